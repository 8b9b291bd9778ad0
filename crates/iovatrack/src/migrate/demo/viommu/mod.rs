//! The demo behind a vIOMMU: the guest's DMA address space is an IOVA→GPA map that a
//! guest-driver model changes all through the migration, the container's host mapping
//! follows it (a VMM with a caching-mode vIOMMU), and every container tracks in IOVA space
//! ([`crate::track::viommu`]).

mod alloc;
mod driver;

pub use alloc::IovaAllocator;

use super::devices::{DemoDevice, DemoMigration};
use crate::device::{DeviceError, EmulatedDevice, EmulatedIommu, MigFlags, MigState};
use crate::migrate::seams::DeviceMigration;
use crate::range::IovaRange;
use crate::track::viommu::{Controls, Headroom, HostMapping, IovaSpace, ViommuStats};
use driver::{Dma, Driver};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// The vIOMMU workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViommuConfig {
    /// Streaming map → DMA → unmap cycles per second (0: as fast as possible).
    pub map_rate: u64,
    /// The device's DMA mask, in bits: IOVAs lie below `2^dma_mask_bits`.
    pub dma_mask_bits: u8,
    /// Bytes planned below the lowest mapped IOVA at each START.
    pub headroom: u64,
    /// Long-lived coherent rings.
    pub rings: u32,
    /// Pages per ring.
    pub ring_pages: u64,
    /// Ring writes per second.
    pub ring_rate: u64,
    /// Streaming buffers outstanding before the oldest is unmapped.
    pub inflight: u32,
    /// Seed.
    pub seed: u64,
    /// A negative control, if any.
    pub fault: Option<ViommuFault>,
}

impl Default for ViommuConfig {
    fn default() -> Self {
        ViommuConfig {
            map_rate: 2_000,
            dma_mask_bits: 32,
            headroom: 128 << 10,
            rings: 2,
            ring_pages: 16,
            ring_rate: 5_000,
            inflight: 32,
            seed: 1,
            fault: None,
        }
    }
}

impl ViommuConfig {
    /// The first IOVA past the DMA mask.
    pub fn dma_limit(&self) -> u64 {
        1u64 << self.dma_mask_bits.clamp(20, 63)
    }
}

/// A negative control behind the vIOMMU: each must end with the destination wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViommuFault {
    /// Unmap without reading the range's dirt first.
    NoUnmapQuery,
    /// Re-arm (STOP, START) without covering the window.
    NaiveRearm,
    /// Take reported IOVAs as guest physical addresses.
    NoTranslate,
}

impl ViommuFault {
    /// Every control's syntax.
    pub const SYNTAX: &'static str =
        "viommu-no-unmap-query, viommu-naive-rearm, viommu-no-translate";
}

impl std::str::FromStr for ViommuFault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viommu-no-unmap-query" => Ok(ViommuFault::NoUnmapQuery),
            "viommu-naive-rearm" => Ok(ViommuFault::NaiveRearm),
            "viommu-no-translate" => Ok(ViommuFault::NoTranslate),
            _ => Err(format!("unknown vIOMMU fault {s:?} ({})", Self::SYNTAX)),
        }
    }
}

impl std::fmt::Display for ViommuFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ViommuFault::NoUnmapQuery => "viommu-no-unmap-query",
            ViommuFault::NaiveRearm => "viommu-naive-rearm",
            ViommuFault::NoTranslate => "viommu-no-translate",
        })
    }
}

/// One container's vIOMMU: its IOVA space and the guest driver changing it.
pub struct ContainerViommu {
    space: Arc<IovaSpace>,
    driver: Driver,
}

