//! The pre-copy engine: a source that migrates a running guest with its DMA devices in
//! flight, and a destination that receives it, both talking only to the seams of
//! [`crate::migrate::seams`] (guest RAM, vCPUs, the CPU dirty log, device migration) and
//! to [`Tracker`]s for device dirt. What a test harness adds (a DMA workload, injected
//! faults) comes in through [`SourceHooks`]; page-level verification through a
//! [`Verifier`].
//!
//! Source, per attempt: start (or restart, with freshly planned ranges) dirty tracking;
//! pass 0 sends every non-zero page; each later pass sends the union of the CPU log and
//! the devices' REPORTs (one bitmap per region: no page twice in a pass), until the
//! estimated downtime fits `downtime_ms` (or `max_iterations`, or the timeout forces it);
//! then stop-and-copy: pause the vCPUs, move the devices to STOP_COPY (through the P2P
//! states when several devices migrate), take the final logs, send them, the device
//! states and the vCPU states; then verification and the Commit handover.
//!
//! Nothing is lost on failure: dirt read from KVM and the devices stays in the ledger
//! until the destination acknowledges the pass that carried it; a dropped connection or a
//! cancel rolls the pass back, the source resumes, and a retry continues into the same
//! destination memory.

use crate::device::DeviceError;
use crate::migrate::guest::GuestError;
use crate::migrate::seams::VmError;
use crate::migrate::wire::{FrameKind, WireError};
use crate::range::IovaRange;
use crate::track::TrackError;
use serde::Serialize;
use std::io;
use std::time::Duration;

mod channel;
mod destination;
mod digest;
mod hooks;
mod link;
mod source;
mod tls;

pub use channel::{Channel, PlainTcp, Transport};
pub use destination::{DestLimits, DestReport, Destination, Received, Refusal, Served};
pub use digest::StateDigest;
pub use hooks::{Checkpoint, Control, NoHooks, SourceHooks, Verifier};
pub use link::connector;
pub use source::{run_source, SourceVm, Switchover};
pub use tls::{HandshakeError, Peer, Tls, TlsError};

const PAGE: u64 = 4096;
/// Pages per Pages frame (1 MiB).
const FRAME_PAGES: usize = 256;
/// A sender writes its frames to the socket once they add up to this much (one system call
/// per 1 MiB, however small the frames).
const SEND_BATCH: usize = 1 << 20;

/// Most hashes one Verify or VerifyPages frame carries within the default payload limit
/// (the rest of the payload is its small fields). Both sides use it: it decides whether
/// verification is per page or per region (and then in runs of pages).
fn max_hashes() -> usize {
    (crate::migrate::wire::Limits::default().max_payload as usize - 64) / 8
}

/// What to do when pre-copy has not converged by the timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimeoutAction {
    /// Give up: the source keeps running.
    Cancel,
    /// Go to stop-and-copy now, whatever the downtime.
    Force,
}

