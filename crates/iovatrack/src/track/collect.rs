//! Reading dirt from the sources into the ledger, in units the sources cannot drop.
//!
//! A device REPORT acknowledges more than it is asked for ([`ReportGranule`]), and the
//! core's `iova_bitmap_set` drops what falls outside the caller's range after the device
//! forgot it. So a device is queried in whole granules of what it tracks: windows aligned
//! to its negotiated page (mlx5, core), or whole 64-page words from each pds region's
//! start, never past a region. An IOMMU read stops at the first unmapped hole, so it is
//! read per mapped run. The ledger then takes each window's bits, clipped to its regions.

use super::{DirtLedger, TrackError};
use crate::bitmap::Geometry;
use crate::device::{DeviceError, DmaLogger, IommuDirtyTracker, ReportGranule};
use crate::range::{align_down, align_up, IovaRange};

/// What a collect (or unmap query) did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CollectStats {
    /// Successful REPORTs / IOMMU reads.
    pub reports: u64,
    /// Failed ones (each marked the tracked set, or the IOMMU read's window, pending).
    pub report_errors: u64,
    /// Pages newly pending in the ledger.
    pub newly_pending: u64,
    /// Bits set in the reports, at the sources' page sizes.
    pub device_bits: u64,
    /// Devices whose logging was re-armed (STOP, START the same ranges) after a failed
    /// REPORT.
    pub rearms: u64,
    /// Switches to another mode because re-arming failed (see [`super::Tracker::mode`]).
    pub fallbacks: u64,
}

impl CollectStats {
    /// Add another's counts.
    pub fn add(&mut self, other: &CollectStats) {
        self.reports += other.reports;
        self.report_errors += other.report_errors;
        self.newly_pending += other.newly_pending;
        self.device_bits += other.device_bits;
        self.rearms += other.rearms;
        self.fallbacks += other.fallbacks;
    }
}

/// A source of dirt.
#[derive(Clone, Copy)]
pub(super) enum Source<'a> {
    Device(&'a dyn DmaLogger),
    Iommu(&'a dyn IommuDirtyTracker, bool),
}

impl Source<'_> {
    fn read(&self, range: IovaRange, page: u64, bm: &mut [u64]) -> Result<(), DeviceError> {
        match *self {
            Source::Device(d) => d.report(range, page, bm),
            Source::Iommu(i, clear) => i.read_dirty(range, page, bm, clear),
        }
    }

    pub(super) fn name(&self) -> &str {
        match self {
            Source::Device(d) => d.name(),
            Source::Iommu(i, _) => i.name(),
        }
    }
}

/// `[a, b)` as a range (`a < b <= 2^64`; a window reaching 2^64 stops a page short of it,
/// which no REPORT can express anyway).
fn span(a: u128, b: u128) -> Option<IovaRange> {
    let b = b.min(u64::MAX as u128);
    (a < b).then(|| IovaRange::new(a as u64, (b - a) as u64))
}

