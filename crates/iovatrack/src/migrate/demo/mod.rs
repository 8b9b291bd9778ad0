//! The demo harness around the engine: a guest (KVM or software) that keeps dirtying its
//! RAM, emulated passthrough devices doing DMA, injected faults and page-level
//! verification, wired to [`crate::migrate::engine`] through its seams. This is what
//! `iovatrack migrate` runs; a VMM uses the engine directly with its own parts.

pub mod devices;
pub mod dma;
pub mod faults;
mod summary;
pub mod targets;
pub mod verify;
pub mod viommu;

pub use devices::{DemoDevice, DemoMigration};
pub use dma::{DmaConfig, DmaPattern};
pub use faults::{Fault, FaultInjector};
pub use summary::{merge_destination, NegativeControl, Summary};

use crate::device::{DmaLogger, EmulatedDevice, EmulatedIommu, IommuDirtyTracker};
use crate::layout::Layout;
use crate::migrate::engine::{
    self, DestReport, Destination, EngineConfig, Event, MigrateError, PlainTcp, SourceVm,
    TimeoutAction, Transport,
};
use crate::migrate::guest::{self, GuestConfig, GuestMemory};
use crate::migrate::guest_regions;
use crate::migrate::seams::{DeviceMigration, EmulatedMigration};
use crate::plan::limits::DeviceLimits;
use crate::plan::Planner;
use crate::track::{Container, ModeChoice, Tracker};
use std::io;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, Instant};
use verify::{hash_bytes, PageHashes};

/// Everything a demo migration needs to know.
#[derive(Clone, Debug)]
pub struct MigrateConfig {
    /// The guest's memory map.
    pub layout: Layout,
    /// Use KVM when `/dev/kvm` is there (else a software vCPU).
    pub use_kvm: bool,
    /// Guest dirty rate, pages per second (0 = as fast as the vCPU goes).
    pub cpu_rate: u64,
    /// Each device's DMA workload.
    pub dma: DmaConfig,
    /// The emulated devices' limits, one entry per device (named `dma0`, `dma1`, ...).
    pub devices: Vec<DeviceLimits>,
    /// Containers the devices are spread over (device `i` in container `i % containers`).
    pub containers: usize,
    /// Track device dirt (false: the negative control; DMA writes go unlogged).
    pub device_tracking: bool,
    /// The tracking mode every container runs (default: the fallback chain).
    pub tracking: ModeChoice,
    /// Range cap for the planner.
    pub max_ranges: u32,
    /// Convergence, link and retry policy.
    pub engine: EngineConfig,
    /// Injected faults.
    pub faults: Vec<Fault>,
    /// How long the guest and the devices run before migration starts.
    pub warmup: Duration,
    /// Share of guest RAM (percent, outside the guest's setup area) filled with non-zero
    /// data before the guest starts, as a booted OS's page cache would have it.
    pub warm_pct: u8,
    /// vCPUs of the KVM guest (writer threads of the software guest).
    pub vcpus: usize,
    /// Bytes of RAM the guest keeps dirtying (0 = all RAM).
    pub working_set: u64,
    /// Behind a vIOMMU: the guest maps and unmaps its DMA, every container tracks in IOVA
    /// space (`None`: the devices DMA to guest physical addresses).
    pub viommu: Option<viommu::ViommuConfig>,
    /// What the connection runs over (plain TCP, or TLS with mutual authentication):
    /// both ends of [`run_local`], and what [`run_source`] reports.
    pub transport: Arc<dyn Transport>,
    /// [`run_local`]'s destination allocates all guest RAM before the source connects
    /// (see [`DemoDestination::prealloc`]).
    pub prealloc: bool,
}

impl MigrateConfig {
    /// Defaults for `layout`: one mlx5 device.
    pub fn new(layout: Layout) -> Self {
        MigrateConfig {
            layout,
            use_kvm: true,
            cpu_rate: 20_000,
            dma: DmaConfig::default(),
            devices: vec![DeviceLimits::mlx5()],
            containers: 1,
            device_tracking: true,
            tracking: ModeChoice::Auto,
            max_ranges: 256,
            engine: EngineConfig::default(),
            faults: Vec::new(),
            warmup: Duration::from_millis(300),
            warm_pct: 25,
            vcpus: 1,
            working_set: 0,
            viommu: None,
            transport: Arc::new(PlainTcp),
            prealloc: false,
        }
    }

    /// The first device's limits (the one most runs have).
    pub fn device(&self) -> DeviceLimits {
        self.devices
            .first()
            .copied()
            .unwrap_or(DeviceLimits::generic())
    }

