use super::Strategy;
use super::*;
use crate::layout::{mtree, presets, Section, SectionKind};
use filter::SkipReason;
use proptest::prelude::*;
use std::collections::BTreeSet;

/// Every invariant a sound plan keeps; `Err` names the first one broken.
pub(crate) fn check_sound(plan: &Plan, cap: usize) -> Result<(), String> {
    let p = plan.page_size;
    if plan.uncovered_bytes() != 0 {
        return Err(format!(
            "{} DMA-able bytes uncovered",
            plan.uncovered_bytes()
        ));
    }
    if plan.ranges.len() > cap {
        return Err(format!("{} ranges > cap {cap}", plan.ranges.len()));
    }
    for (i, r) in plan.ranges.iter().enumerate() {
        if r.length == 0 || !r.is_aligned(p) {
            return Err(format!("range {i} {r} empty or misaligned"));
        }
        if i > 0 && plan.ranges[i - 1].end() >= r.iova as u128 {
            return Err(format!(
                "ranges {} and {i} not sorted and disjoint with a gap",
                i - 1
            ));
        }
    }
    Ok(())
}

/// Brute force: the minimum tracked bytes over every choice of gaps to close.
fn brute_min(merged: &[(u128, u128)], cap: usize) -> u128 {
    let n = merged.len();
    let base: u128 = merged.iter().map(|(s, e)| e - s).sum();
    let gaps: Vec<u128> = (1..n).map(|i| merged[i].0 - merged[i - 1].1).collect();
    let mut best = u128::MAX;
    for mask in 0u32..(1 << gaps.len()) {
        let closed = mask.count_ones() as usize;
        if n - closed > cap {
            continue;
        }
        let extra: u128 = (0..gaps.len())
            .filter(|g| mask & (1 << g) != 0)
            .map(|g| gaps[g])
            .sum();
        best = best.min(base + extra);
    }
    best
}

/// Maximal runs of a page set, as [start, end) byte pairs.
fn runs(pages: &BTreeSet<u128>, page: u64) -> Vec<(u128, u128)> {
    let mut out: Vec<(u128, u128)> = Vec::new();
    for &pg in pages {
        let s = pg * page as u128;
        match out.last_mut() {
            Some(l) if l.1 == s => l.1 = s + page as u128,
            _ => out.push((s, s + page as u128)),
        }
    }
    out
}

/// The docs/design.md rules, page by page, written independently of `filter`.
fn oracle_pages(layout: &Layout, host: u64, page: u64) -> BTreeSet<u128> {
    let mut set = BTreeSet::new();
    for s in layout.sections() {
        let keep = s.kind == SectionKind::Ram
            && !s.readonly
            && !s.protected
            && s.start >> 63 == 0
            && s.start % host == s.offset_in_region % host;
        if !keep {
            continue;
        }
        // every host page entirely inside the section
        let mut a = (s.start as u128).div_ceil(host as u128) * host as u128;
        while a + host as u128 <= s.end() {
            set.insert(a / page as u128);
            a += host as u128;
        }
    }
    set
}

