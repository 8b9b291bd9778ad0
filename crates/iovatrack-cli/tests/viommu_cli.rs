//! `iovatrack migrate --viommu` and the vIOMMU blocker of `iovatrack plan`, as a user runs
//! them.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_iovatrack");

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
fn migrate_viommu_json_verifies_and_rearms() {
    let (code, out, err) = run(&["migrate", "--viommu", "--json"]);
    assert_eq!(code, 0, "{err}\n{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verified"], true, "{out}");
    assert_eq!(v["mismatched_pages"], 0, "{out}");
    assert_eq!(v["untracked_dma_writes"], 0, "{out}");
    assert_eq!(v["viommu"], true, "{out}");
    assert!(v["viommu_rearms"].as_u64().unwrap() >= 1, "{out}");
    for k in ["rearm_pages", "map_hold_ms", "unmap_queries", "rearms"] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
}

#[test]
fn migrate_viommu_control_ends_not_verified() {
    let (code, out, err) = run(&["migrate", "--viommu", "--inject", "viommu-no-translate"]);
    assert_eq!(code, 1, "{err}\n{out}");
    assert!(out.contains("NOT VERIFIED"), "{out}");
    assert!(out.contains("vIOMMU"), "{out}");
}

#[test]
fn viommu_controls_need_viommu() {
    let (code, _, err) = run(&["migrate", "--inject", "viommu-naive-rearm"]);
    assert_ne!(code, 0);
    assert!(err.contains("--viommu"), "{err}");
}

#[test]
fn plan_keeps_the_blocker_and_names_the_way_out() {
    let dir = std::env::temp_dir().join(format!("iovatrack-viommu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("viommu.json");
    std::fs::write(
        &f,
        r#"{"address_space":"vtd-root","sections":[{"start":0,"size":"0x80000000","kind":"iommu","name":"intel_iommu"}]}"#,
    )
    .unwrap();
    let (code, _, err) = run(&["plan", f.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_ne!(code, 0);
    assert!(err.contains("migration blocker"), "{err}");
    assert!(err.contains("iovatrack migrate --viommu"), "{err}");
}
