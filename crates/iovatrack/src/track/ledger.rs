//! Pending and in-flight dirt per RAM region.
//!
//! Dirt read from a device, an IOMMU or KVM is cleared at its source, so the ledger is its
//! only copy: it stays *pending* until a pass takes it (*in flight*), and leaves the ledger
//! only when the destination acknowledges that pass. A failed or cancelled pass puts it
//! back. A page dirtied again during a pass is pending again (it may have been sent before
//! the write), so it goes in the next pass — never lost, never twice in one pass.

use super::TrackError;
use crate::bitmap::{BitmapError, DirtyBitmap, Geometry};
use crate::range::{is_pow2, IovaRange};

/// Why a region list was refused by [`DirtLedger::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionProblem {
    /// Zero length.
    Empty,
    /// Start or length not a multiple of the page size.
    Misaligned,
    /// Starts before the previous region ends (regions must be sorted and disjoint).
    Overlap,
}

impl std::fmt::Display for RegionProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RegionProblem::Empty => "is empty",
            RegionProblem::Misaligned => "is not aligned to the page size",
            RegionProblem::Overlap => "is not sorted after, or overlaps, the previous region",
        })
    }
}

/// Dirt per RAM region, one bit per page: pending (to send) and in flight (being sent).
#[derive(Clone, Debug)]
pub struct DirtLedger {
    regions: Vec<IovaRange>,
    page_size: u64,
    shift: u32,
    pending: Vec<DirtyBitmap>,
    inflight: Vec<DirtyBitmap>,
    pending_count: u64,
    inflight_count: u64,
    in_pass: bool,
}

