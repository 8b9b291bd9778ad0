//! The container a tracker serves and the modes it can run in.

use crate::device::{DeviceError, DmaLogger, IommuDirtyTracker};
use crate::range::{human_bytes, IovaRange};
use std::fmt;
use std::sync::Arc;

/// Which tracking mode to run: chosen by the rules (`Auto`), or forced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ModeChoice {
    /// Device DMA logging, else IOMMU tracking, else all dirty (the module's rules).
    #[default]
    Auto,
    /// Device DMA logging only; start fails if it cannot run. A re-arm that fails later
    /// falls to all dirty (never loses a page).
    Device,
    /// IOMMU dirty tracking only; start fails if the container has none or it fails.
    Iommu,
    /// Every DMA-able page dirty on every collect.
    AllDirty,
}

impl ModeChoice {
    /// The name, as [`TrackingMode::name`] gives it (`auto` for [`ModeChoice::Auto`]).
    pub fn name(self) -> &'static str {
        match self {
            ModeChoice::Auto => "auto",
            ModeChoice::Device => "device",
            ModeChoice::Iommu => "iommu",
            ModeChoice::AllDirty => "all-dirty",
        }
    }
}

impl std::str::FromStr for ModeChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => ModeChoice::Auto,
            "device" => ModeChoice::Device,
            "iommu" => ModeChoice::Iommu,
            "all-dirty" => ModeChoice::AllDirty,
            _ => {
                return Err(format!(
                    "unknown tracking mode {s:?} (auto, device, iommu, all-dirty)"
                ))
            }
        })
    }
}

/// One VFIO container: the devices attached to it and its IOMMU's dirty tracking, if any.
#[derive(Clone)]
pub struct Container {
    /// A name for messages.
    pub name: String,
    /// The devices (each may or may not support DMA logging).
    pub devices: Vec<Arc<dyn DmaLogger>>,
    /// IOMMU dirty tracking of the container, if the IOMMU has it.
    pub iommu: Option<Arc<dyn IommuDirtyTracker>>,
}

impl Container {
    /// A container with no devices and no IOMMU tracking.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            devices: Vec::new(),
            iommu: None,
        }
    }

    /// Add a device.
    pub fn device(mut self, device: Arc<dyn DmaLogger>) -> Self {
        self.devices.push(device);
        self
    }

    /// Set the IOMMU dirty tracker.
    pub fn iommu(mut self, iommu: Arc<dyn IommuDirtyTracker>) -> Self {
        self.iommu = Some(iommu);
        self
    }
}

impl fmt::Debug for Container {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Container")
            .field("name", &self.name)
            .field(
                "devices",
                &self.devices.iter().map(|d| d.name()).collect::<Vec<_>>(),
            )
            .field("iommu", &self.iommu.as_ref().map(|i| i.name()))
            .finish()
    }
}

/// Why device DMA logging is not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FallbackReason {
    /// A device has no DMA logging (its probe failed).
    NoDeviceLogging {
        /// The device.
        device: String,
        /// The probe's error.
        error: DeviceError,
    },
    /// A device refused START, even after re-planning (or with an errno re-planning
    /// cannot help).
    StartRefused {
        /// The device.
        device: String,
        /// Its last START error.
        error: DeviceError,
        /// Ranges in the last attempt.
        ranges: usize,
        /// Re-plans tried.
        replans: u32,
    },
    /// The container is behind a vIOMMU: device logging cannot cover dynamic mappings.
    Viommu {
        /// The translated address space.
        address_space: String,
    },
    /// The caller forced this mode ([`super::Tracker::force_mode`]).
    Forced,
    /// Device logging ran, a REPORT failed, and re-arming it (STOP, START the same
    /// ranges) was refused.
    RearmFailed {
        /// The device.
        device: String,
        /// Its START error.
        error: DeviceError,
    },
}

impl fmt::Display for FallbackReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FallbackReason::NoDeviceLogging { device, error } => {
                write!(f, "device {device} has no DMA logging ({error})")
            }
            FallbackReason::StartRefused {
                device,
                error,
                ranges,
                replans,
            } => write!(
                f,
                "device {device} refused DMA logging of {ranges} range(s) after {replans} re-plan(s) ({error})"
            ),
            FallbackReason::Viommu { address_space } => write!(
                f,
                "address space {address_space:?} is behind a vIOMMU, whose mappings no fixed device range set covers"
            ),
            FallbackReason::Forced => write!(f, "the mode was forced"),
            FallbackReason::RearmFailed { device, error } => write!(
                f,
                "device {device} refused to re-arm DMA logging after a failed report ({error})"
            ),
        }
    }
}

