//! The emulated passthrough device's DMA engine: threads writing guest memory by IOVA at a
//! set rate and pattern, each write logged by the device (and the IOMMU) like real DMA.
//!
//! A write lands in memory *before* it is logged. The other order would let a REPORT clear
//! the bit, the page be sent, and the data land afterwards: lost. This order can only make
//! a page be sent once more than needed.

use super::guest::GuestMemory;
use crate::device::{EmulatedDevice, EmulatedIommu};
use crate::range::IovaRange;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where DMA writes land and who logs them.
pub trait DmaSink: Send + Sync {
    /// Record a DMA write of `len` bytes at `iova`.
    fn dma_write(&self, iova: u64, len: u64);
}

impl DmaSink for EmulatedDevice {
    fn dma_write(&self, iova: u64, len: u64) {
        EmulatedDevice::dma_write(self, iova, len);
    }
}

impl DmaSink for EmulatedIommu {
    fn dma_write(&self, iova: u64, len: u64) {
        EmulatedIommu::dma_write(self, iova, len);
    }
}

/// How the device picks pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DmaPattern {
    /// Each thread fills a ring of receive buffers, page after page, wrapping (a NIC).
    Ring,
    /// Uniformly random pages over all DMA-able memory.
    Random,
    /// 90 % of writes to a hot 1 % of pages, the rest random.
    Hot,
}

/// The DMA workload's shape.
#[derive(Clone, Copy, Debug)]
pub struct DmaConfig {
    /// Writer threads.
    pub threads: usize,
    /// Writes per second over all threads; 0 = as fast as possible.
    pub rate: u64,
    /// Bytes per write (8..=4088, a multiple of 8, within one page, clear of offset 0).
    pub write_len: u64,
    /// Page choice.
    pub pattern: DmaPattern,
    /// Pages per ring (ring pattern).
    pub ring_pages: u64,
    /// Random seed.
    pub seed: u64,
}

impl Default for DmaConfig {
    fn default() -> Self {
        DmaConfig {
            threads: 2,
            rate: 20_000,
            write_len: 512,
            pattern: DmaPattern::Ring,
            ring_pages: 512,
            seed: 1,
        }
    }
}

struct Shared {
    memory: Arc<GuestMemory>,
    sinks: Vec<Arc<dyn DmaSink>>,
    targets: Vec<IovaRange>,
    /// Cumulative page counts of `targets`, for uniform picks.
    cumulative: Vec<u64>,
    paused: AtomicBool,
    stop: AtomicBool,
    active: AtomicUsize,
    writes: AtomicU64,
    logged: AtomicBool,
    unlogged: AtomicU64,
    /// Writes made by [`DmaWorkload::write_now`].
    proofs: AtomicU64,
}

/// Running DMA writer threads.
pub struct DmaWorkload {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// A small xorshift generator: deterministic per seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

impl Shared {
    fn total_pages(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    fn page_gpa(&self, index: u64) -> u64 {
        let i = self.cumulative.partition_point(|&c| c <= index);
        let before = if i == 0 { 0 } else { self.cumulative[i - 1] };
        self.targets[i].iova + (index - before) * 4096
    }
}

impl DmaWorkload {
    /// Start writing pages of `targets` (sorted, disjoint, page-aligned ranges inside
    /// `memory`), logging every write to each of `sinks`.
    pub fn start(
        memory: Arc<GuestMemory>,
        sinks: Vec<Arc<dyn DmaSink>>,
        targets: Vec<IovaRange>,
        cfg: DmaConfig,
    ) -> Self {
        let mut cumulative = Vec::with_capacity(targets.len());
        let mut total = 0;
        for t in &targets {
            total += t.length / 4096;
            cumulative.push(total);
        }
        let shared = Arc::new(Shared {
            memory,
            sinks,
            targets,
            cumulative,
            paused: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            writes: AtomicU64::new(0),
            logged: AtomicBool::new(true),
            unlogged: AtomicU64::new(0),
            proofs: AtomicU64::new(0),
        });
        let n = cfg.threads.max(1);
        let threads = if shared.total_pages() == 0 {
            Vec::new()
        } else {
            (0..n)
                .map(|t| {
                    let sh = shared.clone();
                    std::thread::Builder::new()
                        .name(format!("dma-{t}"))
                        .spawn(move || writer(sh, cfg, t as u64, n as u64))
                        .expect("spawning a DMA thread")
                })
                .collect()
        };
        DmaWorkload { shared, threads }
    }

    /// Quiesce the device (STOP_COPY): returns once no write is in flight and none starts
    /// until [`DmaWorkload::resume`].
    pub fn pause(&self) {
        self.shared.paused.store(true, SeqCst);
        // A thread increments `active` before it re-checks `paused` (both SeqCst), so once
        // `active` reads 0 after the store, every later write sees the pause.
        while self.shared.active.load(SeqCst) != 0 {
            std::thread::yield_now();
        }
    }

    /// Let the device write again.
    pub fn resume(&self) {
        self.shared.paused.store(false, SeqCst);
    }

    /// Whether writes are being logged by some tracker; writes made while not are counted
    /// as unlogged (what a real migration would silently lose).
    pub fn set_logged(&self, logged: bool) {
        self.shared.logged.store(logged, SeqCst);
    }

    /// Writes made so far.
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(SeqCst)
    }

    /// Writes made while no tracker logged them.
    pub fn unlogged_writes(&self) -> u64 {
        self.shared.unlogged.load(SeqCst)
    }