/// The same rules interval by interval (real layouts hold terabytes: no page sets there).
fn oracle_runs(layout: &Layout, host: u64, page: u64) -> Vec<(u128, u128)> {
    let (h, p) = (host as u128, page as u128);
    let mut out: Vec<(u128, u128)> = Vec::new();
    for s in layout.sections() {
        let keep = s.kind == SectionKind::Ram
            && !s.readonly
            && !s.protected
            && s.start >> 63 == 0
            && s.start % host == s.offset_in_region % host;
        let (a, b) = ((s.start as u128).div_ceil(h) * h, s.end() / h * h);
        if !keep || a >= b {
            continue;
        }
        let (a, b) = (a / p * p, b.div_ceil(p) * p);
        match out.last_mut() {
            Some(l) if a <= l.1 => l.1 = l.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

fn all_layouts() -> Vec<(&'static str, Layout)> {
    presets::names()
        .into_iter()
        .map(|n| (n, presets::get(n).unwrap()))
        .collect()
}

#[test]
fn optimal_is_sound_and_minimal_on_real_layouts() {
    for (name, layout) in all_layouts() {
        for page in [4096u64, 2 << 20] {
            let truth = oracle_runs(&layout, 4096, page);
            for cap in 1..=8u32 {
                let plan = Planner::new()
                    .max_ranges(cap)
                    .page_size(page)
                    .plan(&layout)
                    .unwrap();
                check_sound(&plan, cap as usize)
                    .unwrap_or_else(|e| panic!("{name} cap {cap}: {e}"));
                assert_eq!(
                    plan.tracked_bytes,
                    brute_min(&truth, cap as usize),
                    "{name} cap {cap} page {page}"
                );
            }
        }
    }
}

#[test]
fn coverage_check_fails_on_a_plan_missing_one_page() {
    let layout = presets::get("q35-16g").unwrap();
    let mut plan = Planner::new().max_ranges(4).plan(&layout).unwrap();
    check_sound(&plan, 4).unwrap();
    let last = plan.ranges.len() - 1;
    plan.ranges[last].length -= 4096;
    plan.tracked_bytes -= 4096;
    assert_eq!(plan.uncovered_bytes(), 4096);
    assert!(check_sound(&plan, 4)
        .unwrap_err()
        .contains("4096 DMA-able bytes uncovered"));
    // and the minimality oracle rejects a plan that tracks one page too many
    let truth = oracle_runs(&layout, 4096, 4096);
    assert_ne!(plan.tracked_bytes + 8192, brute_min(&truth, 4));
}

fn qemu_ranges_with(name: &str, strategy: Strategy) -> Vec<(u64, u64)> {
    let l = presets::get(name).unwrap();
    let p = Planner::new().strategy(strategy).plan(&l).unwrap();
    p.ranges
        .iter()
        .map(|r| (r.iova, r.last().unwrap()))
        .collect()
}

/// QEMU's buckets with the readonly-bypass patch.
fn qemu_ranges(name: &str) -> Vec<(u64, u64)> {
    qemu_ranges_with(name, Strategy::QemuBypassRo)
}

/// QEMU's buckets with the readonly-bypass patch, worked out by hand from each layout's
/// AS "memory" view.
#[test]
fn qemu_buckets_on_real_layouts() {
    // pc.ram below 2 GiB and vga.vram at 0xfd000000 fill the 32-bit bucket; ROMs are skipped.
    assert_eq!(
        qemu_ranges("q35-16g"),
        vec![(0, 0xfdff_ffff), (0x1_0000_0000, 0x4_7fff_ffff)]
    );
    assert_eq!(
        qemu_ranges("q35-16g-kvm"),
        vec![(0, 0xfdff_ffff), (0x1_0000_0000, 0x4_7fff_ffff)]
    );
    assert_eq!(
        qemu_ranges("q35-2g"),
        vec![(0, 0xfdff_ffff), (0x1_0000_0000, 0x1_3fff_ffff)]
    );
    assert_eq!(
        qemu_ranges("q35-dimms"),
        vec![(0, 0xfdff_ffff), (0x1_0000_0000, 0x2_5fff_ffff)]
    );
    assert_eq!(
        qemu_ranges("q35-virtio-mem"),
        vec![(0, 0xfdff_ffff), (0x1_0000_0000, 0x41_7fff_ffff)]
    );
    for name in ["pc-4g", "amd-1t"] {
        let l = presets::get(name).unwrap();
        let set = filter::dma_able(&l, &FilterOptions::qemu_bypass_ro(4096));
        let lo = set
            .ranges
            .iter()
            .filter(|r| r.1.end() <= 1 << 32)
            .map(|r| r.1);
        let hi: Vec<_> = set
            .ranges
            .iter()
            .filter(|r| r.1.end() > 1 << 32)
            .map(|r| r.1)
            .collect();
        let mut want = vec![];
        let lo: Vec<_> = lo.collect();
        if !lo.is_empty() {
            want.push((lo[0].iova, lo.last().unwrap().last().unwrap()));
        }
        if !hi.is_empty() {
            want.push((hi[0].iova, hi.last().unwrap().last().unwrap()));
        }
        assert_eq!(qemu_ranges(name), want, "{name}");
    }
    assert_eq!(
        qemu_ranges("amd-1t")[1].0,
        0x100_0000_0000,
        "AMD 1 TiB relocation"
    );
}

/// QEMU 8.0 to 10.x as released: `vfio_listener_valid_section(section, "tracking_update")`
/// keeps read-only RAM, so the SeaBIOS ROM `pc.bios` at `0xfffc0000..=0xffffffff`
/// stretches the 32-bit bucket to the top of 4 GiB; the 64-bit bucket is unchanged.
#[test]
fn vfio_listener_valid_section_keeps_readonly_ram() {
    for name in [
        "q35-16g",
        "q35-16g-kvm",
        "q35-2g",
        "q35-dimms",
        "q35-virtio-mem",
        "pc-4g",
    ] {
        let released = qemu_ranges_with(name, Strategy::Qemu);
        let bypass = qemu_ranges(name);
        assert_eq!(released[0], (0, 0xffff_ffff), "{name}");
        assert_eq!(released[1..], bypass[1..], "{name}");
    }
    // q35-16g: the bypass stops at vga.vram, 32 MiB below the BIOS ROM.
    assert_eq!(qemu_ranges("q35-16g")[0], (0, 0xfdff_ffff));
    let l = presets::get("q35-16g").unwrap();
    let p = Planner::new().strategy(Strategy::Qemu).plan(&l).unwrap();
    assert_eq!(p.strategy.as_str(), "qemu");
    assert!(p
        .skipped
        .iter()
        .all(|s| s.reason != filter::SkipReason::Readonly));
    let p = Planner::new()
        .strategy(Strategy::QemuBypassRo)
        .plan(&l)
        .unwrap();
    assert_eq!(p.strategy.as_str(), "qemu-bypass-ro");
    assert!(p
        .skipped
        .iter()
        .any(|s| s.reason == filter::SkipReason::Readonly));
}

/// qemu-upstream.md §2.6: the q35 + OVMF guest with a passed-through GPU.
#[test]
fn qemu_worked_example_with_gpu_bars() {
    let text = "FlatView #0\n AS \"memory\", root: system\n Root memory region: system\n\
  0000000000000000-000000000002ffff (prio 0, ram): pc.ram KVM\n\
  0000000000030000-000000000004ffff (prio 1, i/o): smbase-blackhole\n\
  0000000000050000-00000000000bffff (prio 0, ram): pc.ram @0000000000050000 KVM\n\
  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom KVM\n\
  00000000000e0000-00000000000fffff (prio 0, rom): system.flash0 @000000000035c000 KVM\n\
  0000000000100000-000000007effffff (prio 0, ram): pc.ram @0000000000100000 KVM\n\
  000000007f000000-000000007fffffff (prio 1, i/o): tseg-blackhole\n\
  0000000080000000-0000000080087fff (prio 0, ramd): 0000:01:00.0 BAR 0 mmaps[0] KVM\n\
  0000000080088000-0000000080088fff (prio 1, i/o): vfio-nvidia-bar0-88000-mirror-quirk\n\
  0000000080089000-0000000080b8ffff (prio 0, ramd): 0000:01:00.0 BAR 0 mmaps[0] @0000000000089000 KVM\n\
  0000000080b90000-0000000080b9008f (prio 0, i/o): msix-table\n\
  0000000080b90090-0000000083ffffff (prio 0, ramd): 0000:01:00.0 BAR 0 mmaps[0] @0000000000b90090\n\
  0000000084000000-0000000084003fff (prio 0, ramd): 0000:01:00.1 BAR 0 mmaps[0] KVM\n\
  00000000fed40080-00000000fed40fff (prio 0, ram): tpm-crb-cmd\n\
  00000000fed45000-00000000fed453ff (prio 0, ramd): tpm-ppi\n\
  00000000fee00000-00000000feefffff (prio 4096, i/o): kvm-apic-msi\n\
  00000000ffc00000-00000000ffc83fff (prio 0, romd): system.flash1 KVM\n\
  00000000ffc84000-00000000ffffffff (prio 0, romd): system.flash0 KVM\n\
  0000000100000000-000000047fffffff (prio 0, ram): pc.ram @0000000080000000 KVM\n\
  0000007010000000-0000007010000fff (prio 0, i/o): virtio-pci-common-virtio-serial\n\
  0000007030000000-000000703fffffff (prio 0, ramd): 0000:01:00.0 BAR 1 mmaps[0] KVM\n\
  0000007040000000-0000007041ffffff (prio 0, ramd): 0000:01:00.0 BAR 3 mmaps[0] KVM\n\
  00000070f0000000-00000070f3ffffff (prio 1, ram): looking-glass KVM\n";
    let l = mtree::parse(text, "memory").unwrap();
    let p = Planner::new().strategy(Strategy::Qemu).plan(&l).unwrap();
    let got: Vec<_> = p
        .ranges
        .iter()
        .map(|r| (r.iova, r.last().unwrap()))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 0x8400_3fff),
            (0x1_0000_0000, 0x70_f3ff_ffff),
            (0x70_3000_0000, 0x70_41ff_ffff)
        ]
    );
    assert!(p.overlapping, "the 64-bit bucket contains the pci64 one");
    // the kernel refuses QEMU's overlapping buckets
    let v = DeviceView::new(DeviceLimits::generic(), 4096, &p.ranges);
    assert!(matches!(
        v.outcome,
        DeviceOutcome::Refused {
            errno: "EINVAL",
            ..
        }
    ));
    // optimal (default rules: no ram_device) tracks far less with 3 ranges
    let o = Planner::new().max_ranges(3).plan(&l).unwrap();
    assert!(o.tracked_bytes < p.tracked_bytes / 10);
    check_sound(&o, 3).unwrap();
}

