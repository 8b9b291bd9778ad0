//! The guest side of a live migration: guest RAM and a CPU that keeps dirtying it.
//!
//! * [`GuestMemory`]: RAM regions, each an anonymous `mmap(MAP_NORESERVE)`; source and
//!   destination use the same type.
//! * [`KvmGuest`]: a real KVM VM, one memslot per region with dirty logging, N 64-bit
//!   vCPUs each running a hand-assembled program that writes a running counter into the
//!   pages of its slice of the working set along a stride walk ([`WalkTable`]) and
//!   publishes its progress in guest RAM (no exit per batch).
//! * [`SoftGuest`]: the same walk done by host threads, with its own atomic dirty log, for
//!   hosts without `/dev/kvm`.
//! * [`warm_fill`]: non-zero data over a share of RAM before migration, as a booted OS's
//!   page cache would leave it.
//!
//! Both implement [`GuestCpu`], so the migration engine is generic over them.
//!
//! Dirty bitmaps at this API are plain `u64` words, LSB first, one bit per 4 KiB page, bit 0
//! = the region's first page (KVM's format). Only the CPU's writes are logged: writes the
//! host makes through [`GuestMemory`] (setup, a software DMA device) are not, and must be
//! tracked by whoever makes them.

mod kvm;
mod kvm_state;
mod kvm_vcpu;
mod memory;
mod pace;
pub mod program;
mod soft;
mod state;
mod throttle;
mod walk;
mod warm;
pub mod x86;

use std::sync::Arc;

pub use kvm::KvmGuest;
pub use memory::{
    hash_page_bytes, hash_words, hash_words_from, GuestMemory, HASH_SEED, PAGE_SIZE, PAGE_WORDS,
};
pub use soft::SoftGuest;
pub use walk::WalkTable;
pub use warm::{warm_fill, warm_pattern};