impl ContainerViommu {
    /// The IOVA space `devices` DMA through, mapped by a driver model using `targets`
    /// (guest DMA-able RAM); the IOMMU follows every map.
    pub fn start(
        name: &str,
        cfg: ViommuConfig,
        memory: Arc<crate::migrate::guest::GuestMemory>,
        devices: Vec<Arc<EmulatedDevice>>,
        iommu: Arc<EmulatedIommu>,
        targets: Vec<IovaRange>,
    ) -> Result<Self, String> {
        // The host IOMMU starts empty: the guest maps what its driver uses.
        for r in iommu.mapped() {
            iommu.unmap(r).map_err(|e| e.to_string())?;
        }
        let controls = Controls {
            no_unmap_query: cfg.fault == Some(ViommuFault::NoUnmapQuery),
            naive_rearm: cfg.fault == Some(ViommuFault::NaiveRearm),
            no_translate: cfg.fault == Some(ViommuFault::NoTranslate),
        };
        // The window hook needs the driver, which needs the space: late-bound.
        let slot: Arc<std::sync::OnceLock<std::sync::Weak<driver::Shared>>> =
            Arc::new(std::sync::OnceLock::new());
        let hook_slot = slot.clone();
        let space = Arc::new(
            IovaSpace::new(
                name,
                cfg.dma_limit(),
                devices.iter().map(|d| d.clone() as _).collect(),
                Some(iommu.clone() as _),
            )
            .headroom(Headroom {
                below: cfg.headroom,
            })
            .host(iommu.clone() as Arc<dyn HostMapping>)
            .controls(controls)
            .window_hook(move || {
                if let Some(sh) = hook_slot.get().and_then(std::sync::Weak::upgrade) {
                    sh.window_dma();
                }
            }),
        );
        let dma = Dma {
            memory,
            space: space.clone(),
            devices,
            iommu,
            writes: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            seq: AtomicU64::new(0),
        };
        let driver = Driver::start(dma, cfg, targets)?;
        let _ = slot.set(Arc::downgrade(&driver.shared));
        Ok(ContainerViommu { space, driver })
    }

    /// The IOVA space, for the container's tracker.
    pub fn space(&self) -> Arc<IovaSpace> {
        self.space.clone()
    }

    /// DMA writes done.
    pub fn writes(&self) -> u64 {
        self.driver
            .shared
            .dma
            .writes
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// DMA writes the IOMMU blocked (unmapped IOVA).
    pub fn dma_faults(&self) -> u64 {
        self.driver
            .shared
            .dma
            .faults
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The space's counters.
    pub fn stats(&self) -> ViommuStats {
        self.space.stats()
    }

    /// Map and unmap errors the driver met (none expected).
    pub fn errors(&self) -> Vec<String> {
        self.driver
            .shared
            .errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn pause(&self) {
        self.driver.pause();
    }

    fn resume(&self) {
        self.driver.resume();
    }
}

/// A demo device behind the vIOMMU: its DMA (the container's driver model) stops while the
/// device is stopped, as a real device's does.
pub struct ViommuMigration {
    inner: DemoMigration,
    viommu: Arc<ContainerViommu>,
}

impl ViommuMigration {
    /// `dev`'s migration interface, pausing `viommu`'s driver with it.
    pub fn new(dev: Arc<DemoDevice>, viommu: Arc<ContainerViommu>) -> Self {
        Self {
            inner: DemoMigration::new(dev),
            viommu,
        }
    }
}

impl DeviceMigration for ViommuMigration {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn flags(&self) -> Result<MigFlags, DeviceError> {
        self.inner.flags()
    }
    fn set_state(&mut self, state: MigState) -> Result<(), DeviceError> {
        let dma = matches!(
            state,
            MigState::Running | MigState::RunningP2p | MigState::PreCopy | MigState::PreCopyP2p
        );
        if dma {
            self.inner.set_state(state)?;
            self.viommu.resume();
        } else {
            self.viommu.pause();
            self.inner.set_state(state)?;
        }
        Ok(())
    }
    fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError> {
        self.inner.read_data(buf)
    }
    fn write_data(&mut self, buf: &[u8]) -> Result<(), DeviceError> {
        self.inner.write_data(buf)
    }
    fn precopy_info(&mut self) -> Result<(u64, u64), DeviceError> {
        self.inner.precopy_info()
    }
}

/// The vIOMMU counters of all containers, into the summary.
pub fn fill_summary(s: &mut super::Summary, viommus: &[Arc<ContainerViommu>]) {
    s.viommu = true;
    for v in viommus {
        let st = v.stats();
        s.viommu_rearms += st.rearms;
        s.rearm_pages += st.rearm_pages;
        s.map_hold_ms += st.map_hold_ms;
        s.max_map_hold_ms = s.max_map_hold_ms.max(st.max_map_hold_ms);
        s.unmap_queries += st.unmap_queries;
        s.viommu_maps += st.maps;
        s.viommu_unmaps += st.unmaps;
        s.unmaps_while_logging += st.unmaps_while_logging;
        s.untranslated_bits += st.untranslated_bits;
        s.viommu_dma_faults += v.dma_faults();
        s.dma_writes += v.writes();
        for e in v.errors() {
            log::warn!("vIOMMU driver: {e}");
        }
    }
}
