//! Software guest: host threads do the KVM guest's page walk through the host mapping and
//! log their own writes, for hosts without `/dev/kvm` (or `--no-kvm`).
//!
//! It walks all of RAM, or the first `working_set` bytes of it (there is no in-guest setup
//! to protect). Thread `t` of `n` walks its own slice of that set with its own stride, like
//! the KVM program's vCPUs; every write stores the next value of one shared running
//! counter at offset 0 of the page. Throttling: a thread that has run a 10 ms slice sleeps
//! `pct / (100 - pct)` slices before its next batch.
//!
//! Dirty log: one `AtomicU64` bitmap per region. A writer stores the page first and then
//! sets its bit (`fetch_or`, Release); [`SoftGuest::dirty_log`] swaps words to zero
//! (Acquire) before the caller copies the pages. So a write whose bit was taken is visible
//! to the copy that follows, and a write that lands after the copy sets the bit again:
//! no write is lost. (Setting the bit before the write could let a reader clear it, copy the
//! old page, and then miss the write for good.)

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::memory::{GuestMemory, PAGE_SIZE};
use super::pace::Pacer;
use super::state::{Reader, Writer, KIND_SOFT};
use super::throttle;
use super::walk::WalkTable;
use super::{GuestConfig, GuestCpu, GuestError, Progress};
use crate::range::IovaRange;

const WANT_RUN: u8 = 0;
const WANT_PAUSE: u8 = 1;
const WANT_STOP: u8 = 2;
const PAUSE_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Ctl {
    /// Threads blocked in `park`.
    parked: usize,
    /// Threads that returned.
    exited: usize,
    /// First writer failure.
    failed: Option<GuestError>,
}

struct Shared {
    memory: Arc<GuestMemory>,
    /// One slice of the working set per thread.
    tables: Vec<WalkTable>,
    working_set: u64,
    throttle: AtomicU8,
    dirty: Vec<Vec<AtomicU64>>,
    want: AtomicU8,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    counter: AtomicU64,
    start_counter: u64,
    reports: AtomicU64,
    rate: AtomicU64,
    positions: Vec<AtomicU64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Host threads dirtying guest RAM like the KVM guest, with an atomic dirty log.
pub struct SoftGuest {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for SoftGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftGuest")
            .field("memory", &self.shared.memory)
            .field("threads", &self.shared.positions.len())
            .finish()
    }
}

/// Saved software guest: the running counter, each thread's walk index in its slice, and
/// the working set the slices were cut from.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SoftState {
    counter: u64,
    positions: Vec<u64>,
    working_set: u64,
}

/// Layout version 2: v1 (`counter`, `n`, `n` positions) plus the working set. Version 1
/// positions index one walk over all RAM, not per-thread slices, so it is refused.
const SOFT_VERSION: u32 = 2;

impl SoftState {
    fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::versioned(KIND_SOFT, SOFT_VERSION);
        w.u64(self.counter);
        w.u32(self.positions.len() as u32);
        for p in &self.positions {
            w.u64(*p);
        }
        w.u64(self.working_set);
        w.finish()
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, GuestError> {
        let (mut r, version) = Reader::versioned(bytes, KIND_SOFT, SOFT_VERSION)?;
        if version != SOFT_VERSION {
            return Err(GuestError::StateVersion { found: version });
        }
        let counter = r.u64()?;
        let n = r.u32()? as usize;
        // Bound the allocation by what the bytes can hold.
        if n == 0 || n > bytes.len() / 8 {
            return Err(GuestError::StateInvalid);
        }
        let positions = (0..n).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
        let working_set = r.u64()?;
        r.end()?;
        Ok(Self {
            counter,
            positions,
            working_set,
        })
    }
}

impl SoftGuest {
    /// Start `config.threads` (at least 1) writer threads on `memory`, over
    /// `config.working_set`.
    pub fn start(memory: Arc<GuestMemory>, config: &GuestConfig) -> Result<Self, GuestError> {
        let n = config.threads.max(1);
        let tables = Self::tables(&memory, config, config.working_set, n)?;
        Self::launch(
            memory,
            tables,
            config,
            SoftState {
                counter: 0,
                positions: vec![0; n],
                working_set: config.working_set,
            },
        )
    }

    /// Continue from [`GuestCpu::state_bytes`] of a software guest, on `memory` holding its
    /// RAM (same layout). The thread count and working set come from the state.
    pub fn resume_from(
        memory: Arc<GuestMemory>,
        state: &[u8],
        config: &GuestConfig,
    ) -> Result<Self, GuestError> {
        let st = SoftState::from_bytes(state)?;
        let tables = Self::tables(&memory, config, st.working_set, st.positions.len())?;
        if st.positions.iter().zip(&tables).any(|(&p, t)| p >= t.total) {
            return Err(GuestError::StateInvalid);
        }
        Self::launch(memory, tables, config, st)
    }

