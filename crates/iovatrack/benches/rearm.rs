//! Cost of a re-arm behind a vIOMMU against the mapped-set size.
//!
//! An `IovaSpace` over an emulated mlx5 device, `n` pages mapped as 4-page buffers top-down
//! below a 48-bit DMA limit (headroom 0, so every map below the window re-arms), logging
//! started. Per iteration:
//!
//! * `rearm/<n>`: `IovaSpace::replan`, the re-arm a held map runs — REPORT the logged
//!   range, STOP, plan and START, mark the `n` mapped pages in GPA — then the collect that
//!   hands the marks to the `DirtLedger`.
//! * `held_map/<n>`: what a guest map outside the logged ranges waits for: the same re-arm
//!   plus the map, then its unmap (queried first) and a `replan` back to the mapped set,
//!   so every iteration re-arms twice from the same state (halve it for one hold).
//! * `collect/<n>` (baseline): the same collect with no re-arm (REPORT of the logged range
//!   and translation of its bits, nothing dirty).
//!
//! The difference is what a re-arm adds to a pass. `cargo bench -p iovatrack --bench rearm`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use iovatrack::device::{DmaLogger, EmulatedDevice};
use iovatrack::plan::limits::DeviceLimits;
use iovatrack::range::IovaRange;
use iovatrack::track::viommu::{Headroom, IovaSpace, VIOMMU_PAGE};
use iovatrack::track::DirtLedger;
use std::sync::Arc;

const P: u64 = VIOMMU_PAGE;
const LIMIT: u64 = 1 << 48;
const RAM: u64 = 1 << 30;

fn setup(n: u64) -> (Arc<IovaSpace>, DirtLedger, u64) {
    let dev = Arc::new(EmulatedDevice::new(DeviceLimits::mlx5()));
    let space = Arc::new(
        IovaSpace::new("bench", LIMIT, vec![dev as Arc<dyn DmaLogger>], None)
            .headroom(Headroom { below: 0 }),
    );
    let bufs = n / 4;
    for b in 0..bufs {
        let iova = LIMIT - (b + 1) * 4 * P;
        let gpa = (b * 4 * P * 7) % RAM;
        space.map(IovaRange::new(iova, 4 * P), gpa).unwrap();
    }
    let planner = iovatrack::track::viommu::iova_planner(DeviceLimits::mlx5(), 4);
    space.start(&planner, 8 << 20, false).unwrap();
    let ledger = DirtLedger::new(&[IovaRange::new(0, RAM)], P).unwrap();
    (space, ledger, LIMIT - (bufs + 1) * 4 * P)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("rearm");
    g.sample_size(20);
    for n in [64u64, 512, 4096, 32768] {
        let (space, mut ledger, below) = setup(n);
        g.bench_with_input(BenchmarkId::new("rearm", n), &n, |b, _| {
            b.iter(|| {
                space.replan();
                space.collect(&mut ledger).unwrap();
                ledger.begin_pass().unwrap();
                ledger.ack();
            })
        });
        g.bench_with_input(BenchmarkId::new("held_map", n), &n, |b, _| {
            b.iter(|| {
                let r = IovaRange::new(below - 64 * P, 4 * P);
                space.map(r, 0).unwrap();
                space.unmap(r).unwrap();
                space.replan();
                space.collect(&mut ledger).unwrap();
                ledger.begin_pass().unwrap();
                ledger.ack();
            })
        });
        let (space, mut ledger, _) = setup(n);
        g.bench_with_input(BenchmarkId::new("collect", n), &n, |b, _| {
            b.iter(|| {
                space.collect(&mut ledger).unwrap();
                ledger.begin_pass().unwrap();
                ledger.ack();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