    /// One DMA write now, from the caller's thread, through the same sinks and counters as
    /// the workload's own, unless the device is quiesced; returns whether it was made. The
    /// k-th such write goes to the k-th page from the top of the targets (the guest's
    /// working set, when smaller than RAM, is at the bottom), one word at offset 8, a value
    /// the workload never writes.
    pub fn write_now(&self) -> bool {
        let sh = &self.shared;
        let total = sh.total_pages();
        if total == 0 {
            return false;
        }
        sh.active.fetch_add(1, SeqCst);
        let made = !sh.paused.load(SeqCst) && {
            let k = sh.proofs.fetch_add(1, SeqCst);
            let gpa = sh.page_gpa(total - 1 - k % total) + 8;
            match sh.memory.words(gpa, 8) {
                Ok(words) => {
                    words[0].store(0xD0C0_0000_0000_0000 | k, SeqCst);
                    for s in &sh.sinks {
                        s.dma_write(gpa, 8);
                    }
                    if !sh.logged.load(SeqCst) {
                        sh.unlogged.fetch_add(1, SeqCst);
                    }
                    sh.writes.fetch_add(1, SeqCst);
                    true
                }
                Err(_) => false,
            }
        };
        sh.active.fetch_sub(1, SeqCst);
        made
    }

    /// Stop and join the threads.
    pub fn stop(mut self) {
        self.shared.stop.store(true, SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for DmaWorkload {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn writer(sh: Arc<Shared>, cfg: DmaConfig, id: u64, n: u64) {
    let mut rng = Rng(cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (id + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)
        | 1);
    let total = sh.total_pages();
    // At most a page minus the guest's word at offset 0.
    let len = (cfg.write_len.clamp(8, 4088) / 8) * 8;
    let ring_pages = cfg.ring_pages.clamp(1, total);
    let ring_base = rng.below(total);
    let hot_pages = (total / 100).max(1);
    let hot_base = rng.below(total);
    let per_thread_rate = if cfg.rate == 0 {
        0
    } else {
        (cfg.rate / n).max(1)
    };
    let started = Instant::now();
    let mut done = 0u64;
    let mut seq = 0u64;
    while !sh.stop.load(SeqCst) {
        if sh.paused.load(SeqCst) {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        sh.active.fetch_add(1, SeqCst);
        if sh.paused.load(SeqCst) {
            sh.active.fetch_sub(1, SeqCst);
            continue;
        }
        let page = match cfg.pattern {
            DmaPattern::Ring => (ring_base + seq % ring_pages) % total,
            DmaPattern::Random => rng.below(total),
            DmaPattern::Hot if rng.below(10) < 9 => (hot_base + rng.below(hot_pages)) % total,
            DmaPattern::Hot => rng.below(total),
        };
        let gpa = sh.page_gpa(page);
        // Stay clear of the guest's own store at offset 0 of each page.
        let off = 8 * (1 + rng.below((4096 - len) / 8));
        let value = (id << 56) | (seq & ((1 << 56) - 1));
        if let Ok(words) = sh.memory.words(gpa + off, len) {
            for (i, w) in words.iter().enumerate() {
                w.store(value ^ i as u64, SeqCst);
            }
            for s in &sh.sinks {
                s.dma_write(gpa + off, len);
            }
            if !sh.logged.load(SeqCst) {
                sh.unlogged.fetch_add(1, SeqCst);
            }
            sh.writes.fetch_add(1, SeqCst);
        }
        sh.active.fetch_sub(1, SeqCst);
        seq += 1;
        done += 1;
        if per_thread_rate > 0 && done.is_multiple_of(16) {
            let due = Duration::from_secs_f64(done as f64 / per_thread_rate as f64);
            let el = started.elapsed();
            // In slices, so a slow device still stops promptly.
            let wake = Instant::now() + due.saturating_sub(el);
            while !sh.stop.load(SeqCst) && Instant::now() < wake {
                std::thread::sleep((wake - Instant::now()).min(Duration::from_millis(20)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Log(Mutex<Vec<(u64, u64)>>);
    impl DmaSink for Log {
        fn dma_write(&self, iova: u64, len: u64) {
            self.0.lock().unwrap().push((iova, len));
        }
    }

    #[test]
    fn writes_land_inside_targets_and_pause_quiesces() {
        let mem = Arc::new(GuestMemory::new(&[(0, 16 << 20), (1 << 32, 16 << 20)]).unwrap());
        let targets = vec![
            IovaRange::new(1 << 20, 4 << 20),
            IovaRange::new(1 << 32, 8 << 20),
        ];
        for pattern in [DmaPattern::Ring, DmaPattern::Random, DmaPattern::Hot] {
            let log = Arc::new(Log::default());
            let cfg = DmaConfig {
                threads: 3,
                rate: 0,
                pattern,
                ..DmaConfig::default()
            };
            let w = DmaWorkload::start(mem.clone(), vec![log.clone()], targets.clone(), cfg);
            while w.writes() < 2000 {
                std::thread::yield_now();
            }
            w.pause();
            let n = log.0.lock().unwrap().len();
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(log.0.lock().unwrap().len(), n, "a write after pause");
            w.resume();
            w.stop();
            for &(iova, len) in log.0.lock().unwrap().iter() {
                assert!(
                    targets
                        .iter()
                        .any(|t| t.contains(iova) && t.contains(iova + len - 1)),
                    "{iova:#x}"
                );
                assert_ne!(iova % 4096, 0, "offset 0 is the guest's");
                assert_eq!(
                    iova / 4096,
                    (iova + len - 1) / 4096,
                    "a write crosses a page"
                );
            }
        }
    }
}
