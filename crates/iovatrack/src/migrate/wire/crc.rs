//! CRC-32C (Castagnoli), the frame trailer's checksum, from the `crc32c` crate: it uses the
//! SSE4.2 (or ARMv8) CRC instruction over three interleaved streams when the CPU has one,
//! and tables otherwise, so no hand-written CRC or `unsafe` lives here.

/// Running CRC-32C over several pieces (header, small fields, bulk data) without first
/// gathering them into one buffer.
#[derive(Clone, Copy)]
pub(super) struct Crc(u32);

impl Crc {
    /// `crc32c_append` continues from the finished CRC of the bytes so far; that of no bytes
    /// is 0.
    pub(super) fn new() -> Self {
        Crc(0)
    }
    pub(super) fn update(&mut self, data: &[u8]) {
        self.0 = ::crc32c::crc32c_append(self.0, data);
    }
    pub(super) fn finish(self) -> u32 {
        self.0
    }
}

/// CRC-32C (Castagnoli, as iSCSI/ext4/SSE4.2) of `data`; the frame trailer's checksum.
pub fn crc32c(data: &[u8]) -> u32 {
    ::crc32c::crc32c(data)
}