#[test]
fn per_section_and_single() {
    let l = presets::get("q35-16g").unwrap();
    let per = Planner::new()
        .strategy(Strategy::PerSection)
        .plan(&l)
        .unwrap();
    assert_eq!(per.ranges.len(), per.sections.tracked);
    assert_eq!(per.tracked_bytes, per.dma_bytes);
    check_sound(&per, usize::MAX).unwrap();
    let one = Planner::new().strategy(Strategy::Single).plan(&l).unwrap();
    assert_eq!(one.ranges, vec![IovaRange::new(0, 0x4_8000_0000)]);
}

#[test]
fn device_views() {
    let l = presets::get("q35-virtio-mem").unwrap();
    let p = Planner::new()
        .device(DeviceLimits::mlx5())
        .plan(&l)
        .unwrap();
    assert!(p.ranges.len() <= 4);
    assert!(p.device.as_ref().unwrap().accepted());
    // per-section on pds with 1 region: the driver merges everything into one span
    let mut pds1 = DeviceLimits::pds();
    pds1.max_ranges = 1;
    let p = Planner::new()
        .strategy(Strategy::PerSection)
        .device(pds1)
        .plan(&l)
        .unwrap();
    match &p.device.as_ref().unwrap().outcome {
        DeviceOutcome::Accepted { accepted, .. } => {
            assert!(accepted.merged);
            assert_eq!(accepted.ranges.len(), 1);
        }
        o => panic!("{o:?}"),
    }
    // a 4 TiB+ guest does not fit mlx5's 2^42 total
    let big = Layout::new(
        "memory",
        vec![Section::new(0, (5u64 << 40) - 1, SectionKind::Ram, "ram")],
    )
    .unwrap();
    let p = Planner::new()
        .device(DeviceLimits::mlx5())
        .plan(&big)
        .unwrap();
    assert!(matches!(
        &p.device.as_ref().unwrap().outcome,
        DeviceOutcome::Refused {
            errno: "EOPNOTSUPP",
            ..
        }
    ));
}

