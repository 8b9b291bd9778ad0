//! A digest of the device state one session carried, computed the same way by the source
//! (over what it sent) and the destination (over what it received and gave its devices),
//! so the source can tell that every byte of every device's stream arrived, in order, at
//! the device it was meant for.

use std::collections::BTreeMap;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Per device (by name): FNV-1a over its stream and the stream's length. Records may be
/// split anywhere: only each device's bytes in order count, not how they were framed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateDigest {
    devices: BTreeMap<String, (u64, u64)>,
}

impl StateDigest {
    /// Nothing carried yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// `bytes` more of `device`'s stream (an empty record still names the device).
    pub fn add(&mut self, device: &str, bytes: &[u8]) {
        let (h, n) = self
            .devices
            .entry(device.to_string())
            .or_insert((FNV_OFFSET, 0));
        *h = bytes
            .iter()
            .fold(*h, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME));
        *n += bytes.len() as u64;
    }

    /// Forget everything (a new session).
    pub fn clear(&mut self) {
        self.devices.clear();
    }

    /// The digest: every device's name, stream hash and length, in name order (so the
    /// two sides' device orders need not agree).
    pub fn value(&self) -> u64 {
        let mut h = FNV_OFFSET;
        let mut fold = |w: u64| h = (h ^ w).wrapping_mul(FNV_PRIME);
        for (name, (hash, len)) in &self.devices {
            for b in name.bytes() {
                fold(u64::from(b));
            }
            fold(*hash);
            fold(*len);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_records_agree_and_any_change_shows() {
        let mut a = StateDigest::new();
        a.add("dma0", b"hello ");
        a.add("dma1", b"x");
        a.add("dma0", b"world");
        let mut b = StateDigest::new();
        b.add("dma1", b"x");
        b.add("dma0", b"hello world");
        assert_eq!(
            a.value(),
            b.value(),
            "framing and device order do not matter"
        );
        let base = a.value();
        let changed = |f: &dyn Fn(&mut StateDigest)| {
            let mut d = StateDigest::new();
            f(&mut d);
            d.value()
        };
        // A flipped byte, a lost byte, bytes given to another device, a missing device,
        // an extra empty record of a device not otherwise there.
        for other in [
            changed(&|d| {
                d.add("dma0", b"hello worle");
                d.add("dma1", b"x");
            }),
            changed(&|d| {
                d.add("dma0", b"hello worl");
                d.add("dma1", b"x");
            }),
            changed(&|d| {
                d.add("dma0", b"hello world");
                d.add("dma2", b"x");
            }),
            changed(&|d| d.add("dma0", b"hello world")),
            changed(&|d| {
                d.add("dma0", b"hello world");
                d.add("dma1", b"x");
                d.add("dma2", b"");
            }),
        ] {
            assert_ne!(other, base);
        }
        a.clear();
        assert_eq!(a, StateDigest::new());
    }
}
