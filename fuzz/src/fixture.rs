//! The destination the `receiver` fuzz target serves, and the input format's constants.
//!
//! One file for two users: the fuzz crate (`iovatrack_fuzz::fixture`) and the seed
//! generator in the main crate (`crates/iovatrack/tests/fuzz_seeds.rs`, which includes it
//! by path), so a seed recorded from a real source always matches the layout the target
//! serves. It may use only `std` and `iovatrack`.

use iovatrack::migrate::engine::DestLimits;
use iovatrack::migrate::wire::MemoryLayout;
use iovatrack::range::IovaRange;
use std::time::Duration;

/// Guest page size.
pub const PAGE: u64 = 4096;

/// Guest RAM as `(gpa, bytes)`: three sparse regions, the last above 4 GiB, 32 pages in
/// all (small, so verification hashes little per execution).
pub const REGIONS: [(u64, u64); 3] = [
    (0, 16 * PAGE),
    (0x10_0000, 8 * PAGE),
    (0x1_0000_0000, 8 * PAGE),
];

/// The vCPU kind the destination resumes (the source's Hello must name it).
pub const GUEST_KIND: &str = "software";

/// The destination's devices, by name (two, so the P2P restore path runs and the
/// all-devices limit differs from the per-device one).
pub const DEVICES: [&str; 2] = ["dma0", "dma1"];

/// Tight limits, so a fuzzed stream reaches them within a small input.
pub fn limits() -> DestLimits {
    DestLimits {
        device_state_bytes: 2048,
        session_state_bytes: 3072,
        max_vcpus: 2,
        vcpu_state_bytes: 1024,
        max_refused: 3,
        // An in-memory channel never waits: the timeouts are never reached.
        read_timeout: Duration::from_secs(1),
        hello_timeout: Duration::from_secs(1),
        // Extra streams need a listener; served channel by channel, a session asking
        // for more than one is refused.
        max_streams: 4,
    }
}

/// The layout a source of this guest announces in its Hello.
pub fn layout() -> MemoryLayout {
    let regions = REGIONS.iter().map(|&(a, n)| IovaRange::new(a, n)).collect();
    MemoryLayout::new(PAGE, GUEST_KIND, regions).expect("a valid fixed layout")
}

/// Most sessions (`serve_channel` calls) one input makes.
pub const MAX_SESSIONS: usize = 6;

/// An input whose first byte has this bit set is raw: the rest is the peer's bytes for
/// each session, split at [`SEPARATOR`] (a recorded stream is such a seed). Otherwise the
/// input is structured (see the target's `input` module).
pub const RAW: u8 = 0x80;
/// Raw mode: recompute each frame's CRC before sending, so mutations pass the checksum.
pub const RAW_FIX_CRC: u8 = 0x01;
/// Raw mode: renumber the frames' sequence numbers too.
pub const RAW_FIX_SEQ: u8 = 0x02;
/// Separates sessions in a raw input.
pub const SEPARATOR: &[u8] = b"--iovatrack-next-session--";
