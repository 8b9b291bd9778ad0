//! Live migrations behind a vIOMMU: the guest maps and unmaps its DMA all through pre-copy
//! (rings, streaming buffers, IOVAs from a Linux-like allocator), the device logs IOVAs,
//! and every migration must end verified page for page, over map rates, DMA masks, device
//! profiles, headroom policies, tracking modes and every fault of the engine's matrix. The
//! three vIOMMU negative controls must end unverified.

use iovatrack::layout::presets;
use iovatrack::migrate::demo::viommu::{ViommuConfig, ViommuFault};
use iovatrack::migrate::demo::{run_local, Fault, MigrateConfig, Summary};
use iovatrack::migrate::guest::kvm_available;
use iovatrack::migrate::scale_ram;
use iovatrack::plan::limits::DeviceProfile;
use iovatrack::track::ModeChoice;
use std::time::Duration;

/// Real layouts, shrunk so each migrates in about a second.
const LAYOUTS: [(&str, u64); 6] = [
    ("q35-2g", 8),
    ("q35-16g", 64),
    ("q35-dimms", 32),
    ("q35-virtio-mem", 256),
    ("pc-4g", 16),
    ("amd-1t", 4096),
];

/// Every fault of `tests/migrate_matrix.rs`, and drop-before-commit.
const FAULTS: [Option<Fault>; 9] = [
    None,
    Some(Fault::ReportFail(1)),
    Some(Fault::ReportFail(2)),
    Some(Fault::StartE2big),
    Some(Fault::DropAt(0)),
    Some(Fault::DropAt(1)),
    Some(Fault::CancelAt(0)),
    Some(Fault::CancelAt(1)),
    Some(Fault::DropBeforeCommit),
];

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn base(preset: &str, scale: u64) -> MigrateConfig {
    let mut cfg = MigrateConfig::new(scale_ram(&presets::get(preset).unwrap(), scale));
    cfg.warmup = Duration::from_millis(100);
    cfg.engine.timeout = Duration::from_secs(8);
    cfg.viommu = Some(ViommuConfig::default());
    cfg
}

fn case(seed: u64) -> (String, MigrateConfig) {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (name, scale) = LAYOUTS[(seed % LAYOUTS.len() as u64) as usize];
    let mut cfg = base(name, scale);
    cfg.use_kvm = r.below(5) != 0;
    cfg.cpu_rate = 5_000 + r.below(20_000);
    let fault = FAULTS[(seed / LAYOUTS.len() as u64 % FAULTS.len() as u64) as usize];
    cfg.faults = fault.into_iter().collect();
    let profile = |r: &mut Rng| {
        [
            DeviceProfile::Generic,
            DeviceProfile::Mlx5,
            DeviceProfile::Pds,
        ][r.below(3) as usize]
            .limits()
    };
    cfg.devices = vec![profile(&mut r)];
    if r.below(4) == 0 {
        cfg.devices.push(profile(&mut r));
        cfg.containers = 1 + r.below(2) as usize;
    }
    cfg.max_ranges = [256, 8, 2, 1][r.below(4) as usize];
    cfg.engine.bandwidth = [0, 200 << 20, 400 << 20][r.below(3) as usize];
    // IOMMU tracking now and then, where no device fault is meant to fire.
    if matches!(fault, None | Some(Fault::DropAt(_))) && r.below(4) == 0 {
        cfg.tracking = ModeChoice::Iommu;
    }
    cfg.viommu = Some(ViommuConfig {
        map_rate: [500, 2_000, 8_000, 20_000][r.below(4) as usize],
        dma_mask_bits: [32, 39, 48, 64][r.below(4) as usize],
        headroom: [0, 64 << 10, 1 << 20, 16 << 20][r.below(4) as usize],
        inflight: [8, 32, 64][r.below(3) as usize],
        seed,
        ..ViommuConfig::default()
    });
    let v = cfg.viommu.unwrap();
    let desc = format!(
        "seed {seed}: {name}/{scale} {} {:?} x{} in {} container(s) cap {} bw {} {:?} maps {}/s mask {} headroom {} inflight {} faults {:?}",
        if cfg.use_kvm { "kvm" } else { "soft" },
        cfg.devices.iter().map(|d| d.driver).collect::<Vec<_>>(),
        cfg.devices.len(),
        cfg.containers,
        cfg.max_ranges,
        cfg.engine.bandwidth,
        cfg.tracking,
        v.map_rate,
        v.dma_mask_bits,
        v.headroom,
        v.inflight,
        cfg.faults
    );
    (desc, cfg)
}

fn check(s: &Summary, desc: &str, cfg: &MigrateConfig) {
    let ctx = format!("{desc}\n{s:#?}");
    assert!(s.verified, "not verified: {ctx}");
    assert_eq!(s.mismatched_pages, 0, "{ctx}");
    assert_eq!(s.untracked_dma_writes, 0, "{ctx}");
    assert_eq!(s.untranslated_bits, 0, "{ctx}");
    assert_eq!(s.duplicate_pages_sent, 0, "{ctx}");
    assert!(s.resumed_on_destination && s.device_state_restored, "{ctx}");
    assert!(s.viommu && s.viommu_maps > 0, "{ctx}");
    assert!(s.dma_writes > 0, "the device wrote nothing: {ctx}");
    let mode = if cfg.tracking == ModeChoice::Iommu {
        "iommu"
    } else {
        "device"
    };
    assert_eq!(s.mode, mode, "{ctx}");
    if mode == "device" {
        assert_eq!(
            s.unmap_queries, s.unmaps_while_logging,
            "every unmap queried: {ctx}"
        );
    }
    match cfg.faults.first() {
        Some(Fault::DropAt(_) | Fault::CancelAt(_) | Fault::DropBeforeCommit) => {
            assert_eq!(s.attempts, 2, "{ctx}")
        }
        Some(Fault::ReportFail(_)) => assert!(s.report_errors >= 1, "{ctx}"),
        Some(Fault::StartE2big) => assert_eq!(s.ranges.len(), 1, "{ctx}"),
        None => assert_eq!(s.attempts, 1, "{ctx}"),
        Some(Fault::IommuAcrossHoles | Fault::CorruptDeviceState) => {
            unreachable!("a negative control, not in the matrix")
        }
        Some(Fault::DropAfterCommit) => unreachable!("not in the matrix: {ctx}"),
    }
}

