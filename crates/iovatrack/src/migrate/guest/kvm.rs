//! A real KVM VM: one memslot per RAM region with dirty logging, N 64-bit vCPUs each in
//! its own thread (sharing the page tables, each with its own walk table, stack and slice
//! of the working set), pause/resume by signal kick, register save/restore, and a
//! throttle timer for auto-converge.
//!
//! # Dirty logging
//!
//! Every memslot is registered with `KVM_MEM_LOG_DIRTY_PAGES` from the start (classic mode,
//! no `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): every guest write since the VM was created is
//! logged, and [`KvmGuest::dirty_log`] (`KVM_GET_DIRTY_LOG`) returns and clears the slot's
//! log in one call. Host writes through [`GuestMemory`] (the setup, a software DMA device)
//! are NOT in KVM's log; whoever makes them must track them. The host never writes guest
//! RAM while the guest runs: rate limits travel in registers and `in` data.
//!
//! # Progress without exits
//!
//! Each vCPU publishes its counter and batch count in its progress words (guest RAM, see
//! `x86.rs`) at every batch end; [`GuestCpu::progress`] reads them. The vCPU leaves the
//! guest only at its page limit (`in`, see `program.rs`), which is practically never when
//! unlimited, or when kicked.
//!
//! # Pausing (the kick)
//!
//! A no-op-ish handler is installed for `SIGRTMIN` without `SA_RESTART`. Each vCPU thread
//! publishes, in a thread-local, the address of its `kvm_run.immediate_exit`. To pause, the
//! controller stores `want = PAUSE` and `pthread_kill`s every vCPU thread; the handler sets
//! `immediate_exit = 1`. Whatever a thread was doing, it ends up back at the top of its
//! loop, where it reads `want`:
//! * in the guest: the pending signal forces an exit, `KVM_RUN` fails with `EINTR`;
//! * between its `want` check and `KVM_RUN` (the classic race): the handler already ran,
//!   so `immediate_exit = 1` makes `KVM_RUN` return `EINTR` at once instead of sleeping in
//!   the guest with the kick lost;
//! * in the exit handler or a rate-limit or throttle sleep: it checks `want` next anyway.
//!
//! A stale kick only costs one spurious `EINTR` later. Before parking, the thread re-enters
//! `KVM_RUN` once with `immediate_exit = 1`: KVM then completes a pending `in` (writes RAX,
//! advances RIP) without running guest code, so the saved registers are consistent (KVM
//! API doc, `immediate_exit`). The controller re-kicks every 10 ms until every thread
//! reports itself parked, which it does only when it is out of `KVM_RUN` and blocked on
//! the condvar.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_dirty_log, kvm_dirty_log__bindgen_ty_1, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VmFd};

use super::kvm_state;
use super::kvm_vcpu::{
    install_kick_handler, kick, kvm_err, throttle_timer, vcpu_thread, Ctl, Shared, VcpuProgress,
    WANT_PAUSE, WANT_RUN, WANT_STOP,
};
use super::memory::GuestMemory;
use super::throttle;
use super::walk::WalkTable;
use super::x86::{self, SetupLayout, VcpuState, MAX_VCPUS};
use super::{GuestConfig, GuestCpu, GuestError, Progress};

/// How long `pause()` waits for the vCPUs before giving up.
const PAUSE_DEADLINE: Duration = Duration::from_secs(10);
/// Re-kick period while waiting for the vCPUs to park.
const KICK_PERIOD: Duration = Duration::from_millis(10);

/// TSS area KVM needs for real-mode emulation on some Intel hosts (QEMU/Firecracker value).
const TSS_ADDR: u64 = 0xfffb_d000;

/// A KVM VM running the guest program on N vCPU threads. See the module docs for dirty
/// logging, progress and pausing.
pub struct KvmGuest {
    // Field order = drop order: the VM fd closes before the memory Arc may unmap RAM.
    vm: VmFd,
    _kvm: Kvm,
    shared: Arc<Shared>,
    /// vCPU threads, in vCPU order; emptied (under the lock) by `stop`, so a kick never
    /// reaches a joined thread.
    threads: Mutex<Vec<JoinHandle<()>>>,
    timer: Mutex<Option<JoinHandle<()>>>,
    memory: Arc<GuestMemory>,
}

