//! The demo's result: what `iovatrack migrate --json` prints.

use crate::migrate::engine::{
    DestReport, DeviceReport, Handover, MigrateError, SourceReport, Switchover,
};
use crate::range::IovaRange;
use serde::Serialize;

/// The result of a demo migration.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Destination memory equals the source's at the pause, page for page, the devices'
    /// states arrived as sent and were restored, and the guest ran on at the destination.
    pub verified: bool,
    /// Pages whose contents differ (page hashes compared; for guests too large for a
    /// frame of page hashes, page by page in the regions whose hash differed).
    pub mismatched_pages: u64,
    /// Acknowledged passes over all attempts.
    pub passes: u32,
    /// Pages of acknowledged passes over all attempts.
    pub pages_sent: u64,
    /// Bytes written up to what the destination acknowledged (its last pass Ack, or its
    /// verdict), over all attempts.
    pub bytes_sent: u64,
    /// Every byte written over all attempts, partial passes and lost frames included.
    pub bytes_on_wire: u64,
    /// Times a retry found a different destination memory session (a restarted or reset
    /// receiver) and started over with pass 0.
    pub new_destination_sessions: u32,
    /// `acknowledged` (the destination confirmed it owns the guest), `unacknowledged`
    /// (Commit sent, no CommitAck: the guest is paused here, the destination's state is
    /// unknown), or `none` (no Commit sent).
    pub handover: Handover,
    /// What the connection ran over: `tcp`, or `tls` (mutual authentication).
    pub transport: String,
    /// Connections the destination refused (one-process runs; 0 otherwise).
    pub refused_connections: u32,
    /// Distinct pages sent: each had to travel at least once (non-zero at the start, or
    /// dirtied since), so `pages_sent / distinct_pages_sent` is the resend overhead.
    pub distinct_pages_sent: u64,
    /// Pages sent twice within one pass (must be 0).
    pub duplicate_pages_sent: u64,
    /// Guest pause to the destination holding everything, ms.
    pub downtime_ms: f64,
    /// The downtime budget it was held to, ms.
    pub downtime_budget_ms: u64,
    /// The downtime exceeded the budget.
    pub downtime_exceeded: bool,
    /// Verification after the downtime (both sides hashing, the verdict), ms; the guest
    /// stays paused through it, until Commit.
    pub verify_ms: f64,
    /// Why stop-and-copy began: `converged`, `max-iterations`, `timeout`, `forced`, or
    /// `none` when it was never reached.
    pub switchover_reason: Switchover,
    /// Pages the CPU dirtied (KVM log bits) over all passes.
    pub cpu_dirty_pages: u64,
    /// Bytes per second the CPU dirtied during pre-copy.
    pub cpu_dirty_bytes_per_s: f64,
    /// Final vCPU throttle set by auto-converge, %.
    pub throttle_pct: u8,
    /// Pre-copy passes the timeout cut short.
    pub passes_cut: u32,
    /// Pages the devices reported over all passes.
    pub device_dirty_pages: u64,
    /// DMA writes no tracker logged (must be 0 unless tracking is off): outside the
    /// logged ranges of each device whose container runs device tracking, and every write
    /// once migration started when no container tracks.
    pub untracked_dma_writes: u64,
    /// The negative control (no device tracking): whether it proved that untracked DMA
    /// loses pages, or proved nothing; `null` for any other run.
    pub negative_control: Option<NegativeControl>,
    /// `kvm` or `software`.
    pub guest: String,
    /// Tracking mode of the first container: `device`, `iommu`, `all-dirty`, or `none`
    /// (negative control).
    pub mode: String,
    /// Attempts made.
    pub attempts: u32,
    /// Channels that carried pages (`--streams`).
    pub streams: u32,
    /// Migrating devices.
    pub devices: usize,
    /// Per device: name, container, mode, state bytes sent.
    pub device_reports: Vec<DeviceReport>,
    /// DMA writes the devices made.
    pub dma_writes: u64,
    /// Pages the guest wrote on the source.
    pub guest_pages_written: u64,
    /// The guest reported progress after resuming on the destination.
    pub resumed_on_destination: bool,
    /// Every device's migration state was restored on the destination (and, in one
    /// process, equals the source's).
    pub device_state_restored: bool,
    /// Hash of the source devices' states at stop-and-copy.
    pub device_state_digest: u64,
    /// The destination's digest of the device state it received equalled the source's of
    /// what it sent (told in its verdict, so it holds across two processes).
    pub device_state_matched: bool,
    /// The engine's digest of the device state sent on the connection of the last verdict
    /// (the receiver's `received_state_digest` must equal it).
    pub sent_state_digest: u64,
    /// Ranges the first container's devices logged (last attempt).
    pub ranges: Vec<IovaRange>,
    /// REPORT failures turned into "whole range dirty".
    pub report_errors: u64,
    /// Devices re-armed (STOP, START the same ranges, tracked set marked dirty) after a
    /// failed REPORT.
    pub rearms: u64,
    /// Containers that fell back to a weaker tracking mode during the migration.
    pub fallbacks: u64,
    /// Faults requested.
    pub faults: Vec<String>,
    /// Faults that fired, in order.
    pub faults_fired: Vec<String>,
    /// Why the migration gave up, if it did.
    pub aborted: Option<String>,
    /// The engine resumed the source's guest after giving up.
    #[serde(skip)]
    pub source_resumed: bool,
    /// The source guest still ran after an abort.
    pub source_running_after_abort: Option<bool>,
    /// Migration start (tracking started) to the handover or the give-up, ms.
    pub migration_ms: f64,
    /// Wall time, ms (guest setup and warm-up included).
    pub total_ms: f64,
    /// Allocating the destination's guest RAM before the source connected (`--prealloc`,
    /// one-process runs), ms; in `total_ms`, not in `migration_ms`. 0 without.
    pub prealloc_ms: f64,
    // --- Behind a vIOMMU (`migrate --viommu`); zero and false otherwise. ---
    /// The guest mapped its own DMA through a vIOMMU; tracking ran in IOVA space.
    pub viommu: bool,
    /// Re-arms for a map outside the logged ranges (REPORT, STOP, START a new plan);
    /// REPORT-error re-arms stay in `rearms`.
    pub viommu_rearms: u64,
    /// Pages marked dirty to cover the STOP→START windows of all re-arms.
    pub rearm_pages: u64,
    /// Total time guest maps were held until logging covered them, ms.
    pub map_hold_ms: f64,
    /// Longest single hold, ms.
    pub max_map_hold_ms: f64,
    /// Unmaps whose range was REPORTed (translated) before the unmap completed.
    pub unmap_queries: u64,
    /// Guest maps.
    pub viommu_maps: u64,
    /// Guest unmaps.
    pub viommu_unmaps: u64,
    /// Guest unmaps while logging ran (`unmap_queries` must equal it).
    pub unmaps_while_logging: u64,
    /// Device DMA writes to an unmapped IOVA, blocked by the IOMMU (nothing written).
    pub viommu_dma_faults: u64,
    /// Reported bits whose IOVA had no mapping (must be 0: a query precedes each unmap).
    pub untranslated_bits: u64,
}

