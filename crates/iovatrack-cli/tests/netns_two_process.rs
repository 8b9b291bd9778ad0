//! Source and destination as two processes in two network namespaces joined by a veth
//! pair: a clean migration, one whose device state changes on the way, and the link going
//! down in the middle of one.
//!
//! Needs root and `ip` (iproute2). Without them the tests report a skip, and fail only
//! under CI (`CI` set). Addresses are 10.213.X.1/.2 on a /30 that exists only inside the
//! two namespaces this test creates; the namespaces are deleted on exit, even on panic.

use serde_json::Value;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_iovatrack");
/// Every child is killed after this.
const CHILD_TIMEOUT: Duration = Duration::from_secs(120);
/// The same layout on both sides; a guest dirty rate the link can outrun even in a debug
/// build (the default 20 000 pages/s is 78 MiB/s: at 20 MiB/s it never converges and the
/// forced stop-and-copy alone takes ~30 s).
const LAYOUT: &[&str] = &["--scale", "4"];
const WORKLOAD: &[&str] = &["--cpu-rate", "2000", "--timeout", "30"];

/// One pair of namespaces per test; the tests run one at a time (two cores, and the link
/// outage timing should not compete with another migration).
static SERIAL: Mutex<()> = Mutex::new(());
static SEQ: AtomicU32 = AtomicU32::new(0);