/// The tracking mode in force, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrackingMode {
    /// Every device logs its own DMA writes in `ranges`.
    Device {
        /// The page size requested at START.
        page_size: u64,
        /// The ranges every device was given (empty: no devices, nothing to track).
        ranges: Vec<IovaRange>,
        /// The page size each device chose, in the container's device order.
        device_page_sizes: Vec<u64>,
        /// Re-plans with fewer ranges before START succeeded.
        replans: u32,
    },
    /// The IOMMU tracks dirt on its page tables.
    Iommu {
        /// The page size of the reads.
        page_size: u64,
        /// The DMA-able ranges read each collect.
        ranges: Vec<IovaRange>,
        /// Why device logging is not used.
        reason: FallbackReason,
    },
    /// No tracking: every DMA-able page is pending after every collect.
    AllDirty {
        /// The DMA-able ranges marked each collect.
        ranges: Vec<IovaRange>,
        /// Why device logging is not used.
        reason: FallbackReason,
        /// Why IOMMU tracking is not used: its error, or `None` when there is none.
        iommu_error: Option<DeviceError>,
    },
}

impl TrackingMode {
    /// A short name: `device`, `iommu` or `all-dirty`.
    pub fn name(&self) -> &'static str {
        match self {
            TrackingMode::Device { .. } => "device",
            TrackingMode::Iommu { .. } => "iommu",
            TrackingMode::AllDirty { .. } => "all-dirty",
        }
    }

    /// Why device logging is not used (`None` in device mode).
    pub fn reason(&self) -> Option<&FallbackReason> {
        match self {
            TrackingMode::Device { .. } => None,
            TrackingMode::Iommu { reason, .. } | TrackingMode::AllDirty { reason, .. } => {
                Some(reason)
            }
        }
    }

    /// The ranges tracked (device mode) or read/marked (other modes).
    pub fn ranges(&self) -> &[IovaRange] {
        match self {
            TrackingMode::Device { ranges, .. }
            | TrackingMode::Iommu { ranges, .. }
            | TrackingMode::AllDirty { ranges, .. } => ranges,
        }
    }
}

fn bytes(ranges: &[IovaRange]) -> String {
    human_bytes(ranges.iter().map(|r| r.length as u128).sum())
}

impl fmt::Display for TrackingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrackingMode::Device {
                ranges,
                device_page_sizes,
                ..
            } if device_page_sizes.is_empty() => {
                let _ = ranges;
                write!(f, "device DMA logging: no devices, nothing to track")
            }
            TrackingMode::Device {
                page_size,
                ranges,
                device_page_sizes,
                replans,
            } => {
                write!(
                    f,
                    "device DMA logging: {} device(s), {} range(s) ({}) at {}",
                    device_page_sizes.len(),
                    ranges.len(),
                    bytes(ranges),
                    human_bytes(*page_size as u128)
                )?;
                if device_page_sizes.iter().any(|p| p != page_size) {
                    let ps: Vec<String> = device_page_sizes
                        .iter()
                        .map(|&p| human_bytes(p as u128))
                        .collect();
                    write!(f, ", device pages {}", ps.join(", "))?;
                }
                if *replans > 0 {
                    write!(f, ", after {replans} re-plan(s)")?;
                }
                Ok(())
            }
            TrackingMode::Iommu {
                page_size,
                ranges,
                reason,
            } => write!(
                f,
                "IOMMU dirty tracking: {} range(s) ({}) at {}, because {reason}",
                ranges.len(),
                bytes(ranges),
                human_bytes(*page_size as u128)
            ),
            TrackingMode::AllDirty {
                ranges,
                reason,
                iommu_error,
            } => {
                write!(
                    f,
                    "all dirty: every DMA-able page ({}) re-sent each pass, because {reason}",
                    bytes(ranges)
                )?;
                match iommu_error {
                    Some(e) => write!(f, ", and IOMMU dirty tracking failed ({e})"),
                    None if *reason == FallbackReason::Forced => Ok(()),
                    None => write!(f, ", and the container has no IOMMU dirty tracking"),
                }
            }
        }
    }
}
