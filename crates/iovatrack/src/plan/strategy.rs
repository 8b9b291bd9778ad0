//! The strategies proper.

use super::combine::combine;
use super::filter::DmaSet;
use super::PlanError;
use crate::layout::Layout;
use crate::range::{align_down, align_up, IovaRange};

fn to_range(first: u128, end: u128) -> Result<IovaRange, PlanError> {
    let len = end - first;
    if len > u64::MAX as u128 {
        return Err(PlanError::WholeSpace);
    }
    Ok(IovaRange::new(first as u64, len as u64))
}

/// Align each range outward to `page` and merge those that touch or overlap.
pub(super) fn merge_touching(
    ranges: impl Iterator<Item = IovaRange>,
    page: u64,
) -> Result<Vec<IovaRange>, PlanError> {
    let mut out: Vec<(u128, u128)> = Vec::new();
    for r in ranges {
        let (s, e) = (align_down(r.iova as u128, page), align_up(r.end(), page));
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter().map(|(s, e)| to_range(s, e)).collect()
}

/// Minimum tracked bytes for at most `max` ranges. The DMA set is sorted and disjoint, so
/// after merging touching intervals every remaining gap is positive; closing a gap adds
/// exactly its size and removes exactly one range, and gaps do not change as others close,
/// so closing the `n − max` smallest is optimal (an exchange argument).
pub(super) fn optimal(set: &DmaSet, page: u64, max: usize) -> Result<Vec<IovaRange>, PlanError> {
    let merged = merge_touching(set.ranges.iter().map(|r| r.1), page)?;
    Ok(combine(&merged, max))
}

/// pds: the firmware rounds each region's page count up to whole words of `align` pages
/// but never into the next region (`limits::pds_regions`), and 6.8 refuses a region left
/// off a word. Close every gap narrower than that rounding: the device would track those
/// pages anyway, and START then succeeds. Only ever merges (the count can only drop).
pub(super) fn pds_room(ranges: Vec<IovaRange>, page: u64, align: u64) -> Vec<IovaRange> {
    let mut out: Vec<IovaRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        if let Some(last) = out.last_mut() {
            let rounded = last.length.div_ceil(page).div_ceil(align) * align;
            if (r.iova as u128) < last.iova as u128 + rounded as u128 * page as u128 {
                let end = r.end().max(last.end());
                *last = IovaRange::new(last.iova, (end - last.iova as u128) as u64);
                continue;
            }
        }
        out.push(r);
    }
    out
}

/// One range per DMA-able section, aligned outward to the tracking page (sections that
/// then overlap are merged so the kernel accepts them).
pub(super) fn per_section(set: &DmaSet, page: u64) -> Result<Vec<IovaRange>, PlanError> {
    let mut out: Vec<(u128, u128)> = Vec::new();
    for (_, r) in &set.ranges {
        let (s, e) = (align_down(r.iova as u128, page), align_up(r.end(), page));
        match out.last_mut() {
            Some(last) if s < last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter().map(|(s, e)| to_range(s, e)).collect()
}

/// QEMU's `vfio_dirty_tracking_update_range` buckets, emitted as
/// `vfio_device_feature_dma_logging_start_create` does: 32, 64, pci64, each present iff its
/// max is non-zero. Quirks kept: pci64 tests `iova >= 0xFFFFFFFF` while 32-bit tests
/// `end <= 0xFFFFFFFF`, and a section straddling 4 GiB goes to the 64-bit bucket.
pub(super) fn qemu(layout: &Layout, set: &DmaSet) -> Vec<IovaRange> {
    const U32: u64 = 0xFFFF_FFFF;
    let mut b = [(U32, 0u64), (u64::MAX, 0), (u64::MAX, 0)];
    for &(i, r) in &set.ranges {
        let (iova, end) = (r.iova, (r.end() - 1) as u64);
        let pci = layout.sections()[i].vfio_pci;
        let k = if pci && iova >= U32 {
            2
        } else if end <= U32 {
            0
        } else {
            1
        };
        b[k].0 = b[k].0.min(iova);
        b[k].1 = b[k].1.max(end);
    }
    b.iter()
        .filter(|(_, max)| *max != 0)
        // QEMU's `max - min + 1`; a bucket reaching 2^64 − 1 from 0 cannot occur after
        // inward alignment (the last page would need to start at 2^64).
        .map(|&(min, max)| IovaRange::new(min, max.wrapping_sub(min).wrapping_add(1)))
        .collect()
}
