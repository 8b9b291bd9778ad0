//! Planning cost on virtio-mem-style layouts, with the kernel's own merge as the baseline.
//!
//! Layouts: the usual q35 RAM below 4 GiB and 4 GiB above it, then a virtio-mem device
//! whose dynamic memslots map 2 MiB blocks one section each, with random unplugged holes
//! of 0–3 blocks between them (a 0-block hole leaves two touching sections, as two
//! memslots do). At 131,072 sections that is 256 GiB of 2 MiB blocks.
//!
//! Groups:
//! * `combine/{kernel,ours}/<cap>/<sections>`: `combine_kernel` (the kernel's O(n²)
//!   smallest-gap loop) against `combine` on the same input, the layout's DMA-able set
//!   after merging touching pieces, at 1k and 8k sections (the kernel loop gets slow beyond).
//! * `plan/optimal-<cap>/<sections>`: the whole `Planner::plan` (filter, merge, optimal
//!   strategy) at 1k, 8k, 32k and 131,072 sections, caps 256 and 8.
//!
//! Run: `cargo bench -p iovatrack --bench plan`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use iovatrack::layout::{Layout, Section, SectionKind};
use iovatrack::plan::combine::{combine, combine_kernel};
use iovatrack::plan::{Planner, Strategy};
use iovatrack::range::IovaRange;
use std::hint::black_box;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const BLOCK: u64 = 2 * MIB;

/// xorshift64* (seeded, deterministic; no rand crate).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A q35 guest with a virtio-mem device mapped as `blocks` 2 MiB sections.
fn virtio_mem_layout(blocks: usize, seed: u64) -> Layout {
    let mut rng = XorShift(seed | 1);
    let mut s = vec![
        Section::new(0, 0x9_ffff, SectionKind::Ram, "pc.ram"),
        Section::new(0xc_0000, 0xf_ffff, SectionKind::Rom, "pc.bios"),
        Section::new(0x10_0000, 2 * GIB - 1, SectionKind::Ram, "pc.ram"),
        Section::new(0xfec0_0000, 0xfec0_0fff, SectionKind::Io, "ioapic"),
        Section::new(4 * GIB, 6 * GIB - 1, SectionKind::Ram, "pc.ram"),
    ];
    for sec in &mut s[2..] {
        sec.offset_in_region = sec.start;
    }
    // The device region starts at 8 GiB; blocks keep their offset in it.
    let base = 8 * GIB;
    let mut block = 0u64;
    for _ in 0..blocks {
        let start = base + block * BLOCK;
        let mut sec = Section::new(start, start + BLOCK - 1, SectionKind::Ram, "virtio-mem0");
        sec.offset_in_region = block * BLOCK;
        s.push(sec);
        block += 1 + rng.below(4);
    }
    Layout::new("memory", s).expect("generated layout is a flat view")
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
}

fn bench_combine(c: &mut Criterion) {
    let mut g = c.benchmark_group("combine");
    for sections in [1024usize, 8192] {
        let layout = virtio_mem_layout(sections, 0x5eed + sections as u64);
        // The planner's own merged DMA-able set: what the strategy hands to the merge.
        let dma: Vec<IovaRange> = Planner::new().plan(&layout).expect("plan").dma;
        for cap in [256usize, 8] {
            // Same answer, or the comparison is meaningless.
            assert_eq!(
                combine(&dma, cap),
                combine_kernel(&dma, cap),
                "{sections} sections, cap {cap}"
            );
            let id = format!("{cap}/{sections}");
            g.bench_with_input(BenchmarkId::new("kernel", &id), &dma, |b, d| {
                b.iter(|| combine_kernel(black_box(d), cap))
            });
            g.bench_with_input(BenchmarkId::new("ours", &id), &dma, |b, d| {
                b.iter(|| combine(black_box(d), cap))
            });
        }
        eprintln!(
            "combine input: {sections} sections -> {} merged ranges",
            dma.len()
        );
    }
    g.finish();
}

fn bench_plan(c: &mut Criterion) {
    let mut g = c.benchmark_group("plan");
    for sections in [1024usize, 8192, 32 * 1024, 131_072] {
        let layout = virtio_mem_layout(sections, 0x5eed + sections as u64);
        for cap in [256u32, 8] {
            let planner = Planner::new().strategy(Strategy::Optimal).max_ranges(cap);
            let plan = planner.plan(&layout).expect("plan");
            assert!(plan.ranges.len() <= cap as usize);
            assert_eq!(plan.uncovered_bytes(), 0);
            g.bench_with_input(
                BenchmarkId::new(format!("optimal-{cap}"), sections),
                &layout,
                |b, l| b.iter(|| planner.plan(black_box(l)).expect("plan")),
            );
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_combine, bench_plan
}
criterion_main!(benches);
