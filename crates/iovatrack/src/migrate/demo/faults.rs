//! Injected faults, fired through the engine's hooks (the engine itself knows none).

use super::devices::DemoDevice;
use crate::device::{DeviceError, EmulatedDevice, EmulatedIommu, Errno, IommuDirtyTracker};
use crate::migrate::engine::{Checkpoint, Control, SourceHooks};
use crate::range::IovaRange;
use std::sync::Arc;

/// An injected fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The devices' REPORT fails (EIO) while collecting for pass N.
    ReportFail(u32),
    /// The devices refuse START with E2BIG unless given a single range.
    StartE2big,
    /// The connection drops in the middle of pass N (first attempt).
    DropAt(u32),
    /// The source cancels at pass N (first attempt), then retries.
    CancelAt(u32),
    /// The connection drops after a good verdict, before the source's Commit (first
    /// attempt): the destination must not resume, the source resumes and retries.
    DropBeforeCommit,
    /// Negative control: the tracker is not told the IOMMU's mappings, so in IOMMU mode it
    /// reads whole ranges across unmapped holes, where iommufd stops reading.
    IommuAcrossHoles,
    /// The connection drops right after the source's Commit, before the destination's
    /// CommitAck can arrive (first attempt): the handover is unacknowledged, the source
    /// stays paused and says so.
    DropAfterCommit,
    /// Negative control of the device-state digest: one byte of the first device-state
    /// record is flipped after the source's digest took it in (first attempt), so the
    /// destination's digest differs and the migration must not verify.
    CorruptDeviceState,
}

impl Fault {
    /// Every fault's syntax, for help and errors.
    pub const SYNTAX: &'static str =
        "report-fail@N, start-e2big, drop@N, cancel@N, drop-before-commit, drop-after-commit, iommu-across-holes, corrupt-device-state";
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let at = |p: &str| {
            p.parse::<u32>()
                .map_err(|_| format!("{s:?}: pass must be a number"))
        };
        match s.split_once('@') {
            Some(("report-fail", p)) => Ok(Fault::ReportFail(at(p)?)),
            Some(("drop", p)) => Ok(Fault::DropAt(at(p)?)),
            Some(("cancel", p)) => Ok(Fault::CancelAt(at(p)?)),
            None if s == "start-e2big" => Ok(Fault::StartE2big),
            None if s == "drop-before-commit" => Ok(Fault::DropBeforeCommit),
            None if s == "iommu-across-holes" => Ok(Fault::IommuAcrossHoles),
            None if s == "drop-after-commit" => Ok(Fault::DropAfterCommit),
            None if s == "corrupt-device-state" => Ok(Fault::CorruptDeviceState),
            _ => Err(format!("unknown fault {s:?} ({})", Fault::SYNTAX)),
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::ReportFail(n) => write!(f, "report-fail@{n}"),
            Fault::StartE2big => write!(f, "start-e2big"),
            Fault::DropAt(n) => write!(f, "drop@{n}"),
            Fault::CancelAt(n) => write!(f, "cancel@{n}"),
            Fault::DropBeforeCommit => write!(f, "drop-before-commit"),
            Fault::IommuAcrossHoles => write!(f, "iommu-across-holes"),
            Fault::DropAfterCommit => write!(f, "drop-after-commit"),
            Fault::CorruptDeviceState => write!(f, "corrupt-device-state"),
        }
    }
}

/// An IOMMU whose mappings the tracker is not told (the naive reader): every other call
/// goes to the IOMMU.
pub struct HideMappings(pub Arc<EmulatedIommu>);

impl IommuDirtyTracker for HideMappings {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn set_tracking(&self, on: bool) -> Result<(), DeviceError> {
        self.0.set_tracking(on)
    }
    fn read_dirty(
        &self,
        range: IovaRange,
        page_size: u64,
        bitmap: &mut [u64],
        clear: bool,
    ) -> Result<(), DeviceError> {
        self.0.read_dirty(range, page_size, bitmap, clear)
    }
}

