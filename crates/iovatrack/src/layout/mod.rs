//! The guest physical memory map: the flat view of one address space, as sections.
//!
//! A [`Layout`] is what QEMU's `info mtree -f` prints for one FlatView: sorted, disjoint
//! sections, each with its kind and the facts the DMA-able filter needs. Loaders:
//! [`mtree`] (QEMU text), [`json`] (our documented format), [`qmp`] (a live QEMU) and
//! [`presets`] (embedded real layouts).
//!
//! Sections carry an inclusive `last` byte because a section may end at 2^64 − 1, where an
//! exclusive end does not fit a `u64`.

pub mod json;
pub mod mtree;
pub mod presets;
pub mod qmp;

use crate::range::human_bytes;
use serde::{Deserialize, Serialize};
use std::fmt;

/// What backs a section (QEMU's `memory_region_type`, plus IOMMU which `info mtree` prints
/// as `i/o`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SectionKind {
    /// Guest RAM (`ram`).
    Ram,
    /// Another device's memory mapped into the guest (`ramd`), e.g. a VFIO BAR mmap.
    RamDevice,
    /// Read-only memory (`rom`): a ROM region or RAM mapped read-only (PAM).
    Rom,
    /// A ROM device in romd mode (`romd`), e.g. pflash: not RAM for VFIO.
    Romd,
    /// MMIO / I/O dispatch (`i/o`).
    Io,
    /// An IOMMU memory region (vIOMMU): the mappings behind it are dynamic.
    Iommu,
}

impl SectionKind {
    /// The name QEMU prints (`iommu` is ours; QEMU prints `i/o`).
    pub fn as_str(self) -> &'static str {
        match self {
            SectionKind::Ram => "ram",
            SectionKind::RamDevice => "ram_device",
            SectionKind::Rom => "rom",
            SectionKind::Romd => "romd",
            SectionKind::Io => "io",
            SectionKind::Iommu => "iommu",
        }
    }
}

impl SectionKind {
    /// Whether host memory backs the section (`ram`, `ram_device`, `rom`), as opposed to
    /// dispatch regions (`romd`, `io`, `iommu`), which may span the whole address space.
    pub fn is_memory(self) -> bool {
        matches!(
            self,
            SectionKind::Ram | SectionKind::RamDevice | SectionKind::Rom
        )
    }
}

/// Widest guest physical address on x86-64 and arm64 (LPA2): 52 bits.
pub const MAX_PHYS_BITS: u32 = 52;

/// The largest memory section a guest can have: its whole physical address space.
pub const MAX_MEMORY_SECTION: u128 = 1 << MAX_PHYS_BITS;

impl fmt::Display for SectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A VFIO BAR mmap, recognised by QEMU's region name `"<BDF> BAR <n> mmaps[<i>]"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VfioBar {
    /// Host PCI address, e.g. `0000:01:00.0`.
    pub bdf: String,
    /// BAR index.
    pub bar: u8,
    /// mmap index within the BAR.
    pub mmap: u32,
}

impl VfioBar {
    /// Parse a region name; `None` unless it is exactly QEMU's VFIO BAR mmap form.
    pub fn parse(name: &str) -> Option<VfioBar> {
        let (bdf, rest) = name.split_once(" BAR ")?;
        let b = bdf.as_bytes();
        let hex = |s: &[u8]| {
            s.iter()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
        };
        let ok = b.len() == 12
            && hex(&b[0..4])
            && b[4] == b':'
            && hex(&b[5..7])
            && b[7] == b':'
            && hex(&b[8..10])
            && b[10] == b'.'
            && (b'0'..=b'7').contains(&b[11]);
        if !ok {
            return None;
        }
        let (bar, rest) = rest.split_once(" mmaps[")?;
        let idx = rest.strip_suffix(']')?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
        if !digits(bar) || !digits(idx) {
            return None;
        }
        Some(VfioBar {
            bdf: bdf.to_string(),
            bar: bar.parse().ok()?,
            mmap: idx.parse().ok()?,
        })
    }
}