fn ones(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

impl DirtLedger {
    /// A ledger over `regions` (sorted, disjoint, non-empty, aligned to `page_size`, a
    /// power of two ≥ 4 KiB), everything clean.
    pub fn new(regions: &[IovaRange], page_size: u64) -> Result<Self, TrackError> {
        if !is_pow2(page_size) || page_size < 4096 {
            return Err(crate::bitmap::BitmapError::BadPageSize(page_size).into());
        }
        let mut prev_end = 0u128;
        for (index, &range) in regions.iter().enumerate() {
            let problem = if range.length == 0 {
                Some(RegionProblem::Empty)
            } else if !range.is_aligned(page_size) {
                Some(RegionProblem::Misaligned)
            } else if index > 0 && (range.iova as u128) < prev_end {
                Some(RegionProblem::Overlap)
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(TrackError::Region {
                    index,
                    range,
                    problem,
                });
            }
            prev_end = range.end();
        }
        let shift = page_size.trailing_zeros();
        let bitmaps: Vec<DirtyBitmap> = regions
            .iter()
            .map(|r| DirtyBitmap::new(r.length >> shift))
            .collect();
        Ok(Self {
            regions: regions.to_vec(),
            page_size,
            shift,
            inflight: bitmaps.clone(),
            pending: bitmaps,
            pending_count: 0,
            inflight_count: 0,
            in_pass: false,
        })
    }

    /// The regions, as given.
    pub fn regions(&self) -> &[IovaRange] {
        &self.regions
    }

    /// Bytes per bit.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Total pages of all regions.
    pub fn total_pages(&self) -> u64 {
        self.pending.iter().map(DirtyBitmap::len).sum()
    }

    /// The region holding `addr`, if any.
    pub fn region_of(&self, addr: u64) -> Option<usize> {
        let i = self.regions.partition_point(|r| r.end() <= addr as u128);
        self.regions.get(i).filter(|r| r.contains(addr)).map(|_| i)
    }

    /// Mark every page of every region pending (e.g. the first pass).
    pub fn mark_all(&mut self) {
        for b in &mut self.pending {
            let n = b.len();
            // Cannot fail: the range is the bitmap's own length.
            let _ = b.set_range(0, n);
        }
        self.pending_count = self.total_pages();
    }

    /// Regions overlapping `[lo, hi)`, with the overlap.
    fn overlapping(&self, lo: u128, hi: u128) -> impl Iterator<Item = (usize, u128, u128)> + '_ {
        let first = self.regions.partition_point(|r| r.end() <= lo);
        self.regions[first..]
            .iter()
            .enumerate()
            .take_while(move |(_, r)| (r.iova as u128) < hi)
            .map(move |(k, r)| (first + k, lo.max(r.iova as u128), hi.min(r.end())))
    }

    /// Pending bits of `region` touching bytes `[lo, hi)` (inside the region): word span.
    fn word_span(&self, region: usize, lo: u128, hi: u128) -> (usize, usize) {
        let base = self.regions[region].iova as u128;
        let k0 = ((lo - base) >> self.shift) as usize;
        let k1 = ((hi - 1 - base) >> self.shift) as usize;
        (k0 / 64, k1 / 64 + 1)
    }

    /// Mark every page sharing a byte with `range` pending (clipped to the regions).
    /// Returns the pages that were not pending before.
    pub fn mark_range(&mut self, range: IovaRange) -> u64 {
        if range.length == 0 {
            return 0;
        }
        let spans: Vec<_> = self.overlapping(range.iova as u128, range.end()).collect();
        let mut new = 0;
        for (i, lo, hi) in spans {
            let base = self.regions[i].iova as u128;
            let k0 = ((lo - base) >> self.shift) as u64;
            let k1 = ((hi - 1 - base) >> self.shift) as u64;
            let (w0, w1) = self.word_span(i, lo, hi);
            let b = &mut self.pending[i];
            let before = ones(&b.words()[w0..w1]);
            // In range by construction.
            let _ = b.set_range(k0, k1 - k0 + 1);
            new += ones(&b.words()[w0..w1]) - before;
        }
        self.pending_count += new;
        new
    }

    /// OR a whole-region bitmap at the ledger's page size (e.g. a KVM memslot's dirty log)
    /// into `region`'s pending dirt. `words` must be exactly the region's word count.
    /// Returns the pages newly pending.
    pub fn or_region_words(&mut self, region: usize, words: &[u64]) -> Result<u64, TrackError> {
        let regions = self.regions.len();
        let b = self
            .pending
            .get_mut(region)
            .ok_or(TrackError::NoSuchRegion { region, regions })?;
        let new = b.or_words_counting(words)?;
        self.pending_count += new;
        Ok(new)
    }

    /// OR a bitmap of any base and page size (a device REPORT, an IOMMU read) into the
    /// pending dirt of every region it overlaps; a coarse bit marks every ledger page it
    /// touches. Returns the pages newly pending.
    pub fn or_report(&mut self, report: &[u64], geo: &Geometry) -> Result<u64, TrackError> {
        if report.len() < geo.words() {
            return Err(crate::bitmap::BitmapError::WordCount {
                words: report.len(),
                bits: geo.bits(),
            }
            .into());
        }
        if geo.bits() == 0 {
            return Ok(0);
        }
        let spans: Vec<_> = self.overlapping(geo.base() as u128, geo.end()).collect();
        let mut new = 0;
        for (i, lo, hi) in spans {
            let (w0, w1) = self.word_span(i, lo, hi);
            let base = self.regions[i].iova;
            let (page, b) = (self.page_size, &mut self.pending[i]);
            let before = ones(&b.words()[w0..w1]);
            b.or_regranular(base, page, report, geo)?;
            new += ones(&b.words()[w0..w1]) - before;
        }
        self.pending_count += new;
        Ok(new)
    }

    /// Pages pending (not yet in a pass).
    pub fn pending_pages(&self) -> u64 {
        self.pending_count
    }

    /// Pages of the pass in flight.
    pub fn inflight_pages(&self) -> u64 {
        self.inflight_count
    }

    /// Whether a pass is in flight (begun, neither acknowledged nor rolled back).
    pub fn pass_in_flight(&self) -> bool {
        self.in_pass
    }

    /// The pending bitmap of a region.
    pub fn pending(&self, region: usize) -> &DirtyBitmap {
        &self.pending[region]
    }

    /// Start a pass: every pending page moves to in flight. Refused while a previous pass
    /// is neither acknowledged nor rolled back. Returns the pages in the pass.
    pub fn begin_pass(&mut self) -> Result<u64, TrackError> {
        if self.in_pass {
            return Err(TrackError::PassInFlight);
        }
        for (p, f) in self.pending.iter_mut().zip(&mut self.inflight) {
            // In-flight bitmaps are clear outside a pass; same lengths by construction.
            p.take_into(f)?;
        }
        self.inflight_count = self.pending_count;
        self.pending_count = 0;
        self.in_pass = true;
        Ok(self.inflight_count)
    }

    /// The in-flight bitmap of a region: what this pass sends (iterate `.runs()`; bit k is
    /// page `regions()[region].iova + k * page_size()`).
    pub fn inflight(&self, region: usize) -> &DirtyBitmap {
        &self.inflight[region]
    }

    /// The destination acknowledged the pass: in-flight dirt is done. No-op outside a pass.
    pub fn ack(&mut self) {
        for f in &mut self.inflight {
            f.clear();
        }
        self.inflight_count = 0;
        self.in_pass = false;
    }

    /// The destination acknowledged part of the pass (a pass cut short): the pages set in
    /// `delivered` (one bitmap per region) are done, every other in-flight page is pending
    /// again. Returns the pages that went back. No-op outside a pass.
    pub fn ack_delivered(&mut self, delivered: &[DirtyBitmap]) -> Result<u64, TrackError> {
        if !self.in_pass {
            return Ok(0);
        }
        if delivered.len() != self.inflight.len() {
            return Err(BitmapError::LengthMismatch {
                left: self.inflight.len() as u64,
                right: delivered.len() as u64,
            }
            .into());
        }
        let mut back = 0;
        for ((p, f), d) in self
            .pending
            .iter_mut()
            .zip(&mut self.inflight)
            .zip(delivered)
        {
            f.and_not_assign(d)?;
            back += f.count_ones();
            p.or_assign(f)?;
            f.clear();
        }
        self.pending_count = self.pending.iter().map(DirtyBitmap::count_ones).sum();
        self.inflight_count = 0;
        self.in_pass = false;
        Ok(back)
    }

    /// The pass failed or was cancelled: in-flight dirt is pending again. No-op outside a
    /// pass.
    pub fn rollback(&mut self) {
        if !self.in_pass {
            return;
        }
        let mut count = 0;
        for (p, f) in self.pending.iter_mut().zip(&mut self.inflight) {
            // Same lengths by construction; cannot fail.
            let _ = p.or_assign(f);
            f.clear();
            count += p.count_ones();
        }
        self.pending_count = count;
        self.inflight_count = 0;
        self.in_pass = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_delivered_keeps_what_was_not_delivered() {
        let regions = [
            IovaRange::new(0, 64 * 4096),
            IovaRange::new(1 << 30, 64 * 4096),
        ];
        let mut l = DirtLedger::new(&regions, 4096).unwrap();
        l.mark_range(IovaRange::new(0, 10 * 4096));
        l.mark_range(IovaRange::new(1 << 30, 4 * 4096));
        assert_eq!(l.begin_pass().unwrap(), 14);
        // Dirt arriving during the pass is pending beside the pass.
        l.mark_range(IovaRange::new(20 * 4096, 4096));
        let mut delivered = vec![DirtyBitmap::new(64), DirtyBitmap::new(64)];
        delivered[0].set_range(0, 6).unwrap();
        assert_eq!(
            l.ack_delivered(&delivered).unwrap(),
            8,
            "4 + 4 pages go back"
        );
        assert_eq!(l.pending_pages(), 9);
        assert!(!l.pending(0).is_set(0) && l.pending(0).is_set(6) && l.pending(0).is_set(20));
        assert!(l.pending(1).is_set(3));
        // Outside a pass it does nothing; wrong shapes are refused.
        assert_eq!(l.ack_delivered(&delivered).unwrap(), 0);
        l.begin_pass().unwrap();
        assert!(l.ack_delivered(&delivered[..1]).is_err());
        // Negative control: a plain ack would have lost the undelivered pages.
        l.ack();
        assert_eq!(l.pending_pages(), 0);
    }
}
