//! Where the demo devices can DMA: the DMA-able set inside guest RAM, minus the guest's
//! setup area and the virtio-mem blocks the guest has not plugged (not mapped in the
//! IOMMU, so no device can reach them).

use crate::layout::Layout;
use crate::plan::filter::{dma_able, FilterOptions};
use crate::range::IovaRange;

/// virtio-mem's default block size.
pub const VIRTIO_MEM_BLOCK: u64 = 2 << 20;

/// Whether a RAM section is a virtio-mem device's memory (QEMU names its memory backend
/// `vmemN`, or the owner is a virtio-mem device).
fn is_virtio_mem(name: &str, owner: Option<&str>) -> bool {
    name.starts_with("vmem") || owner.is_some_and(|o| o.contains("virtio-mem"))
}

/// The demo guest's unplugged virtio-mem blocks: one block in four (every fourth 2 MiB
/// block of each virtio-mem section), so plugged memory has holes every 8 MiB, as a guest
/// that plugged and unplugged over time leaves it.
pub fn virtio_mem_unplugged(layout: &Layout) -> Vec<IovaRange> {
    let mut out = Vec::new();
    for s in layout.sections() {
        if !is_virtio_mem(&s.name, s.owner.as_deref()) {
            continue;
        }
        let start = (s.start + VIRTIO_MEM_BLOCK - 1) & !(VIRTIO_MEM_BLOCK - 1);
        let blocks = (s.end().saturating_sub(start as u128) / VIRTIO_MEM_BLOCK as u128) as u64;
        for b in (3..blocks).step_by(4) {
            out.push(IovaRange::new(
                start + b * VIRTIO_MEM_BLOCK,
                VIRTIO_MEM_BLOCK,
            ));
        }
    }
    out
}

/// `ranges` minus `holes` (both sorted, disjoint).
pub fn subtract(ranges: &[IovaRange], holes: &[IovaRange]) -> Vec<IovaRange> {
    let mut out = Vec::new();
    for r in ranges {
        let mut a = r.iova as u128;
        let z = r.end();
        for h in holes {
            let (ha, hz) = (h.iova as u128, h.end());
            if hz <= a || ha >= z {
                continue;
            }
            if ha > a {
                out.push(IovaRange::new(a as u64, (ha - a) as u64));
            }
            a = a.max(hz);
        }
        if a < z {
            out.push(IovaRange::new(a as u64, (z - a) as u64));
        }
    }
    out
}

/// The device's DMA-able memory: the planner's filter over the layout, minus the guest's
/// reserved setup area, inside guest RAM, minus unplugged virtio-mem blocks.
pub fn dma_targets(layout: &Layout, regions: &[IovaRange], reserved: IovaRange) -> Vec<IovaRange> {
    let set = dma_able(layout, &FilterOptions::default());
    let mut out = Vec::new();
    for (_, r) in set.ranges {
        let mut a = r.iova as u128;
        let z = r.end();
        // The reserved area starts the first region, which starts at 0 (checked).
        if a < reserved.end() {
            a = reserved.end();
        }
        for g in regions {
            let (ga, gz) = (g.iova as u128, g.end());
            let (lo, hi) = (a.max(ga), z.min(gz));
            if lo < hi {
                out.push(IovaRange::new(lo as u64, (hi - lo) as u64));
            }
        }
    }
    out.sort_unstable();
    subtract(&out, &virtio_mem_unplugged(layout))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::presets;
    use crate::migrate::scale_ram;

    #[test]
    fn virtio_mem_has_holes_and_targets_avoid_them() {
        let l = scale_ram(&presets::get("q35-virtio-mem").unwrap(), 64);
        let holes = virtio_mem_unplugged(&l);
        assert!(!holes.is_empty());
        let regions: Vec<IovaRange> = crate::migrate::guest_regions(&l)
            .into_iter()
            .map(|(a, n)| IovaRange::new(a, n))
            .collect();
        let t = dma_targets(&l, &regions, IovaRange::new(0, 1 << 20));
        for h in &holes {
            assert!(t
                .iter()
                .all(|r| r.end() <= h.iova as u128 || r.iova as u128 >= h.end()));
        }
        assert!(virtio_mem_unplugged(&presets::get("q35-2g").unwrap()).is_empty());
        assert_eq!(
            subtract(
                &[IovaRange::new(0, 100)],
                &[IovaRange::new(10, 10), IovaRange::new(50, 60)]
            ),
            vec![IovaRange::new(0, 10), IovaRange::new(20, 30)]
        );
    }
}
