//! The migrating devices' VFIO migration v2 states and data streams on the source.
//!
//! With several devices, every device first stops initiating peer-to-peer DMA
//! (RUNNING_P2P, or PRE_COPY_P2P during pre-copy) before any of them stops: otherwise a
//! running device could DMA into a peer's BAR after that peer stopped, and the write
//! would reach no saved state (the kernel's `vfio_mig_get_next_state` arcs, and what QEMU
//! does in `vfio_migration_state_notifier`/`vfio_vmstate_change_prepare`).

use super::{AttemptEnd, Conn, Source};
use crate::device::{MigFlags, MigState};
use crate::migrate::engine::{AttemptError, MigrateError};
use crate::migrate::seams::DeviceMigration;
use crate::migrate::wire::Frame;
use std::borrow::Cow;

/// More than one device needs every device to support the P2P states.
pub(super) fn check_p2p(devices: &[(usize, Box<dyn DeviceMigration>)]) -> Result<(), MigrateError> {
    if devices.len() < 2 {
        return Ok(());
    }
    for (_, d) in devices {
        let flags = d.flags()?;
        if flags.0 & MigFlags::P2P.0 == 0 {
            return Err(MigrateError::NoP2p {
                device: d.name().to_string(),
                count: devices.len(),
            });
        }
    }
    Ok(())
}

impl Source<'_, '_> {
    fn several(&self) -> bool {
        self.vm.devices.len() > 1
    }

    /// Every device into `state`.
    fn all_to(&mut self, state: MigState) -> Result<(), AttemptError> {
        for (_, d) in self.vm.devices.iter_mut() {
            d.set_state(state)?;
        }
        Ok(())
    }

    /// Migration starts: devices that support it enter PRE_COPY (their initial state
    /// travels while the guest runs); the others stay RUNNING until stop-and-copy.
    pub(super) fn devices_to_precopy(&mut self) -> Result<(), AttemptError> {
        for (_, d) in self.vm.devices.iter_mut() {
            if d.flags()?.0 & MigFlags::PRE_COPY.0 != 0 {
                d.set_state(MigState::PreCopy)?;
            }
        }
        Ok(())
    }

    /// Stop-and-copy: all devices to the P2P state first when several migrate, then all
    /// to STOP_COPY.
    pub(super) fn devices_to_stop_copy(&mut self) -> Result<(), AttemptError> {
        if self.several() {
            for (_, d) in self.vm.devices.iter_mut() {
                let p2p = if d.flags()?.0 & MigFlags::PRE_COPY.0 != 0 {
                    MigState::PreCopyP2p
                } else {
                    MigState::RunningP2p
                };
                d.set_state(p2p)?;
            }
        }
        self.all_to(MigState::StopCopy)
    }

    /// After a failed attempt: every device back to RUNNING, best effort (P2P first when
    /// several, so none DMAs into a peer still stopped).
    pub(super) fn devices_to_running(&mut self) {
        if self.several() {
            for (_, d) in self.vm.devices.iter_mut() {
                if let Err(e) = d.set_state(MigState::RunningP2p) {
                    log::warn!("device {}: back to RUNNING_P2P: {e}", d.name());
                }
            }
        }
        for (_, d) in self.vm.devices.iter_mut() {
            if let Err(e) = d.set_state(MigState::Running) {
                log::warn!("device {}: back to RUNNING: {e}", d.name());
            }
        }
    }

    /// Each device's data stream, as far as it reads now, as DeviceState frames (empty
    /// streams send nothing unless `always`).
    pub(super) fn send_device_states_inner(
        &mut self,
        c: &mut Conn,
        always: bool,
    ) -> Result<(), AttemptEnd> {
        for (i, (_, d)) in self.vm.devices.iter_mut().enumerate() {
            let mut bytes = Vec::new();
            if d.flags().map_err(AttemptError::from)?.0 & MigFlags::PRE_COPY.0 != 0 || always {
                d.drain(&mut bytes).map_err(AttemptError::from)?;
            }
            if bytes.is_empty() && !always {
                continue;
            }
            if let Some(r) = self.report.devices.get_mut(i) {
                r.state_bytes += bytes.len() as u64;
            }
            // Digest what the device gave, before a harness may alter it on its way.
            self.sent_state.add(d.name(), &bytes);
            self.hooks.device_state_out(d.name(), &mut bytes);
            c.w.write_frame(&Frame::DeviceState {
                name: Cow::Borrowed(d.name()),
                bytes: Cow::Owned(bytes),
            })?;
        }
        Ok(())
    }

    /// After pass 0: the devices' initial PRE_COPY data.
    pub(super) fn send_device_states(&mut self, c: &mut Conn) -> Result<(), AttemptEnd> {
        self.send_device_states_inner(c, false)
    }
}
