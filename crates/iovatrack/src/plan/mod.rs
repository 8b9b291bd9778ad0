//! From a memory map to the IOVA ranges a device must log.
pub mod combine;
pub mod limits;
