//! Cost of collecting one pre-copy pass's dirt, against baselines, in the same run.
//!
//! Guests of 1, 4, 16 and 64 GiB (one RAM region at 0, sparse `GuestMemory`, 4 KiB pages),
//! 1 % of pages dirty (seeded xorshift, with replacement), per pass:
//!
//! * `kvm_log/<size>`: the real `KVM_GET_DIRTY_LOG` on a VM with one memslot of that size
//!   (`KVM_MEM_LOG_DIRTY_PAGES`) over a `GuestMemory`, with a vCPU that never runs.
//!   - `ioctl_reused`: the raw ioctl into a reused buffer (what `KvmGuest::dirty_log` does);
//!   - `ioctl_alloc` (baseline, Cloud Hypervisor's path): kvm-ioctls' `VmFd::get_dirty_log`,
//!     which allocates a fresh `Vec` per call;
//!   - `ledger_or_1%`: `DirtLedger::or_region_words` of a synthetic 1 % KVM-format bitmap.
//!
//!   No guest runs, so KVM's log is empty: the ioctl time is the part that scales with the
//!   slot (scan + copy-out + clear of the bitmap); the per-dirty-page write-protect work
//!   that a running guest adds is not in it. Driving a `KvmGuest` to exactly 1 % of a
//!   64 GiB slot per pass would touch (and allocate) that much RAM every pass.
//! * `device_report/<size>`: an `EmulatedDevice` logging the whole region (started by a
//!   `Tracker`), 1 % of pages DMA-written (untimed), then `Tracker::collect` into a
//!   `DirtLedger` (REPORT chunks + `or_report`). Baseline `report_only`: the bare REPORT of
//!   the whole range into a reused scratch bitmap.
//! * `merge/<size>`: a 1 % CPU bitmap and a 1 % device bitmap into what the pass sends.
//!   - `ours`: `or_region_words` + `or_report` into the per-region ledger, `begin_pass`,
//!     iterate `runs()`, `ack`;
//!   - `cloud_hypervisor` (baseline): `MemoryRangeTable::from_dirty_bitmap` per source
//!     (`BitposIterator` bit by bit, `coalesce` into ranges, collected), then
//!     `new_from_tables` concatenating the CPU and device tables, iterated. (CH also ORs
//!     vm-memory's own bitmap into the KVM log first; left out here, to its advantage.
//!     Pages dirty in both sources appear twice in its table.)
//!   - `mem_bandwidth` (floor): one read of both input bitmaps, OR-folded.
//!
//! `cargo bench -p iovatrack --bench collect`.

mod common;

use common::{ch_ranges, MemoryRange, XorShift};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use iovatrack::bitmap::{DirtyBitmap, Geometry};
use iovatrack::device::{DmaLogger, EmulatedDevice};
use iovatrack::layout::{Layout, Section, SectionKind};
use iovatrack::migrate::guest::GuestMemory;
use iovatrack::plan::limits::DeviceLimits;
use iovatrack::plan::Planner;
use iovatrack::range::IovaRange;
use iovatrack::track::{Container, DirtLedger, Tracker};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;
const GIB: u64 = 1 << 30;
const SIZES: [(&str, u64); 4] = [
    ("1GiB", GIB),
    ("4GiB", 4 * GIB),
    ("16GiB", 16 * GIB),
    ("64GiB", 64 * GIB),
];
const DIRTY: f64 = 0.01;

/// `DIRTY * pages` random page numbers below `pages` (with replacement).
fn random_pages(pages: u64, seed: u64) -> Vec<u64> {
    let mut rng = XorShift(seed | 1);
    (0..(pages as f64 * DIRTY) as u64)
        .map(|_| rng.next() % pages)
        .collect()
}

fn bitmap_of(pages: u64, set: &[u64]) -> DirtyBitmap {
    let mut b = DirtyBitmap::new(pages);
    for &p in set {
        b.set(p).unwrap();
    }
    b
}

// ---------------------------------------------------------------- Cloud Hypervisor

/// Cloud Hypervisor's `MemoryRangeTable`.
#[derive(Default)]
struct MemoryRangeTable {
    data: Vec<MemoryRange>,
}

impl MemoryRangeTable {
    /// `MemoryRangeTable::from_dirty_bitmap`.
    fn from_dirty_bitmap(
        bitmap: impl IntoIterator<Item = u64>,
        start_addr: u64,
        page_size: u64,
    ) -> Self {
        let data = ch_ranges(bitmap, start_addr, page_size).collect();
        MemoryRangeTable { data }
    }

