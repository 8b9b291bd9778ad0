//! The receiving side of several streams: where pages land (from any thread), the
//! per-pass barrier, and one thread per extra channel.
//!
//! The barrier is QEMU's multifd sync: the destination acknowledges pass k only once every
//! stream has ended its share of pass k (StreamEnd) and every page before it is in guest
//! memory, and a stream reads nothing of pass k + 1 before that. So a page sent again in
//! pass k + 1 on one stream can never be overwritten by a late pass-k copy on another,
//! whatever the source does.

use super::session::is_disconnect;
use crate::bitmap::AtomicDirtyBitmap;
use crate::migrate::engine::channel::Channel;
use crate::migrate::engine::PAGE;
use crate::migrate::seams::{GuestRam, VmError};
use crate::migrate::wire::{
    Frame, FrameReader, FrameWriter, PagesTarget, StreamStep, StreamValidator, WireError,
};
use std::borrow::Cow;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};

/// Where received pages go, from the main channel and every stream thread at once.
pub(super) struct PageSink {
    memory: Arc<dyn GuestRam>,
    /// Pages received in the current pass: a page that arrives twice, on any streams, is
    /// counted.
    seen: Vec<AtomicDirtyBitmap>,
    /// Pages written since the memory was created or last reset.
    written: Vec<AtomicDirtyBitmap>,
    pages: AtomicU64,
    duplicates: AtomicU64,
}

impl PageSink {
    pub(super) fn new(memory: Arc<dyn GuestRam>) -> Self {
        let bitmaps = || {
            memory
                .regions()
                .iter()
                .map(|r| AtomicDirtyBitmap::new(r.length / PAGE))
                .collect()
        };
        PageSink {
            seen: bitmaps(),
            written: bitmaps(),
            memory,
            pages: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
        }
    }

    /// Write `count` validated pages at `target` (page `count` bytes of `data` each).
    pub(super) fn write(
        &self,
        target: PagesTarget,
        count: u32,
        data: &[u8],
    ) -> Result<(), VmError> {
        let first = target.offset / PAGE;
        let n = u64::from(count);
        // Validated runs lie inside their region, so the bitmaps take them.
        let dup = self.seen[target.region].set_range_counting(first, n);
        self.duplicates
            .fetch_add(dup.unwrap_or_default(), Ordering::Relaxed);
        // Marked before the bytes land, so a reset after a refusal zeroes every page a
        // refused peer may have touched.
        let _ = self.written[target.region].set_range(first, n);
        let gpa = self.memory.regions()[target.region].iova + target.offset;
        for (i, page) in data.chunks_exact(PAGE as usize).enumerate() {
            self.memory.write_page(gpa + i as u64 * PAGE, page)?;
        }
        self.pages.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// A new pass: no page seen yet.
    pub(super) fn new_pass(&self) {
        for b in &self.seen {
            b.clear_all();
        }
    }

    /// Pages received, and pages received twice in a pass, so far.
    pub(super) fn counts(&self) -> (u64, u64) {
        (
            self.pages.load(Ordering::Relaxed),
            self.duplicates.load(Ordering::Relaxed),
        )
    }

    /// Zero every page written since the memory was created or last reset.
    pub(super) fn zero_written(&self) -> Result<(), VmError> {
        let zero = vec![0u8; PAGE as usize];
        for (r, b) in self.memory.regions().iter().zip(&self.written) {
            let mut pages = crate::bitmap::DirtyBitmap::new(b.len());
            // Same length by construction.
            let _ = b.read_and_clear_into(&mut pages);
            for (first, len) in pages.runs() {
                for p in first..first + len {
                    self.memory.write_page(r.iova + p * PAGE, &zero)?;
                }
            }
        }
        Ok(())
    }
}

/// The gate of the per-pass barrier: a stream may read frames of pass k only once k
/// passes are complete (acknowledged to the source, or about to be).
#[derive(Default)]
pub(super) struct Gate {
    complete: Mutex<u32>,
    cv: Condvar,
    ended: AtomicBool,
}

impl Gate {
    /// Wait until pass `pass` may be read; false once the session has ended.
    fn wait_for(&self, pass: u32) -> bool {
        let Ok(mut done) = self.complete.lock() else {
            return false;
        };
        while *done < pass && !self.ended.load(Ordering::SeqCst) {
            done = match self.cv.wait(done) {
                Ok(d) => d,
                Err(_) => return false,
            };
        }
        !self.ended.load(Ordering::SeqCst)
    }