    /// Shortcut for the engine's timeout action.
    pub fn timeout_action(&self) -> TimeoutAction {
        self.engine.timeout_action
    }
}

/// The strictest of several devices' limits: the same ranges go to every device of a
/// container, so they are planned for the one that takes the fewest.
pub fn strictest(devices: &[DeviceLimits]) -> DeviceLimits {
    let mut it = devices.iter().copied();
    let first = it.next().unwrap_or(DeviceLimits::generic());
    it.fold(first, |a, b| {
        let pick = if b.max_ranges < a.max_ranges
            || (b.max_ranges == a.max_ranges && b.addr_space_log2.is_some())
        {
            b
        } else {
            a
        };
        DeviceLimits {
            max_ranges: a.max_ranges.min(b.max_ranges),
            core_max_ranges: a.core_max_ranges.min(b.core_max_ranges),
            ..pick
        }
    })
}

/// The demo source: builds the guest, the devices and their workloads, runs the engine,
/// and reports.
pub fn run_source<C: Into<Box<dyn engine::Channel>>>(
    cfg: &MigrateConfig,
    connect: impl FnMut() -> io::Result<C>,
    events: &mut dyn FnMut(Event),
) -> Result<Summary, MigrateError> {
    let t0 = Instant::now();
    let regions = guest_regions(&cfg.layout);
    if regions.first().is_none_or(|r| r.0 != 0) {
        return Err(MigrateError::Layout(
            "the guest needs RAM at address 0 (its page tables and code live there)".into(),
        ));
    }
    let memory = Arc::new(GuestMemory::new(&regions)?);
    // The guest's own setup (page tables, code, stack): no DMA there.
    let reserved = guest::x86::SetupLayout::for_memory(&memory)?.reserved;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    guest::warm_fill(&memory, reserved, cfg.warm_pct, threads)?;
    let gcfg = GuestConfig {
        rate_pages_per_sec: cfg.cpu_rate,
        threads: cfg.vcpus,
        working_set: cfg.working_set,
        ..GuestConfig::default()
    };
    let guest = guest::start_guest(memory.clone(), &gcfg, cfg.use_kvm)?;
    let targets = targets::dma_targets(&cfg.layout, memory.regions(), reserved);
    let n_containers = cfg.containers.clamp(1, cfg.devices.len().max(1));
    // Each container's IOMMU maps what its devices can reach and logs their writes too
    // (dirty bits in its page tables), for IOMMU tracking mode.
    let iommus = (0..n_containers)
        .map(|c| {
            EmulatedIommu::new(&targets)
                .map(|i| Arc::new(i.named(format!("iommu{c}"))))
                .map_err(|e| MigrateError::Layout(format!("IOMMU mappings: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut demo = Vec::new();
    let mut emulated = Vec::new();
    for (i, limits) in cfg.devices.iter().enumerate() {
        let name = format!("dma{i}");
        let device = Arc::new(EmulatedDevice::new(*limits).named(&name));
        // Writes before migration starts are covered by pass 0; only the negative control
        // counts writes as unlogged (from when tracking would have started).
        let dma = DmaConfig {
            seed: cfg.dma.seed.wrapping_add(i as u64),
            ..cfg.dma
        };
        // Behind a vIOMMU the device DMAs by IOVA through the guest's driver model (below),
        // not to guest physical addresses: this workload has nothing to write.
        let direct = if cfg.viommu.is_some() {
            Vec::new()
        } else {
            targets.clone()
        };
        let workload = dma::DmaWorkload::start(
            memory.clone(),
            vec![
                device.clone() as Arc<dyn dma::DmaSink>,
                iommus[i % n_containers].clone() as Arc<dyn dma::DmaSink>,
            ],
            direct,
            dma,
        );
        emulated.push(device.clone());
        demo.push(Arc::new(DemoDevice::new(&name, device, workload)));
    }
    let viommus = match cfg.viommu {
        Some(v) => (0..n_containers)
            .map(|c| {
                let members: Vec<Arc<EmulatedDevice>> = (0..cfg.devices.len())
                    .filter(|i| i % n_containers == c)
                    .map(|i| emulated[i].clone())
                    .collect();
                let v = viommu::ViommuConfig {
                    seed: v.seed.wrapping_add(c as u64),
                    ..v
                };
                viommu::ContainerViommu::start(
                    &format!("viommu{c}"),
                    v,
                    memory.clone(),
                    members,
                    iommus[c].clone(),
                    targets.clone(),
                )
                .map(Arc::new)
                .map_err(|e| MigrateError::Layout(format!("vIOMMU: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let mut containers: Vec<Tracker> = if cfg.device_tracking {
        (0..n_containers)
            .map(|c| {
                let members: Vec<usize> = (0..cfg.devices.len())
                    .filter(|i| i % n_containers == c)
                    .collect();
                let limits: Vec<DeviceLimits> = members.iter().map(|&i| cfg.devices[i]).collect();
                let strict = strictest(&limits);
                let planner = Planner::new()
                    .max_ranges(cfg.max_ranges.min(strict.max_ranges))
                    .device(strict);
                let iommu: Arc<dyn IommuDirtyTracker> =
                    if cfg.faults.contains(&Fault::IommuAcrossHoles) {
                        Arc::new(faults::HideMappings(iommus[c].clone()))
                    } else {
                        iommus[c].clone()
                    };
                let container = members.iter().fold(
                    Container::new(format!("container{c}")).iommu(iommu),
                    |k, &i| k.device(emulated[i].clone() as Arc<dyn DmaLogger>),
                );
                let t = Tracker::new(container, planner).force_mode(cfg.tracking);
                match viommus.get(c) {
                    Some(v) => t.viommu(v.space()),
                    None => t,
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut devices: Vec<(usize, Box<dyn DeviceMigration>)> = demo
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let m: Box<dyn DeviceMigration> = match viommus.get(i % n_containers) {
                Some(v) => Box::new(viommu::ViommuMigration::new(d.clone(), v.clone())),
                None => Box::new(DemoMigration::new(d.clone())),
            };
            (i % n_containers, m)
        })
        .collect();
    let mut hooks = FaultInjector::new(cfg.faults.clone(), emulated.clone(), demo.clone());
    std::thread::sleep(cfg.warmup);
    let vm = SourceVm {
        layout: &cfg.layout,
        memory: memory.as_ref(),
        vcpus: &guest,
        cpu_log: &guest,
        containers: &mut containers,
        devices: &mut devices,
        verifier: Some(&PageHashes),
    };
    let migration_started = Instant::now();
    let report = engine::run_source(&cfg.engine, vm, &mut hooks, connect, events)?;
    let migration_ms = migration_started.elapsed().as_secs_f64() * 1000.0;
    let mut summary = Summary::from_engine(report, guest.kind(), cfg.devices.len());
    summary.downtime_budget_ms = cfg.engine.downtime_ms;
    summary.migration_ms = migration_ms;
    summary.transport = cfg.transport.name().to_string();
    summary.faults = cfg.faults.iter().map(|f| f.to_string()).collect();
    summary.faults_fired = hooks.fired.iter().map(|f| f.to_string()).collect();
    summary.dma_writes = demo.iter().map(|d| d.workload().writes()).sum();
    if cfg.viommu.is_some() {
        viommu::fill_summary(&mut summary, &viommus);
    }
    summary.guest_pages_written = guest.progress().pages_written;
    // Writes nobody logged: outside a device's ranges when its own container runs device
    // mode; the IOMMU sees every DMA in IOMMU mode, and all-dirty mode needs no log.
    let outside: u64 = emulated
        .iter()
        .zip(&summary.device_reports)
        .filter(|(_, r)| r.mode == "device")
        .map(|(d, _)| d.untracked_writes())
        .sum();
    summary.untracked_dma_writes = outside
        + demo
            .iter()
            .map(|d| d.workload().unlogged_writes())
            .sum::<u64>();
    summary.device_state_digest =
        devices_digest(emulated.iter().map(|d| d.migration().data().to_vec()));
    summary.judge_control();
    if summary.aborted.is_some() {
        // The engine resumed the guest after a clean failure: see that it runs.
        let before = guest.progress().pages_written;
        std::thread::sleep(Duration::from_millis(200));
        summary.source_running_after_abort =
            Some(summary.source_resumed && guest.progress().pages_written > before);
    }
    drop(devices);
    drop(hooks);
    drop(containers);
    drop(viommus);
    drop(demo);
    guest.stop()?;
    summary.total_ms = t0.elapsed().as_secs_f64() * 1000.0;
    Ok(summary)
}

/// One digest over every device's state, in device order.
fn devices_digest(states: impl Iterator<Item = Vec<u8>>) -> u64 {
    guest::hash_words(states.map(|s| hash_bytes(&s)))
}

/// The demo destination: guest RAM from `layout`, emulated devices `dma0..` for
/// `devices`; receives, verifies, and resumes the guest, which must make progress.
pub struct DemoDestination {
    memory: Arc<GuestMemory>,
    emulated: Vec<Arc<EmulatedDevice>>,
    dest: Destination,
}

impl DemoDestination {
    /// Memory and devices for a guest of `layout` with `devices`.
    pub fn new(layout: &Layout, devices: &[DeviceLimits]) -> Result<Self, MigrateError> {
        let memory = Arc::new(GuestMemory::new(&guest_regions(layout))?);
        let emulated: Vec<Arc<EmulatedDevice>> = devices
            .iter()
            .enumerate()
            .map(|(i, l)| Arc::new(EmulatedDevice::new(*l).named(format!("dma{i}"))))
            .collect();
        let migr = emulated
            .iter()
            .enumerate()
            .map(|(i, d)| {
                Box::new(EmulatedMigration::new(format!("dma{i}"), d.clone()))
                    as Box<dyn DeviceMigration>
            })
            .collect();
        // KVM state resumes only on KVM; software state anywhere.
        let kinds: &[&str] = if guest::kvm_available() {
            &["kvm", "software"]
        } else {
            &["software"]
        };
        let dest = Destination::new(memory.clone(), migr)
            .verifier(Arc::new(PageHashes))
            .vcpu_kinds(kinds.iter().copied());
        Ok(Self {
            memory,
            emulated,
            dest,
        })
    }

    /// Allocate all guest RAM now, before any source connects, as a destination with a
    /// passthrough device has it: mapping guest RAM for the device's DMA
    /// (`VFIO_IOMMU_MAP_DMA`, or iommufd's `IOMMU_IOAS_MAP`) pins every page, so QEMU or
    /// Cloud Hypervisor start such an incoming VM with its RAM already allocated. Received
    /// pages then cost no page fault and no kernel zeroing. Returns how long it took.
    pub fn prealloc(&self) -> Result<Duration, MigrateError> {
        let t = Instant::now();
        // Whole 2 MiB pages when all of it is allocated anyway (without prealloc, a
        // destination's scattered first writes would each zero 2 MiB).
        self.memory.advise_huge_pages();
        self.memory.prefault()?;
        Ok(t.elapsed())
    }

    /// Bound what one session may make this destination hold, and its timeouts.
    pub fn limits(mut self, limits: engine::DestLimits) -> Self {
        self.dest = self.dest.limits(limits);
        self
    }

    /// Accept connections over `transport` (TLS: only sources with a certificate of the
    /// trusted CA).
    pub fn transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.dest = self.dest.transport(transport);
        self
    }

    /// A flag that makes [`DemoDestination::run`] stop waiting for a connection.
    pub fn give_up_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.dest.give_up_flag()
    }

    /// Receive, then resume the guest here and see it make progress.
    pub fn run(
        mut self,
        listener: &TcpListener,
        max_sessions: u32,
        accept_timeout: Duration,
    ) -> Result<DestReport, MigrateError> {
        let received = self.dest.run(listener, max_sessions, accept_timeout)?;
        let mut report = received.report;
        report.device_state_digest =
            devices_digest(self.emulated.iter().map(|d| d.migration().data().to_vec()));
        if !report.verified {
            return Ok(report);
        }
        let Some(state) = received.vcpu_states.first() else {
            return Err(MigrateError::Destination(
                "the source sent no vCPU state".into(),
            ));
        };
        let g = guest::resume_guest(self.memory.clone(), state, &GuestConfig::default())?;
        let c0 = g.progress().counter;
        let deadline = Instant::now() + Duration::from_secs(5);
        while g.progress().counter <= c0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let c1 = g.progress().counter;
        g.stop()?;
        report.counter = (c0, c1);
        report.resumed = c1 > c0;
        Ok(report)
    }
}

/// Source and destination in one process over loopback TCP (`cfg.transport` on both
/// ends).
pub fn run_local(
    cfg: &MigrateConfig,
    events: &mut dyn FnMut(Event),
) -> Result<Summary, MigrateError> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let dest = DemoDestination::new(&cfg.layout, &cfg.devices)?.transport(cfg.transport.clone());
    let prealloc = if cfg.prealloc {
        dest.prealloc()?
    } else {
        Duration::ZERO
    };
    let sessions = cfg.engine.retries + 1;
    let give_up = dest.give_up_flag();
    let handle = std::thread::Builder::new()
        .name("destination".into())
        .spawn(move || dest.run(&listener, sessions, Duration::from_secs(120)))?;
    let summary = run_source(
        cfg,
        || {
            let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            cfg.transport.client(tcp)
        },
        events,
    );
    give_up.store(true, SeqCst);
    let dest = handle
        .join()
        .map_err(|_| MigrateError::Destination("the destination thread panicked".into()))?;
    let mut summary = summary?;
    summary.prealloc_ms = prealloc.as_secs_f64() * 1000.0;
    summary.total_ms += summary.prealloc_ms;
    merge_destination(&mut summary, dest);
    Ok(summary)
}
