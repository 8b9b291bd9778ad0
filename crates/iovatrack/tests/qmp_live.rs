//! `layout::qmp` against a real QEMU (started paused under TCG, so guest RAM is never
//! touched and a 5 GiB guest costs nothing), plus the QMP error paths against a missing
//! socket and a fake QMP server.
//!
//! Without `qemu-system-x86_64` on `PATH` the live tests print `SKIPPED: ...` and pass,
//! unless the environment variable `CI` is set, where they fail.

use iovatrack::layout::qmp::{self, QmpError};
use iovatrack::layout::{Layout, Section, SectionKind};
use iovatrack::plan::{Planner, Strategy};
use iovatrack::range::IovaRange;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const QEMU: &str = "qemu-system-x86_64";

/// How long QEMU may take to create its QMP socket (TCG start-up under load).
const SOCKET_PATIENCE: Duration = Duration::from_secs(60);

/// A private directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("iovatrack-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running QEMU, killed and reaped on drop (also when a check panics).
struct QemuGuard {
    child: Child,
    socket: PathBuf,
    // Dropped after the child is dead (fields drop after `Drop::drop`).
    _dir: TempDir,
}

impl QemuGuard {
    /// Starts `qemu-system-x86_64 -S -machine q35 -m <mem>` with a QMP socket and waits until
    /// the socket accepts connections.
    fn start(binary: &Path, mem: &str) -> QemuGuard {
        let dir = TempDir::new("qmp");
        let socket = dir.path().join("qmp.sock");
        let child = Command::new(binary)
            .args([
                "-S", "-machine", "q35", "-m", mem, "-accel", "tcg", "-display", "none",
            ])
            .args(["-nodefaults", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        let mut guard = QemuGuard {
            child,
            socket,
            _dir: dir,
        };
        guard.wait_for_socket();
        guard
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + SOCKET_PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("QEMU exited early ({status}): {err}");
            }
            // Probe with a throwaway connection; QEMU serves the next one (wait=off).
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "QEMU made no QMP socket at {}",
                self.socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The QEMU binary on `PATH`, or `None` after a loud skip notice (a failure when `CI` is set).
fn qemu_or_skip() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(QEMU))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        iovatrack::report_skip(&format!("live QMP test: {QEMU} not installed"));
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but {QEMU} is not installed");
        }
    }
    found
}

fn pc_ram(layout: &Layout) -> Vec<&Section> {
    layout
        .sections()
        .iter()
        .filter(|s| s.name == "pc.ram")
        .collect()
}

/// Whether `have` (any order, may overlap) covers every byte of `need`: brute force over
/// the sorted union, independent of the planner's own accounting.
fn covers(have: &[IovaRange], need: &Section) -> bool {
    let mut spans: Vec<(u128, u128)> = have.iter().map(|r| (r.iova as u128, r.end())).collect();
    spans.sort_unstable();
    let mut at = need.start as u128;
    for (s, e) in spans {
        if s <= at && e > at {
            at = e;
        }
    }
    at >= need.end()
}

/// Checks one live layout of a q35 guest with `mem` bytes of RAM.
fn check_layout(layout: &Layout, mem: u64) {
    assert_eq!(layout.address_space(), "memory");
    let ram = pc_ram(layout);
    assert!(
        !ram.is_empty(),
        "no pc.ram sections in {:#?}",
        layout.sections()
    );
    assert!(
        ram.iter().all(|s| s.kind == SectionKind::Ram),
        "pc.ram of another kind: {ram:#?}"
    );
    // pc.ram is one region: the piece with the highest offset ends exactly at -m.
    let region_end = ram
        .iter()
        .map(|s| s.offset_in_region as u128 + s.size())
        .max()
        .unwrap();
    assert_eq!(
        region_end, mem as u128,
        "pc.ram region size differs from -m"
    );
    // Every byte of it is visible except the legacy window [0xc0000, 0x100000) that
    // pc.rom/pc.bios shadow (mapped as rom): RAM + shadow == -m exactly.
    let ram_bytes: u128 = ram.iter().map(|s| s.size()).sum();
    let window = (0xc_0000u64, 0x10_0000u64);
    let shadow: u128 = layout
        .sections()
        .iter()
        .filter(|s| s.kind == SectionKind::Rom && s.start >= window.0 && s.last < window.1)
        .map(|s| s.size())
        .sum();
    assert_eq!(
        shadow,
        (window.1 - window.0) as u128,
        "legacy ROM window not fully shadowed"
    );
    assert_eq!(ram_bytes + shadow, mem as u128, "pc.ram + ROM shadow != -m");
    // Nothing else is RAM in a -nodefaults q35.
    assert_eq!(layout.ram_bytes(), ram_bytes);
    if mem > 2 * GIB {
        // q35 puts 2 GiB below 4 GiB and the rest from 4 GiB on.
        let high: u128 = ram
            .iter()
            .filter(|s| s.start >= 4 * GIB)
            .map(|s| s.size())
            .sum();
        assert_eq!(high, (mem - 2 * GIB) as u128, "RAM above 4 GiB");
    }

    for cap in [256u32, 2, 1] {
        let plan = Planner::new()
            .strategy(Strategy::Optimal)
            .max_ranges(cap)
            .plan(layout)
            .unwrap();
        assert!(plan.ranges.len() <= cap as usize);
        assert_eq!(plan.uncovered_bytes(), 0, "cap {cap}: {plan:#?}");
        assert_eq!(
            plan.dma_bytes, ram_bytes,
            "cap {cap}: DMA-able bytes are pc.ram"
        );
        for s in &ram {
            assert!(
                covers(&plan.ranges, s),
                "cap {cap}: {s:?} not covered by {:?}",
                plan.ranges
            );
        }
        // The ROM shadow is read-only: a plan with room to spare leaves it out.
        if cap == 256 {
            assert_eq!(
                plan.tracked_bytes, ram_bytes,
                "256 ranges track exactly the RAM"
            );
            let rom = IovaRange::new(window.0, window.1 - window.0);
            assert!(
                plan.ranges.iter().all(|r| !r.overlaps(&rom)),
                "{:?}",
                plan.ranges
            );
        }
    }
}