/// Skip (or, under CI, fail) when this machine cannot make namespaces.
fn skip(why: &str) {
    let msg = format!("two-process netns test: {why}");
    if std::env::var_os("CI").is_some() {
        panic!("{msg} (CI is set: this must run)");
    }
    iovatrack::report_skip(&msg);
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Two namespaces, a veth pair between them, and the children running inside. Drop kills
/// the children and deletes the namespaces (which deletes the veth pair).
struct Netns {
    src: String,
    dst: String,
    veth_src: String,
    dst_addr: String,
    dir: PathBuf,
    children: Vec<Child>,
}

impl Netns {
    /// Set up, or say why not.
    fn new() -> Result<Self, String> {
        if !is_root() {
            return Err("not root".into());
        }
        Command::new("ip")
            .arg("-V")
            .output()
            .map_err(|e| format!("no `ip` command (iproute2): {e}"))?;
        let pid = std::process::id();
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{n}", pid % 1_000_000);
        let net = format!("10.213.{}", (pid as usize * 8 + n as usize) % 256);
        let dir = std::env::temp_dir().join(format!("iovatrack-netns-{pid}-{n}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut ns = Netns {
            src: format!("iovt-src-{tag}"),
            dst: format!("iovt-dst-{tag}"),
            veth_src: format!("iovs{tag}"),
            dst_addr: format!("{net}.2"),
            dir,
            children: Vec::new(),
        };
        let veth_dst = format!("iovd{tag}");
        // From here on Drop cleans up whatever was made.
        ip(&["netns", "add", &ns.src])?;
        ip(&["netns", "add", &ns.dst])?;
        ip(&[
            "link",
            "add",
            &ns.veth_src,
            "netns",
            &ns.src,
            "type",
            "veth",
            "peer",
            "name",
            &veth_dst,
            "netns",
            &ns.dst,
        ])?;
        ip(&[
            "-n",
            &ns.src,
            "addr",
            "add",
            &format!("{net}.1/30"),
            "dev",
            &ns.veth_src,
        ])?;
        ip(&[
            "-n",
            &ns.dst,
            "addr",
            "add",
            &format!("{net}.2/30"),
            "dev",
            &veth_dst,
        ])?;
        for (n, dev) in [(&ns.src, &ns.veth_src), (&ns.dst, &veth_dst)] {
            ip(&["-n", n, "link", "set", "lo", "up"])?;
            ip(&["-n", n, "link", "set", dev, "up"])?;
        }
        ns.children.reserve(2);
        Ok(ns)
    }

    /// Start `iovatrack <args>` inside namespace `ns`; stdout and stderr go to files.
    fn spawn(&mut self, ns: &str, name: &str, args: &[&str]) -> usize {
        let out = File::create(self.dir.join(format!("{name}.out"))).expect("create output file");
        let err = File::create(self.dir.join(format!("{name}.err"))).expect("create output file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, BIN])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn ip netns exec");
        self.children.push(child);
        self.children.len() - 1
    }

    /// Wait for child `i`, killing it at `deadline`.
    fn wait(&mut self, i: usize, deadline: Instant) -> ExitStatus {
        loop {
            if let Some(st) = self.children[i].try_wait().expect("try_wait") {
                return st;
            }
            if Instant::now() >= deadline {
                let _ = self.children[i].kill();
                let _ = self.children[i].wait();
                panic!(
                    "child {i} still running after {CHILD_TIMEOUT:?}: killed\n{}",
                    self.logs()
                );
            }
            sleep(Duration::from_millis(50));
        }
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// Parsed JSON from a child's stdout, if it printed any.
    fn json(&self, name: &str) -> Option<Value> {
        serde_json::from_str(&self.read(&format!("{name}.out"))).ok()
    }

    fn logs(&self) -> String {
        ["send.err", "send.out", "recv.err", "recv.out"]
            .iter()
            .map(|f| format!("--- {f}\n{}", self.read(f)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn link(&self, up: bool) {
        ip(&[
            "-n",
            &self.src,
            "link",
            "set",
            &self.veth_src,
            if up { "up" } else { "down" },
        ])
        .expect("set the veth link");
    }

    /// Receiver, then sender with `extra` args; optionally the link goes down at
    /// `outage.0` for `outage.1`. Returns the two exit statuses.
    fn migrate(
        &mut self,
        extra: &[&str],
        outage: Option<(Duration, Duration)>,
    ) -> (ExitStatus, ExitStatus) {
        let listen = format!("{}:7000", self.dst_addr);
        let dst = self.dst.clone();
        let src = self.src.clone();
        let mut recv: Vec<&str> = vec!["migrate", "receive", "--listen", &listen, "--json"];
        recv.extend_from_slice(LAYOUT);
        let r = self.spawn(&dst, "recv", &recv);
        let started = Instant::now();
        // The sender's connector retries for 15 s, so it need not wait for the listener.
        let mut send: Vec<&str> = vec!["migrate", "send", "--to", &listen, "--json"];
        send.extend_from_slice(LAYOUT);
        send.extend_from_slice(WORKLOAD);
        send.extend_from_slice(extra);
        let s = self.spawn(&src, "send", &send);
        if let Some((at, len)) = outage {
            sleep(at);
            self.link(false);
            sleep(len);
            self.link(true);
        }
        let deadline = started + CHILD_TIMEOUT;
        let s_st = self.wait(s, deadline);
        let r_st = self.wait(r, deadline);
        (s_st, r_st)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = ip(&["netns", "del", &self.src]);
        let _ = ip(&["netns", "del", &self.dst]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

/// Both sides say the migration succeeded, and their independent checks agree.
fn assert_verified(ns: &Netns, s_st: ExitStatus, r_st: ExitStatus) -> (Value, Value) {
    let logs = ns.logs();
    assert!(s_st.success(), "the source failed ({s_st})\n{logs}");
    assert!(r_st.success(), "the receiver failed ({r_st})\n{logs}");
    let s = ns
        .json("send")
        .unwrap_or_else(|| panic!("no source JSON\n{logs}"));
    let r = ns
        .json("recv")
        .unwrap_or_else(|| panic!("no receiver JSON\n{logs}"));
    assert_eq!(s["verified"], true, "{logs}");
    assert!(s["aborted"].is_null(), "{logs}");
    assert_eq!(num(&s, "mismatched_pages"), 0, "{logs}");
    assert_eq!(num(&s, "duplicate_pages_sent"), 0, "{logs}");
    assert_eq!(num(&s, "untracked_dma_writes"), 0, "{logs}");
    assert!(num(&s, "pages_sent") > 0, "{logs}");
    assert_eq!(r["verified"], true, "{logs}");
    assert_eq!(r["resumed"], true, "{logs}");
    assert_eq!(r["device_state_restored"], true, "{logs}");
    assert_eq!(
        num(&r, "devices_restored"),
        1,
        "one device migrates: {logs}"
    );
    assert!(
        r["counter"][1].as_u64() > r["counter"][0].as_u64(),
        "the resumed guest made progress: {logs}"
    );
    assert_eq!(num(&r, "mismatched_pages"), 0, "{logs}");
    assert_eq!(num(&r, "duplicate_pages_received"), 0, "{logs}");
    // The device state: the source's digest of what it sent is the one the receiver
    // computed over what it received (each in its own process).
    assert_eq!(s["device_state_matched"], true, "{logs}");
    assert_ne!(num(&s, "sent_state_digest"), 0, "{logs}");
    assert_eq!(
        num(&s, "sent_state_digest"),
        num(&r, "received_state_digest"),
        "{logs}"
    );
    (s, r)
}

/// Set up, or report the skip; `None` means skipped.
fn setup() -> Option<Netns> {
    match Netns::new() {
        Ok(ns) => Some(ns),
        Err(why) => {
            skip(&why);
            None
        }
    }
}

#[test]
fn two_processes_over_veth_verify() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut ns) = setup() else { return };
    let (s_st, r_st) = ns.migrate(&["--bandwidth", "100M"], None);
    let (s, r) = assert_verified(&ns, s_st, r_st);
    assert_eq!(num(&s, "attempts"), 1, "{}", ns.logs());
    assert_eq!(num(&r, "sessions"), 1, "{}", ns.logs());
    // What the destination received is what the source sent: one session, no loss.
    assert_eq!(num(&r, "pages_received"), num(&s, "pages_sent"));
    assert_eq!(s["handover"], "acknowledged", "{}", ns.logs());
    assert_eq!(num(&r, "refused_connections"), 0, "{}", ns.logs());
    assert_eq!(num(&s, "new_destination_sessions"), 0, "{}", ns.logs());
}

/// The negative control of the device-state digest across two processes: a record changed
/// after the source's digest (`--inject corrupt-device-state`) makes the receiver's digest
/// differ; the memory matches, yet neither side verifies, and the receiver says why.
#[test]
fn two_processes_catch_a_changed_device_state() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut ns) = setup() else { return };
    let (s_st, r_st) = ns.migrate(&["--inject", "corrupt-device-state"], None);
    let logs = ns.logs();
    assert_eq!(s_st.code(), Some(1), "{logs}");
    assert_eq!(r_st.code(), Some(1), "{logs}");
    let s = ns
        .json("send")
        .unwrap_or_else(|| panic!("no source JSON\n{logs}"));
    let r = ns
        .json("recv")
        .unwrap_or_else(|| panic!("no receiver JSON\n{logs}"));
    assert_eq!(s["verified"], false, "{logs}");
    assert_eq!(s["device_state_matched"], false, "{logs}");
    assert_eq!(s["faults_fired"][0], "corrupt-device-state", "{logs}");
    assert_eq!(num(&s, "mismatched_pages"), 0, "{logs}");
    assert_eq!(s["handover"], "none", "{logs}");
    assert_eq!(s["source_running_after_abort"], true, "{logs}");
    assert_ne!(
        num(&s, "sent_state_digest"),
        num(&r, "received_state_digest"),
        "{logs}"
    );
    assert_eq!(r["verified"], false, "{logs}");
    assert_eq!(r["resumed"], false, "{logs}");
    assert!(r["handover_refused"].is_string(), "{logs}");
}

/// Run with the link down from `at` for `len`: either it ends verified (TCP survived, or
/// the source retried), or the source aborts cleanly and the receiver claims nothing.
/// Returns the source's attempts when verified.
fn outage(at: Duration, len: Duration) -> Option<u64> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut ns = setup()?;
    // A downtime budget this link cannot meet: pre-copy goes on for all 30 passes (~10 s),
    // so the outage surely falls in the middle of the migration.
    let (s_st, r_st) = ns.migrate(
        &["--bandwidth", "20M", "--downtime-ms", "50"],
        Some((at, len)),
    );
    let logs = ns.logs();
    if s_st.success() {
        let (s, r) = assert_verified(&ns, s_st, r_st);
        let attempts = num(&s, "attempts");
        eprintln!(
            "link down {len:?} at {at:?}: verified after {attempts} attempt(s), {} session(s) at the receiver",
            num(&r, "sessions")
        );
        assert_eq!(attempts, num(&r, "sessions"), "{logs}");
        return Some(attempts);
    }
    // The clean failure: the source says why it gave up and kept its guest running...
    let s = ns
        .json("send")
        .unwrap_or_else(|| panic!("the source failed without a summary ({s_st})\n{logs}"));
    assert_eq!(s["verified"], false, "{logs}");
    assert!(
        s["aborted"].is_string(),
        "a failed source must say why\n{logs}"
    );
    assert_eq!(s["source_running_after_abort"], true, "{logs}");
    // ...and the receiver does not claim a guest it does not fully have.
    assert!(
        !r_st.success(),
        "the source aborted but the receiver exited 0\n{logs}"
    );
    if let Some(r) = ns.json("recv") {
        assert!(
            r["verified"] != true || r["resumed"] != true,
            "the receiver claims success after the source aborted\n{logs}"
        );
    }
    eprintln!(
        "link down {len:?} at {at:?}: aborted cleanly: {}",
        s["aborted"]
    );
    None
}

#[test]
fn link_down_for_3s_mid_migration() {
    outage(Duration::from_secs(1), Duration::from_secs(3));
}

/// An outage longer than the dead-link timeout (10 s): TCP cannot survive it, so success
/// here means the source noticed, reconnected once the link was back, and continued.
#[test]
fn link_down_for_14s_forces_a_reconnect() {
    if let Some(attempts) = outage(Duration::from_secs(1), Duration::from_secs(14)) {
        assert!(
            attempts >= 2,
            "a 14 s outage cannot be survived by one TCP connection (10 s user timeout)"
        );
    }
}
