//! `iovatrack migrate receive` against strangers (issue 11): garbage, an empty connect and
//! a bad checksum are refused, logged with the peer's address and counted, and the
//! receiver still takes the guest from its source afterwards.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_iovatrack");
/// What both ends are given; the source also gets [`WORKLOAD`] (the receiver refuses
/// source-only flags).
const COMMON: &[&str] = &["--scale", "8", "--json"];
const WORKLOAD: &[&str] = &["--cpu-rate", "2000"];

/// A port free now (the receiver binds it a moment later).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn connect(addr: &str) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("{addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Send `bytes`, then wait for the receiver to close.
fn poke(addr: &str, bytes: &[u8]) {
    let mut s = connect(addr);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = s.read_to_end(&mut Vec::new());
}

#[test]
fn receiver_refuses_strangers_and_still_migrates() {
    let addr = format!("127.0.0.1:{}", free_port());
    let receiver = Command::new(BIN)
        .args([
            "migrate",
            "receive",
            "--listen",
            &addr,
            "--accept-timeout",
            "60",
        ])
        .args(COMMON)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // 20 bytes of garbage; a frame header with a bad CRC; a connect that sends nothing.
    poke(&addr, &[0x42; 20]);
    let mut bad = b"IOVT".to_vec();
    bad.extend_from_slice(&iovatrack::migrate::wire::PROTOCOL_VERSION.to_le_bytes());
    bad.extend_from_slice(&1u16.to_le_bytes()); // Hello
    bad.extend_from_slice(&0u32.to_le_bytes()); // no payload
    bad.extend_from_slice(&0u64.to_le_bytes()); // seq 0
    bad.extend_from_slice(&0xdead_beefu32.to_le_bytes()); // wrong CRC
    poke(&addr, &bad);
    poke(&addr, &[]);
    let source = Command::new(BIN)
        .args(["migrate", "send", "--to", &addr])
        .args(COMMON)
        .args(WORKLOAD)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let r = receiver.wait_with_output().unwrap();
    let logs = format!(
        "source: {}\nreceiver: {}",
        String::from_utf8_lossy(&source.stderr),
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(source.status.success(), "{logs}");
    assert!(r.status.success(), "{logs}");
    let s: Value = serde_json::from_slice(&source.stdout).unwrap();
    let d: Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(s["verified"], true, "{logs}");
    assert_eq!(s["handover"], "acknowledged", "{logs}");
    assert_eq!(d["verified"], true, "{logs}");
    assert_eq!(d["refused_connections"], 3, "{logs}");
    assert_eq!(d["sessions"], 1, "{logs}");
    let refusals = String::from_utf8_lossy(&r.stderr);
    assert_eq!(
        refusals
            .matches("refused connection from 127.0.0.1:")
            .count(),
        3,
        "one log line per refusal: {logs}"
    );
    assert!(refusals.contains("checksum"), "{logs}");
}
