//! The guest's driver behind the vIOMMU, as Linux's IOMMU DMA API makes it behave: a few
//! long-lived coherent rings mapped once, and streaming map → DMA → unmap cycles per
//! buffer (a packet, a block request), IOVAs from the Linux-like allocator, buffers from
//! the guest's DMA-able RAM. The device DMAs by IOVA through the vIOMMU: the data lands at
//! the GPA, the device (and the IOMMU) log the IOVA; a DMA to an unmapped IOVA faults.

use super::alloc::IovaAllocator;
use super::ViommuConfig;
use crate::device::{EmulatedDevice, EmulatedIommu};
use crate::migrate::guest::GuestMemory;
use crate::range::IovaRange;
use crate::track::viommu::{IovaSpace, VIOMMU_PAGE};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the device writes and who logs it.
pub(super) struct Dma {
    pub memory: Arc<GuestMemory>,
    pub space: Arc<IovaSpace>,
    pub devices: Vec<Arc<EmulatedDevice>>,
    pub iommu: Arc<EmulatedIommu>,
    pub writes: AtomicU64,
    pub faults: AtomicU64,
    pub seq: AtomicU64,
}

impl Dma {
    /// The device writes `len` bytes at `iova` (within one page, clear of offset 0): data at
    /// the GPA first, then the log (a REPORT between the two could otherwise clear the bit
    /// before the data lands). Returns false on an IOMMU fault (nothing written).
    pub fn write(&self, iova: u64, len: u64) -> bool {
        let seq = self.seq.fetch_add(1, SeqCst);
        let dev = &self.devices[(seq % self.devices.len() as u64) as usize];
        let done = self.space.dma(iova, |gpa| {
            if let Ok(words) = self.memory.words(gpa, len) {
                for (i, w) in words.iter().enumerate() {
                    w.store((0xD0 << 56) ^ seq ^ i as u64, SeqCst);
                }
            }
            dev.dma_write(iova, len);
            self.iommu.dma_write(iova, len);
        });
        if done.is_some() {
            self.writes.fetch_add(1, SeqCst);
        } else {
            self.faults.fetch_add(1, SeqCst);
        }
        done.is_some()
    }
}

/// Driver state the threads and the re-arm window share.
pub(super) struct Shared {
    pub dma: Dma,
    pub cfg: ViommuConfig,
    targets: Vec<IovaRange>,
    rings: Vec<IovaRange>,
    /// A coherent status block the device writes only on rare events (here: while its
    /// logging is re-armed), so nothing else dirties it.
    status: Option<IovaRange>,
    /// Streaming buffers mapped now: (IOVA, pages).
    live: Mutex<VecDeque<(u64, u64)>>,
    alloc: Mutex<IovaAllocator>,
    pub paused: AtomicBool,
    active: AtomicUsize,
    stop: AtomicBool,
    pub errors: Mutex<Vec<String>>,
}

/// A small xorshift generator.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 as u128 * n.max(1) as u128) >> 64) as u64
    }
}

/// An offset in a page for a write of `len`, clear of the guest's word at offset 0.
fn offset(rng: &mut Rng, len: u64) -> u64 {
    8 * (1 + rng.below((VIOMMU_PAGE - len) / 8))
}

impl Shared {
    /// `pages` contiguous pages of DMA-able RAM, at random.
    fn pick_gpa(&self, rng: &mut Rng, pages: u64) -> Option<u64> {
        let fits: Vec<&IovaRange> = self
            .targets
            .iter()
            .filter(|t| t.length >= pages * VIOMMU_PAGE)
            .collect();
        let t = fits.get(rng.below(fits.len() as u64) as usize)?;
        let slots = t.length / VIOMMU_PAGE - pages + 1;
        Some(t.iova + rng.below(slots) * VIOMMU_PAGE)
    }

    fn record(&self, e: impl std::fmt::Display) {
        let mut v = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
        if v.len() < 8 {
            v.push(e.to_string());
        }
    }

