//! Checks the Rust side of the VFIO uAPI (vfio-bindings structs, our ioctl numbers, state
//! and flag values) against the system's `<linux/vfio.h>`: a small C program is generated
//! in a temp dir at test time, compiled with `cc`, run, and its output compared.
//!
//! Items newer than Debian's 6.1 header (PRE_COPY states, `vfio_precopy_info`,
//! `VFIO_MIG_GET_PRECOPY_INFO`, MIG_DATA_SIZE, iommufd) are `#ifdef`-guarded in the C, and
//! checked below with const assertions against the kernel uAPI numbers.

use iovatrack::device::iommufd::{
    IommuHwptGetDirtyBitmap, IommuHwptSetDirtyTracking, IOMMU_HWPT_GET_DIRTY_BITMAP,
    IOMMU_HWPT_SET_DIRTY_TRACKING,
};
use iovatrack::device::migration::VFIO_MIG_GET_PRECOPY_INFO;
use iovatrack::device::type1::{VFIO_IOMMU_DIRTY_PAGES, VFIO_IOMMU_MAP_DMA, VFIO_IOMMU_UNMAP_DMA};
use iovatrack::device::vfio::VFIO_DEVICE_FEATURE;
use iovatrack::device::{MigFlags, MigState};
use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use std::process::Command;
use vfio_bindings::bindings::vfio::*;

// 6.2+ (include/uapi/linux/vfio.h, "vfio: Extend the device migration protocol with
// PRE_COPY", Linux 6.2): absent from Debian's 6.1 header.
const _: () = {
    assert!(MigState::PreCopy as u32 == 6 && MigState::PreCopyP2p as u32 == 7);
    assert!(MigFlags::PRE_COPY.0 == 1 << 2 && VFIO_MIGRATION_PRE_COPY == 1 << 2);
    assert!(size_of::<vfio_precopy_info>() == 24);
    assert!(offset_of!(vfio_precopy_info, initial_bytes) == 8);
    assert!(offset_of!(vfio_precopy_info, dirty_bytes) == 16);
    assert!(VFIO_MIG_GET_PRECOPY_INFO == 0x3B00 | (100 + 21));
    assert!(VFIO_DEVICE_FEATURE_MIG_DATA_SIZE == 9);
    assert!(size_of::<vfio_device_feature_mig_data_size>() == 8);
};

// iommufd (include/uapi/linux/iommufd.h, Linux 6.7+): no header on Debian 12 at all.
const _: () = {
    assert!(size_of::<IommuHwptSetDirtyTracking>() == 16);
    assert!(size_of::<IommuHwptGetDirtyBitmap>() == 48);
    assert!(offset_of!(IommuHwptGetDirtyBitmap, data) == 40);
    assert!(IOMMU_HWPT_SET_DIRTY_TRACKING == 0x3B8B);
    assert!(IOMMU_HWPT_GET_DIRTY_BITMAP == 0x3B8C);
};

