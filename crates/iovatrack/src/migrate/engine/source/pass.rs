//! One pass: which pages, and sending them.

use super::{shutdown, AttemptEnd, Conn, Source};
use crate::migrate::engine::hooks::{Checkpoint, Control};
use crate::migrate::engine::{AttemptError, Event, FRAME_PAGES, PAGE};
use crate::migrate::seams::GuestRam;
use crate::migrate::wire::{Frame, FrameWriter};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// A run of pages to send: (region, first page, count).
type PageRun = (usize, u64, u64);

/// What a pass sent.
pub(super) struct Sent {
    pub(super) pages: u64,
    pub(super) bytes: u64,
    pub(super) secs: f64,
    /// The deadline cut the pass short: only the pages in `Source::sent` went.
    pub(super) cut: bool,
}

impl Source<'_, '_> {
    /// The in-flight pages of the ledger as runs, less the zero pages the destination was
    /// never sent: its memory starts zeroed (a new destination's, or one reset after a
    /// refused peer), so they are there already. This is what makes pass 0 skip zero and
    /// never-written pages, on every attempt and after a new destination too, and keeps a
    /// retry from resending pages that were only marked by a mark-all.
    fn select_pages(&self) -> Result<(Vec<PageRun>, u64), AttemptError> {
        let mut runs: Vec<PageRun> = Vec::new();
        let mut total = 0u64;
        let mut push = |runs: &mut Vec<PageRun>, r: PageRun| {
            total += r.2;
            runs.push(r);
        };
        let memory = self.vm.memory;
        for (region, reg) in memory.regions().iter().enumerate() {
            let at_dest = &self.at_dest[region];
            // Pages never written need not even be read (asked once, when needed).
            let mut never: Option<Option<Vec<u64>>> = None;
            let mut run: Option<(u64, u64)> = None;
            for (first, len) in self.ledger.inflight(region).runs() {
                for b in first..first + len {
                    let skip = !at_dest.is_set(b) && {
                        let never = never.get_or_insert_with(|| memory.never_written(region));
                        let untouched = never
                            .as_ref()
                            .is_some_and(|w| w[(b / 64) as usize] >> (b % 64) & 1 == 1);
                        untouched || memory.is_zero_page(reg.iova + b * PAGE)?
                    };
                    match (&mut run, skip) {
                        (Some(r), false) if r.0 + r.1 == b => r.1 += 1,
                        (Some(r), false) => {
                            push(&mut runs, (region, r.0, r.1));
                            run = Some((b, 1));
                        }
                        (None, false) => run = Some((b, 1)),
                        (Some(r), true) => {
                            push(&mut runs, (region, r.0, r.1));
                            run = None;
                        }
                        (None, true) => {}
                    }
                }
            }
            if let Some(r) = run {
                push(&mut runs, (region, r.0, r.1));
            }
        }
        Ok((runs, total))
    }

