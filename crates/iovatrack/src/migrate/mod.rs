//! Live migration: guest, DMA workload, pre-copy engine, wire protocol.

pub mod guest;
pub mod wire;