/// Errors of guest memory and guest CPUs.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// No RAM region given.
    #[error("no RAM regions")]
    NoRegions,
    /// A region of size zero.
    #[error("empty RAM region at {gpa:#x}")]
    RegionEmpty {
        /// Its start.
        gpa: u64,
    },
    /// A region not aligned to 4 KiB.
    #[error("RAM region {gpa:#x}+{size:#x} is not 4 KiB aligned")]
    RegionUnaligned {
        /// Start.
        gpa: u64,
        /// Size.
        size: u64,
    },
    /// A region reaching 2^64 or too large for this host.
    #[error("RAM region {gpa:#x}+{size:#x} overflows the address space")]
    RegionOverflow {
        /// Start.
        gpa: u64,
        /// Size.
        size: u64,
    },
    /// Region `index` starts before the end of the previous one.
    #[error("RAM region {index} overlaps or precedes the previous one")]
    RegionsOverlapOrUnsorted {
        /// Index of the offending region.
        index: usize,
    },
    /// `mmap` failed.
    #[error("mmap of {size:#x} bytes failed: {source}")]
    Mmap {
        /// Requested size.
        size: u64,
        /// OS error.
        source: std::io::Error,
    },
    /// Allocating guest RAM up front failed (out of memory, or a kernel before 5.14).
    #[error("allocating guest RAM [{gpa:#x}, +{size:#x}) up front failed: {source}")]
    Prefault {
        /// Region start.
        gpa: u64,
        /// Region size.
        size: u64,
        /// OS error.
        source: std::io::Error,
    },
    /// No region (memslot) with this index.
    #[error("no RAM region {index}")]
    NoSuchRegion {
        /// Requested index.
        index: usize,
    },
    /// An access outside RAM or crossing a region's end.
    #[error("guest access {gpa:#x}+{len:#x} is outside RAM")]
    OutOfRange {
        /// Start of the access.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A misaligned access.
    #[error("guest address {gpa:#x} is not {align}-byte aligned")]
    Unaligned {
        /// Address.
        gpa: u64,
        /// Required alignment.
        align: u64,
    },
    /// A caller buffer of the wrong size.
    #[error("buffer holds {got} units, {expected} needed")]
    BufferSize {
        /// Required length (bytes for pages, words for bitmaps).
        expected: usize,
        /// Given length.
        got: usize,
    },
    /// The first region cannot hold the setup area plus one page.
    #[error("first RAM region is {size:#x} bytes; the guest setup needs at least {needed:#x}")]
    FirstRegionTooSmall {
        /// Its size.
        size: u64,
        /// Minimum size.
        needed: u64,
    },
    /// The walk table does not fit its page.
    #[error("{count} walk regions, at most {max} fit the table page")]
    TooManyRegions {
        /// Regions needed.
        count: usize,
        /// Capacity.
        max: usize,
    },
    /// No RAM outside the reserved setup area.
    #[error("no RAM left for the guest to write")]
    NoWalkPages,
    /// The identity page tables do not fit the reserved area.
    #[error("page tables need more than the {available_pages} reserved pages: the guest's RAM spans more than they map at the page size this host allows (2 MiB without 1 GiB page support); shrink the layout (scale its RAM down)")]
    PageTablesTooLarge {
        /// Pages available for tables.
        available_pages: u64,
    },
    /// RAM above the 47-bit identity-mappable range.
    #[error("RAM at {gpa:#x} is above the 47-bit identity map")]
    AddressTooHigh {
        /// Region start.
        gpa: u64,
    },
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// What was attempted.
        op: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// The guest's page tables use 1 GiB pages but this host's KVM does not offer them.
    #[error("saved guest uses 1 GiB pages, unsupported by this host's KVM")]
    No1GPages,
    /// The vCPU left KVM_RUN for a reason the guest program never causes.
    #[error("unexpected vCPU exit: {exit}")]
    UnexpectedExit {
        /// Exit reason.
        exit: &'static str,
    },
    /// The vCPU or writer thread has exited (stopped or failed).
    #[error("guest CPU is not running (stopped or failed)")]
    Exited,
    /// The CPU did not stop within the pause deadline.
    #[error("guest CPU did not pause in time")]
    PauseTimeout,
    /// The operation needs a paused CPU.
    #[error("guest CPU is not paused")]
    NotPaused,
    /// A thread could not be spawned.
    #[error("spawning a guest thread failed: {0}")]
    Spawn(std::io::Error),
    /// A guest thread panicked.
    #[error("a guest thread panicked")]
    ThreadPanicked,
    /// Installing the vCPU kick signal handler failed.
    #[error("installing the vCPU kick signal handler failed: {0}")]
    Signal(std::io::Error),
    /// Saved state does not start with the magic.
    #[error("saved CPU state: bad magic")]
    StateBadMagic,
    /// Saved state of an unknown layout version.
    #[error("saved CPU state: unsupported version {found}")]
    StateVersion {
        /// Version found.
        found: u32,
    },
    /// Saved state of the other guest kind.
    #[error("saved CPU state: kind {found}, expected {expected}")]
    StateKind {
        /// Kind expected (1 = KVM, 2 = software).
        expected: u32,
        /// Kind found.
        found: u32,
    },
    /// Saved state shorter than its layout.
    #[error("saved CPU state: truncated")]
    StateTruncated,
    /// Saved state longer than its layout.
    #[error("saved CPU state: {extra} trailing bytes")]
    StateTrailing {
        /// Bytes left over.
        extra: usize,
    },
    /// Saved state whose content is inconsistent (e.g. zero threads).
    #[error("saved CPU state: inconsistent content")]
    StateInvalid,
    /// More (or fewer) vCPUs than the setup has room for.
    #[error("{count} vCPUs requested, 1 to {max} supported")]
    VcpuCount {
        /// vCPUs asked for.
        count: usize,
        /// Most supported.
        max: usize,
    },
}

/// How a guest CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestConfig {
    /// Pages per second the CPU may write; 0 = unlimited.
    pub rate_pages_per_sec: u64,
    /// Pages written between two progress reports (and rate-limit checks); at least 1.
    pub batch: u64,
    /// vCPUs: KVM vCPUs (each its own thread, at most [`x86::MAX_VCPUS`]) or software
    /// writer threads. A resumed guest takes the count from its saved state.
    pub threads: usize,
    /// Let the KVM guest use 1 GiB pages when the host offers them (else 2 MiB).
    pub allow_1g_pages: bool,
    /// Bytes of RAM the guest writes (the first ones outside the setup area, in address
    /// order, split among the vCPUs); 0 = all RAM. A resumed guest keeps its saved set.
    pub working_set: u64,
}

