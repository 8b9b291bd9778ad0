//! A real KVM VM: one memslot per RAM region with dirty logging, one 64-bit vCPU in its
//! own thread, pause/resume by signal kick, and register save/restore.
//!
//! # Dirty logging
//!
//! Every memslot is registered with `KVM_MEM_LOG_DIRTY_PAGES` from the start (classic mode,
//! no `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): every guest write since the VM was created is
//! logged, and [`KvmGuest::dirty_log`] (`KVM_GET_DIRTY_LOG`) returns and clears the slot's
//! log in one call. Host writes through [`GuestMemory`] (the setup, a software DMA device)
//! are NOT in KVM's log; whoever makes them must track them.
//!
//! # Pausing (the kick)
//!
//! A no-op-ish handler is installed for `SIGRTMIN` without `SA_RESTART`. The vCPU thread
//! publishes, in a thread-local, the address of its `kvm_run.immediate_exit`. To pause, the
//! controller stores `want = PAUSE` and `pthread_kill`s the vCPU thread; the handler sets
//! `immediate_exit = 1`. Whatever the thread was doing, it ends up back at the top of its
//! loop, where it reads `want`:
//! * in the guest: the pending signal forces an exit, `KVM_RUN` fails with `EINTR`;
//! * between its `want` check and `KVM_RUN` (the classic race): the handler already ran,
//!   so `immediate_exit = 1` makes `KVM_RUN` return `EINTR` at once instead of sleeping in
//!   the guest with the kick lost;
//! * in the exit handler or the rate-limit sleep: it checks `want` next anyway.
//!
//! A stale kick only costs one spurious `EINTR` later. Before parking, the thread re-enters
//! `KVM_RUN` once with `immediate_exit = 1`: KVM then completes the pending `out` (advances
//! RIP) without running guest code, so the saved registers are consistent (KVM API doc,
//! `immediate_exit`). The controller re-kicks every 10 ms until the thread reports itself
//! parked, which it does only when it is out of `KVM_RUN` and blocked on the condvar.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_dirty_log, kvm_dirty_log__bindgen_ty_1, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::memory::GuestMemory;
use super::pace::Pacer;
use super::walk::WalkTable;
use super::x86::{self, SetupLayout, VcpuState, PROGRESS_PORT};
use super::{GuestConfig, GuestCpu, GuestError, Progress};

const KVMIO: u32 = 0xAE;
vmm_sys_util::ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);

const WANT_RUN: u8 = 0;
const WANT_PAUSE: u8 = 1;
const WANT_STOP: u8 = 2;

/// How long `pause()` waits for the vCPU before giving up.
const PAUSE_DEADLINE: Duration = Duration::from_secs(10);
/// Re-kick period while waiting for the vCPU to park.
const KICK_PERIOD: Duration = Duration::from_millis(10);

/// TSS area KVM needs for real-mode emulation on some Intel hosts (QEMU/Firecracker value).
const TSS_ADDR: u64 = 0xfffb_d000;

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

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Install the kick handler once per process.
fn install_kick_handler() -> Result<(), GuestError> {
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

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> GuestError {
    move |source| GuestError::Kvm { op, source }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Running,
    Paused,
    Exited,
}

struct Ctl {
    status: Status,
    snapshot: Option<VcpuState>,
}

/// State shared by the controller and the vCPU thread.
struct Shared {
    want: AtomicU8,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    counter: AtomicU64,
    start_counter: u64,
    reports: AtomicU64,
    rate: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        // A poisoned lock only means a thread panicked while holding it; the state is
        // plain data and stays meaningful.
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A KVM VM running the guest program on one vCPU thread. See the module docs for dirty
/// logging and pausing.
pub struct KvmGuest {
    // Field order = drop order: the VM fd closes before the memory Arc may unmap RAM.
    vm: VmFd,
    _kvm: Kvm,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<Result<(), GuestError>>>>,
    pthread: libc::pthread_t,
    memory: Arc<GuestMemory>,
}

impl std::fmt::Debug for KvmGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmGuest")
            .field("memory", &self.memory)
            .finish()
    }
}

/// Whether KVM offers 1 GiB pages (CPUID 0x8000_0001 EDX bit 26, pdpe1gb).
fn supports_1g(cpuid: &kvm_bindings::CpuId) -> bool {
    cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == 0x8000_0001 && e.edx & (1 << 26) != 0)
}

