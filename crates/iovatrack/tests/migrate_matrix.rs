//! A seeded, randomized matrix of real live migrations (KVM guest where /dev/kvm exists),
//! each with the emulated DMA device writing throughout: every one must end verified, page
//! for page, with no untracked DMA write and no page sent twice in a pass. The negative
//! control (device tracking off) must end unverified.

use iovatrack::layout::presets;
use iovatrack::migrate::demo::{run_local, DmaConfig, DmaPattern, Fault, MigrateConfig, Summary};
use iovatrack::migrate::engine::Handover;
use iovatrack::migrate::guest::kvm_available;
use iovatrack::migrate::scale_ram;
use iovatrack::plan::limits::DeviceProfile;
use iovatrack::track::ModeChoice;
use std::time::Duration;

/// Real layouts, shrunk so each migrates in about a second.
const LAYOUTS: [(&str, u64); 7] = [
    ("q35-2g", 4),
    ("q35-16g", 32),
    ("q35-16g-kvm", 32),
    ("q35-dimms", 16),
    ("q35-virtio-mem", 256),
    ("pc-4g", 8),
    ("amd-1t", 2048),
];

const FAULTS: [Option<Fault>; 8] = [
    None,
    Some(Fault::ReportFail(1)),
    Some(Fault::ReportFail(2)),
    Some(Fault::StartE2big),
    Some(Fault::DropAt(0)),
    Some(Fault::DropAt(1)),
    Some(Fault::CancelAt(0)),
    Some(Fault::CancelAt(1)),
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

fn case(seed: u64) -> (String, MigrateConfig) {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (name, scale) = LAYOUTS[(seed % LAYOUTS.len() as u64) as usize];
    let layout = scale_ram(&presets::get(name).unwrap(), scale);
    let mut cfg = MigrateConfig::new(layout);
    cfg.use_kvm = r.below(5) != 0; // mostly KVM, some software vCPU
    cfg.cpu_rate = 5_000 + r.below(25_000);
    cfg.dma = DmaConfig {
        threads: 1 + r.below(3) as usize,
        rate: 5_000 + r.below(40_000),
        write_len: 8 << r.below(9),
        pattern: [DmaPattern::Ring, DmaPattern::Random, DmaPattern::Hot][r.below(3) as usize],
        ring_pages: 64 << r.below(4),
        seed,
    };
    let profile = |r: &mut Rng| {
        [
            DeviceProfile::Generic,
            DeviceProfile::Mlx5,
            DeviceProfile::Pds,
        ][r.below(3) as usize]
            .limits()
    };
    cfg.devices = vec![profile(&mut r)];
    // One draw in three migrates a second device, in the same container or its own.
    if r.below(3) == 0 {
        cfg.devices.push(profile(&mut r));
        cfg.containers = 1 + r.below(2) as usize;
    }
    cfg.max_ranges = [256, 8, 2, 1][r.below(4) as usize];
    cfg.engine.bandwidth = [0, 100 << 20, 300 << 20][r.below(3) as usize];
    cfg.faults = FAULTS[(seed / LAYOUTS.len() as u64 % FAULTS.len() as u64) as usize]
        .into_iter()
        .collect();
    cfg.warmup = Duration::from_millis(100);
    // Some draws dirty faster than the capped link drains: they take the forced path.
    cfg.engine.timeout = Duration::from_secs(8);
    let desc = format!(
        "seed {seed}: {name}/{scale} {} cpu {}/s dma {:?}x{} {}/s {}B {:?} in {} container(s) cap {} bw {} faults {:?}",
        if cfg.use_kvm { "kvm" } else { "soft" },
        cfg.cpu_rate,
        cfg.dma.pattern,
        cfg.dma.threads,
        cfg.dma.rate,
        cfg.dma.write_len,
        cfg.devices.iter().map(|d| d.driver).collect::<Vec<_>>(),
        cfg.containers,
        cfg.max_ranges,
        cfg.engine.bandwidth,
        cfg.faults
    );
    (desc, cfg)
}

fn check(s: &Summary, desc: &str, cfg: &MigrateConfig) {
    let ctx = format!("{desc}\n{s:#?}");
    assert!(s.verified, "not verified: {ctx}");
    assert_eq!(s.mismatched_pages, 0, "{ctx}");
    assert_eq!(s.untracked_dma_writes, 0, "{ctx}");
    assert_eq!(s.duplicate_pages_sent, 0, "{ctx}");
    assert!(s.resumed_on_destination && s.device_state_restored, "{ctx}");
    assert!(s.device_state_matched, "{ctx}");
    assert_eq!(s.negative_control, None, "{ctx}");
    assert_eq!(s.handover, Handover::Acknowledged, "{ctx}");
    assert!(s.bytes_sent <= s.bytes_on_wire, "{ctx}");
    assert_eq!(s.refused_connections, 0, "{ctx}");
    assert!(s.dma_writes > 0, "the device wrote nothing: {ctx}");
    assert_eq!(s.devices, cfg.devices.len(), "{ctx}");
    assert!(s.device_reports.iter().all(|d| d.mode == "device"), "{ctx}");
    assert_eq!(s.mode, "device", "{ctx}");
    if cfg.use_kvm && kvm_available() {
        assert_eq!(s.guest, "kvm", "{ctx}");
    }
    match cfg.faults.first() {
        Some(Fault::DropAt(_) | Fault::CancelAt(_) | Fault::DropBeforeCommit) => {
            assert_eq!(s.attempts, 2, "{ctx}")
        }
        Some(Fault::ReportFail(_)) => assert!(s.report_errors >= 1, "{ctx}"),
        Some(Fault::StartE2big) => assert_eq!(s.ranges.len(), 1, "{ctx}"),
        // Not drawn: a lost CommitAck cannot verify (tests/protocol.rs has it).
        Some(Fault::DropAfterCommit) => unreachable!("{ctx}"),
        None => assert_eq!(s.attempts, 1, "{ctx}"),
        Some(Fault::IommuAcrossHoles | Fault::CorruptDeviceState) => {
            unreachable!("a negative control, not in the matrix")
        }
    }
}

fn run_seeds(seeds: std::ops::Range<u64>) {
    if !kvm_available() {
        iovatrack::report_skip(
            "migration matrix: /dev/kvm not available, the KVM cases ran on the software vCPU",
        );
    }
    for seed in seeds {
        run_case(seed, 1);
    }
}

/// One seed's migration over `streams` streams, checked.
fn run_case(seed: u64, streams: u32) {
    let (desc, mut cfg) = case(seed);
    cfg.engine.streams = streams;
    let desc = format!("{desc} streams {streams}");
    eprintln!("{desc}");
    let s = run_local(&cfg, &mut |_| {}).unwrap_or_else(|e| panic!("{desc}: {e}"));
    check(&s, &desc, &cfg);
    assert_eq!(s.streams, streams, "{desc}");
}

// 56 migrations in 7 groups, so a parallel runner spreads them over the cores. Seed s picks
// layout s % 7 and fault (s / 7) % 8: every layout meets every fault.
#[test]
fn matrix_0() {
    run_seeds(0..8);
}
#[test]
fn matrix_1() {
    run_seeds(8..16);
}
#[test]
fn matrix_2() {
    run_seeds(16..24);
}
#[test]
fn matrix_3() {
    run_seeds(24..32);
}
#[test]
fn matrix_4() {
    run_seeds(32..40);
}
#[test]
fn matrix_5() {
    run_seeds(40..48);
}
#[test]
fn matrix_6() {
    run_seeds(48..56);
}

/// Issue 10: over three streams (the main channel and two joined), six seeds on six
/// layouts that meet no fault, a REPORT failure, a drop in pass 0 and in pass 1, and a
/// cancel in pass 0 and in pass 1: the same checks (verified, no page twice in a pass on
/// either side).
#[test]
fn matrix_streams() {
    for seed in [5, 16, 31, 39, 42, 55] {
        run_case(seed, 3);
    }
}

/// The negative control: without device dirty tracking, DMA writes during pre-copy are
/// never re-sent, and the check must catch it.
#[test]
fn negative_control_is_caught() {
    let mut cfg = MigrateConfig::new(scale_ram(&presets::get("q35-2g").unwrap(), 4));
    cfg.device_tracking = false;
    cfg.dma.rate = 40_000;
    cfg.dma.pattern = DmaPattern::Random;
    cfg.engine.bandwidth = 100 << 20;
    let s = run_local(&cfg, &mut |_| {}).unwrap();
    assert!(!s.verified, "{s:#?}");
    assert!(s.mismatched_pages > 0, "{s:#?}");
    assert!(s.untracked_dma_writes > 0, "{s:#?}");
    assert_eq!(s.mode, "none");
    assert_eq!(
        s.negative_control.as_ref().unwrap().proved,
        "loss",
        "{s:#?}"
    );
}

/// The negative control proves loss every time, not most times: 20 runs back to back on a
/// small guest, half of them with a device that hardly writes (one write a second), where
/// only the write the hooks make at each pass start can go untracked.
#[test]
fn negative_control_proves_loss_every_time() {
    for run in 0..20u64 {
        let mut cfg = quick("q35-2g", 8);
        cfg.device_tracking = false;
        cfg.warmup = Duration::from_millis(50);
        cfg.dma.seed = run;
        cfg.dma.rate = if run % 2 == 0 { 20_000 } else { 1 };
        let s = run_local(&cfg, &mut |_| {}).unwrap();
        let ctx = format!("run {run} at {} DMA writes/s: {s:#?}", cfg.dma.rate);
        assert!(!s.verified, "{ctx}");
        assert!(s.mismatched_pages > 0, "{ctx}");
        assert!(s.untracked_dma_writes > 0, "{ctx}");
        let c = s
            .negative_control
            .as_ref()
            .expect("a control says what it proved");
        assert_eq!(c.proved, "loss", "{ctx}");
        if cfg.dma.rate == 1 {
            // Each of the two threads wrote its first 16 before migration started and
            // then slept; the only other writes are the hooks', one per pass start after
            // pass 0 (passes less one: pass 0 has none, the final pass's start is one).
            let hooks = u64::from(s.passes - 1);
            assert_eq!(s.untracked_dma_writes, hooks, "{ctx}");
            assert_eq!(s.dma_writes, 32 + hooks, "{ctx}");
        }
        eprintln!(
            "run {run}: {} mismatched page(s), {} untracked of {} DMA writes, {:.0} ms",
            s.mismatched_pages, s.untracked_dma_writes, s.dma_writes, s.total_ms
        );
    }
}

/// A plan that misses memory the device writes: the device counts the lost writes and the
/// destination ends up wrong. Tracking only the first range of a one-range-per-section
/// plan is emulated by a layout whose high RAM is hidden from the planner.
#[test]
fn source_survives_an_unrecoverable_drop() {
    let mut cfg = MigrateConfig::new(scale_ram(&presets::get("q35-2g").unwrap(), 8));
    cfg.faults = vec![Fault::DropAt(1)];
    cfg.engine.retries = 0;
    cfg.warmup = Duration::from_millis(50);
    let s = run_local(&cfg, &mut |_| {}).unwrap();
    assert!(!s.verified, "{s:#?}");
    assert!(
        s.aborted.as_deref().unwrap_or("").contains("dropped"),
        "{s:#?}"
    );
    assert_eq!(s.source_running_after_abort, Some(true), "{s:#?}");
}

/// The handover: a verdict the source never answers with Commit must not make the
/// destination run the guest; the source resumes, retries into the same memory, and the
/// second handover completes.
#[test]
fn lost_commit_is_retried_not_run_twice() {
    let mut cfg = MigrateConfig::new(scale_ram(&presets::get("q35-2g").unwrap(), 8));
    cfg.faults = vec![Fault::DropBeforeCommit];
    cfg.warmup = Duration::from_millis(50);
    let s = run_local(&cfg, &mut |_| {}).unwrap();
    assert!(s.verified, "{s:#?}");
    assert_eq!(s.attempts, 2, "{s:#?}");
    assert_eq!(s.mismatched_pages, 0);
    assert!(s.resumed_on_destination);
}

/// Two devices of different profiles in one container (same ranges, planned for the
/// strictest, P2P states on the way to STOP_COPY), then the same two in two containers.
#[test]
fn two_devices_one_container_and_two_containers() {
    for containers in [1, 2] {
        let mut cfg = MigrateConfig::new(scale_ram(&presets::get("q35-2g").unwrap(), 4));
        cfg.devices = vec![DeviceProfile::Mlx5.limits(), DeviceProfile::Pds.limits()];
        cfg.containers = containers;
        cfg.warmup = Duration::from_millis(100);
        let desc = format!("mlx5 + pds in {containers} container(s)");
        let s = run_local(&cfg, &mut |_| {}).unwrap_or_else(|e| panic!("{desc}: {e}"));
        check(&s, &desc, &cfg);
        let names: Vec<&str> = s.device_reports.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["dma0", "dma1"], "{desc}");
        let distinct: std::collections::BTreeSet<&str> = s
            .device_reports
            .iter()
            .map(|d| d.container.as_str())
            .collect();
        assert_eq!(distinct.len(), containers, "{desc}: {s:#?}");
        assert!(s.device_reports.iter().all(|d| d.state_bytes > 0), "{desc}");
    }
}