/// Merge sorted-by-start spans that overlap or touch.
fn merge(mut v: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    v.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Cut `[a, b)` into chunks of at most `step` bytes from `a`.
fn chunks(a: u128, b: u128, step: u128, out: &mut Vec<IovaRange>) {
    let mut at = a;
    while at < b {
        let end = (at + step).min(b);
        if let Some(r) = span(at, end) {
            out.push(r);
        }
        at = end;
    }
}

/// The REPORT windows of one device: whole granules of what it tracks covering `ranges`
/// (or, with `only`, the part of them overlapping it), each at most `chunk_bits` bits at
/// `page`.
pub(super) fn device_windows(
    granule: &ReportGranule,
    ranges: &[IovaRange],
    page: u64,
    chunk_bits: u64,
    only: Option<IovaRange>,
) -> Vec<IovaRange> {
    let page = page.max(1);
    let mut out = Vec::new();
    match granule {
        ReportGranule::DevicePage => {
            // Every window starts and ends on a device page: a page that starts below a
            // window would be acknowledged and dropped.
            let spans = merge(
                ranges
                    .iter()
                    .map(|r| (align_down(r.iova as u128, page), align_up(r.end(), page)))
                    .collect(),
            );
            let step = chunk_bits as u128 * page as u128;
            for (a, b) in spans {
                let (a, b) = match only {
                    None => (a, b),
                    Some(u) => (
                        a.max(align_down(u.iova as u128, page)),
                        b.min(align_up(u.end(), page)),
                    ),
                };
                chunks(a, b, step, &mut out);
            }
        }
        ReportGranule::RegionWords {
            word_pages,
            regions,
        } => {
            let word_pages = (*word_pages).max(1);
            for g in regions {
                if !ranges.iter().any(|r| r.overlaps(&g.range)) {
                    continue;
                }
                // Whole words from the region's start, no more than its bitmap holds per
                // REPORT (a region too small for one word still gets one: the device
                // refuses it, and the refusal is handled like any failed REPORT).
                let pages = (chunk_bits.min(g.max_pages) / word_pages).max(1) * word_pages;
                let step = pages as u128 * g.page_size as u128;
                let (a, b) = (g.range.iova as u128, g.range.end());
                let mut at = a;
                while at < b {
                    let end = (at + step).min(b);
                    let keep = only.is_none_or(|u| (u.iova as u128) < end && u.end() > at);
                    if keep {
                        if let Some(r) = span(at, end) {
                            out.push(r);
                        }
                    }
                    at = end;
                }
            }
        }
    }
    out
}

/// The IOMMU read windows: `ranges` cut at every unmapped hole (reads never span one),
/// with `only`, their part overlapping it widened to `page`, each at most `chunk_bits`
/// bits. The second value of each is the read page: `page`, or the IOMMU's 4 KiB where a
/// mapping edge is not aligned to `page`.
pub(super) fn iommu_windows(
    mapped: Option<&[IovaRange]>,
    ranges: &[IovaRange],
    page: u64,
    chunk_bits: u64,
    only: Option<IovaRange>,
) -> Vec<(IovaRange, u64)> {
    const IOMMU_PAGE: u64 = 4096;
    let runs: Vec<(u128, u128)> = match mapped {
        Some(m) => merge(m.iter().map(|r| (r.iova as u128, r.end())).collect()),
        None => ranges.iter().map(|r| (r.iova as u128, r.end())).collect(),
    };
    let mut out = Vec::new();
    for r in ranges {
        let i = runs.partition_point(|run| run.1 <= r.iova as u128);
        for &(ma, mb) in runs[i..].iter().take_while(|run| run.0 < r.end()) {
            let (mut a, mut b) = ((r.iova as u128).max(ma), r.end().min(mb));
            if let Some(u) = only {
                a = a.max(align_down(u.iova as u128, page));
                b = b.min(align_up(u.end(), page));
            }
            if a >= b {
                continue;
            }
            let p = if a.is_multiple_of(page as u128) && b.is_multiple_of(page as u128) {
                page
            } else {
                IOMMU_PAGE
            };
            let mut v = Vec::new();
            chunks(a, b, chunk_bits as u128 * p as u128, &mut v);
            out.extend(v.into_iter().map(|w| (w, p)));
        }
    }
    out
}

/// Read `chunk` from `src` at `page` into the ledger. `Ok(Err(e))`: the source refused
/// (nothing was added; the caller decides what to mark).
pub(super) fn read_chunk(
    src: Source<'_>,
    chunk: IovaRange,
    page: u64,
    scratch: &mut Vec<u64>,
    ledger: &mut DirtLedger,
    stats: &mut CollectStats,
) -> Result<Result<(), DeviceError>, TrackError> {
    let bits = chunk.length.div_ceil(page);
    let words = bits.div_ceil(64) as usize;
    if scratch.len() < words {
        // Grows to the largest chunk once; later collects reuse it.
        scratch.resize(words, 0);
    }
    let bm = &mut scratch[..words];
    // The sources only OR into the buffer.
    bm.fill(0);
    if let Err(e) = src.read(chunk, page, bm) {
        stats.report_errors += 1;
        return Ok(Err(e));
    }
    stats.reports += 1;
    let set: u64 = bm.iter().map(|w| u64::from(w.count_ones())).sum();
    stats.device_bits += set;
    if set > 0 {
        match Geometry::new(chunk.iova, page, bits) {
            Ok(geo) => stats.newly_pending += ledger.or_report(bm, &geo)?,
            // The last page sticks out past 2^64: mark the chunk whole (conservative).
            Err(_) => stats.newly_pending += ledger.mark_range(chunk),
        }
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::ReportRegion;

    fn r(iova: u64, length: u64) -> IovaRange {
        IovaRange::new(iova, length)
    }

    #[test]
    fn device_page_windows_align_out_and_merge() {
        let m2 = 2 << 20;
        let w = device_windows(
            &ReportGranule::DevicePage,
            &[r(4096, 4096), r(m2 + 4096, 4096), r(3 * m2, m2)],
            m2,
            1 << 20,
            None,
        );
        assert_eq!(w, [r(0, 2 * m2), r(3 * m2, m2)]);
        let w = device_windows(
            &ReportGranule::DevicePage,
            &[r(0, 4 * m2)],
            m2,
            1,
            Some(r(m2 + 5, 1)),
        );
        assert_eq!(w, [r(m2, m2)]);
    }

    #[test]
    fn region_words_windows_start_at_region_words() {
        let g = ReportGranule::RegionWords {
            word_pages: 64,
            regions: vec![ReportRegion {
                range: r(0x10_0000, 200 * 4096),
                page_size: 4096,
                max_pages: 192,
            }],
        };
        let w = device_windows(&g, &[r(0x10_0000 + 70 * 4096, 4096)], 4096, 100, None);
        // 100 bits round down to one word; the last window stops at the region's end.
        assert_eq!(
            w,
            [
                r(0x10_0000, 64 * 4096),
                r(0x10_0000 + 64 * 4096, 64 * 4096),
                r(0x10_0000 + 128 * 4096, 64 * 4096),
                r(0x10_0000 + 192 * 4096, 8 * 4096)
            ]
        );
        let w = device_windows(
            &g,
            &[r(0x10_0000, 4096)],
            4096,
            1 << 20,
            Some(r(0x10_0000 + 199 * 4096, 1)),
        );
        assert_eq!(w, [r(0x10_0000 + 192 * 4096, 8 * 4096)]);
    }

    #[test]
    fn iommu_windows_never_span_a_hole() {
        let mapped = [r(0, 4096), r(4096, 4096), r(4 * 4096, 4096)];
        let w = iommu_windows(Some(&mapped), &[r(0, 8 * 4096)], 4096, 64, None);
        assert_eq!(w, [(r(0, 2 * 4096), 4096), (r(4 * 4096, 4096), 4096)]);
        // A mapping edge off the read page reads at the IOMMU page.
        let w = iommu_windows(Some(&mapped), &[r(0, 8 * 4096)], 8192, 64, None);
        assert_eq!(w, [(r(0, 2 * 4096), 8192), (r(4 * 4096, 4096), 4096)]);
    }
}
