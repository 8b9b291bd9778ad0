//! A plan as one document: what `iovatrack plan` prints, built here so that a front end
//! only renders it (as a table, JSON or a picture) and makes no decision of its own.
//!
//! ```
//! use iovatrack::layout::presets;
//! use iovatrack::plan::limits::DeviceProfile;
//! use iovatrack::plan::report::PlanReport;
//! use iovatrack::plan::Planner;
//!
//! let layout = presets::get("q35-16g").unwrap();
//! let device = Some((DeviceProfile::Mlx5.limits(), "emulated mlx5"));
//! let report = PlanReport::new(&layout, "preset:q35-16g", &Planner::new(), device).unwrap();
//! assert!(report.ranges.len() <= 4);
//! assert!(!report.start_refused());
//! let json = serde_json::to_value(&report).unwrap();
//! assert_eq!(json["device"]["accepted"], true);
//! ```

use super::limits::DeviceLimits;
use super::{DeviceOutcome, Plan, PlanError, Planner, SectionCounts, Skipped, Strategy};
use crate::device::{DmaLogger, EmulatedDevice};
use crate::layout::Layout;
use crate::range::IovaRange;
use serde::Serialize;

/// Everything `iovatrack plan` reports. Serialized, the first keys are the stable plan
/// format (`page_size`, `strategy`, `ranges[{iova,length}]`, `dma_bytes`, `tracked_bytes`,
/// `sections{total,tracked,skipped}`), in that order.
#[derive(Clone, Debug, Serialize)]
pub struct PlanReport {
    /// Tracking page size.
    pub page_size: u64,
    /// Strategy used.
    pub strategy: Strategy,
    /// The ranges to hand to `DMA_LOGGING_START`.
    pub ranges: Vec<IovaRange>,
    /// DMA-able bytes.
    pub dma_bytes: u128,
    /// Sum of range lengths.
    pub tracked_bytes: u128,
    /// Section counts.
    pub sections: SectionCounts,
    /// Tracked bytes that are not DMA-able.
    pub overhead_bytes: u128,
    /// Whether two ranges share bytes (the kernel refuses that with EINVAL).
    pub overlapping: bool,
    /// The range cap the strategy was given (the device's own, when lower).
    pub max_ranges: u32,
    /// The address space of the layout.
    pub address_space: String,
    /// Where the layout came from, as the caller describes it.
    pub source: String,
    /// Bytes of `ram` sections in the layout.
    pub ram_bytes: u128,
    /// Sections left out and why.
    pub skipped: Vec<Skipped>,
    /// Every strategy on the same layout, in display order.
    pub compare: Vec<Comparison>,
    /// What the emulated device did at START, when planned for a device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceReport>,
    /// The plan itself (for drawing: it carries the DMA-able set).
    #[serde(skip)]
    pub plan: Plan,
    /// The plans of [`PlanReport::compare`] (for drawing every strategy's ranges).
    #[serde(skip)]
    pub compared: Vec<Plan>,
}

/// One strategy's result on the same layout.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// The strategy.
    pub strategy: Strategy,
    /// How many ranges it needs.
    pub ranges: usize,
    /// Sum of its range lengths.
    pub tracked_bytes: u128,
    /// Tracked bytes that are not DMA-able.
    pub overhead_bytes: u128,
    /// Whether its ranges overlap.
    pub overlapping: bool,
}

/// What the emulated device did with the plan at START.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceReport {
    /// Device name.
    pub name: String,
    /// Its limits.
    pub limits: DeviceLimits,
    /// Whether START succeeded.
    pub accepted: bool,
    /// What it tracks, or why it refused.
    #[serde(flatten)]
    pub result: DeviceResult,
}

/// The outcome of START on the emulated device.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum DeviceResult {
    /// START succeeded.
    Accepted {
        /// The tracking page size the driver settled on.
        page_size: u64,
        /// Whether the driver merged the plan's ranges into fewer.
        merged: bool,
        /// What the device really tracks, after the driver's merge.
        tracked_ranges: Vec<IovaRange>,
        /// Sum of their lengths.
        tracked_bytes: u128,
    },
    /// START failed.
    Refused {
        /// The errno name, e.g. `EOPNOTSUPP`.
        errno: String,
        /// The device's message.
        error: String,
        /// What the planner's rule check predicted.
        prediction: Option<DeviceOutcome>,
    },
}

