//! After a verdict that named regions (a guest too large for a frame of page hashes):
//! count the pages that differ in them, from the source's page hashes, one frame at a time,
//! so the count is in pages and memory stays bounded by a frame.

use super::{Session, SessionEnd};
use crate::migrate::engine::channel::Duplex;
use crate::migrate::engine::destination::Destination;
use crate::migrate::engine::{MigrateError, PAGE};
use crate::migrate::wire::{Frame, FrameReader};
use std::io;

impl Destination {
    /// Read the VerifyPages runs of the regions in `differ` (in that order, each from its
    /// first page to its last) and answer each with its count. The verdict stands
    /// whatever happens here: a source that stops early only leaves the count short.
    pub(super) fn narrow(
        &mut self,
        r: &mut FrameReader<io::BufReader<Duplex>>,
        s: &mut Session,
        differ: &[u32],
    ) -> Result<SessionEnd, MigrateError> {
        let regions: Vec<(u32, u64)> = differ
            .iter()
            .filter_map(|&i| {
                let r = self.memory.regions().get(i as usize)?;
                Some((i, r.length / PAGE))
            })
            .collect();
        let total: u64 = regions.iter().map(|r| r.1).sum();
        let mut counted = 0u64;
        let (mut next, mut page) = (0usize, 0u64);
        while let Some(&(region, pages)) = regions.get(next) {
            let f = match r.read_frame() {
                Ok(f) => f,
                Err(e) => return Ok(self.cut_short(counted, total, &e.to_string())),
            };
            let v = s.v.as_mut().expect("set by the handshake");
            if let Err(e) = v.validate(&f) {
                return Ok(self.cut_short(counted, total, &e.to_string()));
            }
            let (first, theirs) = match f {
                Frame::VerifyPages {
                    region: rr,
                    first,
                    hashes,
                } if rr == region && first == page => (first, hashes),
                Frame::VerifyPages { region, first, .. } => {
                    let why =
                        format!("page hashes for region {region} from page {first} out of order");
                    return Ok(self.cut_short(counted, total, &why));
                }
                Frame::Abort { reason } => {
                    let why = format!("the source aborted: {reason}");
                    return Ok(self.cut_short(counted, total, &why));
                }
                other => {
                    let why = format!("expected VerifyPages, got {:?}", other.kind());
                    return Ok(self.cut_short(counted, total, &why));
                }
            };
            let Some(verifier) = self.verifier.clone() else {
                return Ok(self.cut_short(counted, total, "no verifier"));
            };
            let n = theirs.len() as u64;
            let ours = verifier.page_hashes(self.memory.as_ref(), region as usize, first, n)?;
            let mismatched = ours
                .iter()
                .zip(theirs.iter())
                .filter(|(a, b)| a != b)
                .count() as u64;
            self.report.mismatched_pages += mismatched;
            counted += n;
            let answer = Frame::VerifyPagesResult {
                region,
                first,
                mismatched,
            };
            if let Err(e) = s.w.write_frame(&answer) {
                return Ok(self.cut_short(counted, total, &format!("sending the count: {e}")));
            }
            page += n;
            if page == pages {
                (next, page) = (next + 1, 0);
            }
        }
        Ok(SessionEnd::Complete)
    }

    /// The count stopped short of the regions' pages: say so beside the verdict.
    fn cut_short(&mut self, counted: u64, total: u64, why: &str) -> SessionEnd {
        let line = format!(
            "counting the pages that differ stopped after {counted} of {total} page(s): {why}"
        );
        log::warn!("destination: {line}");
        self.report.interrupted.push(line);
        SessionEnd::Complete
    }
}
