//! The KVM guest's vCPU threads: the kick signal, the run loop (pacing at the guest's
//! quantum exits, throttle sleeps, rate changes), parking for a pause, and the throttle
//! timer thread. See `kvm.rs` for why a kick cannot be lost.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::memory::GuestMemory;
use super::pace::Pacer;
use super::program::{PROGRESS_PORT, UNLIMITED_QUANTUM};
use super::throttle;
use super::x86::VcpuState;
use super::GuestError;

pub(crate) const WANT_RUN: u8 = 0;
pub(crate) const WANT_PAUSE: u8 = 1;
pub(crate) const WANT_STOP: u8 = 2;

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, or null when it runs no vCPU.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_sig: libc::c_int) {
    // Const-initialised, Drop-free thread-local: reading it is a plain TLS load, which is
    // async-signal-safe.
    let p = IMMEDIATE_EXIT.with(Cell::get);
    if !p.is_null() {
        // SAFETY: non-null only while the owning vCPU (and so its kvm_run mmap) is alive on
        // this very thread. A volatile byte store is what the kernel expects; it may race
        // with a live `&mut kvm_run` of the interrupted code, as in Firecracker and Cloud
        // Hypervisor, and only this one byte is touched.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

pub(crate) fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Send the kick to a vCPU thread.
pub(crate) fn kick(thread: libc::pthread_t) {
    // SAFETY: callers pass only ids of vCPU threads not joined yet (see `KvmGuest::kick_all`
    // and the throttle timer, which is joined before the vCPU threads are).
    unsafe {
        libc::pthread_kill(thread, kick_signal());
    }
}

/// Install the kick handler once per process.
pub(crate) fn install_kick_handler() -> Result<(), GuestError> {
    static RESULT: OnceLock<i32> = OnceLock::new();
    let err = *RESULT.get_or_init(|| {
        // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe (see above)
        // and flags deliberately omit SA_RESTART so KVM_RUN is not restarted.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = kick_handler as *const () as libc::sighandler_t;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut())
        };
        if rc == 0 {
            0
        } else {
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL)
        }
    });
    if err == 0 {
        Ok(())
    } else {
        Err(GuestError::Signal(std::io::Error::from_raw_os_error(err)))
    }
}

pub(crate) fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> GuestError {
    move |source| GuestError::Kvm { op, source }
}

/// Controller-visible state of all vCPUs, under one lock.
pub(crate) struct Ctl {
    /// vCPU threads blocked in `park`.
    pub(crate) parked: usize,
    /// vCPU threads that returned.
    pub(crate) exited: usize,
    /// Registers of each vCPU, saved when it parked.
    pub(crate) snapshots: Vec<Option<VcpuState>>,
    /// First vCPU failure.
    pub(crate) failed: Option<GuestError>,
}

/// One vCPU's progress, as the host sees it.
pub(crate) struct VcpuProgress {
    /// Gpa of its progress words `[counter, batches]` in guest RAM.
    pub(crate) words: u64,
    /// Its exact counter when it last parked (or launched): the published word may lag.
    pub(crate) floor: AtomicU64,
    /// Counter and batches at launch (this instance's zero).
    pub(crate) start: (u64, u64),
}