    /// Send the in-flight pages of the ledger as pass `pass`; a pre-copy pass stops early
    /// at `deadline` (the stop-and-copy pass, with none, sends everything). The pages go
    /// in frames dealt out over every stream, each frame to whichever sender is free next,
    /// so a page travels on exactly one stream; every extra stream ends its share with a
    /// StreamEnd, and the main channel the pass with PassEnd (or PassCut).
    pub(super) fn send_pass(
        &mut self,
        c: &mut Conn,
        attempt: u32,
        pass: u32,
        deadline: Option<Instant>,
        events: &mut dyn FnMut(Event),
    ) -> Result<Sent, AttemptEnd> {
        let final_pass = deadline.is_none();
        let started = Instant::now();
        let bytes0 = c.bytes();
        let (runs, total) = self.select_pages()?;
        events(Event::PassStart {
            attempt,
            pass,
            pages: total,
            final_pass,
        });
        c.w.write_frame(&Frame::PassBegin { pass, pages: total })?;
        for s in &mut self.sent {
            s.clear();
        }
        let frames = split(&runs);
        let deal = Deal {
            memory: self.vm.memory,
            frames: &frames,
            next: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            deadline,
        };
        let hooks = &mut *self.hooks;
        // Pre-copy passes read the CPU log every `cpu_log_interval` (see `harvest`); the
        // stop-and-copy pass runs paused, its dirt read once before it.
        let every = deadline.and(self.cfg.cpu_log_interval);
        let mut next_read = every.map(|e| Instant::now() + e);
        let (cpu_log, bufs, ledger, rate) = (
            self.vm.cpu_log,
            &mut self.cpu_log,
            &mut self.ledger,
            &mut self.rate,
        );
        let mut read = super::harvest::Harvest::default();
        let (main, shares) = std::thread::scope(|s| {
            let senders: Vec<_> = c
                .streams
                .iter_mut()
                .map(|st| {
                    let deal = &deal;
                    s.spawn(move || deal.stream_share(&mut st.w, pass))
                })
                .collect();
            // The main channel's share, with the hooks between its frames (they may drop
            // the link half-way).
            let mut reported = 0;
            let mut main = Ok(());
            while let Some(i) = deal.claim() {
                if let Err(e) = deal.send(&mut c.w, i) {
                    main = Err(AttemptEnd::from(e));
                    break;
                }
                let sent = deal.sent.load(Ordering::Relaxed);
                if sent / 8192 > reported / 8192 {
                    events(Event::PassProgress { sent });
                    reported = sent;
                }
                let point = Checkpoint::PassProgress {
                    attempt,
                    pass,
                    sent,
                    total,
                };
                if hooks.at(point) == Control::DropLink {
                    main = Err(AttemptEnd::Retry(AttemptError::Dropped { pass }));
                    break;
                }
                if let (Some(at), Some(e)) = (next_read, every) {
                    if Instant::now() >= at {
                        match super::harvest::harvest(cpu_log, bufs, ledger) {
                            Ok(h) => {
                                rate.close(h.bits);
                                read.bits += h.bits;
                                read.new += h.new;
                            }
                            Err(e) => {
                                main = Err(AttemptEnd::from(e));
                                break;
                            }
                        }
                        next_read = Some(Instant::now() + e);
                    }
                }
            }
            if main.is_err() {
                // One channel failed: the attempt fails, and every sender stops now.
                deal.stop.store(true, Ordering::Relaxed);
                shutdown(c.tcp.as_ref(), &c.stream_tcp);
            }
            let shares: Vec<_> = senders
                .into_iter()
                .map(|h| h.join().unwrap_or(Err(Failed::Panicked)))
                .collect();
            (main, shares)
        });
        self.report.cpu_dirty_pages += read.bits;
        self.mid_pass_new += read.new;
        // Frames dealt out may have arrived even if the pass failed: the destination's
        // memory may hold them now (never zero-skip them again).
        let claimed = deal.claimed();
        for &(region, first, n) in &frames[..claimed] {
            self.report.duplicate_pages_sent +=
                super::sent::record_run(&mut self.sent[region], first, n);
            let _ = self.touched[region].set_range(first, n);
            let _ = self.at_dest[region].set_range(first, n);
        }
        main?;
        for share in shares {
            match share {
                Ok(_) => {}
                Err(Failed::End(e)) => {
                    c.drop_link();
                    return Err(e);
                }
                Err(Failed::Panicked) => {
                    c.drop_link();
                    return Err(AttemptEnd::Abort(AttemptError::Io(io::Error::other(
                        "a stream sender panicked",
                    ))));
                }
                // Stopped only because another channel failed, which says why.
                Err(Failed::Stopped) => {}
            }
        }
        let sent = deal.sent.load(Ordering::Relaxed);
        let cut = claimed < frames.len();
        events(Event::PassProgress { sent });
        if self.hooks.at(Checkpoint::PassSent { attempt, pass }) == Control::DropLink {
            c.drop_link();
            return Err(AttemptEnd::Retry(AttemptError::Dropped { pass }));
        }
        c.w.write_frame(&if cut {
            Frame::PassCut {
                pass,
                pages_sent: sent,
            }
        } else {
            Frame::PassEnd {
                pass,
                pages_sent: sent,
            }
        })?;
        c.w.flush()?;
        let secs = started.elapsed().as_secs_f64();
        let bytes = c.bytes() - bytes0;
        if bytes > 1 << 20 && secs > 0.0 {
            self.bandwidth = bytes as f64 / secs;
        }
        self.conn_pages += sent;
        Ok(Sent {
            pages: sent,
            bytes,
            secs,
            cut,
        })
    }
}

