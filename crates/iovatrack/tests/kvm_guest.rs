//! Guest side of a live migration, end to end: a real KVM vCPU (skipped loudly without
//! /dev/kvm; `IOVATRACK_REQUIRE_KVM=1` turns the skip into a failure) and the software
//! guest dirty RAM; dirty logs, pause stability, copy to a second memory, resume there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use iovatrack::migrate::guest::x86::{VcpuState, RESERVED_BYTES};
use iovatrack::migrate::guest::{
    kvm_available, resume_guest, GuestConfig, GuestCpu, GuestMemory, KvmGuest, SoftGuest, PAGE_SIZE,
};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const LAYOUT: [(u64, u64); 2] = [(0, 64 * MIB), (4 * GIB, 64 * MIB)];

/// Generous deadline for "eventually" checks; never asserted as a timing.
const PATIENCE: Duration = Duration::from_secs(120);

fn kvm_or_skip() -> bool {
    if kvm_available() {
        return true;
    }
    iovatrack::report_skip("KVM guest tests: /dev/kvm not available");
    if std::env::var("IOVATRACK_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("IOVATRACK_REQUIRE_KVM=1 but /dev/kvm is not available");
    }
    false
}

fn wait_counter(g: &dyn GuestCpu, at_least: u64) {
    let end = Instant::now() + PATIENCE;
    while g.progress().counter < at_least {
        assert!(
            Instant::now() < end,
            "guest stuck at {:?}, wanted counter {at_least}",
            g.progress()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Read every slot's dirty log into oversized buffers, checking words past the slot are
/// untouched; returns one bitmap per slot.
fn read_logs(g: &dyn GuestCpu) -> Vec<Vec<u64>> {
    let mem = g.memory();
    (0..mem.regions().len())
        .map(|slot| {
            let words = mem.bitmap_words(slot).unwrap();
            let mut buf = vec![0xdead_beef_dead_beef_u64; words + 2];
            g.dirty_log(slot, &mut buf).unwrap();
            assert_eq!(
                &buf[words..],
                &[0xdead_beef_dead_beef; 2],
                "slot {slot} overrun"
            );
            let pages = mem.region_pages(slot).unwrap();
            if !pages.is_multiple_of(64) {
                assert_eq!(buf[words - 1] >> (pages % 64), 0, "bits past slot {slot}");
            }
            assert!(g.dirty_log(slot, &mut buf[..words - 1]).is_err());
            buf.truncate(words);
            buf
        })
        .collect()
}

fn dirty_pages(logs: &[Vec<u64>]) -> u64 {
    logs.iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

/// Largest value in word 0 of any page (the guests write their counter there), skipping
/// the reserved setup area when `skip_reserved`.
fn max_counter_in_ram(mem: &GuestMemory, skip_reserved: bool) -> u64 {
    let mut max = 0;
    for (i, r) in mem.regions().iter().enumerate() {
        let first = if i == 0 && skip_reserved {
            RESERVED_BYTES
        } else {
            0
        };
        for off in (first..r.length).step_by(PAGE_SIZE as usize) {
            max = max.max(mem.read_u64(r.iova + off).unwrap());
        }
    }
    max
}

fn all_hashes(mem: &GuestMemory) -> Vec<Vec<u64>> {
    (0..mem.regions().len())
        .map(|i| mem.page_hashes(i).unwrap())
        .collect()
}

/// Copy the non-zero pages of `src` into a fresh memory of the same layout.
fn copy_memory(src: &GuestMemory) -> Arc<GuestMemory> {
    let layout: Vec<(u64, u64)> = src.regions().iter().map(|r| (r.iova, r.length)).collect();
    let dst = GuestMemory::new(&layout).unwrap();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for r in src.regions() {
        for gpa in (r.iova..r.iova + r.length).step_by(PAGE_SIZE as usize) {
            if !src.is_zero_page(gpa).unwrap() {
                src.read_page(gpa, &mut page).unwrap();
                dst.write_page(gpa, &page).unwrap();
            }
        }
    }
    Arc::new(dst)
}

/// The whole scenario for one guest kind. `reserved` = the KVM guest never writes the
/// first MiB of slot 0 (its setup); the software guest walks all of RAM.
fn migrate_scenario(src: Box<dyn GuestCpu>, reserved: bool) {
    let kind = src.kind();
    let mem = Arc::clone(src.memory());

    // Runs and reports progress.
    wait_counter(&*src, 20_000);
    let p1 = src.progress();
    wait_counter(&*src, p1.counter + 20_000);
    assert!(src.progress().reports > p1.reports);

    // Dirty log: non-empty, each dirty page really holds a counter value, and nothing in
    // the reserved area.
    let logs = read_logs(&*src);
    assert!(
        dirty_pages(&logs) > 0,
        "{kind}: empty dirty log while running"
    );
    for (slot, log) in logs.iter().enumerate() {
        let base = mem.regions()[slot].iova;
        for (w, word) in log.iter().enumerate() {
            for b in 0..64 {
                if word & (1 << b) != 0 {
                    let page = (w * 64 + b) as u64;
                    if reserved && slot == 0 {
                        assert!(
                            page * PAGE_SIZE >= RESERVED_BYTES,
                            "setup page {page} dirty"
                        );
                    }
                    // The page was written, so it holds a counter >= 1 (a later write
                    // may have replaced it, never with 0).
                    assert_ne!(mem.read_u64(base + page * PAGE_SIZE).unwrap(), 0);
                }
            }
        }
    }

    // Pause: the next log holds only what was written before the pause, the one after
    // that is empty, and memory does not change.
    src.pause().unwrap();
    let _ = read_logs(&*src);
    assert_eq!(
        dirty_pages(&read_logs(&*src)),
        0,
        "{kind}: dirty after pause"
    );
    let h1 = all_hashes(&mem);
    let paused = src.progress();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(all_hashes(&mem), h1, "{kind}: memory changed while paused");
    assert_eq!(src.progress(), paused);

    // Saved state: the guest's counter is exactly the largest value in RAM.
    let state = src.state_bytes().unwrap();
    let saved_counter = if kind == "kvm" {
        VcpuState::from_bytes(&state).unwrap().counter()
    } else {
        paused.counter
    };
    assert!(saved_counter >= paused.counter);
    assert_eq!(max_counter_in_ram(&mem, reserved), saved_counter);

    // Resume and pause again on the source: progress continues (pause/resume works).
    src.resume().unwrap();
    wait_counter(&*src, saved_counter + 5_000);
    src.pause().unwrap();
    let state = src.state_bytes().unwrap();
    let saved = src.progress();
    let saved_counter = max_counter_in_ram(&mem, reserved);
    assert!(saved_counter >= saved.counter);

    // Migrate: copy RAM, stop the source, continue on the copy.
    let dst_mem = copy_memory(&mem);
    assert_eq!(all_hashes(&dst_mem), all_hashes(&mem));
    src.stop().unwrap();
    assert!(src.resume().is_err(), "{kind}: resume after stop");
    drop(src);

    let dst = resume_guest(Arc::clone(&dst_mem), &state, &GuestConfig::default()).unwrap();
    assert_eq!(dst.kind(), kind);
    assert!(dst.progress().counter >= saved.counter);
    wait_counter(&*dst, saved_counter + 20_000);
    let logs = read_logs(&*dst);
    assert!(
        dirty_pages(&logs) > 0,
        "{kind}: destination dirties nothing"
    );
    dst.pause().unwrap();
    let final_counter = max_counter_in_ram(&dst_mem, reserved);
    assert!(final_counter >= saved_counter + 20_000);
    if kind == "kvm" {
        let st = VcpuState::from_bytes(&dst.state_bytes().unwrap()).unwrap();
        assert_eq!(st.counter(), final_counter);
    }
    dst.stop().unwrap();
}

#[test]
fn kvm_guest_runs_pauses_and_migrates() {
    if !kvm_or_skip() {
        return;
    }
    let mem = Arc::new(GuestMemory::new(&LAYOUT).unwrap());
    let g = KvmGuest::start(mem, &GuestConfig::default()).unwrap();
    migrate_scenario(Box::new(g), true);
}

#[test]
fn kvm_guest_with_2m_pages_and_rate_limit() {
    if !kvm_or_skip() {
        return;
    }
    let mem = Arc::new(GuestMemory::new(&LAYOUT).unwrap());
    let cfg = GuestConfig {
        allow_1g_pages: false,
        rate_pages_per_sec: 200_000,
        ..GuestConfig::default()
    };
    let g = KvmGuest::start(mem, &cfg).unwrap();
    wait_counter(&g, 10_000);
    // Many quick pause/resume cycles: every pause must land (no lost kick) and the saved
    // counter must match RAM each time.
    for _ in 0..100 {
        g.pause().unwrap();
        let st = VcpuState::from_bytes(&g.state_bytes().unwrap()).unwrap();
        assert!(st.counter() >= g.progress().counter);
        g.resume().unwrap();
    }
    g.pause().unwrap();
    let st = VcpuState::from_bytes(&g.state_bytes().unwrap()).unwrap();
    assert_eq!(max_counter_in_ram(g.memory(), true), st.counter());
    assert!(g.state_bytes().is_ok());
    g.resume().unwrap();
    assert!(matches!(
        g.state_bytes(),
        Err(iovatrack::migrate::guest::GuestError::NotPaused)
    ));
    g.stop().unwrap();
}

#[test]
fn kvm_guest_unlimited_rate_report() {
    // Not an assertion on time: prints the measured guest dirty rate for the record.
    if !kvm_or_skip() {
        return;
    }
    let mem = Arc::new(GuestMemory::new(&LAYOUT).unwrap());
    let g = KvmGuest::start(mem, &GuestConfig::default()).unwrap();
    wait_counter(&g, 1_000);
    let (t0, c0) = (Instant::now(), g.progress().counter);
    std::thread::sleep(Duration::from_millis(500));
    let (t1, c1) = (Instant::now(), g.progress().counter);
    eprintln!(
        "kvm guest: {:.0} pages/s unlimited",
        (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
    );
    g.stop().unwrap();
}

#[test]
fn soft_guest_runs_pauses_and_migrates() {
    let mem = Arc::new(GuestMemory::new(&LAYOUT).unwrap());
    let cfg = GuestConfig {
        threads: 2,
        ..GuestConfig::default()
    };
    let g = SoftGuest::start(mem, &cfg).unwrap();
    assert_eq!(g.kind(), "software");
    migrate_scenario(Box::new(g), false);
}

#[test]
fn state_of_wrong_kind_is_refused() {
    let mem = Arc::new(GuestMemory::new(&LAYOUT).unwrap());
    let g = SoftGuest::start(Arc::clone(&mem), &GuestConfig::default()).unwrap();
    assert!(g.state_bytes().is_err(), "state of a running guest");
    g.pause().unwrap();
    let st = g.state_bytes().unwrap();
    g.stop().unwrap();
    assert!(KvmGuest::resume_from(Arc::clone(&mem), &st, &GuestConfig::default()).is_err());
    assert!(resume_guest(mem, &st[..10], &GuestConfig::default()).is_err());
}

/// Pause must land while the writer sleeps in the rate limiter, for both kinds.
fn pause_while_rate_limited(g: &dyn GuestCpu) {
    wait_counter(g, 500);
    for _ in 0..20 {
        g.pause().unwrap();
        let before = g.progress();
        assert_eq!(g.progress(), before);
        g.resume().unwrap();
    }
    let c = g.progress().counter;
    wait_counter(g, c + 200);
    g.set_rate(0);
    wait_counter(g, c + 5_000);
    g.stop().unwrap();
}

#[test]
fn pause_lands_during_rate_limit_sleep() {
    let cfg = GuestConfig {
        rate_pages_per_sec: 2_000,
        ..GuestConfig::default()
    };
    let mem = Arc::new(GuestMemory::new(&LAYOUT).unwrap());
    // `start_guest(.., false)` is the `--no-kvm` path.
    let soft = iovatrack::migrate::guest::start_guest(Arc::clone(&mem), &cfg, false).unwrap();
    assert_eq!(soft.kind(), "software");
    pause_while_rate_limited(&*soft);
    if kvm_or_skip() {
        let mem = Arc::new(GuestMemory::new(&LAYOUT).unwrap());
        let kvm = iovatrack::migrate::guest::start_guest(mem, &cfg, true).unwrap();
        assert_eq!(kvm.kind(), "kvm");
        pause_while_rate_limited(&*kvm);
    }
}