    /// Wait while the device is stopped; false once stopping for good. On true the caller
    /// is counted active until [`Shared::leave`].
    fn enter(&self) -> bool {
        loop {
            if self.stop.load(SeqCst) {
                return false;
            }
            if self.paused.load(SeqCst) {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            self.active.fetch_add(1, SeqCst);
            if !self.paused.load(SeqCst) {
                return true;
            }
            self.active.fetch_sub(1, SeqCst);
        }
    }

    fn leave(&self) {
        self.active.fetch_sub(1, SeqCst);
    }

    /// Inside a STOP→START window: the device writes into the streaming buffers mapped now
    /// (each written once more, then unmapped and rarely written again), so a window left
    /// uncovered loses them.
    pub fn window_dma(&self) {
        if self.paused.load(SeqCst) {
            return;
        }
        if let Some(st) = self.status {
            for p in 0..st.length / VIOMMU_PAGE {
                self.dma.write(st.iova + p * VIOMMU_PAGE + 128, 64);
            }
        }
        let live: Vec<(u64, u64)> = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect();
        for (iova, pages) in live.into_iter().take(16) {
            for p in 0..pages {
                self.dma.write((iova + p) * VIOMMU_PAGE + 64, 256);
            }
        }
    }
}

/// The running driver: its threads and counters.
pub(super) struct Driver {
    pub shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Driver {
    /// Map the rings and start the streaming and ring threads.
    pub fn start(dma: Dma, cfg: ViommuConfig, targets: Vec<IovaRange>) -> Result<Self, String> {
        let limit_pages = cfg.dma_limit() / VIOMMU_PAGE;
        let mut alloc = IovaAllocator::new(limit_pages);
        let mut rng = Rng(cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut shared = Shared {
            dma,
            cfg,
            targets,
            rings: Vec::new(),
            status: None,
            live: Mutex::new(VecDeque::new()),
            alloc: Mutex::new(IovaAllocator::new(1)),
            paused: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            errors: Mutex::new(Vec::new()),
        };
        // dma_alloc_coherent: rings mapped for the device's life, allocated first (top).
        for _ in 0..cfg.rings {
            let pages = cfg.ring_pages.max(1);
            let iova = alloc
                .alloc(pages)
                .ok_or("IOVA space exhausted by the rings")?;
            let gpa = shared
                .pick_gpa(&mut rng, pages)
                .ok_or("no DMA-able RAM for a ring")?;
            let r = IovaRange::new(iova * VIOMMU_PAGE, pages * VIOMMU_PAGE);
            shared.dma.space.map(r, gpa).map_err(|e| e.to_string())?;
            shared.rings.push(r);
        }
        if cfg.rings > 0 {
            let pages = 16;
            let iova = alloc.alloc(pages).ok_or("IOVA space exhausted")?;
            let gpa = shared
                .pick_gpa(&mut rng, pages)
                .ok_or("no DMA-able RAM for the status block")?;
            let r = IovaRange::new(iova * VIOMMU_PAGE, pages * VIOMMU_PAGE);
            shared.dma.space.map(r, gpa).map_err(|e| e.to_string())?;
            shared.status = Some(r);
        }
        shared.alloc = Mutex::new(alloc);
        let shared = Arc::new(shared);
        let mut threads = Vec::new();
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("viommu-driver".into())
                .spawn(move || streaming(s))
                .map_err(|e| e.to_string())?,
        );
        if !shared.rings.is_empty() {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("viommu-rings".into())
                    .spawn(move || rings(s))
                    .map_err(|e| e.to_string())?,
            );
        }
        Ok(Driver { shared, threads })
    }

    /// Quiesce: no DMA, map or unmap until [`Driver::resume`].
    pub fn pause(&self) {
        self.shared.paused.store(true, SeqCst);
        while self.shared.active.load(SeqCst) != 0 {
            std::thread::yield_now();
        }
    }

