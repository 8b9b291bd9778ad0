//! One pass: which pages, and sending them.

use super::{AttemptEnd, Conn, Source};
use crate::migrate::engine::hooks::{Checkpoint, Control};
use crate::migrate::engine::{AttemptError, Event, FRAME_PAGES, PAGE};
use crate::migrate::wire::Frame;
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
    /// at `deadline` (the stop-and-copy pass, with none, sends everything).
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
        let bytes0 = c.w.get_ref().bytes;
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
        let mut sent = 0u64;
        let mut cut = false;
        'runs: for (region, first, len) in runs {
            let base = self.vm.memory.regions()[region].iova;
            let mut at = first;
            while at < first + len {
                let n = (first + len - at).min(FRAME_PAGES as u64);
                for i in 0..n {
                    let bit = at + i;
                    let _ = self.touched[region].set(bit);
                    let _ = self.at_dest[region].set(bit);
                    let off = (i * PAGE) as usize;
                    self.vm
                        .memory
                        .read_page(
                            base + bit * PAGE,
                            &mut self.page_buf[off..off + PAGE as usize],
                        )
                        .map_err(|e| AttemptEnd::Abort(e.into()))?;
                }
                c.w.write_pages(
                    base + at * PAGE,
                    n as u32,
                    &self.page_buf[..(n * PAGE) as usize],
                )?;
                self.report.duplicate_pages_sent +=
                    super::sent::record_run(&mut self.sent[region], at, n);
                sent += n;
                at += n;
                if sent.is_multiple_of(8192) || at == first + len {
                    events(Event::PassProgress { sent });
                }
                let point = Checkpoint::PassProgress {
                    attempt,
                    pass,
                    sent,
                    total,
                };
                if self.hooks.at(point) == Control::DropLink {
                    c.drop_link();
                    return Err(AttemptEnd::Retry(AttemptError::Dropped { pass }));
                }
                if deadline.is_some_and(|d| Instant::now() >= d) && sent < total {
                    cut = true;
                    break 'runs;
                }
            }
        }
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
        let bytes = c.w.get_ref().bytes - bytes0;
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
