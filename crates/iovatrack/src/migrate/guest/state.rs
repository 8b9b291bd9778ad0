//! Versioned little-endian byte layout for saved guest CPU state.
//!
//! Layout: magic `b"IOVTGCPU"`, `u32` version, `u32` kind (1 = KVM, 2 = software), then
//! the kind's fields (see `x86::VcpuState` and `soft::SoftState`). Every integer is little
//! endian and fixed width, so the bytes are portable across hosts.

use super::GuestError;

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
    let mut r = Reader(bytes);
    if r.take(8)? != MAGIC {
        return Err(GuestError::StateBadMagic);
    }
    let version = r.u32()?;
    if !(VERSION..=MAX_VERSION).contains(&version) {
        return Err(GuestError::StateVersion { found: version });
    }
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
        self.0.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
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
pub(crate) struct Reader<'a>(&'a [u8]);

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
        let mut r = Self(bytes);
        if r.take(8)? != MAGIC {
            return Err(GuestError::StateBadMagic);
        }
        let version = r.u32()?;
        if !(VERSION..=max).contains(&version) {
            return Err(GuestError::StateVersion { found: version });
        }
        let found = r.u32()?;
        if found != kind {
            return Err(GuestError::StateKind {
                expected: kind,
                found,
            });
        }
        Ok((r, version))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], GuestError> {
        if self.0.len() < n {
            return Err(GuestError::StateTruncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], GuestError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, GuestError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, GuestError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, GuestError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, GuestError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    /// A byte string written by [`Writer::blob`].
    pub(crate) fn blob(&mut self) -> Result<&'a [u8], GuestError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// Fails unless every byte was consumed (catches layout mismatches).
    pub(crate) fn end(self) -> Result<(), GuestError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(GuestError::StateTrailing {
                extra: self.0.len(),
            })
        }
    }
}