const C_PROGRAM: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <linux/vfio.h>
#define S(t) printf("sizeof %s %zu\n", #t, sizeof(struct t))
#define O(t, f) printf("offsetof %s.%s %zu\n", #t, #f, offsetof(struct t, f))
#define C(c) printf("const %s %llu\n", #c, (unsigned long long)(c))
int main(void) {
    S(vfio_device_feature);
    S(vfio_device_feature_dma_logging_control);
    O(vfio_device_feature_dma_logging_control, page_size);
    O(vfio_device_feature_dma_logging_control, num_ranges);
    O(vfio_device_feature_dma_logging_control, __reserved);
    O(vfio_device_feature_dma_logging_control, ranges);
    S(vfio_device_feature_dma_logging_range);
    O(vfio_device_feature_dma_logging_range, length);
    S(vfio_device_feature_dma_logging_report);
    O(vfio_device_feature_dma_logging_report, iova);
    O(vfio_device_feature_dma_logging_report, length);
    O(vfio_device_feature_dma_logging_report, page_size);
    O(vfio_device_feature_dma_logging_report, bitmap);
    S(vfio_device_feature_mig_state);
    O(vfio_device_feature_mig_state, data_fd);
    S(vfio_device_feature_migration);
    S(vfio_iommu_type1_dma_map);
    O(vfio_iommu_type1_dma_map, vaddr);
    O(vfio_iommu_type1_dma_map, iova);
    O(vfio_iommu_type1_dma_map, size);
    S(vfio_iommu_type1_dma_unmap);
    O(vfio_iommu_type1_dma_unmap, iova);
    O(vfio_iommu_type1_dma_unmap, size);
    S(vfio_bitmap);
    O(vfio_bitmap, size);
    O(vfio_bitmap, data);
    S(vfio_iommu_type1_dirty_bitmap);
    S(vfio_iommu_type1_dirty_bitmap_get);
    O(vfio_iommu_type1_dirty_bitmap_get, size);
    O(vfio_iommu_type1_dirty_bitmap_get, bitmap);
    S(vfio_iommu_type1_info);
    O(vfio_iommu_type1_info, iova_pgsizes);
    O(vfio_iommu_type1_info, cap_offset);
    S(vfio_iommu_type1_info_cap_migration);
    O(vfio_iommu_type1_info_cap_migration, flags);
    O(vfio_iommu_type1_info_cap_migration, pgsize_bitmap);
    O(vfio_iommu_type1_info_cap_migration, max_dirty_bitmap_size);
    C(VFIO_DEVICE_FEATURE);
    C(VFIO_IOMMU_DIRTY_PAGES);
    C(VFIO_IOMMU_MAP_DMA);
    C(VFIO_IOMMU_UNMAP_DMA);
    C(VFIO_DEVICE_FEATURE_MASK);
    C(VFIO_DEVICE_FEATURE_GET);
    C(VFIO_DEVICE_FEATURE_SET);
    C(VFIO_DEVICE_FEATURE_PROBE);
    C(VFIO_DEVICE_FEATURE_PCI_VF_TOKEN);
    C(VFIO_DEVICE_FEATURE_MIGRATION);
    C(VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE);
    C(VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY);
    C(VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP);
    C(VFIO_DEVICE_FEATURE_LOW_POWER_EXIT);
    C(VFIO_DEVICE_FEATURE_DMA_LOGGING_START);
    C(VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP);
    C(VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT);
    C(VFIO_MIGRATION_STOP_COPY);
    C(VFIO_MIGRATION_P2P);
    C(VFIO_DEVICE_STATE_ERROR);
    C(VFIO_DEVICE_STATE_STOP);
    C(VFIO_DEVICE_STATE_RUNNING);
    C(VFIO_DEVICE_STATE_STOP_COPY);
    C(VFIO_DEVICE_STATE_RESUMING);
    C(VFIO_DEVICE_STATE_RUNNING_P2P);
    C(VFIO_IOMMU_DIRTY_PAGES_FLAG_START);
    C(VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP);
    C(VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP);
    C(VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP);
#ifdef VFIO_MIG_GET_PRECOPY_INFO
    C(VFIO_MIG_GET_PRECOPY_INFO);
    C(VFIO_MIGRATION_PRE_COPY);
    C(VFIO_DEVICE_STATE_PRE_COPY);
    C(VFIO_DEVICE_STATE_PRE_COPY_P2P);
    S(vfio_precopy_info);
#endif
#ifdef VFIO_DEVICE_FEATURE_MIG_DATA_SIZE
    C(VFIO_DEVICE_FEATURE_MIG_DATA_SIZE);
    S(vfio_device_feature_mig_data_size);
#endif
    return 0;
}
"#;