/// How the source engine migrates: convergence, link and retry policy.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Downtime budget.
    pub downtime_ms: u64,
    /// Most pre-copy passes before stop-and-copy is forced.
    pub max_iterations: u32,
    /// Pre-copy time limit.
    pub timeout: Duration,
    /// What the timeout does.
    pub timeout_action: TimeoutAction,
    /// Link cap in bytes per second (0 = none).
    pub bandwidth: u64,
    /// Attempts after a failed one.
    pub retries: u32,
    /// Throttle the vCPUs when they dirty faster than the link drains (QEMU's
    /// `auto-converge`).
    pub auto_converge: bool,
    /// First throttle step, % (QEMU's `cpu-throttle-initial`, 20).
    pub throttle_initial: u8,
    /// Each further step, % (QEMU's `cpu-throttle-increment`, 10).
    pub throttle_increment: u8,
    /// Most throttle, % (QEMU's `max-cpu-throttle`, 99).
    pub throttle_max: u8,
    /// How long the source waits for any one answer (HelloAck, Ack, VerifyResult,
    /// CommitAck). A dead link is found sooner through keepalives; this bounds a peer
    /// that is alive but silent, so it must cover the destination's longest work between
    /// frames (hashing a large guest before its verdict).
    pub read_timeout: Duration,
    /// Channels carrying pages, as QEMU's `multifd-channels`: 1 sends everything over
    /// one connection; N > 1 opens N − 1 more per attempt through the same `connect`
    /// (so the transport, TLS included, applies to each), and each pass's pages are dealt
    /// out over all N, one sender thread each, a page to exactly one of them.
    pub streams: u32,
    /// During a pre-copy pass, read and clear the CPU dirty log this often (into the
    /// pages pending for the next pass), as KVM's dirty ring is harvested continuously:
    /// the dirty rate is then measured over short windows, not one per pass (which caps
    /// it at the working set per pass). Each read write-protects the guest's pages
    /// again, so a page written in two windows faults twice. `None`: once per pass, as
    /// QEMU's bitmap sync.
    pub cpu_log_interval: Option<Duration>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            downtime_ms: 300,
            max_iterations: 30,
            timeout: Duration::from_secs(60),
            timeout_action: TimeoutAction::Force,
            bandwidth: 0,
            retries: 2,
            auto_converge: false,
            throttle_initial: 20,
            throttle_increment: 10,
            throttle_max: 99,
            read_timeout: Duration::from_secs(60),
            streams: 1,
            cpu_log_interval: Some(Duration::from_millis(100)),
        }
    }
}

/// One pass, for progress output.
#[derive(Clone, Debug, Serialize)]
pub struct PassStats {
    /// Attempt number (0 first).
    pub attempt: u32,
    /// Pass number within the attempt.
    pub pass: u32,
    /// Pages sent.
    pub pages: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// Seconds it took.
    pub secs: f64,
    /// Pages the CPU's dirty log (KVM) made pending since the pass before began, each
    /// once (read then, during that pass, or now).
    pub cpu_dirty: u64,
    /// Pages the devices reported for it.
    pub device_dirty: u64,
    /// Estimated downtime if stop-and-copy came next, ms.
    pub est_downtime_ms: f64,
    /// The stop-and-copy pass.
    pub final_pass: bool,
}

/// Progress events.
#[derive(Clone, Debug)]
pub enum Event {
    /// Tracking started (or restarted) on a container.
    Tracking {
        /// The container.
        container: String,
        /// Mode name.
        mode: String,
        /// Ranges given to the devices.
        ranges: Vec<IovaRange>,
        /// Why not device mode, if so.
        reason: Option<String>,
    },
    /// A pass begins.
    PassStart {
        /// Attempt.
        attempt: u32,
        /// Pass number.
        pass: u32,
        /// Pages to send.
        pages: u64,
        /// Stop-and-copy pass.
        final_pass: bool,
    },
    /// Pages of the current pass sent so far.
    PassProgress {
        /// Pages sent in this pass.
        sent: u64,
    },
    /// A pass ended.
    Pass(PassStats),
    /// Auto-converge changed the vCPU throttle.
    Throttle {
        /// The new throttle, %.
        pct: u8,
    },
    /// Stop-and-copy begins.
    Switchover {
        /// Why.
        reason: Switchover,
    },
    /// An attempt failed and the migration retries.
    Retry {
        /// The next attempt.
        attempt: u32,
        /// What went wrong.
        reason: String,
    },
}