fn run_seeds(seeds: std::ops::Range<u64>) {
    if !kvm_available() {
        iovatrack::report_skip(
            "vIOMMU matrix: /dev/kvm not available, the KVM cases ran on the software vCPU",
        );
    }
    for seed in seeds {
        let (desc, cfg) = case(seed);
        eprintln!("{desc}");
        let s = run_local(&cfg, &mut |_| {}).unwrap_or_else(|e| panic!("{desc}: {e}"));
        check(&s, &desc, &cfg);
    }
}

// 54 migrations in 9 groups, so a parallel runner spreads them over the cores. Seed s picks
// layout s % 6 and fault (s / 6) % 9: every layout meets every fault.
#[test]
fn viommu_matrix_0() {
    run_seeds(0..6);
}
#[test]
fn viommu_matrix_1() {
    run_seeds(6..12);
}
#[test]
fn viommu_matrix_2() {
    run_seeds(12..18);
}
#[test]
fn viommu_matrix_3() {
    run_seeds(18..24);
}
#[test]
fn viommu_matrix_4() {
    run_seeds(24..30);
}
#[test]
fn viommu_matrix_5() {
    run_seeds(30..36);
}
#[test]
fn viommu_matrix_6() {
    run_seeds(36..42);
}
#[test]
fn viommu_matrix_7() {
    run_seeds(42..48);
}
#[test]
fn viommu_matrix_8() {
    run_seeds(48..54);
}

/// The default run re-arms (the load ramps past the headroom) and stays verified.
#[test]
fn viommu_default_rearms_and_verifies() {
    let cfg = base("q35-2g", 8);
    let s = run_local(&cfg, &mut |_| {}).unwrap();
    check(&s, "default", &cfg);
    assert!(s.viommu_rearms >= 1, "{s:#?}");
    assert!(s.rearm_pages >= 1, "{s:#?}");
    // Each such re-arm held the map that asked for it; the longest hold is one of them.
    assert!(
        s.max_map_hold_ms > 0.0 && s.max_map_hold_ms <= s.map_hold_ms,
        "{s:#?}"
    );
    // Unmaps are of earlier maps; one in 32 is followed by a late DMA the IOMMU blocks.
    assert!(s.unmaps_while_logging <= s.viommu_unmaps, "{s:#?}");
    assert!(s.viommu_unmaps <= s.viommu_maps, "{s:#?}");
    assert!(s.viommu_dma_faults <= s.viommu_unmaps, "{s:#?}");
    if s.viommu_unmaps >= 500 {
        assert!(s.viommu_dma_faults >= 1, "{s:#?}");
    }
}

/// A control with the link capped, so pre-copy runs long enough for the event to happen
/// after the first pass has sent the pages it spoils.
fn control(fault: ViommuFault) -> Summary {
    let mut cfg = base("q35-2g", 8);
    // A short pass 0 (no warm fill), so the re-arms whose windows the control leaves
    // uncovered come after pass 0 has sent the pages they write.
    cfg.warm_pct = 0;
    cfg.engine.bandwidth = 100 << 20;
    cfg.viommu = Some(ViommuConfig {
        headroom: 0,
        map_rate: 4_000,
        fault: Some(fault),
        ..ViommuConfig::default()
    });
    run_local(&cfg, &mut |_| {}).unwrap()
}

/// Unmapping without the query loses the dirt of the IOVA that goes (its bits translate to
/// nothing, or to the next mapping of a reused IOVA).
#[test]
fn viommu_control_no_unmap_query_is_caught() {
    let s = control(ViommuFault::NoUnmapQuery);
    assert!(!s.verified, "{s:#?}");
    assert!(s.mismatched_pages > 0, "{s:#?}");
    assert_eq!(s.unmap_queries, 0, "{s:#?}");
}

/// STOP then START without marking the window's mapped pages loses what the device wrote
/// in the window (the harness makes it write its status block there).
#[test]
fn viommu_control_naive_rearm_is_caught() {
    let s = control(ViommuFault::NaiveRearm);
    assert!(s.viommu_rearms >= 1, "{s:#?}");
    assert_eq!(s.rearm_pages, 0, "{s:#?}");
    assert!(!s.verified, "{s:#?}");
    assert!(s.mismatched_pages > 0, "{s:#?}");
}

/// IOVAs taken as guest physical addresses mark the wrong pages (or none).
#[test]
fn viommu_control_no_translate_is_caught() {
    let s = control(ViommuFault::NoTranslate);
    assert!(!s.verified, "{s:#?}");
    assert!(s.mismatched_pages > 0, "{s:#?}");
}