    fn tables(
        memory: &GuestMemory,
        config: &GuestConfig,
        working_set: u64,
        n: usize,
    ) -> Result<Vec<WalkTable>, GuestError> {
        // Nothing reserved: an empty range at 0 removes no page.
        WalkTable::slices(
            memory.regions(),
            IovaRange::new(0, 0),
            config.batch,
            working_set,
            n,
        )
    }

    fn launch(
        memory: Arc<GuestMemory>,
        tables: Vec<WalkTable>,
        config: &GuestConfig,
        st: SoftState,
    ) -> Result<Self, GuestError> {
        let dirty = (0..memory.regions().len())
            .map(|i| {
                memory
                    .bitmap_words(i)
                    .map(|w| (0..w).map(|_| AtomicU64::new(0)).collect())
            })
            .collect::<Result<Vec<Vec<AtomicU64>>, _>>()?;
        let n = st.positions.len();
        let shared = Arc::new(Shared {
            memory,
            tables,
            working_set: st.working_set,
            throttle: AtomicU8::new(0),
            dirty,
            want: AtomicU8::new(WANT_RUN),
            ctl: Mutex::new(Ctl::default()),
            cv: Condvar::new(),
            counter: AtomicU64::new(st.counter),
            start_counter: st.counter,
            reports: AtomicU64::new(0),
            rate: AtomicU64::new(config.rate_pages_per_sec),
            positions: st.positions.into_iter().map(AtomicU64::new).collect(),
        });
        let guest = Self {
            shared,
            threads: Mutex::new(Vec::with_capacity(n)),
        };
        for t in 0..n {
            let s = Arc::clone(&guest.shared);
            let h = std::thread::Builder::new()
                .name(format!("iovatrack-soft{t}"))
                .spawn(move || writer(&s, t))
                .map_err(GuestError::Spawn)?; // Drop of `guest` stops the ones started.
            guest
                .threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(h);
        }
        Ok(guest)
    }

    /// Fill `buf` with region `slot`'s dirty bits since the last call, clearing them.
    pub fn dirty_log(&self, slot: usize, buf: &mut [u64]) -> Result<(), GuestError> {
        let words = self
            .shared
            .dirty
            .get(slot)
            .ok_or(GuestError::NoSuchRegion { index: slot })?;
        if buf.len() < words.len() {
            return Err(GuestError::BufferSize {
                expected: words.len(),
                got: buf.len(),
            });
        }
        for (b, w) in buf.iter_mut().zip(words) {
            *b = w.swap(0, Ordering::Acquire);
        }
        Ok(())
    }
}

/// One writer thread; on failure records the error and exits.
fn writer(s: &Shared, t: usize) {
    if let Err(e) = write_loop(s, t) {
        log::error!("software guest writer {t} failed: {e}");
        s.lock().failed.get_or_insert(e);
    }
    let mut ctl = s.lock();
    ctl.exited += 1;
    s.cv.notify_all();
}

