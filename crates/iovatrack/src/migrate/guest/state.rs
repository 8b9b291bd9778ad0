//! Versioned little-endian byte layout for saved guest CPU state.
//!
//! Layout: magic `b"IOVTGCPU"`, `u32` version, `u32` kind (1 = KVM, 2 = software), then
//! the kind's fields (see `x86::VcpuState` and `soft::SoftState`). Every integer is little
//! endian and fixed width, so the bytes are portable across hosts. The encoding is the
//! wire codec's own ([`le`]); this file adds the header and maps short input to
//! [`GuestError::StateTruncated`].

use super::GuestError;
use crate::migrate::wire::le::{self, Cursor, PutLe};

const MAGIC: &[u8; 8] = b"IOVTGCPU";
/// Layout version of the KVM kinds (and of the first software layout).
pub(crate) const VERSION: u32 = 1;
/// Newest layout version of any kind (software: v2 adds the working set).
pub(crate) const MAX_VERSION: u32 = 2;
/// Kind tag of a KVM vCPU state.
pub(crate) const KIND_KVM: u32 = 1;
/// Kind tag of a software guest state.
pub(crate) const KIND_SOFT: u32 = 2;
/// Kind tag of a multi-vCPU KVM state (a count, then each vCPU's `KIND_KVM` blob).
pub(crate) const KIND_KVM_SMP: u32 = 3;

/// The kind tag of saved state bytes (after checking magic and version).
pub(crate) fn kind_of(bytes: &[u8]) -> Result<u32, GuestError> {
    let mut r = Reader(Cursor::new(bytes));
    r.header(MAX_VERSION)?;
    match r.u32()? {
        k @ (KIND_KVM | KIND_SOFT | KIND_KVM_SMP) => Ok(k),
        found => Err(GuestError::StateKind {
            expected: KIND_KVM,
            found,
        }),
    }
}

/// Appends fixed-width little-endian fields.
pub(crate) struct Writer(Vec<u8>);