    /// Passes `..=pass` are complete: the streams may go on to the next.
    pub(super) fn complete(&self, pass: u32) {
        if let Ok(mut done) = self.complete.lock() {
            *done = pass.wrapping_add(1);
        }
        self.cv.notify_all();
    }

    /// The session is over: every stream stops.
    pub(super) fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
        // Taken so no stream is between its check and its wait.
        drop(self.complete.lock());
        self.cv.notify_all();
    }
}

/// What a stream thread tells the session.
pub(super) enum StreamMsg {
    /// Stream `stream` ended its share of pass `pass`: `pages` pages, all written.
    PassDone { stream: u32, pass: u32, pages: u64 },
    /// Stream `stream` ended: disconnected or aborted by the source (`breach: None`), or
    /// it broke the protocol.
    Ended {
        stream: u32,
        why: String,
        breach: Option<WireError>,
    },
    /// Writing guest memory failed (the destination's own failure).
    Local(VmError),
}

/// An extra channel of a session, past its Join.
pub(super) struct Joined {
    /// Its reader (which may hold its first pages already).
    pub(super) r: FrameReader<io::BufReader<Box<dyn Channel>>>,
    pub(super) tcp: Option<TcpStream>,
    pub(super) v: StreamValidator,
}

/// How reading a stream stopped.
enum Stop {
    /// Closed, truncated, failed, or aborted by the source.
    Gone(String),
    /// A protocol breach.
    Breach(WireError),
    /// Writing guest memory failed.
    Local(VmError),
}

/// Read and apply one frame: `Some((pass, pages))` when it ends the stream's share of a
/// pass.
fn step<R: io::Read>(
    r: &mut FrameReader<R>,
    v: &mut StreamValidator,
    sink: &PageSink,
) -> Result<Option<(u32, u64)>, Stop> {
    // Closed, truncated or failed: the session decides whether it still needed this
    // stream (the source closes them after the final pass). Garbage is a breach.
    let f = r.read_frame().map_err(|e| match is_disconnect(&e) {
        true => Stop::Gone(e.to_string()),
        false => Stop::Breach(e),
    })?;
    match v.validate(&f).map_err(Stop::Breach)? {
        StreamStep::Pages(t) => {
            if let Frame::Pages { count, data, .. } = &f {
                sink.write(t, *count, data).map_err(Stop::Local)?;
            }
            Ok(None)
        }
        StreamStep::PassDone { pass, pages } => Ok(Some((pass, pages))),
        StreamStep::Aborted => Err(Stop::Gone("the source aborted it".into())),
    }
}

/// Receive one extra stream until it ends or the session does. A protocol breach or a
/// failed write shuts the main channel down too, so the session ends at once.
pub(super) fn receive(
    joined: Joined,
    sink: &PageSink,
    gate: &Gate,
    tx: mpsc::Sender<StreamMsg>,
    main: Option<&TcpStream>,
) {
    let Joined { mut r, mut v, .. } = joined;
    let stream = v.stream();
    let stop = loop {
        if !gate.wait_for(v.pass()) {
            return;
        }
        match step(&mut r, &mut v, sink) {
            Ok(None) => {}
            Ok(Some((pass, pages))) => {
                let _ = tx.send(StreamMsg::PassDone {
                    stream,
                    pass,
                    pages,
                });
            }
            Err(stop) => break stop,
        }
    };
    let msg = match stop {
        Stop::Gone(why) => StreamMsg::Ended {
            stream,
            why,
            breach: None,
        },
        Stop::Breach(e) => {
            // Tell the peer why, best effort.
            let _ = FrameWriter::new(r.get_mut().get_mut()).write_frame(&Frame::Abort {
                reason: Cow::Owned(e.to_string()),
            });
            StreamMsg::Ended {
                stream,
                why: e.to_string(),
                breach: Some(e),
            }
        }
        Stop::Local(e) => StreamMsg::Local(e),
    };
    if !matches!(msg, StreamMsg::Ended { breach: None, .. }) {
        if let Some(t) = main {
            let _ = t.shutdown(Shutdown::Both);
        }
    }
    let _ = tx.send(msg);
}