/// The demo's hooks: fires the configured faults on the first attempt and records which
/// fired; tells the DMA workloads whether their writes are logged. When no tracker logs
/// them (the negative control), every device makes one DMA write at the start of each
/// pass after pass 0, waited for here: the last lands just before stop-and-copy, after
/// pass 0 sent its page and past the last collection, so the control always has a write
/// to lose.
pub struct FaultInjector {
    faults: Vec<Fault>,
    devices: Vec<Arc<EmulatedDevice>>,
    demo: Vec<Arc<DemoDevice>>,
    report_fired: bool,
    /// Device DMA is logged by some tracker.
    logged: bool,
    /// Faults that fired, in order.
    pub fired: Vec<Fault>,
}

impl FaultInjector {
    /// Faults on `devices` (REPORT failures), with `demo` devices' workloads to tell.
    pub fn new(
        faults: Vec<Fault>,
        devices: Vec<Arc<EmulatedDevice>>,
        demo: Vec<Arc<DemoDevice>>,
    ) -> Self {
        if faults.contains(&Fault::StartE2big) {
            for d in &devices {
                d.refuse_start(Errno::E2BIG, Some(1));
            }
        }
        Self {
            faults,
            devices,
            demo,
            report_fired: false,
            logged: true,
            fired: Vec::new(),
        }
    }

    fn fire(&mut self, f: Fault) -> bool {
        if self.fired.contains(&f) {
            return false;
        }
        self.fired.push(f);
        true
    }
}

impl SourceHooks for FaultInjector {
    fn at(&mut self, point: Checkpoint) -> Control {
        if let Checkpoint::PassStart { pass: 1.., .. } = point {
            if !self.logged {
                for d in &self.demo {
                    d.workload().write_now();
                }
            }
        }
        match point {
            Checkpoint::Collect {
                attempt: 0,
                pass,
                final_pass,
            } if !self.report_fired => {
                // A REPORT fault planned for a pass the migration did not reach hits the
                // final one.
                let due = self.faults.iter().copied().find(|f| {
                    matches!(f, Fault::ReportFail(n) if *n == pass || (final_pass && *n >= pass))
                });
                if let Some(f) = due {
                    for d in &self.devices {
                        d.fail_report(1, Errno::EIO);
                    }
                    self.report_fired = true;
                    self.fired.push(f);
                }
                Control::Continue
            }
            Checkpoint::PassStart { attempt: 0, pass }
                if self.faults.contains(&Fault::CancelAt(pass)) =>
            {
                if self.fire(Fault::CancelAt(pass)) {
                    Control::Cancel
                } else {
                    Control::Continue
                }
            }
            Checkpoint::PassProgress {
                attempt: 0,
                pass,
                sent,
                total,
            } if self.faults.contains(&Fault::DropAt(pass)) && sent * 2 >= total => {
                if self.fire(Fault::DropAt(pass)) {
                    Control::DropLink
                } else {
                    Control::Continue
                }
            }
            // A pass too small to drop half-way through drops before its end.
            Checkpoint::PassSent { attempt: 0, pass }
                if self.faults.contains(&Fault::DropAt(pass)) && self.fire(Fault::DropAt(pass)) =>
            {
                Control::DropLink
            }
            Checkpoint::BeforeCommit { attempt: 0 }
                if self.faults.contains(&Fault::DropBeforeCommit)
                    && self.fire(Fault::DropBeforeCommit) =>
            {
                Control::DropLink
            }
            Checkpoint::AfterCommit { attempt: 0 }
                if self.faults.contains(&Fault::DropAfterCommit)
                    && self.fire(Fault::DropAfterCommit) =>
            {
                Control::DropLink
            }
            _ => Control::Continue,
        }
    }

    fn tracking_started(&mut self, logged: bool) {
        self.logged = logged;
        for d in &self.demo {
            d.workload().set_logged(logged);
        }
    }

    fn device_state_out(&mut self, _device: &str, bytes: &mut Vec<u8>) {
        if self.faults.contains(&Fault::CorruptDeviceState) && self.fire(Fault::CorruptDeviceState)
        {
            match bytes.first_mut() {
                Some(b) => *b ^= 0x01,
                None => bytes.push(0x01),
            }
        }
    }
}