/// What a negative control showed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NegativeControl {
    /// `loss` (NOT VERIFIED, pages differ) or `nothing`.
    pub proved: String,
    /// Why, in words.
    pub why: String,
}

impl Summary {
    /// For a run without device tracking: say whether it proved loss or nothing.
    pub fn judge_control(&mut self) {
        if self.mode != "none" {
            return;
        }
        let n = self.untracked_dma_writes;
        let (proved, why) = if !self.verified && self.mismatched_pages > 0 {
            (
                "loss",
                format!(
                    "{} page(s) differ after {n} untracked DMA write(s)",
                    self.mismatched_pages
                ),
            )
        } else if n == 0 {
            ("nothing", "no DMA write went untracked".to_string())
        } else {
            (
                "nothing",
                format!("{n} DMA write(s) went untracked, but no page was found different"),
            )
        };
        self.negative_control = Some(NegativeControl {
            proved: proved.into(),
            why,
        });
    }

    /// The engine's counters, for a guest of `guest` kind with `devices` devices.
    pub fn from_engine(r: SourceReport, guest: &str, devices: usize) -> Self {
        Summary {
            verified: r.verified,
            mismatched_pages: r.mismatched_pages,
            passes: r.passes,
            pages_sent: r.pages_sent,
            bytes_sent: r.bytes_sent,
            bytes_on_wire: r.bytes_on_wire,
            new_destination_sessions: r.new_destination_sessions,
            handover: r.handover,
            distinct_pages_sent: r.distinct_pages_sent,
            duplicate_pages_sent: r.duplicate_pages_sent,
            downtime_ms: r.downtime_ms,
            downtime_exceeded: r.downtime_exceeded,
            verify_ms: r.verify_ms,
            switchover_reason: r.switchover_reason,
            cpu_dirty_pages: r.cpu_dirty_pages,
            cpu_dirty_bytes_per_s: r.cpu_dirty_bytes_per_s,
            throttle_pct: r.throttle_pct,
            passes_cut: r.passes_cut,
            device_dirty_pages: r.device_dirty_pages,
            device_state_matched: r.device_state_matched,
            sent_state_digest: r.sent_state_digest,
            guest: guest.to_string(),
            mode: r.mode,
            attempts: r.attempts,
            streams: r.streams,
            devices,
            device_reports: r.devices,
            ranges: r.ranges,
            report_errors: r.report_errors,
            rearms: r.rearms,
            fallbacks: r.fallbacks,
            aborted: r.aborted,
            source_resumed: r.source_resumed,
            ..Summary::default()
        }
    }
}

