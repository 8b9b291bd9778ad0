//! What a harness plugs into the engine: hooks at the points where a test injects faults,
//! and the verification both sides run before the handover.

use crate::migrate::seams::{GuestRam, VmError};

/// A point in the source's run where a hook may step in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpoint {
    /// Pass `pass` of attempt `attempt` is about to collect dirt (the final pass too).
    Collect {
        /// Attempt (0 first).
        attempt: u32,
        /// Pass.
        pass: u32,
        /// The stop-and-copy pass.
        final_pass: bool,
    },
    /// Pass `pass` is about to start sending (after its dirt was collected).
    PassStart {
        /// Attempt.
        attempt: u32,
        /// Pass.
        pass: u32,
    },
    /// `sent` of `total` pages of pass `pass` are on the wire.
    PassProgress {
        /// Attempt.
        attempt: u32,
        /// Pass.
        pass: u32,
        /// Pages sent so far.
        sent: u64,
        /// Pages in the pass.
        total: u64,
    },
    /// All pages of pass `pass` are on the wire, before its end marker.
    PassSent {
        /// Attempt.
        attempt: u32,
        /// Pass.
        pass: u32,
    },
    /// The destination verified; the source is about to send Commit.
    BeforeCommit {
        /// Attempt.
        attempt: u32,
    },
    /// Commit is on the wire; the source is about to wait for CommitAck.
    AfterCommit {
        /// Attempt.
        attempt: u32,
    },
}

/// What the engine does after a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Go on.
    Continue,
    /// Cancel this attempt (tell the destination) and retry.
    Cancel,
    /// Drop the connection now, as a failed link would.
    DropLink,
    /// Begin stop-and-copy now (at [`Checkpoint::PassStart`] only).
    Switchover,
}

/// Hooks into the source engine. Every method has a do-nothing default.
pub trait SourceHooks {
    /// Called at each checkpoint; the answer steers the engine.
    fn at(&mut self, _point: Checkpoint) -> Control {
        Control::Continue
    }
    /// Dirty tracking (re)started: `logged` says whether device DMA is now logged by
    /// anyone (false when no container tracks devices).
    fn tracking_started(&mut self, _logged: bool) {}
    /// A device-state record is about to be sent, after the source's device-state digest
    /// took it in: a harness may alter it here to show that the destination's digest
    /// catches what changed on the way.
    fn device_state_out(&mut self, _device: &str, _bytes: &mut Vec<u8>) {}
}

/// No hooks: what a VMM passes.
pub struct NoHooks;

impl SourceHooks for NoHooks {}

/// Verification of the destination's memory against the source's before the guest is
/// handed over. Both sides run the same verifier.
pub trait Verifier: Send + Sync {
    /// The hashes that stand for `memory` (what the source sends, what the destination
    /// compares): one per page, or one per region for memory too large for a frame.
    fn hashes(&self, memory: &dyn GuestRam, max_hashes: usize) -> Result<Vec<u64>, VmError>;
    /// A digest of `hashes`.
    fn digest(&self, hashes: &[u64]) -> u64;
    /// One hash per page of pages `first..first + count` of region `region`: after
    /// [`Verifier::hashes`] gave one hash per region and some differed, both sides compare
    /// these to count the pages that differ.
    fn page_hashes(
        &self,
        memory: &dyn GuestRam,
        region: usize,
        first: u64,
        count: u64,
    ) -> Result<Vec<u64>, VmError> {
        memory.page_hashes_in(region, first, count)
    }
}
