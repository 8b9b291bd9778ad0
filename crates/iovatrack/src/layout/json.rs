//! The JSON layout format.
//!
//! ```json
//! {
//!   "address_space": "memory",
//!   "viommu": false,
//!   "sections": [
//!     { "start": 0, "size": 655360, "kind": "ram", "name": "pc.ram" },
//!     { "start": "0xc0000", "size": "0xb000", "kind": "rom", "name": "pc.ram", "offset": "0xc0000" },
//!     { "start": "0x100000000", "size": "0x380000000", "kind": "ram", "name": "pc.ram",
//!       "offset": "0x80000000", "nonvolatile": false, "protected": false,
//!       "owner": null, "vfio_pci": false, "readonly": false }
//!   ]
//! }
//! ```
//!
//! * `start`, `size`, `offset`: a JSON integer, or a string in decimal or `0x` hex (JSON
//!   tools often lose integers above 2^53, so strings are the safe form). `size` may be up to
//!   2^64 and `start + size` must not exceed 2^64; a memory section (`ram`, `ram_device`,
//!   `rom`) is at most 2^52 bytes, the widest guest physical address space.
//! * `kind`: `ram`, `ram_device`, `rom`, `romd`, `io` or `iommu` (an `iommu` section marks
//!   the address space as vIOMMU-translated).
//! * `readonly` defaults to true for `rom` and false otherwise; other flags default to false,
//!   `name` to `""`, `address_space` to `memory`. Unknown keys are refused (a typo such as
//!   `lenght` must not silently drop a field).

use super::{Layout, LayoutError, Section, SectionKind};
use serde::Deserialize;

