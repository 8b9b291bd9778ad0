//! The demo's passthrough devices: an emulated device (DMA logging and migration state)
//! with its own DMA workload, which stops while the device is stopped, as a real
//! device's DMA does.

use super::dma::DmaWorkload;
use crate::device::{DeviceError, EmulatedDevice, MigFlags, MigState};
use crate::migrate::seams::{DeviceMigration, EmulatedMigration};
use std::sync::Arc;

/// An emulated device and the DMA it does.
pub struct DemoDevice {
    migration: std::sync::Mutex<EmulatedMigration>,
    workload: DmaWorkload,
}

impl DemoDevice {
    /// `device` named `name`, doing `workload`'s DMA.
    pub fn new(name: &str, device: Arc<EmulatedDevice>, workload: DmaWorkload) -> Self {
        Self {
            migration: std::sync::Mutex::new(EmulatedMigration::new(name, device)),
            workload,
        }
    }

    /// The emulated device.
    pub fn device(&self) -> Arc<EmulatedDevice> {
        self.lock().device().clone()
    }

    /// Its DMA workload.
    pub fn workload(&self) -> &DmaWorkload {
        &self.workload
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, EmulatedMigration> {
        self.migration
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A [`DemoDevice`]'s migration interface, for the engine.
pub struct DemoMigration {
    name: String,
    dev: Arc<DemoDevice>,
}

impl DemoMigration {
    /// The migration interface of `dev`.
    pub fn new(dev: Arc<DemoDevice>) -> Self {
        let name = dev.lock().name().to_string();
        Self { name, dev }
    }
}

impl DeviceMigration for DemoMigration {
    fn name(&self) -> &str {
        &self.name
    }
    fn flags(&self) -> Result<MigFlags, DeviceError> {
        self.dev.lock().flags()
    }
    fn set_state(&mut self, state: MigState) -> Result<(), DeviceError> {
        let dma = matches!(
            state,
            MigState::Running | MigState::RunningP2p | MigState::PreCopy | MigState::PreCopyP2p
        );
        let mut m = self.dev.lock();
        if dma {
            m.set_state(state)?;
            self.dev.workload.resume();
        } else {
            // The device stops its DMA before its final state is taken.
            self.dev.workload.pause();
            let data = format!("{} writes={} ", self.name, self.dev.workload.writes());
            m.device().migration().set_data(data.into_bytes());
            m.set_state(state)?;
        }
        Ok(())
    }
    fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError> {
        self.dev.lock().read_data(buf)
    }
    fn write_data(&mut self, buf: &[u8]) -> Result<(), DeviceError> {
        self.dev.lock().write_data(buf)
    }
    fn precopy_info(&mut self) -> Result<(u64, u64), DeviceError> {
        self.dev.lock().precopy_info()
    }
}