/// Why a migration could not run at all (failures mid-way are in
/// [`SourceReport::aborted`]).
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Guest setup failed.
    #[error("guest: {0}")]
    Guest(#[from] GuestError),
    /// A VMM seam failed.
    #[error("{0}")]
    Vm(#[from] VmError),
    /// A device's migration interface failed.
    #[error("device migration: {0}")]
    Device(#[from] DeviceError),
    /// Dirty tracking failed.
    #[error("dirty tracking: {0}")]
    Track(#[from] TrackError),
    /// The protocol failed.
    #[error("protocol: {0}")]
    Wire(#[from] WireError),
    /// Networking failed.
    #[error("network: {0}")]
    Io(#[from] io::Error),
    /// The layout has no usable RAM for a guest.
    #[error("layout: {0}")]
    Layout(String),
    /// More than one device migrates but one cannot stop its P2P DMA first.
    #[error("device {device} lacks VFIO_MIGRATION_P2P, which migrating {count} devices together needs (the kernel would let it DMA into a peer that is already stopped)")]
    NoP2p {
        /// The device.
        device: String,
        /// How many devices migrate.
        count: usize,
    },
    /// The destination received no complete migration.
    #[error("destination: {0}")]
    Destination(String),
}

/// Why one attempt ended early.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// The connection failed.
    #[error("connection: {0}")]
    Wire(#[from] WireError),
    /// A socket operation failed.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The source could not connect.
    #[error("cannot connect: {0}")]
    Connect(#[source] io::Error),
    /// The transport's handshake failed in a way no retry can fix (a certificate one
    /// side refuses, a peer that does not speak TLS): not retried.
    #[error("TLS: {0}; not retried (it would fail the same way)")]
    Handshake(#[source] io::Error),
    /// The destination answered the Hello with a TLS record: it runs TLS, this source
    /// does not. Not retried.
    #[error("the destination speaks TLS (it answered the Hello with a TLS record): is it running with --tls-*? This source needs them too; not retried")]
    DestinationSpeaksTls,
    /// A hook dropped the link.
    #[error("connection dropped during pass {pass} (injected)")]
    Dropped {
        /// The pass.
        pass: u32,
    },
    /// A hook dropped the link after the verdict.
    #[error("connection dropped before Commit (injected)")]
    DroppedBeforeCommit,
    /// A hook cancelled the attempt.
    #[error("cancelled at pass {pass} (injected)")]
    Cancelled {
        /// The pass.
        pass: u32,
    },
    /// Pre-copy ran out of time and the action is cancel.
    #[error("pre-copy did not converge within {0:?} (timeout action: cancel)")]
    Timeout(Duration),
    /// The destination said it aborts.
    #[error("the destination aborted: {0}")]
    DestinationAborted(String),
    /// The destination sent the wrong frame.
    #[error("expected {expected} from the destination, got {got:?}")]
    Unexpected {
        /// What the source waited for.
        expected: &'static str,
        /// What came.
        got: FrameKind,
    },
    /// A VMM seam failed.
    #[error("{0}")]
    Vm(#[from] VmError),
    /// A device's migration interface failed.
    #[error("device migration: {0}")]
    Device(#[from] DeviceError),
    /// Dirty tracking failed.
    #[error("dirty tracking: {0}")]
    Track(#[from] TrackError),
    /// The protocol's own check of what the source is about to send failed.
    #[error("protocol: {0}")]
    Layout(WireError),
    /// Sending Commit failed: the destination may be running the guest.
    #[error("sending Commit failed ({0}): the destination may be running the guest, so the source stays paused")]
    CommitUncertain(#[source] WireError),
    /// The destination's memory differs from the source's.
    #[error("the destination's memory differs in {0} page(s): the source resumed")]
    Mismatch(u64),
    /// The destination's memory differs, but counting the pages stopped early.
    #[error("the destination's memory differs in {regions} region(s), at least {pages} page(s) (counting them stopped: {why}): the source resumed")]
    MismatchUncounted {
        /// Regions whose hash differed.
        regions: u64,
        /// Pages found different before counting stopped.
        pages: u64,
        /// Why it stopped.
        why: String,
    },
    /// The destination received other device state than the source sent.
    #[error("the destination's digest of the device state it received ({theirs:#018x}) differs from the source's of what it sent ({ours:#018x}): no handover, the source resumed")]
    DeviceStateMismatch {
        /// The source's digest.
        ours: u64,
        /// The destination's.
        theirs: u64,
    },
}

/// Whether the destination confirmed it took the guest over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Handover {
    /// No Commit was sent (the migration did not get that far, or did not verify).
    #[default]
    None,
    /// The destination acknowledged Commit: the guest runs there.
    Acknowledged,
    /// Commit was sent but no CommitAck came: the guest is paused here and the
    /// destination's state is unknown.
    Unacknowledged,
}

/// One migrating device, as the source saw it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeviceReport {
    /// Its name.
    pub name: String,
    /// The container (tracker) it logs DMA through.
    pub container: String,
    /// That container's tracking mode.
    pub mode: String,
    /// Device-state bytes sent for it.
    pub state_bytes: u64,
}

/// What the source engine did: counters of acknowledged work.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SourceReport {
    /// The destination verified its memory, its digest of the device state it received
    /// equalled the source's of what it sent, and it took the guest over.
    pub verified: bool,
    /// Pages the destination found different (for guests too large for a frame of page
    /// hashes, counted page by page in the regions whose hash differed).
    pub mismatched_pages: u64,
    /// The destination's digest of the device state it received equalled the source's
    /// of what it sent (at the last verdict; false when no verdict came).
    pub device_state_matched: bool,
    /// The source's digest ([`StateDigest`]) of the device state it sent on the connection
    /// of the last verdict (0 when no verdict came): equals the destination's
    /// `received_state_digest` when they matched.
    pub sent_state_digest: u64,
    /// Acknowledged passes over all attempts.
    pub passes: u32,
    /// Pages of acknowledged passes over all attempts.
    pub pages_sent: u64,
    /// Bytes written up to what the destination acknowledged (its last Ack or verdict),
    /// over all attempts.
    pub bytes_sent: u64,
    /// Every byte written, over all attempts (partial passes and lost frames included).
    pub bytes_on_wire: u64,
    /// Times the destination's memory session changed between attempts (a restarted or
    /// reset destination), each restarting with pass 0.
    pub new_destination_sessions: u32,
    /// Whether the destination acknowledged taking the guest over.
    pub handover: Handover,
    /// Distinct pages sent.
    pub distinct_pages_sent: u64,
    /// Pages sent twice within one pass (must be 0).
    pub duplicate_pages_sent: u64,
    /// Guest pause to the destination holding everything, ms.
    pub downtime_ms: f64,
    /// The downtime exceeded the budget.
    pub downtime_exceeded: bool,
    /// Verification after the downtime above: both sides hashing memory and the verdict,
    /// ms (last verdict; 0 without a verifier). The guest stays paused through it, until
    /// Commit: a migration without a verifier hands over that much sooner.
    pub verify_ms: f64,
    /// Why stop-and-copy began (last attempt).
    pub switchover_reason: Switchover,
    /// Pages the CPU dirtied (KVM log bits) over all passes.
    pub cpu_dirty_pages: u64,
    /// Bytes per second the CPU dirtied during pre-copy (distinct pages per collection
    /// over the time between collections).
    pub cpu_dirty_bytes_per_s: f64,
    /// Final vCPU throttle set by auto-converge, %.
    pub throttle_pct: u8,
    /// Passes cut short by the timeout (what they did not send went back to pending).
    pub passes_cut: u32,
    /// Pages the devices reported over all passes.
    pub device_dirty_pages: u64,
    /// Tracking mode of the first container: `device`, `iommu`, `all-dirty`, or `none`.
    pub mode: String,
    /// Ranges the first container's devices logged (last attempt).
    pub ranges: Vec<IovaRange>,
    /// REPORT failures turned into "whole range dirty".
    pub report_errors: u64,
    /// Devices re-armed (STOP, START the same ranges) after a failed REPORT.
    pub rearms: u64,
    /// Containers that fell back to a weaker mode during the migration.
    pub fallbacks: u64,
    /// Attempts made.
    pub attempts: u32,
    /// Channels that carried pages (the configured streams).
    pub streams: u32,
    /// The migrating devices.
    pub devices: Vec<DeviceReport>,
    /// Why the migration gave up, if it did.
    pub aborted: Option<String>,
    /// The engine resumed the source's vCPUs after giving up.
    pub source_resumed: bool,
}
