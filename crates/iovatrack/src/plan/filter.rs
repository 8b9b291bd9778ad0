//! The DMA-able set: which bytes a passthrough device can DMA-write.
//!
//! Rules (docs/design.md, from QEMU master's `vfio_listener_valid_section` and
//! `vfio_get_section_iova_range`, minus what the seed thread rejected): keep `ram`; drop
//! `io`, `romd`, read-only, protected and bit-63 sections; drop `ram_device` unless asked
//! (another device's BAR migrates its own state); drop a section whose start and
//! offset-in-region disagree modulo the host page; align the rest inward to the host page.

use crate::layout::{Layout, SectionKind};
use crate::range::{align_down, align_up, IovaRange};
use serde::Serialize;

/// Choices of the filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterOptions {
    /// Host (IOMMU mapping) page size: sections are aligned inward to it.
    pub host_page_size: u64,
    /// Keep `ram_device` sections (P2P targets). QEMU does; the default does not.
    pub include_ram_device: bool,
    /// Keep read-only sections. Released QEMU does; the readonly-bypass patch and the
    /// default do not (the IOMMU maps them read-only).
    pub include_readonly: bool,
    /// Keep IOMMU sections whole (only meaningful once the vIOMMU blocker is waived).
    pub include_iommu: bool,
}

impl Default for FilterOptions {
    fn default() -> Self {
        FilterOptions {
            host_page_size: 4096,
            include_ram_device: false,
            include_readonly: false,
            include_iommu: false,
        }
    }
}

impl FilterOptions {
    /// Released QEMU's rules (8.0 to 10.x, `vfio_listener_valid_section(section,
    /// "tracking_update")`): ram_device kept, read-only RAM (ROM) kept, since
    /// `memory_region_is_ram` is true for it.
    pub fn qemu(host_page_size: u64) -> Self {
        FilterOptions {
            host_page_size,
            include_ram_device: true,
            include_readonly: true,
            include_iommu: true,
        }
    }

    /// QEMU with the readonly-bypass patch (`5c9da3d65d`): read-only sections skipped.
    pub fn qemu_bypass_ro(host_page_size: u64) -> Self {
        FilterOptions {
            include_readonly: false,
            ..Self::qemu(host_page_size)
        }
    }
}

/// Why a section is not DMA-able.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SkipReason {
    /// MMIO dispatch, not memory.
    Io,
    /// A ROM device in romd mode (not RAM for VFIO).
    Romd,
    /// A vIOMMU region.
    Iommu,
    /// Protected RAM (never DMA-mapped).
    Protected,
    /// Bit 63 set: a BAR-sizing artefact.
    Bit63,
    /// Read-only (mapped read-only in the IOMMU: no DMA write can land).
    Readonly,
    /// Another device's memory (P2P target); `--include-ram-device` keeps it.
    RamDevice,
    /// Start and offset-in-region disagree modulo the host page: cannot be DMA-mapped.
    Misaligned,
    /// Nothing left after aligning inward to the host page.
    SubPage,
}

impl SkipReason {
    /// A short human explanation.
    pub fn describe(self) -> &'static str {
        match self {
            SkipReason::Io => "i/o: not memory",
            SkipReason::Romd => "romd: ROM device, not RAM",
            SkipReason::Iommu => "iommu region",
            SkipReason::Protected => "protected RAM",
            SkipReason::Bit63 => "bit 63 set (BAR sizing)",
            SkipReason::Readonly => "read-only: no DMA write",
            SkipReason::RamDevice => "ram_device: another device's BAR",
            SkipReason::Misaligned => "start/offset misaligned to host page",
            SkipReason::SubPage => "smaller than a host page once aligned",
        }
    }
}

/// The DMA-able set of a layout.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DmaSet {
    /// `(section index, aligned range)` in address order; ranges are disjoint.
    pub ranges: Vec<(usize, IovaRange)>,
    /// `(section index, reason)` of every section left out.
    pub skipped: Vec<(usize, SkipReason)>,
    /// Sum of the kept ranges.
    pub bytes: u128,
}