#[test]
fn errors() {
    let l = presets::get("q35-16g").unwrap();
    assert_eq!(
        Planner::new().max_ranges(0).plan(&l),
        Err(PlanError::ZeroRanges)
    );
    assert_eq!(
        Planner::new().page_size(12288).plan(&l),
        Err(PlanError::PageSize(12288))
    );
    assert_eq!(
        Planner::new()
            .host_page_size(65536)
            .page_size(4096)
            .plan(&l),
        Err(PlanError::PageBelowHost {
            page: 4096,
            host: 65536
        })
    );
    let io = Layout::new("memory", vec![Section::new(0, 0xfff, SectionKind::Io, "x")]).unwrap();
    assert_eq!(Planner::new().plan(&io), Err(PlanError::NothingToTrack(1)));
    let v = Layout::new(
        "memory",
        vec![Section::new(0, u64::MAX, SectionKind::Iommu, "dmar")],
    )
    .unwrap();
    assert!(matches!(Planner::new().plan(&v), Err(PlanError::Viommu(_))));
    assert_eq!(
        Planner::new().allow_viommu(true).plan(&v),
        Err(PlanError::WholeSpace)
    );
}

#[test]
fn top_of_address_space() {
    // A section ending at 2^64 - 1 has bit 63 set: dropped (QEMU's rule), never an overflow.
    let top = Section::new(u64::MAX - 0x3fff, u64::MAX, SectionKind::Ram, "top");
    let l = Layout::new(
        "memory",
        vec![Section::new(0, 0xfff, SectionKind::Ram, "low"), top],
    )
    .unwrap();
    for cap in 1..=2 {
        let p = Planner::new().max_ranges(cap).plan(&l).unwrap();
        check_sound(&p, cap as usize).unwrap();
        assert_eq!(p.ranges, vec![IovaRange::new(0, 0x1000)]);
        assert_eq!(p.skipped[0].reason, SkipReason::Bit63);
    }
    // A whole-space IOMMU region, once allowed, is refused as inexpressible, not wrapped.
    let v = Layout::new(
        "memory",
        vec![Section::new(0, u64::MAX, SectionKind::Iommu, "dmar")],
    )
    .unwrap();
    assert_eq!(
        Planner::new().allow_viommu(true).plan(&v),
        Err(PlanError::WholeSpace)
    );
    // Just below bit 63 with a 1 GiB tracking page: the outward alignment stays exact.
    let hi = Section::new(
        (1 << 63) - 0x5000,
        (1 << 63) - 0x1001,
        SectionKind::Ram,
        "hi",
    );
    let l = Layout::new("memory", vec![with_off(hi)]).unwrap();
    let p = Planner::new().page_size(1 << 30).plan(&l).unwrap();
    assert_eq!(
        p.ranges,
        vec![IovaRange::new((1 << 63) - (1 << 30), 1 << 30)]
    );
    // and a range that does reach 2^64 is refused by the kernel rules with EOVERFLOW
    let v = DeviceView::new(
        DeviceLimits::generic(),
        4096,
        &[IovaRange::new(u64::MAX - 0xfff, 0x1000)],
    );
    assert!(
        matches!(
            v.outcome,
            DeviceOutcome::Refused {
                errno: "EOVERFLOW",
                ..
            }
        ),
        "{v:?}"
    );
}