impl KvmGuest {
    /// Boot a fresh guest on `memory` (its first region must exceed 1 MiB): write the setup
    /// into the first MiB, create the VM and start the vCPU running.
    pub fn start(memory: Arc<GuestMemory>, config: &GuestConfig) -> Result<Self, GuestError> {
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("GET_SUPPORTED_CPUID"))?;
        let huge_1g = config.allow_1g_pages && supports_1g(&cpuid);
        let layout = SetupLayout::for_memory(&memory)?;
        let table = WalkTable::new(memory.regions(), layout.reserved, config.batch)?;
        x86::write_setup(&memory, &layout, &table, huge_1g)?;
        let regs = x86::initial_regs(&layout);
        Self::launch(kvm, cpuid, memory, config, |base| VcpuState {
            regs,
            sregs: x86::long_mode_sregs(base, &layout),
        })
    }

    /// Continue a guest saved by [`GuestCpu::state_bytes`] on `memory`, which must already
    /// hold the guest's RAM (program and page tables included).
    pub fn resume_from(
        memory: Arc<GuestMemory>,
        state: &[u8],
        config: &GuestConfig,
    ) -> Result<Self, GuestError> {
        let saved = VcpuState::from_bytes(state)?;
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("GET_SUPPORTED_CPUID"))?;
        if x86::uses_1g_pages(&memory, saved.sregs.cr3, saved.regs.rip) && !supports_1g(&cpuid) {
            return Err(GuestError::No1GPages);
        }
        Self::launch(kvm, cpuid, memory, config, |_| saved)
    }

    fn launch(
        kvm: Kvm,
        cpuid: kvm_bindings::CpuId,
        memory: Arc<GuestMemory>,
        config: &GuestConfig,
        state: impl FnOnce(&kvm_bindings::kvm_sregs) -> VcpuState,
    ) -> Result<Self, GuestError> {
        install_kick_handler()?;
        let vm = kvm.create_vm().map_err(kvm_err("CREATE_VM"))?;
        let tss = crate::range::IovaRange::new(TSS_ADDR, 3 * 4096);
        if !memory.regions().iter().any(|r| r.overlaps(&tss)) {
            vm.set_tss_address(TSS_ADDR as usize)
                .map_err(kvm_err("SET_TSS_ADDR"))?;
        }
        for (slot, r) in memory.regions().iter().enumerate() {
            let host = memory
                .host_addr(slot)
                .ok_or(GuestError::NoSuchRegion { index: slot })?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: r.iova,
                memory_size: r.length,
                userspace_addr: host,
            };
            // SAFETY: `host` is the start of a live mapping of exactly `r.length` bytes that
            // `memory` owns; `memory` (an Arc held by the returned KvmGuest) outlives the VM
            // fd (field order). Were it unmapped first, KVM would fault the guest access, not
            // corrupt host memory.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("SET_USER_MEMORY_REGION"))?;
        }
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("CREATE_VCPU"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("SET_CPUID2"))?;
        let base = vcpu.get_sregs().map_err(kvm_err("GET_SREGS"))?;
        let st = state(&base);
        vcpu.set_sregs(&st.sregs).map_err(kvm_err("SET_SREGS"))?;
        vcpu.set_regs(&st.regs).map_err(kvm_err("SET_REGS"))?;

        let shared = Arc::new(Shared {
            want: AtomicU8::new(WANT_RUN),
            ctl: Mutex::new(Ctl {
                status: Status::Running,
                snapshot: None,
            }),
            cv: Condvar::new(),
            counter: AtomicU64::new(st.counter()),
            start_counter: st.counter(),
            reports: AtomicU64::new(0),
            rate: AtomicU64::new(config.rate_pages_per_sec),
        });
        let s2 = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("iovatrack-vcpu0".into())
            .spawn(move || vcpu_thread(vcpu, &s2))
            .map_err(GuestError::Spawn)?;
        let pthread = handle.as_pthread_t();
        Ok(Self {
            vm,
            _kvm: kvm,
            shared,
            thread: Mutex::new(Some(handle)),
            pthread,
            memory,
        })
    }

    fn kick(&self) {
        // SAFETY: `pthread` belongs to a thread we have not joined yet (kicks happen only
        // while `thread` holds its JoinHandle), so the id is valid even if it has exited.
        unsafe {
            libc::pthread_kill(self.pthread, kick_signal());
        }
    }

    /// Fill `buf` with region `slot`'s dirty bitmap and clear KVM's log for it (classic
    /// `KVM_GET_DIRTY_LOG`). Raw ioctl into the caller's buffer: kvm-ioctls'
    /// `VmFd::get_dirty_log` allocates a fresh Vec on every call, which a pre-copy loop
    /// calling it per slot per pass does not need.
    pub fn dirty_log(&self, slot: usize, buf: &mut [u64]) -> Result<(), GuestError> {
        let words = self.memory.bitmap_words(slot)?;
        if buf.len() < words {
            return Err(GuestError::BufferSize {
                expected: words,
                got: buf.len(),
            });
        }
        let log = kvm_dirty_log {
            slot: slot as u32,
            padding1: 0,
            __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: buf.as_mut_ptr().cast(),
            },
        };
        // SAFETY: `vm` is a KVM VM fd; KVM writes ALIGN(npages, 64) / 8 bytes for the slot,
        // which is `words * 8`, and `buf` holds at least `words` u64s for this call.
        let rc =
            unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.vm, KVM_GET_DIRTY_LOG(), &log) };
        if rc != 0 {
            return Err(GuestError::Kvm {
                op: "GET_DIRTY_LOG",
                source: kvm_ioctls::Error::last(),
            });
        }
        Ok(())
    }

    /// The registers saved when the vCPU last paused; `NotPaused` unless paused now.
    pub fn vcpu_state(&self) -> Result<VcpuState, GuestError> {
        let ctl = self.shared.lock();
        match (ctl.status, ctl.snapshot) {
            (Status::Paused, Some(s)) if self.shared.want.load(Ordering::SeqCst) == WANT_PAUSE => {
                Ok(s)
            }
            (Status::Exited, _) => Err(GuestError::Exited),
            _ => Err(GuestError::NotPaused),
        }
    }
}