/// Apply the filter to every section.
pub fn dma_able(layout: &Layout, opts: &FilterOptions) -> DmaSet {
    let hps = opts.host_page_size;
    let mask = hps - 1;
    let mut set = DmaSet::default();
    for (i, s) in layout.sections().iter().enumerate() {
        let reason = match s.kind {
            SectionKind::Io => Some(SkipReason::Io),
            SectionKind::Romd => Some(SkipReason::Romd),
            SectionKind::Iommu if !opts.include_iommu => Some(SkipReason::Iommu),
            _ if s.protected => Some(SkipReason::Protected),
            _ if s.start & (1 << 63) != 0 => Some(SkipReason::Bit63),
            _ if s.readonly && !opts.include_readonly => Some(SkipReason::Readonly),
            SectionKind::RamDevice if !opts.include_ram_device => Some(SkipReason::RamDevice),
            // IOMMU regions are not backed by a RAM block, so no offset rule applies.
            SectionKind::Iommu => None,
            _ if s.start & mask != s.offset_in_region & mask => Some(SkipReason::Misaligned),
            _ => None,
        };
        if let Some(r) = reason {
            set.skipped.push((i, r));
            continue;
        }
        let first = align_up(s.start as u128, hps);
        let end = align_down(s.end(), hps);
        if first >= end {
            set.skipped.push((i, SkipReason::SubPage));
            continue;
        }
        // `first < 2^64` here; a length of 2^64 only for a whole-space IOMMU section.
        let len = (end - first).min(u64::MAX as u128) as u64;
        set.bytes += end - first;
        set.ranges.push((i, IovaRange::new(first as u64, len)));
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Section;

    fn sec(start: u64, last: u64, kind: SectionKind) -> Section {
        Section::new(start, last, kind, "s")
    }

    fn with_offset(mut s: Section, off: u64) -> Section {
        s.offset_in_region = off;
        s
    }

    #[test]
    fn rules() {
        let mut mis = sec(0x3000, 0x7fff, SectionKind::Ram);
        mis.offset_in_region = 0x10;
        let mut prot = sec(0x10000, 0x1ffff, SectionKind::Ram);
        prot.protected = true;
        let l = Layout::new(
            "memory",
            vec![
                sec(0x0, 0x2fff, SectionKind::Ram),
                mis,
                sec(0x8000, 0x8fff, SectionKind::Io),
                sec(0x9000, 0x9fff, SectionKind::Rom),
                sec(0xa000, 0xafff, SectionKind::Romd),
                sec(0xb000, 0xbfff, SectionKind::RamDevice),
                with_offset(sec(0xc010, 0xe00f, SectionKind::Ram), 0x10),
                with_offset(sec(0xe010, 0xe80f, SectionKind::Ram), 0x10),
                prot,
                sec(1 << 63, (1 << 63) + 0xfff, SectionKind::Ram),
            ],
        )
        .unwrap();
        let d = dma_able(&l, &FilterOptions::default());
        let reasons: Vec<_> = d.skipped.iter().map(|s| s.1).collect();
        use SkipReason::*;
        assert_eq!(
            reasons,
            vec![Misaligned, Io, Readonly, Romd, RamDevice, SubPage, Protected, Bit63]
        );
        assert_eq!(
            d.ranges,
            vec![
                (0, IovaRange::new(0, 0x3000)),
                (6, IovaRange::new(0xd000, 0x1000))
            ]
        );
        assert_eq!(d.bytes, 0x4000);
        let q = dma_able(&l, &FilterOptions::qemu(4096));
        assert!(q.ranges.iter().any(|r| r.0 == 5));
    }

    #[test]
    fn top_of_space() {
        // Everything with bit 63 set is a BAR-sizing artefact to QEMU, the top page included.
        let l = Layout::new(
            "memory",
            vec![sec(u64::MAX - 0x1fff, u64::MAX, SectionKind::Ram)],
        )
        .unwrap();
        let d = dma_able(&l, &FilterOptions::default());
        assert_eq!(d.skipped, vec![(0, SkipReason::Bit63)]);
        // Just below bit 63, an unaligned end is trimmed exactly.
        let l = Layout::new(
            "memory",
            vec![sec((1 << 63) - 0x2000, (1 << 63) - 2, SectionKind::Ram)],
        )
        .unwrap();
        let d = dma_able(&l, &FilterOptions::default());
        assert_eq!(
            d.ranges,
            vec![(0, IovaRange::new((1 << 63) - 0x2000, 0x1000))]
        );
    }
}
