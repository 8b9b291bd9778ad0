//! Device mode's collect, and re-arming a device whose REPORT failed.
//!
//! After a failed REPORT the device's log is not to be trusted (uAPI: "consider all memory
//! dirty and restart tracking"), and mlx5 makes that concrete: `tracker->is_err` fails
//! every later REPORT until STOP and a new START. So the tracker reads what the other
//! devices still report, then STOPs the failed device, STARTs it with the same ranges and
//! page size, and marks the whole tracked set pending: that covers the log the device lost
//! and every write in the STOP→START window, which nothing logs. If the device refuses the
//! new START, the container falls back to IOMMU tracking (or all dirty) and the whole
//! DMA-able set is marked pending.

use super::collect::{device_windows, read_chunk, Source};
use super::{
    iommu_or_all_dirty, report_page, stop_mode, Active, CollectStats, Container, DirtLedger,
    FallbackReason, ModeChoice, TrackError, TrackingMode,
};
use crate::device::DeviceError;
use crate::range::IovaRange;

/// What `query_devices` needs from the tracker besides the active state.
pub(super) struct Ctx<'a> {
    pub(super) container: &'a Container,
    pub(super) force: ModeChoice,
    pub(super) host_page: u64,
    pub(super) chunk_bits: u64,
}

/// Query every device in the granules it states; re-arm those whose REPORT failed.
pub(super) fn query_devices(
    ctx: &Ctx<'_>,
    a: &mut Active,
    only: Option<IovaRange>,
    ledger: &mut DirtLedger,
    stats: &mut CollectStats,
) -> Result<(), TrackError> {
    let mut failed: Vec<(usize, DeviceError)> = Vec::new();
    {
        let Active {
            mode,
            report_pages,
            scratch,
            ..
        } = &mut *a;
        let TrackingMode::Device { ranges, .. } = &*mode else {
            return Ok(());
        };
        for (i, (d, &page)) in ctx
            .container
            .devices
            .iter()
            .zip(report_pages.iter())
            .enumerate()
        {
            let granule = d.report_granule();
            for w in device_windows(&granule, ranges, page, ctx.chunk_bits, only) {
                let src = Source::Device(d.as_ref());
                if let Err(e) = read_chunk(src, w, page, scratch, ledger, stats)? {
                    log::warn!(
                        "{}: REPORT of {w} failed ({e}): its log is lost, re-arming",
                        d.name()
                    );
                    // The rest of this device's log is no more trustworthy: skip it.
                    failed.push((i, e));
                    break;
                }
            }
        }
    }
    if failed.is_empty() {
        return Ok(());
    }
    rearm(ctx, a, &failed, ledger, stats);
    Ok(())
}

/// STOP and START each failed device with the same ranges; mark the tracked set pending.
/// A refused START falls back (see the module documentation).
fn rearm(
    ctx: &Ctx<'_>,
    a: &mut Active,
    failed: &[(usize, DeviceError)],
    ledger: &mut DirtLedger,
    stats: &mut CollectStats,
) {
    let TrackingMode::Device {
        page_size, ranges, ..
    } = &a.mode
    else {
        return;
    };
    let (page_size, ranges) = (*page_size, ranges.clone());
    for &(i, _) in failed {
        let d = &ctx.container.devices[i];
        if let Err(e) = d.stop() {
            log::warn!("{}: STOP failed: {e}", d.name());
        }
        match d.start(page_size, &ranges) {
            Ok(ps) => {
                if let TrackingMode::Device {
                    device_page_sizes, ..
                } = &mut a.mode
                {
                    device_page_sizes[i] = ps;
                }
                a.report_pages[i] = report_page(ps, page_size);
                stats.rearms += 1;
                log::warn!(
                    "container {}: {}: DMA logging re-armed on {} range(s); the tracked set is dirty",
                    ctx.container.name,
                    d.name(),
                    ranges.len()
                );
            }
            Err(error) => {
                let reason = FallbackReason::RearmFailed {
                    device: d.name().to_string(),
                    error,
                };
                stop_mode(ctx.container, &a.mode);
                let dma = a
                    .plan
                    .as_ref()
                    .map_or_else(|| ranges.clone(), |p| p.dma.clone());
                // A forced device mode never switches to the IOMMU; all dirty loses nothing.
                let force = match ctx.force {
                    ModeChoice::Device => ModeChoice::AllDirty,
                    f => f,
                };
                *a = iommu_or_all_dirty(ctx.container, force, dma, ctx.host_page, reason);
                log::warn!("container {}: now {}", ctx.container.name, a.mode);
                stats.fallbacks += 1;
                for r in a.mode.ranges() {
                    stats.newly_pending += ledger.mark_range(*r);
                }
                return;
            }
        }
    }
    for r in &ranges {
        stats.newly_pending += ledger.mark_range(*r);
    }
}