fn quick(preset: &str, scale: u64) -> MigrateConfig {
    let mut cfg = MigrateConfig::new(scale_ram(&presets::get(preset).unwrap(), scale));
    cfg.warmup = Duration::from_millis(100);
    cfg
}

/// IOMMU mode on virtio-mem, whose unplugged blocks are holes in the IOMMU's mappings:
/// read per mapped area it verifies; the naive reader (across holes, where iommufd stops)
/// loses the dirt after the first hole, and the check catches it.
#[test]
fn iommu_mode_on_virtio_mem_and_the_naive_reader() {
    let mut cfg = quick("q35-virtio-mem", 64);
    cfg.tracking = ModeChoice::Iommu;
    cfg.dma.pattern = DmaPattern::Random;
    let s = run_local(&cfg, &mut |_| {}).unwrap();
    assert_eq!(s.mode, "iommu", "{s:#?}");
    assert!(s.verified && s.mismatched_pages == 0, "{s:#?}");
    cfg.faults = vec![Fault::IommuAcrossHoles];
    let s = run_local(&cfg, &mut |_| {}).unwrap();
    assert_eq!(s.mode, "iommu", "{s:#?}");
    assert!(
        !s.verified && s.mismatched_pages > 0,
        "the naive reader must lose pages: {s:#?}"
    );
}