impl Default for GuestConfig {
    fn default() -> Self {
        Self {
            rate_pages_per_sec: 0,
            batch: 64,
            threads: 1,
            allow_1g_pages: true,
            working_set: 0,
        }
    }
}

/// Counters of a running guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// The guest's running counter: the value of its last page write, summed over vCPUs
    /// (each vCPU counts its own writes). It continues across migration (it is guest
    /// state), so a resumed guest starts from the saved value.
    pub counter: u64,
    /// Pages written by this instance (since it started or resumed from state).
    pub pages_written: u64,
    /// Batches completed by this instance (each ends with a progress report: a store to
    /// the progress words for KVM, a counter update for software).
    pub reports: u64,
}

/// A CPU that dirties guest memory: the migration engine's view of the guest.
pub trait GuestCpu: Send + Sync {
    /// `"kvm"` or `"software"`.
    fn kind(&self) -> &'static str;
    /// The RAM it writes.
    fn memory(&self) -> &Arc<GuestMemory>;
    /// Stop writing; returns once no further guest write can happen until [`resume`].
    ///
    /// [`resume`]: GuestCpu::resume
    fn pause(&self) -> Result<(), GuestError>;
    /// Continue after [`GuestCpu::pause`].
    fn resume(&self) -> Result<(), GuestError>;
    /// Stop for good and join the thread(s); returns the first failure, if any.
    fn stop(&self) -> Result<(), GuestError>;
    /// Fill `buf` (at least `memory().bitmap_words(slot)` words; overwritten, not OR-ed)
    /// with the pages of region `slot` the CPU dirtied since the previous call, and clear
    /// that log.
    fn dirty_log(&self, slot: usize, buf: &mut [u64]) -> Result<(), GuestError>;
    /// Current counters.
    fn progress(&self) -> Progress;
    /// Change the rate limit (pages per second over all vCPUs, 0 = unlimited).
    fn set_rate(&self, pages_per_sec: u64);
    /// Keep the vCPUs out of the guest `pct`% of the time (0 = off, capped at 99): every
    /// vCPU runs ~10 ms, then sleeps `pct / (100 - pct)` times that (QEMU's
    /// `cpu-throttle-percentage`), for auto-converge.
    fn set_throttle(&self, pct: u8);
    /// The current throttle percentage.
    fn throttle_pct(&self) -> u8;
    /// Saved CPU state (versioned bytes) to continue elsewhere; needs a paused CPU.
    fn state_bytes(&self) -> Result<Vec<u8>, GuestError>;
}

/// Whether `/dev/kvm` can be opened.
pub fn kvm_available() -> bool {
    kvm_ioctls::Kvm::new().is_ok()
}

/// Start a guest on `memory`: KVM if `use_kvm` and available, else software.
pub fn start_guest(
    memory: Arc<GuestMemory>,
    config: &GuestConfig,
    use_kvm: bool,
) -> Result<Box<dyn GuestCpu>, GuestError> {
    if use_kvm && kvm_available() {
        Ok(Box::new(KvmGuest::start(memory, config)?))
    } else {
        Ok(Box::new(SoftGuest::start(memory, config)?))
    }
}

/// Continue a guest from [`GuestCpu::state_bytes`] on `memory` (already holding its RAM),
/// with the kind the state was saved from.
pub fn resume_guest(
    memory: Arc<GuestMemory>,
    state: &[u8],
    config: &GuestConfig,
) -> Result<Box<dyn GuestCpu>, GuestError> {
    match state::kind_of(state)? {
        state::KIND_KVM | state::KIND_KVM_SMP => {
            Ok(Box::new(KvmGuest::resume_from(memory, state, config)?))
        }
        _ => Ok(Box::new(SoftGuest::resume_from(memory, state, config)?)),
    }
}
