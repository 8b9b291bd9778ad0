//! Little-endian, fixed-width encoding shared by the wire codec and the saved vCPU state
//! (`guest::state`): [`PutLe`] appends fields to a `Vec<u8>`, and [`Cursor`] reads them
//! back with every read bounds-checked, so hostile input yields [`Short`], never a panic.
//!
//! Multi-field layouts are `zerocopy` structs of `little_endian` integers ([`PutLe::put`],
//! [`Cursor::read`], [`Cursor::slice`]): their byte order and packing are part of the type,
//! and reading one is a bounds check and a copy, with no per-field offset arithmetic.

use std::mem::size_of;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The input ended before a field: it needed `need` bytes, `left` remained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("input ends {left} bytes into a {need}-byte field")]
pub(crate) struct Short {
    /// Bytes the field needs.
    pub(crate) need: usize,
    /// Bytes that remained.
    pub(crate) left: usize,
}

/// Appends little-endian fields.
pub(crate) trait PutLe {
    /// One byte.
    fn put_u8(&mut self, v: u8);
    /// A little-endian u16.
    fn put_u16(&mut self, v: u16);
    /// A little-endian u32.
    fn put_u32(&mut self, v: u32);
    /// A little-endian u64.
    fn put_u64(&mut self, v: u64);
    /// A fixed layout (or a slice of them), as its bytes.
    fn put<T: IntoBytes + Immutable + ?Sized>(&mut self, v: &T);
}

impl PutLe for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put<T: IntoBytes + Immutable + ?Sized>(&mut self, v: &T) {
        self.extend_from_slice(v.as_bytes());
    }
}

/// A bounds-checked little-endian reader over a byte slice; what it returns borrows the
/// slice.
#[derive(Clone, Debug)]
pub(crate) struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `b`.
    pub(crate) fn new(b: &'a [u8]) -> Self {
        Self { b }
    }

    fn short(&self, need: usize) -> Short {
        Short {
            need,
            left: self.b.len(),
        }
    }

    /// The next `n` bytes.
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], Short> {
        let Some((head, tail)) = self.b.split_at_checked(n) else {
            return Err(self.short(n));
        };
        self.b = tail;
        Ok(head)
    }

    /// The next `N` bytes, by value.
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], Short> {
        let Some((head, tail)) = self.b.split_first_chunk::<N>() else {
            return Err(self.short(N));
        };
        self.b = tail;
        Ok(*head)
    }

    /// One byte.
    pub(crate) fn u8(&mut self) -> Result<u8, Short> {
        Ok(u8::from_le_bytes(self.array()?))
    }

    /// A little-endian u16.
    pub(crate) fn u16(&mut self) -> Result<u16, Short> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    /// A little-endian u32.
    pub(crate) fn u32(&mut self) -> Result<u32, Short> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// A little-endian u64.
    pub(crate) fn u64(&mut self) -> Result<u64, Short> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A fixed layout, by value.
    pub(crate) fn read<T: FromBytes + Unaligned>(&mut self) -> Result<T, Short> {
        let Ok((v, tail)) = T::read_from_prefix(self.b) else {
            return Err(self.short(size_of::<T>()));
        };
        self.b = tail;
        Ok(v)
    }

    /// `n` fixed layouts, borrowed in place (`Unaligned` makes any offset valid).
    pub(crate) fn slice<T>(&mut self, n: usize) -> Result<&'a [T], Short>
    where
        T: FromBytes + KnownLayout + Immutable + Unaligned,
    {
        let Ok((v, tail)) = <[T]>::ref_from_prefix_with_elems(self.b, n) else {
            return Err(self.short(n.saturating_mul(size_of::<T>())));
        };
        self.b = tail;
        Ok(v)
    }

    /// Everything left.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }

    /// Bytes left.
    pub(crate) fn remaining(&self) -> usize {
        self.b.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use zerocopy::little_endian::{U16, U64};

    #[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, PartialEq)]
    #[repr(C)]
    struct Pair {
        a: U16,
        b: U64,
    }

    #[test]
    fn round_trip_fields_and_layouts() {
        let mut out = Vec::new();
        out.put_u8(0xAB);
        out.put_u16(0x0102);
        out.put_u32(0x0304_0506);
        out.put_u64(0x0708_090A_0B0C_0D0E);
        out.put(&Pair {
            a: U16::new(7),
            b: U64::new(u64::MAX - 1),
        });
        out.put(&[U16::new(1), U16::new(2)][..]);
        assert_eq!(&out[1..3], &[2, 1], "little endian");
        assert_eq!(out.len(), 1 + 2 + 4 + 8 + 10 + 4);

        let mut c = Cursor::new(&out);
        assert_eq!(c.u8(), Ok(0xAB));
        assert_eq!(c.u16(), Ok(0x0102));
        assert_eq!(c.u32(), Ok(0x0304_0506));
        assert_eq!(c.u64(), Ok(0x0708_090A_0B0C_0D0E));
        let p: Pair = c.read().unwrap();
        assert_eq!((p.a.get(), p.b.get()), (7, u64::MAX - 1));
        let s: &[U16] = c.slice(2).unwrap();
        assert_eq!((s[0].get(), s[1].get()), (1, 2));
        assert_eq!(c.remaining(), 0);
        assert_eq!(c.rest(), &[] as &[u8]);
    }

    #[test]
    fn short_reads_are_errors_and_consume_nothing() {
        let bytes = [1u8, 2, 3];
        let mut c = Cursor::new(&bytes);
        assert_eq!(c.u32(), Err(Short { need: 4, left: 3 }));
        assert_eq!(c.u64(), Err(Short { need: 8, left: 3 }));
        assert_eq!(c.read::<Pair>(), Err(Short { need: 10, left: 3 }));
        assert_eq!(c.slice::<U16>(2), Err(Short { need: 4, left: 3 }));
        // A hostile element count neither overflows nor panics.
        assert_eq!(
            c.slice::<U64>(usize::MAX),
            Err(Short {
                need: usize::MAX,
                left: 3
            })
        );
        assert_eq!(c.take(4), Err(Short { need: 4, left: 3 }));
        assert_eq!(
            c.remaining(),
            3,
            "a failed read leaves the cursor where it was"
        );
        assert_eq!(c.u16(), Ok(0x0201));
        assert_eq!(c.u8(), Ok(3));
        assert_eq!(c.u8(), Err(Short { need: 1, left: 0 }));
    }

    proptest! {
        #[test]
        fn arbitrary_reads_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            ops in proptest::collection::vec((0u8..8, any::<usize>()), 0..32),
        ) {
            let mut c = Cursor::new(&bytes);
            for (op, n) in ops {
                let before = c.remaining();
                let ok = match op {
                    0 => c.u8().is_ok(),
                    1 => c.u16().is_ok(),
                    2 => c.u32().is_ok(),
                    3 => c.u64().is_ok(),
                    4 => c.take(n % 80).is_ok(),
                    5 => c.read::<Pair>().is_ok(),
                    6 => c.slice::<U64>(n).is_ok(),
                    _ => c.array::<3>().is_ok(),
                };
                prop_assert!(ok || c.remaining() == before);
                prop_assert!(c.remaining() <= before);
            }
        }
    }
}
