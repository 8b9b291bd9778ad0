//! Live migration: the seams a VMM implements, the pre-copy engine, the wire protocol,
//! and the demo harness (a guest, DMA devices, faults) that `iovatrack migrate` runs.
//!
//! * [`seams`]: the traits the engine talks to (guest RAM, vCPUs, CPU dirty log, device
//!   migration) and their implementations for this crate's parts and VFIO devices.
//! * [`engine`]: the pre-copy loop (source) and the receiver (destination).
//! * [`wire`]: the framed, versioned, checksummed protocol.
//! * [`vm_memory`]: guest memory from `vm-memory`, layouts from it, dirt as range tables.
//! * [`guest`]: guest RAM and a CPU that dirties it (a real KVM vCPU, or software).
//! * [`demo`]: DMA workloads, fault injection, verification, and the runs of the CLI.

pub mod demo;
pub mod engine;
pub mod guest;
pub mod seams;
pub mod vm_memory;
pub mod wire;

use crate::layout::{Layout, Section, SectionKind};

/// Guest RAM regions of a layout: its RAM-backed sections (`ram`, and `rom` which QEMU
/// backs with RAM too), merged across gaps smaller than 1 MiB (MMIO overlays such as the
/// VGA window punch holes in one RAM block), aligned outward to 4 KiB.
pub fn guest_regions(layout: &Layout) -> Vec<(u64, u64)> {
    const JOIN: u128 = 1 << 20;
    let mut out: Vec<(u128, u128)> = Vec::new();
    for s in layout.sections() {
        if !matches!(s.kind, SectionKind::Ram | SectionKind::Rom) || s.start >> 63 != 0 {
            continue;
        }
        let (a, z) = ((s.start as u128) & !0xfff, (s.end() + 0xfff) & !0xfff);
        match out.last_mut() {
            Some(l) if a <= l.1 + JOIN && a >= l.1 => l.1 = z,
            Some(l) if a < l.1 => l.1 = l.1.max(z),
            _ => out.push((a, z)),
        }
    }
    out.into_iter()
        .filter(|(a, z)| z > a && *z <= u64::MAX as u128)
        .map(|(a, z)| (a as u64, (z - a) as u64))
        .collect()
}

/// A copy of `layout` with every `ram` section shrunk by `factor` (keeping its start, at
/// least 4 MiB), so a 16 GiB or 1 TiB layout keeps its shape — holes, relocations, region
/// count — at a size a test machine migrates in seconds.
pub fn scale_ram(layout: &Layout, factor: u64) -> Layout {
    if factor <= 1 {
        return layout.clone();
    }
    let secs: Vec<Section> = layout
        .sections()
        .iter()
        .map(|s| {
            let mut s = s.clone();
            if s.kind == SectionKind::Ram && s.size() > 8 << 20 {
                let size = ((s.size() / factor as u128).max(4 << 20) as u64) & !0xfff;
                s.last = s.start + size - 1;
            }
            s
        })
        .collect();
    Layout::new(layout.address_space(), secs)
        .expect("shrinking sections in place keeps them disjoint")
        .with_viommu(layout.viommu())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::presets;

    #[test]
    fn q35_regions() {
        let l = presets::get("q35-2g").unwrap();
        let r = guest_regions(&l);
        assert_eq!(
            r[0],
            (0, 1 << 30),
            "pc.ram below 4 GiB is one block despite the VGA window"
        );
        assert!(
            r.iter().any(|&(a, n)| a <= 1 << 32 && a + n == 5 << 30),
            "{r:x?}"
        );
        let s = scale_ram(&presets::get("amd-1t").unwrap(), 1024);
        assert!(guest_regions(&s).iter().all(|r| r.1 <= 2 << 30));
        assert_eq!(
            s.sections().len(),
            presets::get("amd-1t").unwrap().sections().len()
        );
    }
}