/// A pass's pages cut into frames of at most [`FRAME_PAGES`]: (region, first page, count).
fn split(runs: &[PageRun]) -> Vec<PageRun> {
    let mut frames = Vec::new();
    for &(region, first, len) in runs {
        let mut at = first;
        while at < first + len {
            let n = (first + len - at).min(FRAME_PAGES as u64);
            frames.push((region, at, n));
            at += n;
        }
    }
    frames
}

/// Why a stream's sender stopped short.
enum Failed {
    /// Its channel failed, or guest memory could not be read.
    End(AttemptEnd),
    /// Another channel failed first.
    Stopped,
    /// The sender thread panicked.
    Panicked,
}

/// One pass's frames, dealt out to the senders: each takes the next frame not yet taken,
/// so every frame goes exactly once, and a slow stream simply takes fewer.
struct Deal<'a> {
    memory: &'a dyn GuestRam,
    frames: &'a [PageRun],
    next: AtomicUsize,
    /// Pages sent so far over all streams.
    sent: AtomicU64,
    /// Set when the attempt fails: senders take no more frames.
    stop: AtomicBool,
    deadline: Option<Instant>,
}

impl Deal<'_> {
    /// The next frame to send, unless the pass is over, failed, or past its deadline
    /// (checked before taking one, so every frame taken is sent).
    fn claim(&self) -> Option<usize> {
        if self.stop.load(Ordering::Relaxed) || self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        (i < self.frames.len()).then_some(i)
    }

    /// Frames taken: `frames[..claimed()]`, once every sender is done.
    fn claimed(&self) -> usize {
        self.next.load(Ordering::Relaxed).min(self.frames.len())
    }

    /// Frame `i`, its pages copied out of guest memory straight into the send buffer.
    /// That one copy is needed: the CRC must cover stable bytes, and a running vCPU may
    /// change a guest page between the CRC and the socket's copy; nothing else copies
    /// the pages before the socket does.
    fn send<W: io::Write>(&self, w: &mut FrameWriter<W>, i: usize) -> Result<(), AttemptError> {
        let (region, first, n) = self.frames[i];
        let base = self.memory.regions()[region].iova + first * PAGE;
        let len = (n * PAGE) as usize;
        w.write_pages_with(base, n as u32, len, |data| {
            for (k, page) in data.chunks_exact_mut(PAGE as usize).enumerate() {
                self.memory.read_page(base + k as u64 * PAGE, page)?;
            }
            Ok::<_, AttemptError>(())
        })?;
        self.sent.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// An extra stream's share of pass `pass`, ended with its StreamEnd.
    fn stream_share<W: io::Write>(&self, w: &mut FrameWriter<W>, pass: u32) -> Result<u64, Failed> {
        let mut pages = 0;
        let fail = |e: AttemptError| {
            // The others stop too: the attempt is lost.
            self.stop.store(true, Ordering::Relaxed);
            Failed::End(e.into())
        };
        while let Some(i) = self.claim() {
            self.send(w, i).map_err(fail)?;
            pages += self.frames[i].2;
        }
        if self.stop.load(Ordering::Relaxed) {
            return Err(Failed::Stopped);
        }
        w.write_frame(&Frame::StreamEnd { pass, pages })
            .and_then(|_| w.flush())
            .map_err(|e| fail(e.into()))?;
        Ok(pages)
    }
}