fn live(mem: &str, bytes: u64) {
    let Some(qemu) = qemu_or_skip() else { return };
    let vm = QemuGuard::start(&qemu, mem);
    let layout = qmp::load(&vm.socket, "memory").unwrap_or_else(|e| panic!("QMP load: {e}"));
    check_layout(&layout, bytes);
    // The raw text is QEMU's own and names the address space.
    let text = qmp::fetch_mtree(&vm.socket).unwrap();
    assert!(text.contains("AS \"memory\""), "{text}");
}

#[test]
fn live_q35_2g() {
    live("2G", 2 * GIB);
}

#[test]
fn live_q35_5g_ram_above_4g() {
    live("5G", 5 * GIB);
}

#[test]
fn live_missing_address_space_is_an_error() {
    let Some(qemu) = qemu_or_skip() else { return };
    let vm = QemuGuard::start(&qemu, &format!("{}M", 256));
    let err = qmp::load(&vm.socket, "no-such-address-space").unwrap_err();
    assert!(matches!(err, QmpError::Mtree(_)), "{err:?}");
    // And a small guest still loads.
    let layout = qmp::load(&vm.socket, "memory").unwrap();
    check_layout(&layout, 256 * MIB);
}

#[test]
fn missing_socket_is_connect_error() {
    let dir = TempDir::new("qmp-missing");
    let path = dir.path().join("nobody-here.sock");
    let err = qmp::load(&path, "memory").unwrap_err();
    match err {
        QmpError::Connect { path: p, source } => {
            assert_eq!(p, path.display().to_string());
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Connect, got {other:?}"),
    }
}

/// A fake QMP server: greets, then answers each command line in turn with `replies`
/// (an event is sent before every reply, which the client must skip).
fn fake_server(
    replies: Vec<&'static str>,
) -> (TempDir, PathBuf, std::thread::JoinHandle<Vec<String>>) {
    let dir = TempDir::new("qmp-fake");
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut w = stream.try_clone().unwrap();
        let mut r = BufReader::new(stream);
        w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}}, \"capabilities\": []}}\r\n")
            .unwrap();
        let mut seen = Vec::new();
        for reply in replies {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap() == 0 {
                break;
            }
            seen.push(line.trim().to_string());
            w.write_all(b"{\"event\": \"RESUME\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\r\n")
                .unwrap();
            w.write_all(reply.as_bytes()).unwrap();
            w.write_all(b"\r\n").unwrap();
        }
        seen
    });
    (dir, path, handle)
}

#[test]
fn qmp_error_reply_is_command_error() {
    let (_dir, path, server) = fake_server(vec![
        r#"{"return": {}}"#,
        r#"{"error": {"class": "GenericError", "desc": "monitor is busy"}}"#,
    ]);
    let err = qmp::load(&path, "memory").unwrap_err();
    match err {
        QmpError::Command {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "human-monitor-command");
            assert_eq!(class, "GenericError");
            assert_eq!(desc, "monitor is busy");
        }
        other => panic!("expected Command, got {other:?}"),
    }
    let seen = server.join().unwrap();
    assert_eq!(seen.len(), 2);
    let cmd: serde_json::Value = serde_json::from_str(&seen[1]).unwrap();
    assert_eq!(cmd["execute"], "human-monitor-command");
    assert_eq!(cmd["arguments"]["command-line"], "info mtree -f");
}

#[test]
fn qmp_capabilities_refused_is_command_error() {
    let (_dir, path, server) = fake_server(vec![
        r#"{"error": {"class": "CommandNotFound", "desc": "no caps"}}"#,
    ]);
    let err = qmp::fetch_mtree(&path).unwrap_err();
    assert!(
        matches!(&err, QmpError::Command { command: "qmp_capabilities", class, .. } if class == "CommandNotFound"),
        "{err:?}"
    );
    server.join().unwrap();
}

#[test]
fn fake_server_mtree_text_is_parsed() {
    // A reply carrying real `info mtree -f` text (the 2 GiB q35 preset) goes through the parser.
    let text = iovatrack::layout::presets::text("q35-2g").unwrap();
    let reply: &'static str = Box::leak(
        serde_json::json!({ "return": text })
            .to_string()
            .into_boxed_str(),
    );
    let (_dir, path, server) = fake_server(vec![r#"{"return": {}}"#, reply]);
    let layout = qmp::load(&path, "memory").unwrap();
    assert_eq!(
        layout,
        iovatrack::layout::mtree::parse(text, "memory").unwrap()
    );
    server.join().unwrap();
}