    /// Run again.
    pub fn resume(&self) {
        self.shared.paused.store(false, SeqCst);
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Sleep so that `done` events at `rate` per second keep pace since `started`.
fn pace(started: Instant, done: u64, rate: u64) {
    if rate == 0 {
        return;
    }
    let due = Duration::from_secs_f64(done as f64 / rate as f64);
    let el = started.elapsed();
    if due > el {
        std::thread::sleep(due - el);
    }
}

/// Streaming DMA: map a buffer, the device writes it, the driver unmaps the oldest once
/// `inflight` are outstanding. Sometimes a buffer aliases the page of a live one, and
/// sometimes the device writes a buffer just unmapped (it faults).
fn streaming(sh: Arc<Shared>) {
    let cfg = sh.cfg;
    let mut rng = Rng(cfg.seed.wrapping_add(7).wrapping_mul(0xD1B5_4A32_D192_ED03) | 1);
    let started = Instant::now();
    let mut done = 0u64;
    while sh.enter() {
        // Mostly packets of 1..4 pages; now and then a large block request (16..64 pages,
        // past the rcache's sizes at 64), which the allocator places below everything
        // cached when no gap fits.
        let pages = if rng.below(64) == 0 {
            16 << rng.below(3)
        } else {
            1u64 << rng.below(3)
        };
        // The load ramps: the queue depth grows a step every 50 ms to 32x, then falls
        // back (a 1.6 s sawtooth). A deeper queue needs IOVAs the caches do not hold, below
        // the window in use, which is what makes logging re-arm.
        let step = started.elapsed().as_millis() as u64 / 50;
        let depth = u64::from(cfg.inflight.max(1)) * (1 + step % 32);
        let alias = {
            let live = sh.live.lock().unwrap_or_else(PoisonError::into_inner);
            (rng.below(16) == 0).then(|| live.back().copied()).flatten()
        };
        let gpa = match alias {
            // Two IOVAs onto one page: the translation must mark it either way.
            Some((iova, _)) => sh
                .dma
                .space
                .dma(iova * VIOMMU_PAGE, |g| g & !(VIOMMU_PAGE - 1)),
            None => sh.pick_gpa(&mut rng, pages),
        };
        let iova = sh
            .alloc
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .alloc(pages);
        if let (Some(gpa), Some(iova)) = (gpa, iova) {
            let pages = if alias.is_some() { 1 } else { pages };
            let r = IovaRange::new(iova * VIOMMU_PAGE, pages * VIOMMU_PAGE);
            match sh.dma.space.map(r, gpa) {
                Ok(()) => {
                    for p in 0..pages {
                        let len = 64 << rng.below(5);
                        let off = offset(&mut rng, len);
                        sh.dma.write((iova + p) * VIOMMU_PAGE + off, len);
                    }
                    sh.live
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push_back((iova, pages));
                }
                Err(e) => {
                    sh.record(e);
                    sh.alloc
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .free(iova, pages);
                }
            }
        } else if let Some(iova) = iova {
            sh.alloc
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .free(iova, pages);
        }
        let old = {
            let mut live = sh.live.lock().unwrap_or_else(PoisonError::into_inner);
            (live.len() as u64 > depth)
                .then(|| live.pop_front())
                .flatten()
        };
        if let Some((iova, pages)) = old {
            let r = IovaRange::new(iova * VIOMMU_PAGE, pages * VIOMMU_PAGE);
            if let Err(e) = sh.dma.space.unmap(r) {
                sh.record(e);
            }
            sh.alloc
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .free(iova, pages);
            // A late DMA to the buffer just unmapped: the IOMMU blocks it.
            if rng.below(32) == 0 {
                sh.dma.write(iova * VIOMMU_PAGE + 8, 8);
            }
        }
        sh.leave();
        done += 1;
        pace(started, done, cfg.map_rate);
    }
    // Leave nothing mapped behind (the migration is over).
    let live: Vec<(u64, u64)> = sh
        .live
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .drain(..)
        .collect();
    for (iova, pages) in live {
        let _ = sh
            .dma
            .space
            .unmap(IovaRange::new(iova * VIOMMU_PAGE, pages * VIOMMU_PAGE));
    }
}

/// Descriptor and completion writes into the coherent rings, concurrently with the
/// streaming maps and unmaps.
fn rings(sh: Arc<Shared>) {
    let cfg = sh.cfg;
    let mut rng = Rng(cfg
        .seed
        .wrapping_add(13)
        .wrapping_mul(0x94D0_49BB_1331_11EB)
        | 1);
    let started = Instant::now();
    let mut done = 0u64;
    let mut slot = 0u64;
    while sh.enter() {
        let r = sh.rings[(slot % sh.rings.len() as u64) as usize];
        let page = (slot / sh.rings.len() as u64) % (r.length / VIOMMU_PAGE);
        let off = offset(&mut rng, 64);
        sh.dma.write(r.iova + page * VIOMMU_PAGE + off, 64);
        sh.leave();
        slot += 1;
        done += 1;
        pace(started, done, cfg.ring_rate);
    }
}