/// What the Rust side says for every key the C program may print.
fn rust_side() -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: usize| {
        m.insert(k.to_string(), v as u64);
    };
    macro_rules! s {
        ($t:ident) => {
            put(concat!("sizeof ", stringify!($t)), size_of::<$t>())
        };
    }
    macro_rules! o {
        ($t:ident, $f:ident) => {
            put(
                concat!("offsetof ", stringify!($t), ".", stringify!($f)),
                offset_of!($t, $f),
            )
        };
    }
    macro_rules! c {
        ($name:literal, $v:expr) => {
            put(concat!("const ", $name), $v as usize)
        };
    }
    s!(vfio_device_feature);
    s!(vfio_device_feature_dma_logging_control);
    o!(vfio_device_feature_dma_logging_control, page_size);
    o!(vfio_device_feature_dma_logging_control, num_ranges);
    o!(vfio_device_feature_dma_logging_control, __reserved);
    o!(vfio_device_feature_dma_logging_control, ranges);
    s!(vfio_device_feature_dma_logging_range);
    o!(vfio_device_feature_dma_logging_range, length);
    s!(vfio_device_feature_dma_logging_report);
    o!(vfio_device_feature_dma_logging_report, iova);
    o!(vfio_device_feature_dma_logging_report, length);
    o!(vfio_device_feature_dma_logging_report, page_size);
    o!(vfio_device_feature_dma_logging_report, bitmap);
    s!(vfio_device_feature_mig_state);
    o!(vfio_device_feature_mig_state, data_fd);
    s!(vfio_device_feature_migration);
    s!(vfio_iommu_type1_dma_map);
    o!(vfio_iommu_type1_dma_map, vaddr);
    o!(vfio_iommu_type1_dma_map, iova);
    o!(vfio_iommu_type1_dma_map, size);
    s!(vfio_iommu_type1_dma_unmap);
    o!(vfio_iommu_type1_dma_unmap, iova);
    o!(vfio_iommu_type1_dma_unmap, size);
    s!(vfio_bitmap);
    o!(vfio_bitmap, size);
    o!(vfio_bitmap, data);
    s!(vfio_iommu_type1_dirty_bitmap);
    s!(vfio_iommu_type1_dirty_bitmap_get);
    o!(vfio_iommu_type1_dirty_bitmap_get, size);
    o!(vfio_iommu_type1_dirty_bitmap_get, bitmap);
    s!(vfio_iommu_type1_info);
    o!(vfio_iommu_type1_info, iova_pgsizes);
    o!(vfio_iommu_type1_info, cap_offset);
    s!(vfio_iommu_type1_info_cap_migration);
    o!(vfio_iommu_type1_info_cap_migration, flags);
    o!(vfio_iommu_type1_info_cap_migration, pgsize_bitmap);
    o!(vfio_iommu_type1_info_cap_migration, max_dirty_bitmap_size);
    s!(vfio_precopy_info);
    s!(vfio_device_feature_mig_data_size);
    // Our ioctl numbers, not the bindings' (bindgen drops _IO macros).
    c!("VFIO_DEVICE_FEATURE", VFIO_DEVICE_FEATURE);
    c!("VFIO_IOMMU_DIRTY_PAGES", VFIO_IOMMU_DIRTY_PAGES);
    c!("VFIO_IOMMU_MAP_DMA", VFIO_IOMMU_MAP_DMA);
    c!("VFIO_IOMMU_UNMAP_DMA", VFIO_IOMMU_UNMAP_DMA);
    c!("VFIO_MIG_GET_PRECOPY_INFO", VFIO_MIG_GET_PRECOPY_INFO);
    c!("VFIO_DEVICE_FEATURE_MASK", VFIO_DEVICE_FEATURE_MASK);
    c!("VFIO_DEVICE_FEATURE_GET", VFIO_DEVICE_FEATURE_GET);
    c!("VFIO_DEVICE_FEATURE_SET", VFIO_DEVICE_FEATURE_SET);
    c!("VFIO_DEVICE_FEATURE_PROBE", VFIO_DEVICE_FEATURE_PROBE);
    c!(
        "VFIO_DEVICE_FEATURE_PCI_VF_TOKEN",
        VFIO_DEVICE_FEATURE_PCI_VF_TOKEN
    );
    c!(
        "VFIO_DEVICE_FEATURE_MIGRATION",
        VFIO_DEVICE_FEATURE_MIGRATION
    );
    c!(
        "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE",
        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
    );
    c!(
        "VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY",
        VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY
    );
    c!(
        "VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP",
        VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP
    );
    c!(
        "VFIO_DEVICE_FEATURE_LOW_POWER_EXIT",
        VFIO_DEVICE_FEATURE_LOW_POWER_EXIT
    );
    c!(
        "VFIO_DEVICE_FEATURE_DMA_LOGGING_START",
        VFIO_DEVICE_FEATURE_DMA_LOGGING_START
    );
    c!(
        "VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP",
        VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP
    );
    c!(
        "VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT",
        VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT
    );
    c!(
        "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE",
        VFIO_DEVICE_FEATURE_MIG_DATA_SIZE
    );
    // Our migration flags and state numbers.
    c!("VFIO_MIGRATION_STOP_COPY", MigFlags::STOP_COPY.0);
    c!("VFIO_MIGRATION_P2P", MigFlags::P2P.0);
    c!("VFIO_MIGRATION_PRE_COPY", MigFlags::PRE_COPY.0);
    c!("VFIO_DEVICE_STATE_ERROR", MigState::Error as u32);
    c!("VFIO_DEVICE_STATE_STOP", MigState::Stop as u32);
    c!("VFIO_DEVICE_STATE_RUNNING", MigState::Running as u32);
    c!("VFIO_DEVICE_STATE_STOP_COPY", MigState::StopCopy as u32);
    c!("VFIO_DEVICE_STATE_RESUMING", MigState::Resuming as u32);
    c!("VFIO_DEVICE_STATE_RUNNING_P2P", MigState::RunningP2p as u32);
    c!("VFIO_DEVICE_STATE_PRE_COPY", MigState::PreCopy as u32);
    c!(
        "VFIO_DEVICE_STATE_PRE_COPY_P2P",
        MigState::PreCopyP2p as u32
    );
    c!(
        "VFIO_IOMMU_DIRTY_PAGES_FLAG_START",
        VFIO_IOMMU_DIRTY_PAGES_FLAG_START
    );
    c!(
        "VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP",
        VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP
    );
    c!(
        "VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP",
        VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP
    );
    c!(
        "VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP",
        VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP
    );
    m
}

