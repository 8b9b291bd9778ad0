//! Real QEMU memory maps embedded in the library, so `iovatrack plan` works with no input.
//!
//! All are `info mtree -f` dumps of QEMU 7.2 guests; `q35-2g` is the small q35 guest
//! `iovatrack migrate` runs by default (1 GiB below the 32-bit PCI hole, 1 GiB above it).

use super::{mtree, Layout, LoadError};

const PRESETS: [(&str, &str, &str); 7] = [
    (
        "q35-16g",
        "q35, 16 GiB, TCG (2 GiB below 4 GiB, 14 GiB above)",
        include_str!("../../presets/q35-16g.mtree"),
    ),
    (
        "q35-16g-kvm",
        "q35, 16 GiB, KVM memslots",
        include_str!("../../presets/q35-16g-kvm.mtree"),
    ),
    (
        "q35-2g",
        "q35, 2 GiB: 1 GiB below 4 GiB, 1 GiB above (migration default)",
        include_str!("../../presets/q35-2g.mtree"),
    ),
    (
        "q35-dimms",
        "q35 with three pc-dimm devices above 4 GiB",
        include_str!("../../presets/q35-dimms.mtree"),
    ),
    (
        "q35-virtio-mem",
        "q35 with a 256 GiB virtio-mem device",
        include_str!("../../presets/q35-virtio-mem.mtree"),
    ),
    (
        "pc-4g",
        "i440fx pc, 4 GiB",
        include_str!("../../presets/pc-4g.mtree"),
    ),
    (
        "amd-1t",
        "AMD guest with ram-above-4g relocated to 1 TiB",
        include_str!("../../presets/amd-1t.mtree"),
    ),
];

/// The preset `iovatrack plan` uses with no input.
pub const DEFAULT: &str = "q35-16g";

/// Names of every preset.
pub fn names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.0).collect()
}

/// `(name, description)` of every preset.
pub fn list() -> impl Iterator<Item = (&'static str, &'static str)> {
    PRESETS.iter().map(|p| (p.0, p.1))
}

/// The `info mtree -f` text of a preset.
pub fn text(name: &str) -> Option<&'static str> {
    PRESETS.iter().find(|p| p.0 == name).map(|p| p.2)
}

/// A preset's flat view of AS `memory`.
pub fn get(name: &str) -> Result<Layout, LoadError> {
    let t = text(name).ok_or_else(|| LoadError::UnknownPreset(name.to_string()))?;
    Ok(mtree::parse(t, mtree::DEFAULT_ADDRESS_SPACE)?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn all_presets_parse() {
        for n in super::names() {
            let l = super::get(n).unwrap();
            assert!(l.ram_bytes() > 0, "{n}");
        }
        assert!(super::get("nope").is_err());
    }
}
