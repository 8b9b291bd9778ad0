//! Verification from the source's side: Complete, Verify and the destination's verdict on
//! memory and device state; for guests verified per region, the pages of the regions that
//! differed, so the count is always in pages.

use super::{AttemptEnd, Conn, Source};
use crate::migrate::engine::hooks::Verifier;
use crate::migrate::engine::{max_hashes, AttemptError, PAGE};
use crate::migrate::wire::Frame;
use std::borrow::Cow;

/// What the destination said about its memory and the device state it received.
pub(super) struct Heard {
    /// Every memory hash matched.
    pub(super) memory_ok: bool,
    /// Pages that differ (counted page by page when the verdict was per region).
    pub(super) mismatched: u64,
    /// Counting the pages stopped early: the regions that differed, and why.
    pub(super) uncounted: Option<(u64, String)>,
    /// The source's digest of the device state it sent, and the destination's of what it
    /// received.
    pub(super) device_digests: (u64, u64),
}

impl Heard {
    /// The two device-state digests agree.
    pub(super) fn device_state_matched(&self) -> bool {
        self.device_digests.0 == self.device_digests.1
    }

    /// Why the migration cannot hand over, when it cannot.
    pub(super) fn failure(&self) -> Option<AttemptError> {
        if !self.memory_ok {
            return Some(match &self.uncounted {
                Some((regions, why)) => AttemptError::MismatchUncounted {
                    regions: *regions,
                    pages: self.mismatched,
                    why: why.clone(),
                },
                None => AttemptError::Mismatch(self.mismatched),
            });
        }
        (!self.device_state_matched()).then_some(AttemptError::DeviceStateMismatch {
            ours: self.device_digests.0,
            theirs: self.device_digests.1,
        })
    }
}

impl Source<'_, '_> {
    /// Complete, Verify, the destination's verdict, and (per-region verdicts) the pages.
    pub(super) fn verify(&mut self, c: &mut Conn) -> Result<Heard, AttemptEnd> {
        let regions = self.vm.memory.regions().len();
        let total_pages: u64 = self
            .vm
            .memory
            .regions()
            .iter()
            .map(|r| r.length / PAGE)
            .sum();
        let (digest, hashes) = match self.vm.verifier {
            Some(v) => {
                let h = v
                    .hashes(self.vm.memory, max_hashes())
                    .map_err(|e| AttemptEnd::Abort(e.into()))?;
                (v.digest(&h), h)
            }
            // Unverified: one placeholder per region, which a destination without a
            // verifier does not compare.
            None => (0, vec![0; regions]),
        };
        let per_page = hashes.len() as u64 == total_pages;
        c.w.write_frame(&Frame::Complete {
            total_pages: self.conn_pages,
            digest,
        })?;
        c.w.write_frame(&Frame::Verify {
            digest,
            region_hashes: Cow::Owned(hashes),
        })?;
        c.w.flush()?;
        let (memory_ok, theirs, differ) = match c.r.read_frame()? {
            Frame::VerifyResult {
                ok,
                device_digest,
                mismatched_regions,
                ..
            } => (ok, device_digest, mismatched_regions.into_owned()),
            Frame::Abort { reason } => {
                return Err(AttemptEnd::Abort(AttemptError::DestinationAborted(
                    reason.into_owned(),
                )))
            }
            other => {
                return Err(AttemptEnd::Abort(AttemptError::Unexpected {
                    expected: "VerifyResult",
                    got: other.kind(),
                }))
            }
        };
        // The destination answered: it read everything before its verdict.
        c.acked_bytes = c.bytes();
        let mut heard = Heard {
            memory_ok,
            mismatched: differ.len() as u64,
            uncounted: None,
            device_digests: (self.sent_state.value(), theirs),
        };
        if !memory_ok && !per_page && !differ.is_empty() {
            // The verdict named regions: count their pages, a frame of hashes at a time.
            heard.mismatched = 0;
            let counted = match self.vm.verifier {
                Some(v) => self.count_pages(c, v, &differ, &mut heard.mismatched),
                None => Err("the source has no verifier to hash pages with".into()),
            };
            if let Err(why) = counted {
                log::warn!("counting the pages that differ stopped: {why}");
                heard.uncounted = Some((differ.len() as u64, why));
            }
        }
        Ok(heard)
    }

    /// Send the page hashes of each region in `differ` (in order, in runs that fit a
    /// frame) and add up the destination's count of pages that differ in each run.
    fn count_pages(
        &mut self,
        c: &mut Conn,
        v: &dyn Verifier,
        differ: &[u32],
        found: &mut u64,
    ) -> Result<(), String> {
        let max = max_hashes() as u64;
        for &region in differ {
            let Some(r) = self.vm.memory.regions().get(region as usize).copied() else {
                return Err(format!(
                    "the verdict names region {region}, which this guest lacks"
                ));
            };
            let pages = r.length / PAGE;
            let mut first = 0;
            while first < pages {
                let n = (pages - first).min(max);
                let hashes = v
                    .page_hashes(self.vm.memory, region as usize, first, n)
                    .map_err(|e| e.to_string())?;
                c.w.write_frame(&Frame::VerifyPages {
                    region,
                    first,
                    hashes: Cow::Owned(hashes),
                })
                .and_then(|_| c.w.flush())
                .map_err(|e| format!("sending page hashes: {e}"))?;
                match c.r.read_frame() {
                    Ok(Frame::VerifyPagesResult {
                        region: rr,
                        first: ff,
                        mismatched,
                    }) if rr == region && ff == first && mismatched <= n => *found += mismatched,
                    Ok(other) => {
                        return Err(format!(
                            "expected the count for region {region} from page {first}, got {:?}",
                            other.kind()
                        ))
                    }
                    Err(e) => return Err(format!("no count of differing pages: {e}")),
                }
                c.acked_bytes = c.bytes();
                first += n;
            }
        }
        Ok(())
    }
}