fn with_off(mut s: Section) -> Section {
    s.offset_in_region = s.start & 0xfff;
    s
}

fn build(base: u64, raw: &[(u64, u64, u8, u64)], mis: &[bool]) -> Option<Layout> {
    let mut secs = Vec::new();
    for (i, &(start, len, kind, sub)) in raw.iter().enumerate() {
        let s = base + start * 0x1000 + sub;
        let last = s.checked_add(len * 0x1000 - 1 - sub)?;
        let k = [
            SectionKind::Ram,
            SectionKind::Ram,
            SectionKind::Ram,
            SectionKind::Rom,
            SectionKind::Io,
            SectionKind::RamDevice,
            SectionKind::Romd,
            SectionKind::Ram,
        ][kind as usize];
        let mut sec = Section::new(s, last, k, format!("s{i}"));
        if mis.get(i).copied().unwrap_or(false) {
            sec.offset_in_region = 0x800;
        } else {
            sec.offset_in_region = sub;
        }
        secs.push(sec);
    }
    // keep only a disjoint subset (generated sections may collide)
    secs.sort_by_key(|s| s.start);
    let mut keep: Vec<Section> = Vec::new();
    for s in secs {
        if keep.last().is_none_or(|l| s.start > l.last) {
            keep.push(s);
        }
    }
    Layout::new("memory", keep).ok()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    #[test]
    fn optimal_against_brute_force(
        top in any::<bool>(),
        raw in prop::collection::vec((0u64..60, 1u64..6, 0u8..8, prop::sample::select(vec![0u64, 0x400, 0x800])), 1..12),
        mis in prop::collection::vec(any::<bool>(), 12),
        cap in 1u32..6,
        page_shift in 12u32..15,
    ) {
        // `top`: the last 64 pages below bit 63, the highest a DMA-able section can sit.
        let base = if top { (1u64 << 63) - 64 * 0x1000 } else { 0 };
        let Some(layout) = build(base, &raw, &mis) else { return Ok(()) };
        let page = 1u64 << page_shift;
        let truth_pages = oracle_pages(&layout, 4096, page);
        match Planner::new().max_ranges(cap).page_size(page).plan(&layout) {
            Err(PlanError::NothingToTrack(_)) => prop_assert!(truth_pages.is_empty()),
            Err(e) => prop_assert!(false, "{e}"),
            Ok(plan) => {
                prop_assert!(check_sound(&plan, cap as usize).is_ok(), "{:?}", check_sound(&plan, cap as usize));
                // coverage, page by page, against the oracle
                for &pg in &truth_pages {
                    let a = pg * page as u128;
                    prop_assert!(plan.ranges.iter().any(|r| (r.iova as u128) <= a && a + page as u128 <= r.end()));
                }
                prop_assert_eq!(plan.tracked_bytes, brute_min(&runs(&truth_pages, page), cap as usize));
                prop_assert_eq!(runs(&truth_pages, page), oracle_runs(&layout, 4096, page));
                // same ranges as the kernel's own merge of the merged set
                let merged: Vec<IovaRange> = runs(&truth_pages, page).iter().map(|&(s, e)| IovaRange::new(s as u64, (e - s) as u64)).collect();
                prop_assert_eq!(&plan.ranges, &combine::combine_kernel(&merged, cap as usize));
            }
        }
    }
}