impl std::fmt::Debug for KvmGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmGuest")
            .field("memory", &self.memory)
            .field("vcpus", &self.shared.vcpus.len())
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
    /// Boot a fresh guest on `memory` (its first region must exceed the setup area) with
    /// `config.threads` vCPUs over `config.working_set`: write the setup into the first
    /// region, create the VM and start the vCPUs running.
    pub fn start(memory: Arc<GuestMemory>, config: &GuestConfig) -> Result<Self, GuestError> {
        let n = config.threads.max(1);
        if n > MAX_VCPUS {
            return Err(GuestError::VcpuCount {
                count: n,
                max: MAX_VCPUS,
            });
        }
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("GET_SUPPORTED_CPUID"))?;
        let huge_1g = config.allow_1g_pages && supports_1g(&cpuid);
        let layout = SetupLayout::for_memory(&memory)?;
        let mut tables = WalkTable::slices(
            memory.regions(),
            layout.reserved,
            config.batch,
            config.working_set,
            n,
        )?;
        for (i, t) in tables.iter_mut().enumerate() {
            t.progress = layout.progress_of(i);
        }
        x86::write_setup(&memory, &layout, &tables, huge_1g)?;
        Self::launch(
            kvm,
            cpuid,
            memory,
            config,
            |i, base| VcpuState {
                regs: x86::initial_regs(&layout, i),
                sregs: x86::long_mode_sregs(base, &layout),
            },
            n,
        )
    }

    /// Continue a guest saved by [`GuestCpu::state_bytes`] on `memory`, which must already
    /// hold the guest's RAM (program, tables and page tables included). The vCPU count and
    /// working set come from the saved guest; `config` gives the rate.
    pub fn resume_from(
        memory: Arc<GuestMemory>,
        state: &[u8],
        config: &GuestConfig,
    ) -> Result<Self, GuestError> {
        let saved = kvm_state::from_bytes(state)?;
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("GET_SUPPORTED_CPUID"))?;
        let s0 = &saved[0];
        if x86::uses_1g_pages(&memory, s0.sregs.cr3) && !supports_1g(&cpuid) {
            return Err(GuestError::No1GPages);
        }
        let n = saved.len();
        Self::launch(kvm, cpuid, memory, config, |i, _| saved[i], n)
    }

    fn launch(
        kvm: Kvm,
        cpuid: kvm_bindings::CpuId,
        memory: Arc<GuestMemory>,
        config: &GuestConfig,
        state: impl Fn(usize, &kvm_bindings::kvm_sregs) -> VcpuState,
        n: usize,
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
        let mut fds = Vec::with_capacity(n);
        let mut progress = Vec::with_capacity(n);
        for i in 0..n {
            let vcpu = vm.create_vcpu(i as u64).map_err(kvm_err("CREATE_VCPU"))?;
            vcpu.set_cpuid2(&cpuid).map_err(kvm_err("SET_CPUID2"))?;
            let base = vcpu.get_sregs().map_err(kvm_err("GET_SREGS"))?;
            let mut st = state(i, &base);
            // Ask the host for a quantum after the first batch: the saved limit belongs to
            // the previous host's rate.
            st.regs.r14 = 0;
            vcpu.set_sregs(&st.sregs).map_err(kvm_err("SET_SREGS"))?;
            vcpu.set_regs(&st.regs).map_err(kvm_err("SET_REGS"))?;
            // The progress words' gpa sits in the vCPU's table (RBX), word 4.
            let words = memory.read_u64(st.regs.rbx + 32)?;
            memory.read_u64(words + 8)?; // inside RAM, or the guest could not report
            progress.push(VcpuProgress {
                words,
                floor: AtomicU64::new(st.counter()),
                start: (st.counter(), st.regs.rbp),
            });
            fds.push(vcpu);
        }
        let shared = Arc::new(Shared {
            memory: Arc::clone(&memory),
            want: AtomicU8::new(WANT_RUN),
            ctl: Mutex::new(Ctl {
                parked: 0,
                exited: 0,
                snapshots: vec![None; n],
                failed: None,
            }),
            cv: Condvar::new(),
            rate: AtomicU64::new(config.rate_pages_per_sec),
            rate_gen: AtomicU64::new(0),
            throttle: AtomicU8::new(0),
            throttle_ticket: AtomicU64::new(0),
            vcpus: progress,
        });
        let guest = Self {
            vm,
            _kvm: kvm,
            shared,
            threads: Mutex::new(Vec::with_capacity(n)),
            timer: Mutex::new(None),
            memory,
        };
        for (i, vcpu) in fds.into_iter().enumerate() {
            let s = Arc::clone(&guest.shared);
            let h = std::thread::Builder::new()
                .name(format!("iovatrack-vcpu{i}"))
                .spawn(move || vcpu_thread(vcpu, &s, i))
                .map_err(GuestError::Spawn)?; // Drop of `guest` stops the ones started.
            guest.lock_threads().push(h);
        }
        let ids: Vec<libc::pthread_t> = guest
            .lock_threads()
            .iter()
            .map(|h| h.as_pthread_t())
            .collect();
        let s = Arc::clone(&guest.shared);
        let timer = std::thread::Builder::new()
            .name("iovatrack-throttle".into())
            .spawn(move || throttle_timer(&s, &ids))
            .map_err(GuestError::Spawn)?;
        *guest.timer.lock().unwrap_or_else(|e| e.into_inner()) = Some(timer);
        Ok(guest)
    }

    fn lock_threads(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Kick every vCPU thread not yet joined.
    fn kick_all(&self) {
        for h in self.lock_threads().iter() {
            kick(h.as_pthread_t());
        }
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.shared.vcpus.len()
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

    /// vCPU 0's registers saved when the vCPUs last paused; `NotPaused` unless paused now.
    pub fn vcpu_state(&self) -> Result<VcpuState, GuestError> {
        Ok(self.vcpu_states()?[0])
    }

    /// Every vCPU's registers saved when they last paused, in vCPU order; `NotPaused`
    /// unless all are paused now.
    pub fn vcpu_states(&self) -> Result<Vec<VcpuState>, GuestError> {
        let ctl = self.shared.lock();
        if ctl.exited > 0 {
            return Err(GuestError::Exited);
        }
        if ctl.parked < self.vcpu_count() || self.shared.want.load(Ordering::SeqCst) != WANT_PAUSE {
            return Err(GuestError::NotPaused);
        }
        ctl.snapshots
            .iter()
            .map(|s| s.ok_or(GuestError::NotPaused))
            .collect()
    }
}

const KVMIO: u32 = 0xAE;
vmm_sys_util::ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);