impl GuestCpu for KvmGuest {
    fn kind(&self) -> &'static str {
        "kvm"
    }

    fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    fn pause(&self) -> Result<(), GuestError> {
        let mut ctl = self.shared.lock();
        if ctl.status == Status::Exited {
            return Err(GuestError::Exited);
        }
        self.shared.want.store(WANT_PAUSE, Ordering::SeqCst);
        self.shared.cv.notify_all();
        let deadline = Instant::now() + PAUSE_DEADLINE;
        loop {
            match ctl.status {
                Status::Paused => return Ok(()),
                Status::Exited => return Err(GuestError::Exited),
                Status::Running => {}
            }
            if Instant::now() >= deadline {
                return Err(GuestError::PauseTimeout);
            }
            self.kick();
            ctl = self
                .shared
                .cv
                .wait_timeout_while(ctl, KICK_PERIOD, |c| c.status == Status::Running)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn resume(&self) -> Result<(), GuestError> {
        let ctl = self.shared.lock();
        if ctl.status == Status::Exited {
            return Err(GuestError::Exited);
        }
        self.shared.want.store(WANT_RUN, Ordering::SeqCst);
        self.shared.cv.notify_all();
        Ok(())
    }

    fn stop(&self) -> Result<(), GuestError> {
        let mut slot = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        let Some(handle) = slot.take() else {
            return Ok(());
        };
        {
            let _ctl = self.shared.lock();
            self.shared.want.store(WANT_STOP, Ordering::SeqCst);
            self.shared.cv.notify_all();
        }
        // One kick suffices: `want` is STOP before it, and see the module docs for why a
        // kick cannot be lost.
        self.kick();
        handle.join().map_err(|_| GuestError::ThreadPanicked)?
    }

    fn dirty_log(&self, slot: usize, buf: &mut [u64]) -> Result<(), GuestError> {
        KvmGuest::dirty_log(self, slot, buf)
    }

    fn progress(&self) -> Progress {
        let counter = self.shared.counter.load(Ordering::Relaxed);
        Progress {
            counter,
            pages_written: counter.wrapping_sub(self.shared.start_counter),
            reports: self.shared.reports.load(Ordering::Relaxed),
        }
    }

    fn set_rate(&self, pages_per_sec: u64) {
        self.shared.rate.store(pages_per_sec, Ordering::Relaxed);
    }

    fn state_bytes(&self) -> Result<Vec<u8>, GuestError> {
        Ok(self.vcpu_state()?.to_bytes())
    }
}

impl Drop for KvmGuest {
    fn drop(&mut self) {
        if let Err(e) = GuestCpu::stop(self) {
            log::warn!("KVM guest vCPU ended with an error: {e}");
        }
    }
}

fn exit_name(exit: &VcpuExit<'_>) -> &'static str {
    match exit {
        VcpuExit::IoIn(..) => "io-in",
        VcpuExit::IoOut(..) => "io-out (unknown port)",
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

fn vcpu_thread(mut vcpu: VcpuFd, shared: &Shared) -> Result<(), GuestError> {
    let flag: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|c| c.set(flag));
    let result = run_loop(&mut vcpu, shared);
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    if let Err(e) = &result {
        log::error!("vCPU thread failed: {e}");
    }
    let mut ctl = shared.lock();
    ctl.status = Status::Exited;
    shared.cv.notify_all();
    drop(ctl);
    result
}

/// Record one progress report: extend the guest's 32-bit counter to 64 bits.
fn report(shared: &Shared, low: u32) {
    let prev = shared.counter.load(Ordering::Relaxed);
    let mut c = (prev & !0xffff_ffff) | u64::from(low);
    if c < prev {
        c += 1 << 32;
    }
    shared.counter.store(c, Ordering::Relaxed);
    shared.reports.fetch_add(1, Ordering::Relaxed);
}

fn run_loop(vcpu: &mut VcpuFd, shared: &Shared) -> Result<(), GuestError> {
    let mut pacer = Pacer::new(shared.rate.load(Ordering::Relaxed));
    loop {
        match shared.want.load(Ordering::SeqCst) {
            WANT_RUN => {}
            WANT_PAUSE => {
                if park(vcpu, shared)? {
                    return Ok(());
                }
                pacer = Pacer::new(shared.rate.load(Ordering::Relaxed));
                continue;
            }
            _ => return Ok(()),
        }
        let before = shared.counter.load(Ordering::Relaxed);
        match vcpu.run() {
            Ok(VcpuExit::IoOut(PROGRESS_PORT, data)) => {
                let mut b = [0u8; 4];
                let n = data.len().min(4);
                b[..n].copy_from_slice(&data[..n]);
                report(shared, u32::from_le_bytes(b));
                let pages = shared.counter.load(Ordering::Relaxed).wrapping_sub(before);
                if let Some(d) = pacer.after(pages, shared.rate.load(Ordering::Relaxed)) {
                    // Interruptible sleep: pause/stop wake it through the condvar.
                    let ctl = shared.lock();
                    let _ = shared.cv.wait_timeout_while(ctl, d, |_| {
                        shared.want.load(Ordering::SeqCst) == WANT_RUN
                    });
                }
            }
            Ok(exit) => {
                return Err(GuestError::UnexpectedExit {
                    exit: exit_name(&exit),
                })
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked (or a stale kick): clear the flag and re-check `want`.
                vcpu.set_kvm_immediate_exit(0);
            }
            Err(e) => return Err(kvm_err("RUN")(e)),
        }
    }
}

/// Park the vCPU: complete the pending I/O, snapshot registers, wait for RUN or STOP.
/// Returns `true` for STOP.
fn park(vcpu: &mut VcpuFd, shared: &Shared) -> Result<bool, GuestError> {
    vcpu.set_kvm_immediate_exit(1);
    loop {
        match vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => break,
            // Not expected with immediate_exit set, but harmless: count it and retry.
            Ok(VcpuExit::IoOut(PROGRESS_PORT, data)) => {
                let mut b = [0u8; 4];
                let n = data.len().min(4);
                b[..n].copy_from_slice(&data[..n]);
                report(shared, u32::from_le_bytes(b));
            }
            Ok(exit) => {
                return Err(GuestError::UnexpectedExit {
                    exit: exit_name(&exit),
                })
            }
            Err(e) => return Err(kvm_err("RUN (complete I/O)")(e)),
        }
    }
    vcpu.set_kvm_immediate_exit(0);
    let snapshot = VcpuState {
        regs: vcpu.get_regs().map_err(kvm_err("GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm_err("GET_SREGS"))?,
    };
    let mut ctl = shared.lock();
    ctl.status = Status::Paused;
    ctl.snapshot = Some(snapshot);
    shared.cv.notify_all();
    while shared.want.load(Ordering::SeqCst) == WANT_PAUSE {
        ctl = shared.cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
    }
    if shared.want.load(Ordering::SeqCst) == WANT_STOP {
        return Ok(true);
    }
    ctl.status = Status::Running;
    ctl.snapshot = None;
    Ok(false)
}