/// Compile and run the probe; `None` (with the reason) when there is no compiler or header.
fn c_side() -> Result<String, String> {
    let dir = std::env::temp_dir().join(format!("iovatrack-vfio-header-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("temp dir: {e}"))?;
    let (src, exe) = (dir.join("probe.c"), dir.join("probe"));
    std::fs::write(&src, C_PROGRAM).map_err(|e| format!("write: {e}"))?;
    let out = Command::new("cc")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .map_err(|e| format!("cc: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cc failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let run = Command::new(&exe)
        .output()
        .map_err(|e| format!("run: {e}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    if !run.status.success() {
        return Err("probe failed".into());
    }
    Ok(String::from_utf8_lossy(&run.stdout).into_owned())
}

#[test]
fn bindings_match_system_header() {
    let text = match c_side() {
        Ok(t) => t,
        Err(why) => {
            iovatrack::report_skip(&format!(
                "VFIO header layout check: linux/vfio.h not available ({why})"
            ));
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must have gcc and linux-libc-dev"
            );
            return;
        }
    };
    let rust = rust_side();
    let mut checked = 0;
    for line in text.lines() {
        let (key, value) = line.rsplit_once(' ').expect("probe output: key value");
        let value: u64 = value.parse().expect("probe output: number");
        let ours = rust
            .get(key)
            .unwrap_or_else(|| panic!("no Rust counterpart for `{key}`"));
        assert_eq!(*ours, value, "{key}: Rust {ours:#x}, C {value:#x}");
        checked += 1;
    }
    // The 6.1 header has 66 of these; newer headers add the 6.2+ ones.
    assert!(checked >= 66, "only {checked} items checked");
    eprintln!("checked {checked} items against <linux/vfio.h>");
}