impl PlanReport {
    /// Plan `layout` with `planner`, compare every strategy, and with `device` (limits and
    /// a name) plan for those limits and run START on an emulated device that has them.
    pub fn new(
        layout: &Layout,
        source: &str,
        planner: &Planner,
        device: Option<(DeviceLimits, &str)>,
    ) -> Result<Self, PlanError> {
        let planner = match device {
            Some((limits, _)) => planner.clone().device(limits),
            None => planner.clone(),
        };
        let plan = planner.plan(layout)?;
        // A strategy that cannot plan this layout is left out of the comparison; the
        // chosen one succeeded above.
        let compared: Vec<Plan> = Strategy::ALL
            .iter()
            .filter_map(|s| planner.clone().strategy(*s).plan(layout).ok())
            .collect();
        let compare = compared
            .iter()
            .map(|p| Comparison {
                strategy: p.strategy,
                ranges: p.ranges.len(),
                tracked_bytes: p.tracked_bytes,
                overhead_bytes: p.overhead_bytes(),
                overlapping: p.overlapping,
            })
            .collect();
        let device = device.map(|(limits, name)| DeviceReport::start(limits, name, &plan));
        Ok(PlanReport {
            page_size: plan.page_size,
            strategy: plan.strategy,
            ranges: plan.ranges.clone(),
            dma_bytes: plan.dma_bytes,
            tracked_bytes: plan.tracked_bytes,
            sections: plan.sections,
            overhead_bytes: plan.overhead_bytes(),
            overlapping: plan.overlapping,
            max_ranges: planner.effective_max_ranges(),
            address_space: layout.address_space().to_string(),
            source: source.to_string(),
            ram_bytes: layout.ram_bytes(),
            skipped: plan.skipped.clone(),
            compare,
            device,
            plan,
            compared,
        })
    }

    /// Whether the device refused START: the plan cannot be used with it as it is.
    pub fn start_refused(&self) -> bool {
        self.device.as_ref().is_some_and(|d| !d.accepted)
    }
}

impl DeviceReport {
    /// Run START (then STOP) with `plan`'s ranges on an emulated device with `limits`.
    pub fn start(limits: DeviceLimits, name: &str, plan: &Plan) -> Self {
        let dev = EmulatedDevice::new(limits).named(name);
        let started = dev.start(plan.page_size, &plan.ranges);
        let tracked = dev.tracked_ranges().unwrap_or_default();
        // Nothing to undo if START failed; the emulated device cannot fail STOP otherwise.
        let _ = dev.stop();
        let result = match started {
            Ok(page_size) => DeviceResult::Accepted {
                page_size,
                merged: tracked.len() < plan.ranges.len(),
                tracked_bytes: tracked.iter().map(|r| u128::from(r.length)).sum(),
                tracked_ranges: tracked,
            },
            Err(e) => DeviceResult::Refused {
                errno: e.errno.name().unwrap_or("?").to_string(),
                error: e.to_string(),
                prediction: plan.device.as_ref().map(|v| v.outcome.clone()),
            },
        };
        DeviceReport {
            name: name.to_string(),
            limits,
            accepted: matches!(result, DeviceResult::Accepted { .. }),
            result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::presets;
    use crate::plan::limits::DeviceProfile;

    #[test]
    fn refused_start_is_reported_with_its_errno() {
        let layout = presets::get("q35-16g").unwrap();
        let mut limits = DeviceProfile::Mlx5.limits();
        limits.addr_space_log2 = Some((12, 30));
        let r = PlanReport::new(&layout, "t", &Planner::new(), Some((limits, "mlx5"))).unwrap();
        assert!(r.start_refused());
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["device"]["accepted"], false);
        assert_eq!(v["device"]["errno"], "EOPNOTSUPP");
        assert!(v["device"].get("tracked_ranges").is_none());
    }

    #[test]
    fn merged_ranges_are_what_the_device_tracks() {
        let layout = presets::get("q35-virtio-mem").unwrap();
        let planner = Planner::new().strategy(Strategy::PerSection);
        let r = PlanReport::new(
            &layout,
            "t",
            &planner,
            Some((DeviceProfile::Mlx5.limits(), "m")),
        )
        .unwrap();
        let d = r.device.as_ref().unwrap();
        let DeviceResult::Accepted {
            merged,
            tracked_ranges,
            ..
        } = &d.result
        else {
            panic!("refused: {d:?}");
        };
        assert!(*merged);
        assert!(tracked_ranges.len() < r.ranges.len());
        assert_eq!(r.compare.len(), Strategy::ALL.len());
        // The stable keys come first, in order.
        let text = serde_json::to_string(&r).unwrap();
        let at: Vec<usize> = [
            "page_size",
            "strategy",
            "ranges",
            "dma_bytes",
            "tracked_bytes",
            "sections",
            "overhead_bytes",
        ]
        .iter()
        .map(|k| text.find(&format!("\"{k}\":")).unwrap())
        .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
    }
}