    /// `MemoryRangeTable::new_from_tables`: concatenation.
    fn new_from_tables(tables: Vec<Self>) -> Self {
        let mut data = Vec::new();
        for t in tables {
            data.extend(t.data);
        }
        MemoryRangeTable { data }
    }
}

/// Consume ranges: (count, bytes, address checksum).
fn digest(it: impl Iterator<Item = (u64, u64)>) -> (u64, u64, u64) {
    it.fold((0, 0, 0), |(n, bytes, x), (gpa, len)| {
        (n + 1, bytes + len, x ^ gpa)
    })
}

// ---------------------------------------------------------------- KVM

mod kvm {
    use super::*;
    use kvm_bindings::{
        kvm_dirty_log, kvm_dirty_log__bindgen_ty_1, kvm_userspace_memory_region,
        KVM_MEM_LOG_DIRTY_PAGES,
    };
    use kvm_ioctls::{Kvm, VcpuFd, VmFd};

    const KVMIO: u32 = 0xAE;
    vmm_sys_util::ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);

    /// A VM with one logged memslot over `memory`'s only region, and a vCPU that never runs.
    pub struct Vm {
        // Drop order: the VM before the memory it maps.
        pub vm: VmFd,
        _vcpu: VcpuFd,
        _kvm: Kvm,
        pub memory: GuestMemory,
    }

    impl Vm {
        pub fn new(size: u64) -> Result<Self, String> {
            let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
            let vm = kvm.create_vm().map_err(|e| format!("CREATE_VM: {e}"))?;
            let memory = GuestMemory::new(&[(0, size)]).map_err(|e| e.to_string())?;
            let host = memory.words(0, 8).map_err(|e| e.to_string())?.as_ptr() as u64;
            let region = kvm_userspace_memory_region {
                slot: 0,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: 0,
                memory_size: size,
                userspace_addr: host,
            };
            // SAFETY: `host` is the start of `memory`'s live mapping of exactly `size` bytes;
            // `memory` is dropped after `vm` (field order), and no vCPU ever runs.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(|e| format!("SET_USER_MEMORY_REGION: {e}"))?;
            let vcpu = vm.create_vcpu(0).map_err(|e| format!("CREATE_VCPU: {e}"))?;
            Ok(Vm {
                vm,
                _vcpu: vcpu,
                _kvm: kvm,
                memory,
            })
        }

        /// `KVM_GET_DIRTY_LOG` of slot 0 into `buf` (at least the slot's bitmap words).
        pub fn dirty_log(&self, buf: &mut [u64]) {
            assert!(buf.len() >= self.memory.bitmap_words(0).unwrap());
            let log = kvm_dirty_log {
                slot: 0,
                padding1: 0,
                __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: buf.as_mut_ptr().cast(),
                },
            };
            // SAFETY: `vm` is a KVM VM fd; KVM writes the slot's bitmap (`bitmap_words(0)`
            // u64s, checked above) into `buf`.
            let rc =
                unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.vm, KVM_GET_DIRTY_LOG(), &log) };
            assert_eq!(
                rc,
                0,
                "KVM_GET_DIRTY_LOG: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn bench_kvm(c: &mut Criterion) {
    let mut g = c.benchmark_group("kvm_log");
    for (name, size) in SIZES {
        let pages = size / PAGE;
        let vm = match kvm::Vm::new(size) {
            Ok(vm) => vm,
            Err(e) => {
                eprintln!("SKIPPED: kvm_log/{name}: {e}");
                continue;
            }
        };
        let words = vm.memory.bitmap_words(0).unwrap();
        g.throughput(Throughput::Bytes(words as u64 * 8));
        let mut buf = vec![0u64; words];
        g.bench_function(BenchmarkId::new("ioctl_reused", name), |b| {
            b.iter(|| {
                vm.dirty_log(&mut buf);
                black_box(&buf);
            })
        });
        g.bench_function(BenchmarkId::new("ioctl_alloc", name), |b| {
            b.iter(|| black_box(vm.vm.get_dirty_log(0, size as usize).unwrap()))
        });
        let cpu = bitmap_of(pages, &random_pages(pages, 1));
        let mut ledger = DirtLedger::new(&[IovaRange::new(0, size)], PAGE).unwrap();
        g.bench_function(BenchmarkId::new("ledger_or_1%", name), |b| {
            b.iter(|| black_box(ledger.or_region_words(0, cpu.words()).unwrap()))
        });
    }
    g.finish();
}

