//! QEMU's `info mtree -f` text (`system/memory.c: mtree_print_flatview`).
//!
//! ```text
//! FlatView #0
//!  AS "memory", root: system
//!  Root memory region: system
//!   0000000000000000-000000000009ffff (prio 0, ram): pc.ram KVM
//!   00000000000c0000-00000000000cafff (prio 0, rom): pc.ram @00000000000c0000 KVM
//! ```
//!
//! One FlatView block may serve several address spaces; the one serving the wanted AS is
//! kept. Text before the first `FlatView` line (a monitor prompt, a command echo) is skipped;
//! anything unexpected inside a block is an error naming its line.

use super::{Layout, LayoutError, Section, SectionKind, VfioBar};

/// The address space VFIO containers use without a vIOMMU.
pub const DEFAULT_ADDRESS_SPACE: &str = "memory";

/// Accelerator names QEMU appends when it holds a memslot for the range.
const ACCELS: [&str; 6] = ["KVM", "HVF", "WHPX", "NVMM", "HAX", "Xen"];

/// What is wrong with one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineProblem {
    /// Not `<start>-<end>`.
    #[error("expected `<start>-<end> (prio N, type): name`")]
    Shape,
    /// A hex number that does not parse or exceeds 64 bits.
    #[error("bad hex number {0:?}")]
    Hex(String),
    /// End before start.
    #[error("range ends before it starts")]
    Inverted,
    /// The `(prio N, type)` part is malformed.
    #[error("malformed `(prio N, type)` part")]
    Prio,
    /// A type QEMU does not print.
    #[error("unknown region type {0:?} (expected ram, ramd, rom, romd, i/o, optionally nv-)")]
    UnknownType(String),
    /// No region name after `): `.
    #[error("missing region name")]
    NoName,
    /// An unexpected line inside a FlatView block.
    #[error("unexpected line in a FlatView block")]
    Unexpected,
}

/// Why `info mtree -f` text could not be turned into a layout.
#[derive(Debug, thiserror::Error)]
pub enum MtreeError {
    /// No `FlatView #N` header anywhere.
    #[error("no `FlatView #` block found: is this the output of `info mtree -f`?")]
    NoFlatView,
    /// Hierarchical `info mtree` (without `-f`).
    #[error("line {line}: this is `info mtree` without -f (a region tree, not a flat view); run `info mtree -f`")]
    NotFlat {
        /// 1-based line number.
        line: usize,
    },
    /// The wanted address space is not served by any FlatView.
    #[error("no FlatView serves address space {wanted:?} (present: {})", available.join(", "))]
    NoAddressSpace {
        /// What was asked for.
        wanted: String,
        /// What the text has.
        available: Vec<String>,
    },
    /// A malformed line.
    #[error("line {line}: {problem}: {text:?}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// The line as read (truncated to 120 characters).
        text: String,
        /// What is wrong.
        problem: LineProblem,
    },
    /// The sections of the chosen view do not form a flat view.
    #[error("address space {address_space:?}: {source}")]
    Layout {
        /// The chosen address space.
        address_space: String,
        /// What is wrong.
        source: LayoutError,
    },
}

#[derive(Default)]
struct Block {
    address_spaces: Vec<String>,
    root: Option<String>,
    sections: Vec<Section>,
}

/// Parse `info mtree -f` text and return the flat view serving `address_space`.
pub fn parse(text: &str, address_space: &str) -> Result<Layout, MtreeError> {
    let mut blocks: Vec<Block> = Vec::new();
    let mut in_dispatch = false;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim_end_matches('\r');
        if line.starts_with("FlatView #") {
            blocks.push(Block::default());
            in_dispatch = false;
            continue;
        }
        let Some(block) = blocks.last_mut() else {
            // Preamble before the first block; a region tree here means no -f.
            if line.starts_with("address-space:") {
                return Err(MtreeError::NotFlat { line: line_no });
            }
            continue;
        };
        let t = line.trim();
        if t.is_empty() {
            in_dispatch = false;
            continue;
        }
        if in_dispatch {
            continue; // `info mtree -f -d` appends the dispatch tree; not ours to read
        }
        if t == "Dispatch" {
            in_dispatch = true;
        } else if let Some(rest) = t.strip_prefix("AS \"") {
            let name = rest.split('"').next().unwrap_or_default().to_string();
            block.address_spaces.push(name);
        } else if let Some(root) = t.strip_prefix("Root memory region: ") {
            block.root = Some(root.to_string());
        } else if t == "No rendered FlatView" {
        } else if line.starts_with("address-space:") {
            return Err(MtreeError::NotFlat { line: line_no });
        } else {
            let s = parse_section(t).map_err(|problem| MtreeError::Line {
                line: line_no,
                text: line.chars().take(120).collect(),
                problem,
            })?;
            block.sections.push(s);
        }
    }
    if blocks.is_empty() {
        return Err(MtreeError::NoFlatView);
    }
    let Some(block) = blocks
        .iter()
        .find(|b| b.address_spaces.iter().any(|a| a == address_space))
    else {
        return Err(MtreeError::NoAddressSpace {
            wanted: address_space.to_string(),
            available: blocks
                .iter()
                .flat_map(|b| b.address_spaces.iter().cloned())
                .collect(),
        });
    };
    let viommu = block.root.as_deref().is_some_and(is_iommu_root);
    Layout::new(address_space, block.sections.clone())
        .map(|l| l.with_viommu(viommu))
        .map_err(|source| MtreeError::Layout {
            address_space: address_space.to_string(),
            source,
        })
}

