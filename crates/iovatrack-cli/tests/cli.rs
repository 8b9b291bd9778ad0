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
    assert_eq!(code, 3, "a refused START must not exit 0");
    assert!(
        out.contains("START REFUSED") && out.contains("EOPNOTSUPP"),
        "{out}"
    );
    let (code, out, _) = run(&[
        "plan",
        "--preset",
        "q35-16g",
        "--device",
        "mlx5",
        "--device-max-span-log2",
        "30",
        "--json",
    ]);
    assert_eq!(code, 3);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["device"]["accepted"], false);
    let (code, help, _) = run(&["plan", "--help"]);
    assert_eq!(code, 0);
    assert!(help.contains("3 the device refused START"), "{help}");
}

/// `iovatrack plan | head -1`: a reader that goes away is not a crash, for every output.
#[test]
fn closed_stdout_is_not_a_panic() {
    let svg = ["plan", "--preset", "amd-1t", "--svg", "-"];
    for args in [
        &["plan"][..],
        &["plan", "--json"],
        &["plan", "--list-presets"],
        &svg,
    ] {
        // A pipe whose read end is already closed: every write fails with EPIPE.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(BIN)
            .args(args)
            .stdout(writer)
            .output()
            .expect("running iovatrack");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
    }
}

#[test]
fn device_overrides_out_of_range_are_refused() {
    for (flag, value, needle) in [
        ("--device-max-span-log2", "100", "12..=64"),
        ("--device-max-span-log2", "11", "12..=64"),
        ("--device-max-ranges", "0", "1.."),
    ] {
        let (code, _, err) = run(&["plan", "--device", "mlx5", flag, value]);
        assert_eq!(code, 2, "{flag} {value}: {err}");
        assert!(err.contains(needle), "{flag} {value}: {err}");
    }
    let (code, _, err) = run(&["plan", "--device", "pds", "--device-max-span-log2", "30"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no tracked-total ceiling"), "{err}");
    let (code, _, err) = run(&["plan", "--page-size", "2Q"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is not a size"), "{err}");
    let (code, out, err) = run(&["plan", "--page-size", "2MiB", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"page_size\": 2097152"), "{out}");
}

#[test]
fn json_layout_errors_say_what_is_wrong() {
    let dir = std::env::temp_dir();
    let pid = std::process::id();
    let cases = [
        ("empty.json", "", "the JSON layout is empty"),
        ("blank.json", " \n", "the JSON layout is empty"),
        ("array.json", "[]", "is an array, not an object"),
        ("string.layout", "\"q35\"", "is a string, not an object"),
        ("empty.mtree", "", "the layout is empty"),
        (
            "whole.json",
            r#"{"sections":[{"start":0,"size":"0x10000000000000000","kind":"ram","name":"all"}]}"#,
            "section 0 (\"all\"): 16 EiB of ram cannot be guest memory",
        ),
        (
            "16e.json",
            r#"{"sections":[{"start":0,"size":4096,"kind":"ram","name":"low"},
                {"start":"0x100000000","size":"0xffffff0000000000","kind":"ram","name":"huge"}]}"#,
            "section 1 (\"huge\")",
        ),
    ];
    for (name, text, needle) in cases {
        let p = dir.join(format!("iovatrack-{pid}-{name}"));
        std::fs::write(&p, text).unwrap();
        let (code, out, err) = run(&["plan", p.to_str().unwrap()]);
        let _ = std::fs::remove_file(&p);
        assert_eq!(code, 2, "{name}: {out}{err}");
        assert!(err.contains(needle), "{name}: {err}");
        assert!(!err.contains("FlatView"), "{name}: {err}");
    }
}

/// amd-1t: RAM resumes at 1 TiB after a hole from 4 GiB; the label at that boundary is
/// 1 TiB's, and the device row shows what mlx5 tracks.
#[test]
fn svg_labels_boundaries_and_draws_the_device_row() {
    let (code, doc, err) = run(&[
        "plan", "--preset", "amd-1t", "--device", "mlx5", "--svg", "-",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(doc.starts_with("<svg") && doc.trim_end().ends_with("</svg>"));
    // x of the rectangle whose tooltip starts with `title`.
    let rect_x = |title: &str| -> f64 {
        let at = doc.find(title).unwrap_or_else(|| panic!("no {title}"));
        let tag = &doc[doc[..at].rfind("<rect").unwrap()..at];
        let x = tag.split("x=\"").nth(1).unwrap().split('"').next().unwrap();
        x.parse().unwrap()
    };
    // x of the address label `text`, if drawn.
    let label_x = |text: &str| -> Option<f64> {
        let at = doc.find(&format!(">{text}</text>"))?;
        let tag = &doc[doc[..at].rfind("translate(").unwrap() + 10..];
        Some(tag.split(',').next().unwrap().parse().unwrap())
    };
    let tib = rect_x("<title>ram0 [ram] 0x10000000000");
    let at = label_x("0x10000000000").expect("no label at the 1 TiB boundary");
    assert!(
        (at - tib).abs() < 0.1,
        "1 TiB label at {at}, boundary at {tib}"
    );
    if let Some(x) = label_x("0x100000000") {
        assert!(
            tib - x >= 60.0,
            "the 4 GiB label at {x} crowds the 1 TiB start at {tib}"
        );
    }
    assert!(doc.contains("emulated mlx5 range 0:"), "no device row");
    assert!(doc.contains(">device (4)</text>"), "no device row label");
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
    assert_eq!(v["device_state_matched"], true);
    assert!(v["negative_control"].is_null(), "{out}");
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
    assert!(v["mismatched_pages"].as_u64().unwrap() > 0, "{out}");
    assert_eq!(v["negative_control"]["proved"], "loss", "{out}");
    // In words too, and a run with tracking says nothing about a control.
    let (code, out, _) = run(&[
        "migrate",
        "--scale",
        "8",
        "--no-device-tracking",
        "--dma-rate",
        "1",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("the negative control proved loss: "), "{out}");
    assert!(!out.contains("proved nothing"), "{out}");
    let (code, _, err) = run(&["migrate", "--inject", "explode@3"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown fault"), "{err}");
}
