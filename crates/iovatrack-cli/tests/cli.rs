//! The `iovatrack` binary as a user runs it.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_iovatrack");
const Q35: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../iovatrack/presets/q35-16g.mtree"
);

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("running iovatrack");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn plan_json_has_the_design_fields() {
    let (code, out, err) = run(&["plan", Q35, "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["page_size"], 4096);
    assert_eq!(v["strategy"], "optimal");
    for k in ["ranges", "dma_bytes", "tracked_bytes", "sections"] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    assert_eq!(v["sections"]["total"], 28);
    let ranges = v["ranges"].as_array().unwrap();
    assert!(ranges
        .iter()
        .all(|r| r["iova"].is_u64() && r["length"].is_u64()));
    // the first keys keep docs/design.md's order
    assert!(out.find("\"page_size\"").unwrap() < out.find("\"ranges\"").unwrap());
}

#[test]
fn plan_table_device_and_svg() {
    let svg = std::env::temp_dir().join(format!("iovatrack-{}.svg", std::process::id()));
    let (code, out, err) = run(&[
        "plan",
        "--preset",
        "q35-virtio-mem",
        "--strategy",
        "per-section",
        "--device",
        "mlx5",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Strategies compared"), "{out}");
    assert!(out.contains("the driver merged 7 ranges into 4"), "{out}");
    let doc = std::fs::read_to_string(&svg).unwrap();
    assert!(doc.starts_with("<svg") && doc.trim_end().ends_with("</svg>"));
    let _ = std::fs::remove_file(svg);
    let (code, out, _) = run(&[
        "plan",
        "--preset",
        "q35-16g",
        "--device",
        "mlx5",
        "--device-max-span-log2",
        "30",
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("START REFUSED") && out.contains("EOPNOTSUPP"),
        "{out}"
    );
}

#[test]
fn bad_input_exits_2_with_a_named_error() {
    let dir = std::env::temp_dir();
    let cases = [
        ("garbage.mtree", "FlatView #0\n AS \"memory\", root: system\n Root memory region: system\nnot a section\n", "line 4"),
        ("unknown.json", r#"{"sections":[{"start":0,"size":4096,"kind":"flash"}]}"#, "unknown kind"),
        ("empty.json", r#"{"sections":[]}"#, "no sections"),
        ("top.json", r#"{"sections":[{"start":"0xfffffffffffff000","size":"0x2000","kind":"ram"}]}"#, "past 2^64"),
        ("overlap.json", r#"{"sections":[{"start":0,"size":8192,"kind":"ram"},{"start":4096,"size":4096,"kind":"ram"}]}"#, "overlap"),
    ];
    for (name, text, needle) in cases {
        let p = dir.join(format!("iovatrack-{}-{name}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        let (code, _, err) = run(&["plan", p.to_str().unwrap()]);
        let _ = std::fs::remove_file(&p);
        assert_eq!(code, 2, "{name}: {err}");
        assert!(err.contains(needle), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
    let (code, _, err) = run(&["plan", "/nonexistent/layout"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read /nonexistent/layout"), "{err}");
}

/// The README's main command, scaled down: a real migration ends verified.
#[test]
fn migrate_json_verifies() {
    let (code, out, err) = run(&["migrate", "--json", "--scale", "8"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verified"], true, "{out}");
    assert_eq!(v["mismatched_pages"], 0);
    assert_eq!(v["untracked_dma_writes"], 0);
    assert_eq!(v["duplicate_pages_sent"], 0);
    if std::path::Path::new("/dev/kvm").exists() {
        assert_eq!(v["guest"], "kvm");
    }
    let (code, out, _) = run(&[
        "migrate",
        "--json",
        "--scale",
        "8",
        "--no-device-tracking",
        "--dma-rate",
        "40000",
        "--bandwidth",
        "100M",
    ]);
    assert_eq!(code, 1, "the negative control must fail");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verified"], false);
    let (code, _, err) = run(&["migrate", "--inject", "explode@3"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown fault"), "{err}");
}