/// Roots of vIOMMU-translated address spaces (intel-iommu, amd-iommu, virtio-iommu, SMMUv3).
fn is_iommu_root(root: &str) -> bool {
    let r = root.to_ascii_lowercase();
    ["iommu", "dmar", "vtd", "smmu"]
        .iter()
        .any(|k| r.contains(k))
}

fn hex(s: &str) -> Result<u64, LineProblem> {
    if s.is_empty() || s.len() > 16 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(LineProblem::Hex(s.to_string()));
    }
    u64::from_str_radix(s, 16).map_err(|_| LineProblem::Hex(s.to_string()))
}

/// One section line, already trimmed.
fn parse_section(t: &str) -> Result<Section, LineProblem> {
    let (range, rest) = t.split_once(" (prio ").ok_or_else(|| {
        if t.contains('-')
            && t.split('-')
                .next()
                .is_some_and(|a| a.bytes().all(|c| c.is_ascii_hexdigit()))
        {
            LineProblem::Prio
        } else {
            LineProblem::Unexpected
        }
    })?;
    let (a, b) = range.split_once('-').ok_or(LineProblem::Shape)?;
    let (start, last) = (hex(a)?, hex(b)?);
    if last < start {
        return Err(LineProblem::Inverted);
    }
    let (attrs, rest) = rest.split_once("): ").ok_or(LineProblem::Prio)?;
    let (prio, ty) = attrs.split_once(", ").ok_or(LineProblem::Prio)?;
    let priority: i32 = prio.parse().map_err(|_| LineProblem::Prio)?;
    let (nonvolatile, ty) = match ty.strip_prefix("nv-") {
        Some(t) => (true, t),
        None => (false, ty),
    };
    let (kind, readonly) = match ty {
        "ram" => (SectionKind::Ram, false),
        "ramd" => (SectionKind::RamDevice, false),
        "rom" => (SectionKind::Rom, true),
        "romd" => (SectionKind::Romd, false),
        "i/o" => (SectionKind::Io, false),
        other => return Err(LineProblem::UnknownType(other.to_string())),
    };
    let mut name = rest;
    // `-o` appends owner/parent information; it is the last thing on the line.
    let mut owner = None;
    for key in [" owner:{", " parent:{"] {
        if let Some(at) = name.find(key) {
            let info = &name[at + key.len()..];
            owner = Some(info.split('}').next().unwrap_or_default().to_string());
            name = &name[..at];
            break;
        }
    }
    if let Some(n) = name.strip_suffix(" orphan") {
        name = n;
    }
    let mut accel = None;
    if let Some((head, tail)) = name.rsplit_once(' ') {
        if ACCELS.contains(&tail) {
            accel = Some(tail.to_string());
            name = head;
        }
    }
    let mut offset_in_region = 0;
    if let Some((head, tail)) = name.rsplit_once(" @") {
        if tail.len() == 16 && tail.bytes().all(|c| c.is_ascii_hexdigit()) {
            offset_in_region = hex(tail)?;
            name = head;
        }
    }
    if name.trim().is_empty() {
        return Err(LineProblem::NoName);
    }
    let vfio_pci = kind == SectionKind::RamDevice && VfioBar::parse(name).is_some();
    Ok(Section {
        start,
        last,
        kind,
        readonly,
        nonvolatile,
        name: name.to_string(),
        offset_in_region,
        owner,
        protected: false,
        vfio_pci,
        priority,
        accel,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "(qemu) info mtree -f\nFlatView #0\n AS \"memory\", root: system\n AS \"cpu-memory-0\", root: system\n Root memory region: system\n  0000000000000000-000000000009ffff (prio 0, ram): pc.ram KVM\n  00000000000c0000-00000000000cafff (prio 0, rom): pc.ram @00000000000c0000 KVM\n  0000000080000000-0000000080087fff (prio 0, ramd): 0000:01:00.0 BAR 0 mmaps[0] KVM\n  0000000080b90090-0000000083ffffff (prio 0, ramd): 0000:01:00.0 BAR 0 mmaps[0] @0000000000b90090\n  00000000fed40080-00000000fed40fff (prio 0, ram): tpm-crb-cmd owner:{dev id=tpm0}\n  0000000100000000-000000047fffffff (prio 0, nv-ram): nvdimm0 @0000000080000000 KVM\n  00000000feb80000-00000000feb9ffff (prio 1, i/o): vga ioports remapped\n\nFlatView #1\n AS \"I/O\", root: io\n Root memory region: io\n  No rendered FlatView\n";

    #[test]
    fn parses_every_suffix() {
        let l = parse(SAMPLE, "memory").unwrap();
        let s = l.sections();
        assert_eq!(s.len(), 7);
        assert_eq!(s[0].accel.as_deref(), Some("KVM"));
        assert_eq!(
            (s[1].kind, s[1].readonly, s[1].offset_in_region),
            (SectionKind::Rom, true, 0xc0000)
        );
        assert!(s[2].vfio_pci);
        assert_eq!(s[3].offset_in_region, 0xb90090);
        assert_eq!(s[3].name, "0000:01:00.0 BAR 0 mmaps[0]");
        assert_eq!(s[5].owner.as_deref(), Some("dev id=tpm0"));
        assert_eq!(s[5].name, "tpm-crb-cmd");
        assert_eq!(s[6].name, "nvdimm0");
        assert!(s[6].nonvolatile);
        assert_eq!(s[4].name, "vga ioports remapped");
        assert!(parse(SAMPLE, "cpu-memory-0").is_ok());
        assert!(!l.viommu());
    }

    #[test]
    fn errors_name_the_line() {
        let bad = SAMPLE.replace("(prio 0, ram): pc.ram KVM", "(prio 0, ram-ish): pc.ram KVM");
        let e = parse(&bad, "memory").unwrap_err();
        assert!(
            matches!(&e, MtreeError::Line { line: 6, problem: LineProblem::UnknownType(t), .. } if t == "ram-ish"),
            "{e}"
        );
        let garbage = SAMPLE.replace(
            " Root memory region: system\n",
            " Root memory region: system\nhello world\n",
        );
        assert!(matches!(
            parse(&garbage, "memory"),
            Err(MtreeError::Line {
                line: 6,
                problem: LineProblem::Unexpected,
                ..
            })
        ));
        let big = SAMPLE.replace(
            "0000000000000000-000000000009ffff",
            "10000000000000000-000000000009ffff",
        );
        assert!(matches!(
            parse(&big, "memory"),
            Err(MtreeError::Line {
                problem: LineProblem::Hex(_),
                ..
            })
        ));
        let inv = SAMPLE.replace(
            "0000000000000000-000000000009ffff",
            "00000000000a0000-000000000009ffff",
        );
        assert!(matches!(
            parse(&inv, "memory"),
            Err(MtreeError::Line {
                problem: LineProblem::Inverted,
                ..
            })
        ));
        let noname = SAMPLE.replace("(prio 1, i/o): vga ioports remapped", "(prio 1, i/o): ");
        assert!(matches!(
            parse(&noname, "memory"),
            Err(MtreeError::Line { .. })
        ));
        assert!(matches!(
            parse("hello\n", "memory"),
            Err(MtreeError::NoFlatView)
        ));
        assert!(matches!(parse("", "memory"), Err(MtreeError::NoFlatView)));
        assert!(matches!(parse("address-space: memory\n  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n", "memory"), Err(MtreeError::NotFlat { line: 1 })));
        assert!(matches!(
            parse(SAMPLE, "nope"),
            Err(MtreeError::NoAddressSpace { .. })
        ));
        let ov = SAMPLE.replace(
            "00000000000c0000-00000000000cafff",
            "0000000000090000-00000000000cafff",
        );
        assert!(matches!(
            parse(&ov, "memory"),
            Err(MtreeError::Layout {
                source: LayoutError::Overlap { .. },
                ..
            })
        ));
        let empty = "FlatView #0\n AS \"memory\", root: system\n Root memory region: system\n  No rendered FlatView\n";
        assert!(matches!(
            parse(empty, "memory"),
            Err(MtreeError::Layout {
                source: LayoutError::Empty,
                ..
            })
        ));
    }

    #[test]
    fn top_of_space_and_viommu() {
        let t = "FlatView #0\n AS \"dev\", root: vtd-root-dev\n Root memory region: vtd-root-dev\n  0000000000000000-ffffffffffffffff (prio 0, i/o): vtd-dmar\n";
        let l = parse(t, "dev").unwrap();
        assert_eq!(l.sections()[0].size(), 1u128 << 64);
        assert!(l.viommu());
    }
}