/// One piece of the flat view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Section {
    /// First guest physical byte.
    pub start: u64,
    /// Last guest physical byte (inclusive).
    pub last: u64,
    /// What backs it.
    pub kind: SectionKind,
    /// Mapped read-only (QEMU prints such a FlatRange as `rom`).
    pub readonly: bool,
    /// Nonvolatile RAM (NVDIMM; QEMU's `nv-` prefix).
    pub nonvolatile: bool,
    /// Memory region name (aliases resolved, as QEMU prints it).
    pub name: String,
    /// Offset of `start` within its memory region (QEMU's `@offset`).
    pub offset_in_region: u64,
    /// Owner device or object, when known (`info mtree -f -o`, or JSON).
    pub owner: Option<String>,
    /// Protected RAM (`RAM_PROTECTED`, e.g. SGX EPC); never DMA-mapped.
    pub protected: bool,
    /// Owned by a vfio-pci device of the container (QEMU's `vfio_section_is_vfio_pci`).
    pub vfio_pci: bool,
    /// Flat-view priority, as printed.
    pub priority: i32,
    /// Accelerator holding a memslot here (`KVM`, ...), as printed.
    pub accel: Option<String>,
}

impl Section {
    /// A plain section; other facts default to false/none.
    pub fn new(start: u64, last: u64, kind: SectionKind, name: impl Into<String>) -> Self {
        Section {
            start,
            last,
            kind,
            readonly: kind == SectionKind::Rom,
            nonvolatile: false,
            name: name.into(),
            offset_in_region: 0,
            owner: None,
            protected: false,
            vfio_pci: false,
            priority: 0,
            accel: None,
        }
    }

    /// Size in bytes (exact: may be 2^64 for a section covering everything).
    pub fn size(&self) -> u128 {
        self.last as u128 - self.start as u128 + 1
    }

    /// Exclusive end (exact).
    pub fn end(&self) -> u128 {
        self.last as u128 + 1
    }

    /// The VFIO BAR this section maps, if its name says so.
    pub fn vfio_bar(&self) -> Option<VfioBar> {
        VfioBar::parse(&self.name)
    }
}

/// Why a layout is not a valid flat view.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// No sections at all.
    #[error("the memory map has no sections")]
    Empty,
    /// A section whose last byte is before its first.
    #[error("section {index} ({name:?}) ends before it starts")]
    Inverted {
        /// Position in the input.
        index: usize,
        /// Region name.
        name: String,
    },
    /// A memory section larger than any guest physical address space holds.
    #[error("section {index} ({name:?}): {size} of {kind} cannot be guest memory: guest physical addresses have at most {MAX_PHYS_BITS} bits, so no memory section exceeds {max}", size = human_bytes(*size), max = human_bytes(MAX_MEMORY_SECTION))]
    ImpossibleMemory {
        /// Position in the input.
        index: usize,
        /// Region name.
        name: String,
        /// Its kind.
        kind: SectionKind,
        /// Its size in bytes.
        size: u128,
    },
    /// Two sections share bytes (a flat view never does).
    #[error("sections {first:?} [{first_start:#x}..] and {second:?} [{second_start:#x}..] overlap at {at:#x}")]
    Overlap {
        /// Earlier section's name.
        first: String,
        /// Earlier section's start.
        first_start: u64,
        /// Later section's name.
        second: String,
        /// Later section's start.
        second_start: u64,
        /// First shared byte.
        at: u64,
    },
}

/// The flat view of one address space.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Layout {
    address_space: String,
    sections: Vec<Section>,
    viommu: bool,
}

impl Layout {
    /// Build from sections in any order; sorts them and checks they are disjoint.
    pub fn new(
        address_space: impl Into<String>,
        mut sections: Vec<Section>,
    ) -> Result<Self, LayoutError> {
        if sections.is_empty() {
            return Err(LayoutError::Empty);
        }
        if let Some((index, s)) = sections.iter().enumerate().find(|(_, s)| s.last < s.start) {
            return Err(LayoutError::Inverted {
                index,
                name: s.name.clone(),
            });
        }
        // Checked here, not left to the planner: a 16 EiB "RAM" section would be planned
        // (and tracked) as if it were real, and only fail when something tried to back it.
        if let Some((index, s)) = sections
            .iter()
            .enumerate()
            .find(|(_, s)| s.kind.is_memory() && s.size() > MAX_MEMORY_SECTION)
        {
            return Err(LayoutError::ImpossibleMemory {
                index,
                name: s.name.clone(),
                kind: s.kind,
                size: s.size(),
            });
        }
        sections.sort_by_key(|s| (s.start, s.last));
        for w in sections.windows(2) {
            if w[1].start <= w[0].last {
                return Err(LayoutError::Overlap {
                    first: w[0].name.clone(),
                    first_start: w[0].start,
                    second: w[1].name.clone(),
                    second_start: w[1].start,
                    at: w[1].start,
                });
            }
        }
        let viommu = sections.iter().any(|s| s.kind == SectionKind::Iommu);
        Ok(Layout {
            address_space: address_space.into(),
            sections,
            viommu,
        })
    }