fn write_loop(s: &Shared, t: usize) -> Result<(), GuestError> {
    let n = s.tables.len();
    let table = &s.tables[t];
    let mut idx = s.positions[t].load(Ordering::Relaxed);
    let batch = table.batch;
    let thread_rate = |r: u64| if r == 0 { 0 } else { (r / n as u64).max(1) };
    let mut pacer = Pacer::new(thread_rate(s.rate.load(Ordering::Relaxed)));
    let mut slice_start = Instant::now();
    loop {
        for _ in 0..batch {
            if s.want.load(Ordering::SeqCst) != WANT_RUN {
                s.positions[t].store(idx, Ordering::Relaxed);
                if park(s) {
                    return Ok(());
                }
                pacer = Pacer::new(thread_rate(s.rate.load(Ordering::Relaxed)));
                slice_start = Instant::now();
            }
            let gpa = table.page_gpa(idx).ok_or(GuestError::OutOfRange {
                gpa: idx,
                len: PAGE_SIZE,
            })?;
            let value = s.counter.fetch_add(1, Ordering::Relaxed) + 1;
            s.memory.write_u64(gpa, value)?;
            // Mark after the write (see module docs).
            let region = s.memory.region_of(gpa).ok_or(GuestError::OutOfRange {
                gpa,
                len: PAGE_SIZE,
            })?;
            let page = (gpa - s.memory.regions()[region].iova) / PAGE_SIZE;
            s.dirty[region][(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
            idx = table.step(idx);
        }
        s.reports.fetch_add(1, Ordering::Relaxed);
        let pct = s.throttle.load(Ordering::Relaxed);
        if pct == 0 {
            slice_start = Instant::now();
        } else if slice_start.elapsed() >= throttle::SLICE {
            nap(s, throttle::sleep_per_slice(pct));
            slice_start = Instant::now();
        }
        if let Some(d) = pacer.after(batch, thread_rate(s.rate.load(Ordering::Relaxed))) {
            nap(s, d);
        }
    }
}

/// Sleep up to `d` unless a pause or stop comes first.
fn nap(s: &Shared, d: Duration) {
    let ctl = s.lock();
    let _ =
        s.cv.wait_timeout_while(ctl, d, |_| s.want.load(Ordering::SeqCst) == WANT_RUN);
}

/// Block while paused; `true` means stop.
fn park(s: &Shared) -> bool {
    let mut ctl = s.lock();
    ctl.parked += 1;
    s.cv.notify_all();
    while s.want.load(Ordering::SeqCst) == WANT_PAUSE {
        ctl = s.cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
    }
    ctl.parked -= 1;
    s.want.load(Ordering::SeqCst) == WANT_STOP
}

impl GuestCpu for SoftGuest {
    fn kind(&self) -> &'static str {
        "software"
    }

    fn memory(&self) -> &Arc<GuestMemory> {
        &self.shared.memory
    }

    fn pause(&self) -> Result<(), GuestError> {
        let n = self.shared.positions.len();
        let mut ctl = self.shared.lock();
        if ctl.exited > 0 {
            return Err(GuestError::Exited);
        }
        self.shared.want.store(WANT_PAUSE, Ordering::SeqCst);
        self.shared.cv.notify_all();
        let deadline = Instant::now() + PAUSE_DEADLINE;
        while ctl.parked < n {
            if ctl.exited > 0 {
                return Err(GuestError::Exited);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(GuestError::PauseTimeout);
            }
            ctl = self
                .shared
                .cv
                .wait_timeout(ctl, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), GuestError> {
        let ctl = self.shared.lock();
        if ctl.exited > 0 {
            return Err(GuestError::Exited);
        }
        self.shared.want.store(WANT_RUN, Ordering::SeqCst);
        self.shared.cv.notify_all();
        Ok(())
    }

    fn stop(&self) -> Result<(), GuestError> {
        let handles: Vec<_> =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        {
            let _ctl = self.shared.lock();
            self.shared.want.store(WANT_STOP, Ordering::SeqCst);
            self.shared.cv.notify_all();
        }
        let mut panicked = false;
        for h in handles {
            panicked |= h.join().is_err();
        }
        if let Some(e) = self.shared.lock().failed.take() {
            return Err(e);
        }
        if panicked {
            return Err(GuestError::ThreadPanicked);
        }
        Ok(())
    }

    fn dirty_log(&self, slot: usize, buf: &mut [u64]) -> Result<(), GuestError> {
        SoftGuest::dirty_log(self, slot, buf)
    }

    fn progress(&self) -> Progress {
        let counter = self.shared.counter.load(Ordering::Relaxed);
        Progress {
            counter,
            pages_written: counter - self.shared.start_counter,
            reports: self.shared.reports.load(Ordering::Relaxed),
        }
    }

    fn set_rate(&self, pages_per_sec: u64) {
        self.shared.rate.store(pages_per_sec, Ordering::Relaxed);
    }

    fn set_throttle(&self, pct: u8) {
        self.shared
            .throttle
            .store(throttle::clamp(pct), Ordering::Relaxed);
    }

    fn throttle_pct(&self) -> u8 {
        self.shared.throttle.load(Ordering::Relaxed)
    }

    fn state_bytes(&self) -> Result<Vec<u8>, GuestError> {
        let ctl = self.shared.lock();
        if ctl.parked < self.shared.positions.len()
            || self.shared.want.load(Ordering::SeqCst) != WANT_PAUSE
        {
            return Err(GuestError::NotPaused);
        }
        Ok(SoftState {
            counter: self.shared.counter.load(Ordering::Relaxed),
            positions: self
                .shared
                .positions
                .iter()
                .map(|p| p.load(Ordering::Relaxed))
                .collect(),
            working_set: self.shared.working_set,
        }
        .to_bytes())
    }
}

impl Drop for SoftGuest {
    fn drop(&mut self) {
        if let Err(e) = GuestCpu::stop(self) {
            log::warn!("software guest ended with an error: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_rejects_garbage() {
        let st = SoftState {
            counter: 99,
            positions: vec![1, 2, 3],
            working_set: 1 << 20,
        };
        let b = st.to_bytes();
        assert_eq!(SoftState::from_bytes(&b).unwrap(), st);
        assert!(SoftState::from_bytes(&b[..b.len() - 3]).is_err());
        let mut huge = b.clone();
        huge[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            SoftState::from_bytes(&huge),
            Err(GuestError::StateInvalid)
        ));
    }
}