/// A failed REPORT on mlx5 sticks until STOP + START: the tracker re-arms and the
/// migration still converges, verified.
#[test]
fn mlx5_sticky_report_error_rearms_and_converges() {
    let mut cfg = quick("q35-2g", 4);
    cfg.devices = vec![DeviceProfile::Mlx5.limits()];
    cfg.faults = vec![Fault::ReportFail(1)];
    let s = run_local(&cfg, &mut |_| {}).unwrap();
    assert!(s.verified && s.mismatched_pages == 0, "{s:#?}");
    assert!(s.rearms >= 1 && s.report_errors >= 1, "{s:#?}");
    assert_eq!(s.switchover_reason.to_string(), "converged", "{s:#?}");
}

/// pds reports whole 64-page words; with 8 ranges on real layouts the plan's ranges are not
/// word-aligned, and the migration still loses nothing.
#[test]
fn pds_with_unaligned_ranges_verifies() {
    for (preset, scale) in [("q35-16g", 32), ("q35-dimms", 16), ("pc-4g", 4)] {
        let mut cfg = quick(preset, scale);
        cfg.devices = vec![DeviceProfile::Pds.limits()];
        cfg.max_ranges = 8;
        cfg.dma.pattern = DmaPattern::Random;
        let s = run_local(&cfg, &mut |_| {}).unwrap();
        assert_eq!(s.mode, "device", "{preset}: {s:#?}");
        assert!(
            s.ranges
                .iter()
                .any(|r| r.iova % (64 * 4096) != 0 || r.length % (64 * 4096) != 0),
            "{preset}: the case needs ranges off the 64-page words: {:x?}",
            s.ranges
        );
        assert!(s.verified && s.mismatched_pages == 0, "{preset}: {s:#?}");
        assert_eq!(s.untracked_dma_writes, 0, "{preset}");
    }
}
