//! The VFIO payloads byte for byte, as the kernel reads them (moved here from `vfio.rs` and
//! `type1.rs` with the encoders).

use super::*;

/// The bytes of a `repr(C)` value.
fn bytes<T>(v: &T) -> Vec<u8> {
    // SAFETY: reading `size_of::<T>()` initialised bytes of a plain-data repr(C) value
    // with no padding (asserted by the sizes above).
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
        .to_vec()
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().unwrap())
}

#[test]
fn ioctl_number() {
    assert_eq!(device_feature_nr(), VFIO_DEVICE_FEATURE);
}

#[test]
fn probe_and_stop_payloads() {
    let p = bytes(&encode_probe());
    assert_eq!(p.len(), 8);
    assert_eq!(u32_at(&p, 0), 8);
    assert_eq!(u32_at(&p, 4), 0x0004_0000 | 0x0002_0000 | 6);
    let s = bytes(&encode_stop());
    assert_eq!((u32_at(&s, 0), u32_at(&s, 4)), (8, 0x0002_0000 | 7));
}

#[test]
fn start_payload() {
    let ranges = [
        IovaRange::new(0, 0x8000_0000),
        IovaRange::new(0x1_0000_0000, 0x4000_0000),
    ];
    let mut array = Vec::new();
    let buf = encode_start(4096, &ranges, &mut array).unwrap().buf;
    let b = bytes(&buf);
    assert_eq!(b.len(), 32);
    assert_eq!(u32_at(&b, 0), 32); // argsz = header + control
    assert_eq!(u32_at(&b, 4), 0x0002_0000 | 6);
    assert_eq!(u64_at(&b, 8), 4096); // page_size
    assert_eq!(u32_at(&b, 16), 2); // num_ranges
    assert_eq!(u32_at(&b, 20), 0); // __reserved
    assert_eq!(u64_at(&b, 24), array.as_ptr() as u64);
    let a = bytes(&array[1]);
    assert_eq!((u64_at(&a, 0), u64_at(&a, 8)), (0x1_0000_0000, 0x4000_0000));
}

#[test]
fn report_payload() {
    let mut bitmap = vec![0u64; 4];
    let ptr = bitmap.as_ptr() as u64;
    let buf = encode_report(IovaRange::new(0x10_0000, 0x40_0000), 0x1000, &mut bitmap).buf;
    let b = bytes(&buf);
    assert_eq!(b.len(), 40);
    assert_eq!((u32_at(&b, 0), u32_at(&b, 4)), (40, 0x0001_0000 | 8));
    assert_eq!((u64_at(&b, 8), u64_at(&b, 16)), (0x10_0000, 0x40_0000));
    assert_eq!((u64_at(&b, 24), u64_at(&b, 32)), (0x1000, ptr));
}

#[test]
fn report_arg_checks_coverage() {
    // 0x40_0000 / 0x1000 = 1024 bits = 16 words: 4 are refused, 16 accepted.
    let r = IovaRange::new(0x10_0000, 0x40_0000);
    let Err(e) = ReportArg::new(r, 0x1000, &mut [0; 4]) else {
        panic!("a 4-word bitmap cannot hold 1024 bits");
    };
    assert_eq!(
        e.rule,
        Rule::BitmapTooSmall {
            words: 4,
            needed: 16
        }
    );
    assert!(ReportArg::new(r, 0x1000, &mut [0; 16]).is_ok());
    assert!(DirtyGetArg::new(r, 0x1000, &mut [0; 15]).is_err());
    assert!(DirtyGetArg::new(r, 0x1000, &mut [0; 16]).is_ok());
}

#[test]
fn type1_ioctl_numbers() {
    use crate::device::type1::{VFIO_IOMMU_MAP_DMA, VFIO_IOMMU_UNMAP_DMA};
    assert_eq!(
        type1_ioctl_nrs(),
        [
            VFIO_IOMMU_DIRTY_PAGES,
            VFIO_IOMMU_MAP_DMA,
            VFIO_IOMMU_UNMAP_DMA
        ]
    );
}

#[test]
fn type1_payloads() {
    let s = encode_type1_flag(VFIO_IOMMU_DIRTY_PAGES_FLAG_START);
    assert_eq!((s.argsz, s.flags), (8, 1));
    assert_eq!(encode_type1_flag(VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP).flags, 2);
    let mut bm = vec![0u64; 3];
    let ptr = bm.as_mut_ptr();
    let g = encode_type1_get(IovaRange::new(0x10000, 130 * 4096), 4096, &mut bm).raw;
    assert_eq!((g.hdr.argsz, g.hdr.flags), (48, 4));
    assert_eq!((g.get.iova, g.get.size), (0x10000, 130 * 4096));
    assert_eq!((g.get.bitmap.pgsize, g.get.bitmap.size), (4096, 24));
    assert_eq!(g.get.bitmap.data, ptr);
    // Field offsets inside the whole buffer, as the kernel reads them.
    let base = &g as *const DirtyGet as usize;
    assert_eq!(&g.get.iova as *const u64 as usize - base, 8);
    assert_eq!(&g.get.bitmap.pgsize as *const u64 as usize - base, 24);
    assert_eq!(&g.get.bitmap.data as *const *mut u64 as usize - base, 40);
}