impl Writer {
    pub(crate) fn new(kind: u32) -> Self {
        Self::versioned(kind, VERSION)
    }
    pub(crate) fn versioned(kind: u32, version: u32) -> Self {
        let mut w = Self(Vec::with_capacity(512));
        w.0.extend_from_slice(MAGIC);
        w.u32(version);
        w.u32(kind);
        w
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.put_u8(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.0.put_u16(v);
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.put_u32(v);
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.put_u64(v);
    }
    /// A length-prefixed (u32) byte string.
    pub(crate) fn blob(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    pub(crate) fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// Reads fields written by [`Writer`]; every read is bounds checked.
pub(crate) struct Reader<'a>(Cursor<'a>);

/// Every short read of saved state is the same error: the bytes end before the layout does.
fn truncated(_: le::Short) -> GuestError {
    GuestError::StateTruncated
}

impl<'a> Reader<'a> {
    /// Check magic, version and kind; position after the header.
    pub(crate) fn new(bytes: &'a [u8], kind: u32) -> Result<Self, GuestError> {
        Self::versioned(bytes, kind, VERSION).map(|(r, _)| r)
    }
    /// Like [`Reader::new`], accepting versions `VERSION ..= max`; returns the version.
    pub(crate) fn versioned(
        bytes: &'a [u8],
        kind: u32,
        max: u32,
    ) -> Result<(Self, u32), GuestError> {
        let mut r = Self(Cursor::new(bytes));
        let version = r.header(max)?;
        let found = r.u32()?;
        if found != kind {
            return Err(GuestError::StateKind {
                expected: kind,
                found,
            });
        }
        Ok((r, version))
    }
    /// Magic and a version in `VERSION..=max`; the kind is left for the caller to read.
    fn header(&mut self, max: u32) -> Result<u32, GuestError> {
        if self.0.array::<8>().map_err(truncated)? != *MAGIC {
            return Err(GuestError::StateBadMagic);
        }
        let version = self.u32()?;
        if !(VERSION..=max).contains(&version) {
            return Err(GuestError::StateVersion { found: version });
        }
        Ok(version)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, GuestError> {
        self.0.u8().map_err(truncated)
    }
    pub(crate) fn u16(&mut self) -> Result<u16, GuestError> {
        self.0.u16().map_err(truncated)
    }
    pub(crate) fn u32(&mut self) -> Result<u32, GuestError> {
        self.0.u32().map_err(truncated)
    }
    pub(crate) fn u64(&mut self) -> Result<u64, GuestError> {
        self.0.u64().map_err(truncated)
    }
    /// A byte string written by [`Writer::blob`].
    pub(crate) fn blob(&mut self) -> Result<&'a [u8], GuestError> {
        let n = self.u32()? as usize;
        self.0.take(n).map_err(truncated)
    }
    /// Fails unless every byte was consumed (catches layout mismatches).
    pub(crate) fn end(self) -> Result<(), GuestError> {
        match self.0.remaining() {
            0 => Ok(()),
            extra => Err(GuestError::StateTrailing { extra }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_checks_in_order() {
        let w = Writer::new(KIND_SOFT);
        let good = w.finish();
        assert_eq!(good.len(), 16);
        assert_eq!(kind_of(&good).unwrap(), KIND_SOFT);
        assert!(Reader::new(&good, KIND_SOFT).unwrap().end().is_ok());
        assert!(matches!(
            Reader::new(&good, KIND_KVM),
            Err(GuestError::StateKind {
                expected: KIND_KVM,
                found: KIND_SOFT
            })
        ));
        for cut in 0..good.len() {
            assert!(
                matches!(kind_of(&good[..cut]), Err(GuestError::StateTruncated)),
                "cut at {cut}"
            );
        }
        let mut bad = good.clone();
        bad[0] ^= 1;
        assert!(matches!(kind_of(&bad), Err(GuestError::StateBadMagic)));
        let mut bad = good.clone();
        // One past the newest layout any kind has.
        bad[8] = (MAX_VERSION + 1) as u8;
        assert!(matches!(
            kind_of(&bad),
            Err(GuestError::StateVersion { found }) if found == MAX_VERSION + 1
        ));
        bad[8] = 0;
        assert!(matches!(
            kind_of(&bad),
            Err(GuestError::StateVersion { found: 0 })
        ));
        let mut bad = good;
        bad[12] = 9;
        assert!(matches!(
            kind_of(&bad),
            Err(GuestError::StateKind { found: 9, .. })
        ));
    }

    #[test]
    fn fields_round_trip_and_trailing_bytes_are_counted() {
        let mut w = Writer::new(KIND_KVM);
        w.u8(1);
        w.u16(0x0203);
        w.u32(0x0405_0607);
        w.u64(u64::MAX);
        w.u8(0xEE);
        let bytes = w.finish();
        let mut r = Reader::new(&bytes, KIND_KVM).unwrap();
        assert_eq!(r.u8().unwrap(), 1);
        assert_eq!(r.u16().unwrap(), 0x0203);
        assert_eq!(r.u32().unwrap(), 0x0405_0607);
        assert_eq!(r.u64().unwrap(), u64::MAX);
        assert!(matches!(
            r.end(),
            Err(GuestError::StateTrailing { extra: 1 })
        ));
        let mut r = Reader::new(&bytes[..bytes.len() - 3], KIND_KVM).unwrap();
        r.u8().unwrap();
        r.u16().unwrap();
        r.u32().unwrap();
        assert!(matches!(r.u64(), Err(GuestError::StateTruncated)));
    }

    proptest! {
        #[test]
        fn hostile_state_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            reads in proptest::collection::vec(0u8..4, 0..16),
        ) {
            let _ = kind_of(&bytes);
            if let Ok(mut r) = Reader::new(&bytes, KIND_KVM) {
                for op in reads {
                    let _ = match op {
                        0 => r.u8().map(u64::from),
                        1 => r.u16().map(u64::from),
                        2 => r.u32().map(u64::from),
                        _ => r.u64(),
                    };
                }
                let _ = r.end();
            }
        }
    }
}