/// Fold the destination's report into the source's summary: the destination's own
/// observations (mismatches, duplicates, resume) are the independent ones.
pub fn merge_destination(summary: &mut Summary, dest: Result<DestReport, MigrateError>) {
    match dest {
        Ok(d) => {
            summary.mismatched_pages = summary.mismatched_pages.max(d.mismatched_pages);
            summary.duplicate_pages_sent =
                summary.duplicate_pages_sent.max(d.duplicate_pages_received);
            summary.resumed_on_destination = d.resumed;
            summary.refused_connections = d.refused_connections;
            summary.device_state_restored =
                d.device_state_restored && d.device_state_digest == summary.device_state_digest;
            summary.verified = summary.verified
                && d.verified
                && d.resumed
                && summary.device_state_restored
                && summary.aborted.is_none();
            summary.judge_control();
        }
        Err(e) => {
            summary.verified = false;
            if summary.aborted.is_none() {
                summary.aborted = Some(format!("destination: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(verified: bool, mismatched_pages: u64, untracked: u64) -> Option<NegativeControl> {
        let mut s = Summary {
            mode: "none".into(),
            verified,
            mismatched_pages,
            untracked_dma_writes: untracked,
            ..Summary::default()
        };
        s.judge_control();
        s.negative_control
    }

    #[test]
    fn a_control_says_what_it_proved() {
        let c = control(false, 3, 40).unwrap();
        assert_eq!(c.proved, "loss");
        assert_eq!(c.why, "3 page(s) differ after 40 untracked DMA write(s)");
        let c = control(true, 0, 0).unwrap();
        assert_eq!(
            (c.proved.as_str(), c.why.as_str()),
            ("nothing", "no DMA write went untracked")
        );
        // Aborted before any verdict: nothing found different, so nothing proved.
        let c = control(false, 0, 40).unwrap();
        assert_eq!(c.proved, "nothing");
        assert!(
            c.why.starts_with("40 DMA write(s) went untracked"),
            "{}",
            c.why
        );
        // Not a control: nothing said.
        let mut s = Summary {
            mode: "device".into(),
            ..Summary::default()
        };
        s.judge_control();
        assert_eq!(s.negative_control, None);
    }
}