/// State shared by the controller, the vCPU threads and the throttle timer.
pub(crate) struct Shared {
    pub(crate) memory: Arc<GuestMemory>,
    pub(crate) want: AtomicU8,
    pub(crate) ctl: Mutex<Ctl>,
    pub(crate) cv: Condvar,
    /// Pages per second over all vCPUs (0 = unlimited).
    pub(crate) rate: AtomicU64,
    /// Bumped on every rate change: a vCPU seeing a new value forces a quantum request.
    pub(crate) rate_gen: AtomicU64,
    /// Throttle percentage (0 = off).
    pub(crate) throttle: AtomicU8,
    /// Bumped by the throttle timer once per period: each vCPU then sleeps once.
    pub(crate) throttle_ticket: AtomicU64,
    pub(crate) vcpus: Vec<VcpuProgress>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Ctl> {
        // A poisoned lock only means a thread panicked while holding it; the state is
        // plain data and stays meaningful.
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `(counter, batches)` of vCPU `i`: its published words, never below its floor.
    pub(crate) fn vcpu_progress(&self, i: usize) -> (u64, u64) {
        let v = &self.vcpus[i];
        let counter = self.memory.read_u64(v.words).unwrap_or(0);
        let batches = self.memory.read_u64(v.words + 8).unwrap_or(0);
        (counter.max(v.floor.load(Ordering::Relaxed)), batches)
    }

    fn rate_per_vcpu(&self) -> u64 {
        match self.rate.load(Ordering::Relaxed) {
            0 => 0,
            r => (r / self.vcpus.len() as u64).max(1),
        }
    }

    /// Sleep up to `d` unless a pause or stop comes first.
    fn nap(&self, d: Duration) {
        let ctl = self.lock();
        let _ = self
            .cv
            .wait_timeout_while(ctl, d, |_| self.want.load(Ordering::SeqCst) == WANT_RUN);
    }
}

fn exit_name(exit: &VcpuExit<'_>) -> &'static str {
    match exit {
        VcpuExit::IoIn(..) => "io-in (unknown port)",
        VcpuExit::IoOut(..) => "io-out",
        VcpuExit::MmioRead(..) => "mmio-read",
        VcpuExit::MmioWrite(..) => "mmio-write",
        VcpuExit::Hlt => "hlt",
        VcpuExit::Shutdown => "shutdown (triple fault)",
        VcpuExit::FailEntry(..) => "fail-entry",
        VcpuExit::InternalError => "internal-error",
        VcpuExit::Exception => "exception",
        VcpuExit::Intr => "intr",
        _ => "other",
    }
}

/// Body of vCPU thread `index`.
pub(crate) fn vcpu_thread(mut vcpu: VcpuFd, shared: &Shared, index: usize) {
    let flag: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|c| c.set(flag));
    let result = Runner::new(&mut vcpu, shared, index).run();
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    let mut ctl = shared.lock();
    if let Err(e) = result {
        log::error!("vCPU {index} failed: {e}");
        ctl.failed.get_or_insert(e);
    }
    ctl.exited += 1;
    shared.cv.notify_all();
}

/// One vCPU's run loop state.
struct Runner<'a> {
    vcpu: &'a mut VcpuFd,
    shared: &'a Shared,
    index: usize,
    pacer: Pacer,
    /// Published counter at the last quantum exit (pages since = pacing input).
    last: u64,
    rate_gen: u64,
    ticket: u64,
    /// The last exit was an `in` whose completion needs one more `KVM_RUN`.
    io_pending: bool,
}

impl<'a> Runner<'a> {
    fn new(vcpu: &'a mut VcpuFd, shared: &'a Shared, index: usize) -> Self {
        Self {
            pacer: Pacer::new(shared.rate_per_vcpu()),
            last: shared.vcpu_progress(index).0,
            rate_gen: shared.rate_gen.load(Ordering::SeqCst),
            ticket: shared.throttle_ticket.load(Ordering::SeqCst),
            io_pending: false,
            vcpu,
            shared,
            index,
        }
    }

    fn run(&mut self) -> Result<(), GuestError> {
        let s = self.shared;
        loop {
            match s.want.load(Ordering::SeqCst) {
                WANT_RUN => {}
                WANT_PAUSE => {
                    if self.park()? {
                        return Ok(());
                    }
                    self.pacer = Pacer::new(s.rate_per_vcpu());
                    self.last = s.vcpu_progress(self.index).0;
                    continue;
                }
                _ => return Ok(()),
            }
            let ticket = s.throttle_ticket.load(Ordering::SeqCst);
            if ticket != self.ticket {
                // One throttle sleep per period, however many kicks came with it.
                self.ticket = ticket;
                let pct = s.throttle.load(Ordering::Relaxed);
                if pct > 0 {
                    s.nap(throttle::sleep_per_slice(pct));
                    continue;
                }
            }
            let gen = s.rate_gen.load(Ordering::SeqCst);
            if gen != self.rate_gen {
                self.rate_gen = gen;
                self.force_quantum_request()?;
            }
            match self.vcpu.run() {
                Ok(VcpuExit::IoIn(PROGRESS_PORT, data)) => {
                    let q = quantum(s.rate_per_vcpu());
                    let n = data.len().min(4);
                    data[..n].copy_from_slice(&q.to_le_bytes()[..n]);
                    self.io_pending = true;
                    self.pace();
                }
                Ok(exit) => {
                    return Err(GuestError::UnexpectedExit {
                        exit: exit_name(&exit),
                    })
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // Kicked (or a stale kick): clear the flag and re-check. KVM completed
                    // any pending `in` before it returned EINTR.
                    self.io_pending = false;
                    self.vcpu.set_kvm_immediate_exit(0);
                }
                Err(e) => return Err(kvm_err("RUN")(e)),
            }
        }
    }

    /// At a quantum exit: sleep as the rate limit requires.
    fn pace(&mut self) {
        let now = self.shared.vcpu_progress(self.index).0;
        let pages = now.wrapping_sub(self.last);
        self.last = now;
        if let Some(d) = self.pacer.after(pages, self.shared.rate_per_vcpu()) {
            // Interruptible: pause/stop wake it through the condvar.
            self.shared.nap(d);
        }
    }