    /// Mark the container's address space as translated by a vIOMMU (its mappings are
    /// dynamic, so no fixed range set covers them).
    pub fn with_viommu(mut self, viommu: bool) -> Self {
        self.viommu = viommu || self.sections.iter().any(|s| s.kind == SectionKind::Iommu);
        self
    }

    /// The address space this flat view serves (`memory` for the system AS).
    pub fn address_space(&self) -> &str {
        &self.address_space
    }

    /// Sections, sorted by start, disjoint.
    pub fn sections(&self) -> &[Section] {
        &self.sections
    }

    /// Whether the container sits behind a vIOMMU.
    pub fn viommu(&self) -> bool {
        self.viommu
    }

    /// Total bytes of `ram` sections (any flags).
    pub fn ram_bytes(&self) -> u128 {
        self.sections
            .iter()
            .filter(|s| s.kind == SectionKind::Ram)
            .map(Section::size)
            .sum()
    }
}

/// Any error loading a layout, from any source.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// `info mtree -f` text could not be parsed.
    #[error(transparent)]
    Mtree(#[from] mtree::MtreeError),
    /// JSON layout could not be parsed.
    #[error(transparent)]
    Json(#[from] json::JsonLayoutError),
    /// A live QEMU could not be queried.
    #[error(transparent)]
    Qmp(#[from] qmp::QmpError),
    /// The sections do not form a flat view.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Reading the input failed.
    #[error("cannot read {path}")]
    Io {
        /// What was read.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The input is empty (or only whitespace).
    #[error("the layout is empty: expected QEMU `info mtree -f` text or a JSON layout")]
    Empty,
    /// No preset of that name.
    #[error("no preset named {0:?} (known: {known})", known = presets::names().join(", "))]
    UnknownPreset(String),
}

/// Parse layout text, telling JSON from `info mtree -f`: text that is JSON at all (an
/// object, but also an array, a string or a number, which get a JSON error saying what they
/// are) is read as a JSON layout, anything else as `info mtree -f`.
pub fn parse_any(text: &str, address_space: Option<&str>) -> Result<Layout, LoadError> {
    let t = text.trim_start();
    if t.is_empty() {
        return Err(LoadError::Empty);
    }
    // An mtree dump fails as JSON at its first character, so this costs nothing there.
    if t.starts_with('{') || serde_json::from_str::<serde::de::IgnoredAny>(t).is_ok() {
        Ok(json::parse(text)?)
    } else {
        Ok(mtree::parse(
            text,
            address_space.unwrap_or(mtree::DEFAULT_ADDRESS_SPACE),
        )?)
    }
}

/// Load a layout file (`-` = standard input), JSON or `info mtree -f`. A file named
/// `*.json` is read as JSON whatever it holds, so that an empty or broken one gets a JSON
/// error rather than an `info mtree -f` one.
pub fn load_file(path: &str, address_space: Option<&str>) -> Result<Layout, LoadError> {
    use std::io::Read;
    let mut text = String::new();
    let res = if path == "-" {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(path).map(|t| text = t)
    };
    res.map_err(|source| LoadError::Io {
        path: path.to_string(),
        source,
    })?;
    let is_json = std::path::Path::new(path)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if is_json {
        Ok(json::parse(&text)?)
    } else {
        parse_any(&text, address_space)
    }
}

/// Why a size was refused by [`parse_size`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a number in a known form.
    #[error("{0:?} is not a size: give bytes in decimal or 0x hex, or a decimal number with a binary suffix K, M, G, T, P or E (optionally followed by iB or B)")]
    Invalid(String),
    /// A size of 2^64 bytes or more.
    #[error("{0:?} is 2^64 bytes or more")]
    TooLarge(String),
}

/// Parse a byte count as people write one: `4096`, `0x1000`, `2M`, `2MiB`, `16g`, `1T`.
/// Suffixes are binary (K = 1024) and case-insensitive; hex takes no suffix (`B` and `E`
/// are hex digits).
///
/// ```
/// use iovatrack::layout::parse_size;
///
/// assert_eq!(parse_size("2M"), Ok(2 << 20));
/// assert_eq!(parse_size("0x1000"), Ok(4096));
/// assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
/// assert!(parse_size("16E").is_err()); // 2^64: does not fit
/// ```
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let invalid = || SizeError::Invalid(text.to_string());
    let t = text.trim();
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return match u64::from_str_radix(h, 16) {
            Ok(v) if !h.starts_with('+') => Ok(v),
            Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => {
                Err(SizeError::TooLarge(text.to_string()))
            }
            _ => Err(invalid()),
        };
    }
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    if num.is_empty() {
        return Err(invalid());
    }
    let unit = unit.trim_start().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        "e" => 60,
        _ => return Err(invalid()),
    };
    let too_large = || SizeError::TooLarge(text.to_string());
    let v: u64 = num.parse().map_err(|_| too_large())?;
    v.checked_mul(1u64 << shift).ok_or_else(too_large)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vfio_bar_names() {
        let b = VfioBar::parse("0000:01:00.0 BAR 3 mmaps[0]").unwrap();
        assert_eq!((b.bdf.as_str(), b.bar, b.mmap), ("0000:01:00.0", 3, 0));
        assert!(VfioBar::parse("0000:01:00.8 BAR 3 mmaps[0]").is_none());
        assert!(VfioBar::parse("0000:01:00.0 BAR x mmaps[0]").is_none());
        assert!(VfioBar::parse("pc.ram").is_none());
        assert!(VfioBar::parse("0000:01:00.0 BAR 3 mmaps[0] extra").is_none());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 2M "), Ok(2 << 20));
        assert_eq!(parse_size("2mib"), Ok(2 << 20));
        assert_eq!(parse_size("4KB"), Ok(4096));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("0XfFfF"), Ok(0xffff));
        assert_eq!(parse_size("15E"), Ok(15 << 60));
        for bad in ["", "x", "0x", "-1", "+1", "1.5G", "2Q", "0x1M", "M", "0x+1"] {
            assert_eq!(
                parse_size(bad),
                Err(SizeError::Invalid(bad.into())),
                "{bad}"
            );
        }
        for big in [
            "16E",
            "99999999999999G",
            "0x10000000000000000",
            "18446744073709551616",
        ] {
            assert_eq!(
                parse_size(big),
                Err(SizeError::TooLarge(big.into())),
                "{big}"
            );
        }
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn memory_larger_than_any_guest_is_refused_by_name() {
        let ram = Section::new(0x1_0000_0000, u64::MAX, SectionKind::Ram, "huge");
        let low = Section::new(0, 0xfff, SectionKind::Ram, "low");
        let e = Layout::new("m", vec![low.clone(), ram]).unwrap_err();
        assert!(
            matches!(e, LayoutError::ImpossibleMemory { index: 1, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("section 1 (\"huge\")"), "{e}");
        // Dispatch regions may cover everything; 4 PiB of RAM is still possible.
        let io = Section::new(0x1000, u64::MAX, SectionKind::Io, "io");
        assert!(Layout::new("m", vec![low.clone(), io]).is_ok());
        let big = Section::new(1 << 52, (2 << 52) - 1, SectionKind::Ram, "4p");
        assert!(Layout::new("m", vec![low, big]).is_ok());
    }

    #[test]
    fn empty_and_non_object_inputs_get_their_own_errors() {
        assert!(matches!(parse_any(" \n", None), Err(LoadError::Empty)));
        for (text, what) in [
            ("[]", "an array"),
            ("\"x\"", "a string"),
            ("42", "a number"),
        ] {
            let e = parse_any(text, None).unwrap_err();
            assert!(e.to_string().contains(what), "{text}: {e}");
        }
    }

    #[test]
    fn overlap_and_empty() {
        assert_eq!(Layout::new("m", vec![]), Err(LayoutError::Empty));
        let a = Section::new(0, 0xfff, SectionKind::Ram, "a");
        let b = Section::new(0xfff, 0x1fff, SectionKind::Ram, "b");
        assert!(matches!(
            Layout::new("m", vec![b.clone(), a.clone()]),
            Err(LayoutError::Overlap { at: 0xfff, .. })
        ));
        let inv = Section::new(0x2000, 0x1000, SectionKind::Ram, "inv");
        assert!(matches!(
            Layout::new("m", vec![inv]),
            Err(LayoutError::Inverted { .. })
        ));
        let top = Section::new(u64::MAX - 0xfff, u64::MAX, SectionKind::Ram, "top");
        let l = Layout::new("m", vec![top, a]).unwrap();
        assert_eq!(l.sections()[1].size(), 0x1000);
        assert_eq!(l.sections()[1].end(), 1u128 << 64);
    }
}