impl GuestCpu for KvmGuest {
    fn kind(&self) -> &'static str {
        "kvm"
    }

    fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    fn pause(&self) -> Result<(), GuestError> {
        let n = self.vcpu_count();
        let mut ctl = self.shared.lock();
        if ctl.exited > 0 {
            return Err(GuestError::Exited);
        }
        self.shared.want.store(WANT_PAUSE, Ordering::SeqCst);
        self.shared.cv.notify_all();
        let deadline = Instant::now() + PAUSE_DEADLINE;
        loop {
            if ctl.exited > 0 {
                return Err(GuestError::Exited);
            }
            if ctl.parked == n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(GuestError::PauseTimeout);
            }
            drop(ctl);
            self.kick_all();
            ctl = self.shared.lock();
            ctl = self
                .shared
                .cv
                .wait_timeout_while(ctl, KICK_PERIOD, |c| c.parked < n && c.exited == 0)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
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
        {
            let _ctl = self.shared.lock();
            self.shared.want.store(WANT_STOP, Ordering::SeqCst);
            self.shared.cv.notify_all();
        }
        // The timer kicks by thread id: join it before any vCPU thread is joined.
        let timer = self.timer.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut panicked = timer.is_some_and(|t| t.join().is_err());
        let handles = {
            let mut threads = self.lock_threads();
            // One kick each suffices: `want` is STOP before it (see the module docs).
            for h in threads.iter() {
                kick(h.as_pthread_t());
            }
            std::mem::take(&mut *threads)
        };
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
        KvmGuest::dirty_log(self, slot, buf)
    }

    fn progress(&self) -> Progress {
        let mut p = Progress::default();
        for (i, v) in self.shared.vcpus.iter().enumerate() {
            let (counter, batches) = self.shared.vcpu_progress(i);
            p.counter = p.counter.wrapping_add(counter);
            p.pages_written += counter.saturating_sub(v.start.0);
            p.reports += batches.saturating_sub(v.start.1);
        }
        p
    }

    fn set_rate(&self, pages_per_sec: u64) {
        self.shared.rate.store(pages_per_sec, Ordering::SeqCst);
        self.shared.rate_gen.fetch_add(1, Ordering::SeqCst);
        // A vCPU holding a large quantum would not ask again for a long time.
        self.kick_all();
    }

    fn set_throttle(&self, pct: u8) {
        let _ctl = self.shared.lock();
        self.shared
            .throttle
            .store(throttle::clamp(pct), Ordering::SeqCst);
        self.shared.cv.notify_all();
    }

    fn throttle_pct(&self) -> u8 {
        self.shared.throttle.load(Ordering::SeqCst)
    }

    fn state_bytes(&self) -> Result<Vec<u8>, GuestError> {
        Ok(kvm_state::to_bytes(&self.vcpu_states()?))
    }
}

impl Drop for KvmGuest {
    fn drop(&mut self) {
        if let Err(e) = GuestCpu::stop(self) {
            log::warn!("KVM guest vCPU ended with an error: {e}");
        }
    }
}