fn bench_device(c: &mut Criterion) {
    let mut g = c.benchmark_group("device_report");
    for (name, size) in SIZES {
        let pages = size / PAGE;
        let region = IovaRange::new(0, size);
        let layout = Layout::new(
            "memory",
            vec![Section::new(0, size - 1, SectionKind::Ram, "ram")],
        )
        .unwrap();
        let dev = Arc::new(EmulatedDevice::new(DeviceLimits::generic()));
        let mut tracker = Tracker::new(
            Container::new("c0").device(dev.clone() as Arc<dyn DmaLogger>),
            Planner::new(),
        );
        tracker.start(&layout).unwrap();
        assert_eq!(dev.tracked_ranges().unwrap(), vec![region]);
        assert_eq!(dev.page_size(), Some(PAGE));
        let dirty = random_pages(pages, 2);
        let mut ledger = DirtLedger::new(&[region], PAGE).unwrap();
        g.throughput(Throughput::Bytes(pages.div_ceil(64) * 8));
        g.bench_function(BenchmarkId::new("tracker_collect", name), |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    for &p in &dirty {
                        dev.dma_write(p * PAGE, 8);
                    }
                    let t0 = Instant::now();
                    black_box(tracker.collect(&mut ledger).unwrap());
                    t += t0.elapsed();
                    assert!(ledger.begin_pass().unwrap() > 0);
                    ledger.ack();
                }
                t
            })
        });
        let mut scratch = vec![0u64; pages.div_ceil(64) as usize];
        g.bench_function(BenchmarkId::new("report_only", name), |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    for &p in &dirty {
                        dev.dma_write(p * PAGE, 8);
                    }
                    scratch.fill(0);
                    let t0 = Instant::now();
                    dev.report(region, PAGE, &mut scratch).unwrap();
                    t += t0.elapsed();
                    black_box(&scratch);
                }
                t
            })
        });
        tracker.stop();
    }
    g.finish();
}

fn bench_merge(c: &mut Criterion) {
    let mut g = c.benchmark_group("merge");
    for (name, size) in SIZES {
        let pages = size / PAGE;
        let cpu = bitmap_of(pages, &random_pages(pages, 3));
        let dev = bitmap_of(pages, &random_pages(pages, 4));
        let geo = Geometry::new(0, PAGE, pages).unwrap();
        let mut ledger = DirtLedger::new(&[IovaRange::new(0, size)], PAGE).unwrap();
        // Same answer from both (CH counts pages dirty in both sources twice).
        let union = {
            let mut u = cpu.clone();
            u.or_assign(&dev).unwrap();
            u.count_ones()
        };
        g.throughput(Throughput::Bytes(2 * pages.div_ceil(64) * 8));
        g.bench_function(BenchmarkId::new("ours", name), |b| {
            b.iter(|| {
                ledger.or_region_words(0, cpu.words()).unwrap();
                ledger.or_report(dev.words(), &geo).unwrap();
                let n = ledger.begin_pass().unwrap();
                let d = digest(ledger.inflight(0).runs().map(|(f, l)| (f * PAGE, l * PAGE)));
                ledger.ack();
                assert_eq!(d.1, n * PAGE);
                d
            })
        });
        let ours = {
            ledger.or_region_words(0, cpu.words()).unwrap();
            ledger.or_report(dev.words(), &geo).unwrap();
            let n = ledger.begin_pass().unwrap();
            ledger.ack();
            n
        };
        assert_eq!(ours, union);
        g.bench_function(BenchmarkId::new("cloud_hypervisor", name), |b| {
            b.iter(|| {
                let cpu_t =
                    MemoryRangeTable::from_dirty_bitmap(cpu.words().iter().copied(), 0, PAGE);
                let dev_t =
                    MemoryRangeTable::from_dirty_bitmap(dev.words().iter().copied(), 0, PAGE);
                let table = MemoryRangeTable::new_from_tables(vec![cpu_t, dev_t]);
                digest(table.data.iter().map(|r| (r.gpa, r.length)))
            })
        });
        let ch = {
            let cpu_t = MemoryRangeTable::from_dirty_bitmap(cpu.words().iter().copied(), 0, PAGE);
            let dev_t = MemoryRangeTable::from_dirty_bitmap(dev.words().iter().copied(), 0, PAGE);
            MemoryRangeTable::new_from_tables(vec![cpu_t, dev_t])
        };
        let ch_pages: u64 = ch.data.iter().map(|r| r.length / PAGE).sum();
        assert_eq!(ch_pages, cpu.count_ones() + dev.count_ones());
        g.bench_function(BenchmarkId::new("mem_bandwidth", name), |b| {
            b.iter(|| {
                let (a, d) = (black_box(cpu.words()), black_box(dev.words()));
                a.iter().zip(d).fold(0u64, |acc, (a, d)| acc ^ (a | d))
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_kvm, bench_device, bench_merge
}
criterion_main!(benches);