/// Planning for pds leaves each region room for the firmware's whole-word page count, so
/// the 6.8 driver (`pds_vfio_dirty_enable`) accepts the plan; without the device the same
/// layout's optimal plan is refused.
#[test]
fn pds_vfio_dirty_enable_accepts_planned_regions() {
    use crate::range::IovaRange as R;
    // 48 pages, an 8-page hole, then more RAM: rounding the first region to 64 pages
    // would reach into the second.
    let l = Layout::new(
        "memory",
        vec![
            Section::new(0, 0x2_ffff, SectionKind::Ram, "a"),
            Section::new(0x3_8000, 0x9_ffff, SectionKind::Ram, "b"),
            Section::new(0x10_0000, 0x7f_ffff, SectionKind::Ram, "c"),
        ],
    )
    .unwrap();
    let bare = Planner::new().plan(&l).unwrap();
    assert_eq!(bare.ranges.len(), 3);
    let refused = DeviceView::new(DeviceLimits::pds(), 4096, &bare.ranges);
    assert!(matches!(
        refused.outcome,
        DeviceOutcome::Refused {
            errno: "EINVAL",
            ..
        }
    ));
    let p = Planner::new().device(DeviceLimits::pds()).plan(&l).unwrap();
    assert!(p.device.as_ref().unwrap().accepted(), "{:?}", p.device);
    assert_eq!(p.ranges[0], R::new(0, 0xa_0000));
    check_sound(&p, 8).unwrap();
}
