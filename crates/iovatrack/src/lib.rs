//! # iovatrack
//!
//! Live migration of VMs with passthrough (VFIO) devices: which IOVA ranges a device must
//! log, how to drive its DMA logging, how to collect and merge device and CPU dirt without
//! losing a page, and the pre-copy loop that sends it.
//!
//! Data flows one way, and a lower module never imports a higher one:
//!
//! ```text
//! range → layout → plan → device → track → bitmap ← migrate
//! ```
//!
//! * [`range`]: IOVA ranges and page-size arithmetic, overflow-safe up to 2^64 − 1.
//! * [`layout`]: a guest physical memory map (QEMU `info mtree -f`, JSON, QMP, presets).
//! * [`plan`]: the DMA-able filter, range strategies, device limits and the kernel's merge.
//! * [`bitmap`]: dirty bitmaps in the kernel's native format.
//! * [`device`]: the DMA-logging seam and its backends (VFIO, iommufd, type1, emulated).
//! * [`track`]: one container's dirty tracking: mode choice, START with re-plan, pending dirt.
//! * [`migrate`]: guest memory, KVM vCPU, DMA workload, pre-copy engine, wire protocol.
//!
//! ```
//! use iovatrack::layout::presets;
//! use iovatrack::plan::{Planner, Strategy};
//!
//! let layout = presets::get("q35-16g").unwrap();
//! let plan = Planner::new().max_ranges(2).strategy(Strategy::Optimal).plan(&layout).unwrap();
//! assert!(plan.ranges.len() <= 2);
//! assert!(plan.tracked_bytes >= plan.dma_bytes);
//! ```
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

#[cfg(feature = "track")]
pub mod bitmap;
#[cfg(feature = "track")]
pub mod device;
pub mod layout;
#[cfg(feature = "migrate")]
pub mod migrate;
pub mod plan;
pub mod range;
#[cfg(feature = "track")]
pub mod track;

/// Say loudly that a test could not use a real part (no `/dev/kvm`, no VFIO device, ...):
/// print it, and append it to the file named by `IOVATRACK_SKIP_LOG` so `scripts/test` can
/// list every skip at the end of a CI run.
#[doc(hidden)]
pub fn report_skip(what: &str) {
    eprintln!("SKIPPED: {what}");
    if let Some(path) = std::env::var_os("IOVATRACK_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
        {
            let _ = writeln!(f, "SKIPPED: {what}");
        }
    }
}