/// Why a JSON layout was refused.
#[derive(Debug, thiserror::Error)]
pub enum JsonLayoutError {
    /// Not JSON, or not the expected shape.
    #[error("JSON layout: {0}")]
    Syntax(#[from] serde_json::Error),
    /// Nothing but whitespace.
    #[error("the JSON layout is empty: expected an object with a \"sections\" array")]
    Empty,
    /// Valid JSON, but not an object.
    #[error("the JSON layout is {0}, not an object with a \"sections\" array")]
    NotAnObject(&'static str),
    /// A number field that is not an unsigned integer.
    #[error("section {index}: field {field:?}: {text:?} is not an unsigned integer (use a number, or a string in decimal or 0x hex)")]
    Number {
        /// Position in `sections`.
        index: usize,
        /// Field name.
        field: &'static str,
        /// What was there.
        text: String,
    },
    /// A kind not in the list.
    #[error(
        "section {index}: unknown kind {kind:?} (expected ram, ram_device, rom, romd, io or iommu)"
    )]
    UnknownKind {
        /// Position in `sections`.
        index: usize,
        /// What was there.
        kind: String,
    },
    /// `size` is zero.
    #[error("section {index} ({name:?}): size is zero")]
    ZeroSize {
        /// Position in `sections`.
        index: usize,
        /// Its name.
        name: String,
    },
    /// `start + size` is past 2^64.
    #[error("section {index} ({name:?}): start {start:#x} + size {size:#x} ends past 2^64")]
    PastTop {
        /// Position in `sections`.
        index: usize,
        /// Its name.
        name: String,
        /// Its start.
        start: u64,
        /// Its size.
        size: u128,
    },
    /// The sections do not form a flat view.
    #[error("JSON layout: {0}")]
    Layout(#[from] LayoutError),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Num {
    N(u64),
    S(String),
    Other(serde_json::Value),
}

impl Num {
    fn get(&self, index: usize, field: &'static str) -> Result<u128, JsonLayoutError> {
        let bad = |text: String| JsonLayoutError::Number { index, field, text };
        match self {
            Num::N(n) => Ok(*n as u128),
            Num::S(s) => {
                let t = s.trim();
                let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                    Some(h) => u128::from_str_radix(h, 16),
                    None => t.parse::<u128>(),
                };
                r.ok()
                    .filter(|v| *v <= 1u128 << 64)
                    .ok_or_else(|| bad(s.clone()))
            }
            Num::Other(v) => Err(bad(v.to_string())),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonSection {
    start: Num,
    size: Num,
    kind: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    offset: Option<Num>,
    #[serde(default)]
    readonly: Option<bool>,
    #[serde(default)]
    nonvolatile: bool,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    protected: bool,
    #[serde(default)]
    vfio_pci: bool,
    #[serde(default)]
    priority: i32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLayout {
    #[serde(default = "default_as")]
    address_space: String,
    #[serde(default)]
    viommu: bool,
    sections: Vec<JsonSection>,
}

fn default_as() -> String {
    super::mtree::DEFAULT_ADDRESS_SPACE.to_string()
}

/// Parse a JSON layout.
pub fn parse(text: &str) -> Result<Layout, JsonLayoutError> {
    let t = text.trim_start();
    if t.is_empty() {
        return Err(JsonLayoutError::Empty);
    }
    if !t.starts_with('{') {
        // Say what it is when it is JSON at all; otherwise the syntax error says where.
        let v: serde_json::Value = serde_json::from_str(text)?;
        return Err(JsonLayoutError::NotAnObject(match v {
            serde_json::Value::Array(_) => "an array",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Number(_) => "a number",
            serde_json::Value::Bool(_) => "a boolean",
            serde_json::Value::Null => "null",
            serde_json::Value::Object(_) => "an object", // unreachable: no leading '{'
        }));
    }
    let j: JsonLayout = serde_json::from_str(text)?;
    let mut sections = Vec::with_capacity(j.sections.len());
    for (index, s) in j.sections.into_iter().enumerate() {
        let kind = match s.kind.as_str() {
            "ram" => SectionKind::Ram,
            "ram_device" | "ramd" => SectionKind::RamDevice,
            "rom" => SectionKind::Rom,
            "romd" => SectionKind::Romd,
            "io" | "i/o" => SectionKind::Io,
            "iommu" => SectionKind::Iommu,
            _ => {
                return Err(JsonLayoutError::UnknownKind {
                    index,
                    kind: s.kind,
                })
            }
        };
        let start = s.start.get(index, "start")?;
        if start > u64::MAX as u128 {
            return Err(JsonLayoutError::Number {
                index,
                field: "start",
                text: format!("{start:#x}"),
            });
        }
        let start = start as u64;
        let size = s.size.get(index, "size")?;
        if size == 0 {
            return Err(JsonLayoutError::ZeroSize {
                index,
                name: s.name,
            });
        }
        if start as u128 + size > 1u128 << 64 {
            return Err(JsonLayoutError::PastTop {
                index,
                name: s.name,
                start,
                size,
            });
        }
        let offset = match &s.offset {
            Some(n) => n.get(index, "offset")?,
            None => 0,
        };
        if offset > u64::MAX as u128 {
            return Err(JsonLayoutError::Number {
                index,
                field: "offset",
                text: format!("{offset:#x}"),
            });
        }
        let mut sec = Section::new(start, (start as u128 + size - 1) as u64, kind, s.name);
        sec.offset_in_region = offset as u64;
        sec.readonly = s.readonly.unwrap_or(kind == SectionKind::Rom);
        sec.nonvolatile = s.nonvolatile;
        sec.owner = s.owner;
        sec.protected = s.protected;
        sec.vfio_pci = s.vfio_pci || (kind == SectionKind::RamDevice && sec.vfio_bar().is_some());
        sec.priority = s.priority;
        sections.push(sec);
    }
    Ok(Layout::new(j.address_space, sections)?.with_viommu(j.viommu))
}

/// Render a layout in this format (integers as `0x` strings, lossless in any JSON tool).
pub fn to_json(layout: &Layout) -> serde_json::Value {
    let secs: Vec<serde_json::Value> = layout
        .sections()
        .iter()
        .map(|s| {
            serde_json::json!({
                "start": format!("{:#x}", s.start),
                "size": format!("{:#x}", s.size()),
                "kind": s.kind.as_str(),
                "name": s.name,
                "offset": format!("{:#x}", s.offset_in_region),
                "readonly": s.readonly,
                "nonvolatile": s.nonvolatile,
                "owner": s.owner,
                "protected": s.protected,
                "vfio_pci": s.vfio_pci,
                "priority": s.priority,
            })
        })
        .collect();
    serde_json::json!({ "address_space": layout.address_space(), "viommu": layout.viommu(), "sections": secs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_round_trips() {
        let t = r#"{"sections":[{"start":0,"size":"0xa0000","kind":"ram","name":"pc.ram"},
            {"start":"0xc0000","size":45056,"kind":"rom","name":"pc.ram","offset":"0xc0000"},
            {"start":"0xfffffffffffff000","size":"0x1000","kind":"ram","name":"top"}]}"#;
        let l = parse(t).unwrap();
        assert_eq!(l.sections().len(), 3);
        assert!(l.sections()[1].readonly);
        assert_eq!(l.sections()[2].last, u64::MAX);
        let back = parse(&to_json(&l).to_string()).unwrap();
        assert_eq!(back, l);
    }

    #[test]
    fn named_errors() {
        let e = |t: &str| parse(t).unwrap_err();
        assert!(matches!(
            e(r#"{"sections":[{"start":0,"size":0,"kind":"ram"}]}"#),
            JsonLayoutError::ZeroSize { index: 0, .. }
        ));
        assert!(matches!(
            e(r#"{"sections":[{"start":"0xfffffffffffff000","size":"0x2000","kind":"ram"}]}"#),
            JsonLayoutError::PastTop { .. }
        ));
        assert!(matches!(
            e(r#"{"sections":[{"start":0,"size":1,"kind":"flash"}]}"#),
            JsonLayoutError::UnknownKind { .. }
        ));
        assert!(matches!(
            e(r#"{"sections":[{"start":-1,"size":1,"kind":"ram"}]}"#),
            JsonLayoutError::Number { field: "start", .. }
        ));
        assert!(matches!(
            e(r#"{"sections":[{"start":"0x1g","size":1,"kind":"ram"}]}"#),
            JsonLayoutError::Number { .. }
        ));
        assert!(matches!(
            e(r#"{"sections":[]}"#),
            JsonLayoutError::Layout(LayoutError::Empty)
        ));
        assert!(matches!(
            e(
                r#"{"sections":[{"start":0,"size":8192,"kind":"ram"},{"start":4096,"size":1,"kind":"ram"}]}"#
            ),
            JsonLayoutError::Layout(LayoutError::Overlap { .. })
        ));
        assert!(matches!(
            e(r#"{"sections":[{"start":0,"lenght":1,"kind":"ram"}]}"#),
            JsonLayoutError::Syntax(_)
        ));
        assert!(matches!(e("{"), JsonLayoutError::Syntax(_)));
        assert!(matches!(e(" \n"), JsonLayoutError::Empty));
        assert!(matches!(e("[1]"), JsonLayoutError::NotAnObject("an array")));
        assert!(matches!(e("null"), JsonLayoutError::NotAnObject("null")));
        assert!(matches!(e("nope"), JsonLayoutError::Syntax(_)));
        let huge = e(
            r#"{"sections":[{"start":0,"size":"0x10000000000000000","kind":"ram","name":"all"}]}"#,
        );
        assert!(
            huge.to_string().contains("section 0 (\"all\")") && huge.to_string().contains("16 EiB"),
            "{huge}"
        );
        let iommu =
            parse(r#"{"sections":[{"start":0,"size":"0x10000000000000000","kind":"iommu"}]}"#)
                .unwrap();
        assert!(iommu.viommu());
    }
}