    /// Let KVM finish a pending `in` without running guest code (`immediate_exit`), so the
    /// registers are consistent and may be read or replaced.
    fn complete_io(&mut self) -> Result<(), GuestError> {
        self.vcpu.set_kvm_immediate_exit(1);
        loop {
            match self.vcpu.run() {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => break,
                // Not expected with immediate_exit set: answer and retry.
                Ok(VcpuExit::IoIn(PROGRESS_PORT, data)) => {
                    data.fill(0);
                }
                Ok(exit) => {
                    return Err(GuestError::UnexpectedExit {
                        exit: exit_name(&exit),
                    })
                }
                Err(e) => return Err(kvm_err("RUN (complete I/O)")(e)),
            }
        }
        self.vcpu.set_kvm_immediate_exit(0);
        self.io_pending = false;
        Ok(())
    }

    /// After a rate change: make the guest ask for a quantum at its next batch end (limit
    /// `r14 = 0`), so the new rate applies at once even if it held a huge quantum.
    fn force_quantum_request(&mut self) -> Result<(), GuestError> {
        if self.io_pending {
            self.complete_io()?;
        }
        let mut regs = self.vcpu.get_regs().map_err(kvm_err("GET_REGS"))?;
        regs.r14 = 0;
        self.vcpu.set_regs(&regs).map_err(kvm_err("SET_REGS"))?;
        self.pacer = Pacer::new(self.shared.rate_per_vcpu());
        self.last = self.shared.vcpu_progress(self.index).0;
        Ok(())
    }

    /// Park: complete the pending I/O, snapshot registers, wait for RUN or STOP. Returns
    /// `true` for STOP.
    fn park(&mut self) -> Result<bool, GuestError> {
        let s = self.shared;
        self.complete_io()?;
        let snapshot = VcpuState {
            regs: self.vcpu.get_regs().map_err(kvm_err("GET_REGS"))?,
            sregs: self.vcpu.get_sregs().map_err(kvm_err("GET_SREGS"))?,
        };
        s.vcpus[self.index]
            .floor
            .store(snapshot.counter(), Ordering::Relaxed);
        let mut ctl = s.lock();
        ctl.parked += 1;
        ctl.snapshots[self.index] = Some(snapshot);
        s.cv.notify_all();
        while s.want.load(Ordering::SeqCst) == WANT_PAUSE {
            ctl = s.cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
        }
        ctl.parked -= 1;
        ctl.snapshots[self.index] = None;
        Ok(s.want.load(Ordering::SeqCst) == WANT_STOP)
    }
}

/// Pages a vCPU may write before it asks again: ~10 ms at `rate` (pages/s per vCPU), or
/// as many as `in eax` carries when unlimited.
fn quantum(rate: u64) -> u32 {
    if rate == 0 {
        UNLIMITED_QUANTUM
    } else {
        (rate / 100).clamp(1, u64::from(UNLIMITED_QUANTUM - 1)) as u32
    }
}

/// The throttle timer: while throttling, once per period, hand every vCPU one sleep
/// (bump the ticket) and kick it out of the guest to take it. Ends on STOP.
pub(crate) fn throttle_timer(shared: &Shared, threads: &[libc::pthread_t]) {
    let mut ctl = shared.lock();
    loop {
        ctl = shared
            .cv
            .wait_while(ctl, |_| {
                shared.throttle.load(Ordering::SeqCst) == 0
                    && shared.want.load(Ordering::SeqCst) != WANT_STOP
            })
            .unwrap_or_else(|e| e.into_inner());
        if shared.want.load(Ordering::SeqCst) == WANT_STOP {
            return;
        }
        let pct = shared.throttle.load(Ordering::SeqCst);
        ctl = shared
            .cv
            .wait_timeout_while(ctl, throttle::period(pct), |_| {
                shared.want.load(Ordering::SeqCst) != WANT_STOP
            })
            .unwrap_or_else(|e| e.into_inner())
            .0;
        if shared.want.load(Ordering::SeqCst) == WANT_STOP {
            return;
        }
        if shared.throttle.load(Ordering::SeqCst) > 0 {
            shared.throttle_ticket.fetch_add(1, Ordering::SeqCst);
            for &t in threads {
                kick(t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantum_is_ten_ms_of_pages() {
        assert_eq!(quantum(0), u32::MAX);
        assert_eq!(quantum(50), 1);
        assert_eq!(quantum(20_000), 200);
        assert_eq!(quantum(u64::MAX), u32::MAX - 1);
    }
}
