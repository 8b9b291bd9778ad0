//! The guest physical memory map.
