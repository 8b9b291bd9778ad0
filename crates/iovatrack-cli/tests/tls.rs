//! `iovatrack migrate` over TLS with mutual authentication (issue 11): two processes
//! verify; a receiver refuses every source it cannot authenticate at the handshake,
//! before a byte of guest memory moves, and still takes its real source afterwards; a
//! source refuses a destination it does not trust; bad certificate files are clear errors.
//!
//! Certificates are made here with rcgen: a CA, a host certificate (IP SAN 127.0.0.1,
//! server and client use), a client-only certificate, and a stranger CA with a
//! certificate of its own.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose as Eku, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_iovatrack");
/// What both ends are given; sources also get [`WORKLOAD`] (a receiver refuses it).
const COMMON: &[&str] = &["--scale", "8", "--json"];
const WORKLOAD: &[&str] = &["--cpu-rate", "2000"];

/// A CA that signs certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A new CA whose certificate is written to `dir/name.pem`.
    fn new(dir: &Path, name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        std::fs::write(
            dir.join(format!("{name}.pem")),
            p.self_signed(&key).unwrap().pem(),
        )
        .unwrap();
        Ca {
            issuer: Issuer::new(p, key),
        }
    }

    /// A certificate for `sans` with `usages`, written to `dir/name.pem` and its key to
    /// `dir/name-key.pem`.
    fn issue(&self, dir: &Path, name: &str, sans: &[&str], usages: Vec<Eku>) {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = usages;
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
    }
}

/// A directory of certificates for one test.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(test: &str) -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("tls-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Ca::new(&dir, "ca");
        ca.issue(
            &dir,
            "host",
            &["127.0.0.1"],
            vec![Eku::ServerAuth, Eku::ClientAuth],
        );
        ca.issue(&dir, "client", &["source.example"], vec![Eku::ClientAuth]);
        let stranger = Ca::new(&dir, "stranger-ca");
        stranger.issue(
            &dir,
            "stranger",
            &["127.0.0.1"],
            vec![Eku::ServerAuth, Eku::ClientAuth],
        );
        Pki { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }

    /// `--tls-cert NAME.pem --tls-key NAME-key.pem --tls-ca CA.pem`.
    fn flags(&self, name: &str, ca: &str) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path(&format!("{name}.pem")),
            "--tls-key".into(),
            self.path(&format!("{name}-key.pem")),
            "--tls-ca".into(),
            self.path(&format!("{ca}.pem")),
        ]
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port free now (the receiver binds it a moment later).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TLS receiver on `addr` with the host certificate.
fn receiver(pki: &Pki, addr: &str) -> Child {
    receiver_with(addr, &pki.flags("host", "ca"))
}

/// A receiver on `addr` with `flags` (none: plain TCP).
fn receiver_with(addr: &str, flags: &[String]) -> Child {
    let child = Command::new(BIN)
        .args([
            "migrate",
            "receive",
            "--listen",
            addr,
            "--accept-timeout",
            "60",
        ])
        .args(flags)
        .args(COMMON)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_listening(addr);
    child
}

/// Wait until something accepts on `addr` (the probe itself is one refused connection,
/// so callers count it).
fn wait_listening(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `migrate send --to to` with `extra` flags.
fn send(to: &str, extra: &[String]) -> Output {
    Command::new(BIN)
        .args(["migrate", "send", "--to", to])
        .args(extra)
        .args(COMMON)
        .args(WORKLOAD)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn json(out: &Output, logs: &str) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {logs}"))
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// A TLS client that trusts the CA but has no certificate of its own: it completes its
/// side of the handshake, writes a Hello frame's bytes, and must read nothing but the
/// receiver's refusal.
fn no_certificate_client(pki: &Pki, addr: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.path("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut hello = b"IOVT".to_vec();
    hello.extend_from_slice(&2u16.to_le_bytes());
    hello.extend_from_slice(&1u16.to_le_bytes());
    let _ = s.write_all(&hello).and_then(|()| s.flush());
    let mut got = Vec::new();
    let err = s
        .read_to_end(&mut got)
        .expect_err("the receiver must refuse a client without a certificate");
    assert!(
        got.is_empty(),
        "the receiver answered a client without a certificate: {got:?}"
    );
    err.to_string()
}

#[test]
fn tls_two_processes_verify() {
    let pki = Pki::new("two");
    let addr = format!("127.0.0.1:{}", free_port());
    let r = receiver(&pki, &addr);
    let source = send(&addr, &pki.flags("client", "ca"));
    let r = r.wait_with_output().unwrap();
    let logs = format!("source: {}\nreceiver: {}", text(&source), text(&r));
    assert!(source.status.success(), "{logs}");
    assert!(r.status.success(), "{logs}");
    let (s, d) = (json(&source, &logs), json(&r, &logs));
    assert_eq!(s["verified"], true, "{logs}");
    assert_eq!(s["transport"], "tls", "{logs}");
    assert_eq!(s["handover"], "acknowledged", "{logs}");
    assert_eq!(d["verified"], true, "{logs}");
    assert_eq!(d["transport"], "tls", "{logs}");
    assert_eq!(d["sessions"], 1, "{logs}");
    // The readiness probe closed without a handshake.
    assert_eq!(d["refused_connections"], 1, "{logs}");
    assert_eq!(d["pages_received"], s["pages_sent"], "{logs}");
}

#[test]
fn tls_receiver_refuses_unauthenticated_sources_before_any_page() {
    let pki = Pki::new("strangers");
    let addr = format!("127.0.0.1:{}", free_port());
    let r = receiver(&pki, &addr);
    let once = ["--retries".to_string(), "0".to_string()];
    // A source without TLS.
    let plain = send(&addr, &once);
    // A source whose certificate a stranger CA signed (it trusts the real CA).
    let mut flags = pki.flags("stranger", "ca");
    flags.extend(once.clone());
    let stranger = send(&addr, &flags);
    // A TLS client with no certificate at all.
    let no_cert = no_certificate_client(&pki, &addr);
    // The real source, afterwards.
    let source = send(&addr, &pki.flags("client", "ca"));
    let r = r.wait_with_output().unwrap();
    let logs = format!(
        "plain: {}\nstranger: {}\nno certificate: {no_cert}\nsource: {}\nreceiver: {}",
        text(&plain),
        text(&stranger),
        text(&source),
        text(&r)
    );
    assert_eq!(plain.status.code(), Some(1), "{logs}");
    assert_eq!(json(&plain, &logs)["verified"], false, "{logs}");
    assert_eq!(stranger.status.code(), Some(1), "{logs}");
    let st = json(&stranger, &logs);
    assert_eq!(st["passes"], 0, "{logs}");
    let why = st["aborted"].as_str().unwrap_or_default();
    assert!(
        why.contains("the destination refused this side") && why.contains("UnknownCA"),
        "the stranger learns why: {logs}"
    );
    assert!(no_cert.contains("CertificateRequired"), "{logs}");
    assert!(source.status.success(), "{logs}");
    assert!(r.status.success(), "{logs}");
    let (s, d) = (json(&source, &logs), json(&r, &logs));
    assert_eq!(s["verified"], true, "{logs}");
    assert_eq!(d["verified"], true, "{logs}");
    // Probe, plain, stranger, no certificate: all refused at the handshake, none got a
    // session, none wrote a page (a refused peer that wrote would have reset the memory).
    let refusals = strings(&d["refusals"]);
    assert_eq!(d["refused_connections"], 4, "{logs}");
    assert!(
        refusals.iter().all(|r| r.contains("tls handshake")),
        "{logs}"
    );
    assert!(
        refusals[1].contains("plain iovatrack Hello on a TLS receiver"),
        "{logs}"
    );
    assert!(
        refusals[2].contains("not signed by a CA in") && refusals[2].contains("ca.pem"),
        "{logs}"
    );
    assert!(refusals[3].contains("sent no client certificate"), "{logs}");
    assert_eq!(d["sessions"], 1, "{logs}");
    assert_eq!(d["memory_resets"], 0, "{logs}");
    assert_eq!(
        d["pages_received"], s["pages_sent"],
        "only the real source's pages: {logs}"
    );
}

#[test]
fn tls_source_refuses_an_untrusted_destination() {
    let pki = Pki::new("untrusted");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let r = receiver(&pki, &addr);
    let attempt = |to: &str, extra: &[&str], ca: &str| {
        let mut flags = pki.flags("client", ca);
        flags.extend(["--retries", "0"].map(String::from));
        flags.extend(extra.iter().map(|s| s.to_string()));
        send(to, &flags)
    };
    // It trusts another CA; the name it expects is not the certificate's; `localhost`
    // is not an IP SAN of it either (the default name is the host part of --to).
    let wrong_ca = attempt(&addr, &[], "stranger-ca");
    let wrong_name = attempt(&addr, &["--tls-hostname", "wrong.example"], "ca");
    let by_name = attempt(&format!("localhost:{port}"), &[], "ca");
    let source = send(&addr, &pki.flags("client", "ca"));
    let r = r.wait_with_output().unwrap();
    let logs = format!(
        "wrong CA: {}\nwrong name: {}\nlocalhost: {}\nsource: {}\nreceiver: {}",
        text(&wrong_ca),
        text(&wrong_name),
        text(&by_name),
        text(&source),
        text(&r)
    );
    let aborted = |o: &Output| {
        assert_eq!(o.status.code(), Some(1), "{logs}");
        let v = json(o, &logs);
        assert_eq!(v["passes"], 0, "{logs}");
        v["aborted"].as_str().unwrap_or_default().to_string()
    };
    let why = aborted(&wrong_ca);
    assert!(
        why.contains("the destination's certificate is not signed by a CA in")
            && why.contains("stranger-ca.pem"),
        "{logs}"
    );
    let why = aborted(&wrong_name);
    assert!(
        why.contains("not valid for wrong.example: it names only 127.0.0.1"),
        "{logs}"
    );
    let why = aborted(&by_name);
    assert!(why.contains("not valid for localhost"), "{logs}");
    assert!(source.status.success(), "{logs}");
    let d = json(&r, &logs);
    assert_eq!(d["verified"], true, "{logs}");
    assert_eq!(d["sessions"], 1, "{logs}");
    assert_eq!(d["memory_resets"], 0, "{logs}");
    let refusals = strings(&d["refusals"]);
    assert_eq!(d["refused_connections"], 4, "{logs}");
    assert!(
        refusals[1].contains("the source refused this side") && refusals[1].contains("UnknownCA"),
        "{logs}"
    );
    assert!(refusals[2].contains("BadCertificate"), "{logs}");
}

#[test]
fn tls_one_process_says_which_transport() {
    let pki = Pki::new("local");
    let run = |extra: &[&str]| {
        Command::new(BIN)
            .arg("migrate")
            .args(pki.flags("host", "ca"))
            .args(extra)
            .args(COMMON)
            .args(WORKLOAD)
            .output()
            .unwrap()
    };
    let ok = run(&[]);
    let logs = text(&ok);
    assert!(ok.status.success(), "{logs}");
    let v = json(&ok, &logs);
    assert_eq!(v["verified"], true, "{logs}");
    assert_eq!(v["transport"], "tls", "{logs}");
    // Negative control: the same run checking another name must not verify.
    let wrong = run(&["--tls-hostname", "127.0.0.2", "--retries", "0"]);
    let logs = text(&wrong);
    assert_eq!(wrong.status.code(), Some(1), "{logs}");
    let v = json(&wrong, &logs);
    assert_eq!(v["verified"], false, "{logs}");
    let why = v["aborted"].as_str().unwrap_or_default();
    assert!(why.contains("not valid for 127.0.0.2"), "{logs}");
    // Plain TCP says so.
    let plain = Command::new(BIN)
        .args(["migrate"])
        .args(COMMON)
        .args(WORKLOAD)
        .output()
        .unwrap();
    let logs = text(&plain);
    assert_eq!(json(&plain, &logs)["transport"], "tcp", "{logs}");
}

#[test]
fn tls_bad_inputs_are_clear_errors() {
    let pki = Pki::new("bad");
    let garbage = pki.path("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\n!!not base64!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let prose = pki.path("prose.pem");
    std::fs::write(&prose, "this is not a certificate\n").unwrap();
    let empty = pki.path("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let missing = pki.path("missing.pem");
    let (host, host_key, ca) = (
        pki.path("host.pem"),
        pki.path("host-key.pem"),
        pki.path("ca.pem"),
    );
    let client_key = pki.path("client-key.pem");
    // (arguments, what stderr must say)
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec![
                "--tls-cert",
                &missing,
                "--tls-key",
                &host_key,
                "--tls-ca",
                &ca,
            ],
            vec![&missing, "No such file", "hint:"],
        ),
        (
            vec![
                "--tls-cert",
                &garbage,
                "--tls-key",
                &host_key,
                "--tls-ca",
                &ca,
            ],
            vec![&garbage, "not valid PEM"],
        ),
        (
            vec![
                "--tls-cert",
                &prose,
                "--tls-key",
                &host_key,
                "--tls-ca",
                &ca,
            ],
            vec![&prose, "no certificate in it"],
        ),
        (
            vec!["--tls-cert", &host, "--tls-key", &prose, "--tls-ca", &ca],
            vec![&prose, "no private key in it"],
        ),
        (
            vec![
                "--tls-cert",
                &host,
                "--tls-key",
                &client_key,
                "--tls-ca",
                &ca,
            ],
            vec![
                &client_key,
                "does not match the certificate in",
                &host,
                "hint:",
            ],
        ),
        (
            vec!["--tls-cert", &host_key, "--tls-key", &host, "--tls-ca", &ca],
            vec![&host_key, "holds a private key instead", "swapped?"],
        ),
        (
            vec![
                "--tls-cert",
                &host,
                "--tls-key",
                &host_key,
                "--tls-ca",
                &empty,
            ],
            vec![&empty, "no certificate in it"],
        ),
        (
            vec![
                "--tls-cert",
                &host,
                "--tls-key",
                &host_key,
                "--tls-ca",
                &ca,
                "--tls-hostname",
                "not a name!",
            ],
            vec!["not a TLS server name"],
        ),
        (vec!["--tls-cert", &host], vec!["--tls-key", "--tls-ca"]),
        (vec!["--tls-hostname", "a.example"], vec!["--tls-cert"]),
    ];
    for (args, says) in &cases {
        let out = Command::new(BIN)
            .arg("migrate")
            .args(args)
            .args(COMMON)
            .args(WORKLOAD)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let logs = format!("{args:?}: {}", text(&out));
        assert_eq!(out.status.code(), Some(2), "{logs}");
        assert!(!err.contains("panicked"), "{logs}");
        for s in says {
            assert!(err.contains(s), "must say {s:?}: {logs}");
        }
        assert!(out.stdout.is_empty(), "{logs}");
    }
    // The same checks on `send` and `receive`, and flags put before the subcommand.
    let receive = Command::new(BIN)
        .args([
            "migrate",
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            &host,
            "--tls-key",
            &client_key,
            "--tls-ca",
            &ca,
        ])
        .output()
        .unwrap();
    assert_eq!(receive.status.code(), Some(2), "{}", text(&receive));
    assert!(
        String::from_utf8_lossy(&receive.stderr).contains("does not match"),
        "{}",
        text(&receive)
    );
    let early = Command::new(BIN)
        .args([
            "migrate",
            "--tls-cert",
            &host,
            "--tls-key",
            &host_key,
            "--tls-ca",
            &ca,
            "send",
            "--to",
            "127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert_eq!(early.status.code(), Some(2), "{}", text(&early));
    assert!(
        // clap refuses every flag given before `send`/`receive`.
        String::from_utf8_lossy(&early.stderr).contains("cannot be used with"),
        "{}",
        text(&early)
    );
}

/// The source's report after a failed attempt: exit status 1, no pass, one attempt (no
/// retry), and the reason it gave up.
fn gave_up_at_once(o: &Output, logs: &str) -> String {
    assert_eq!(o.status.code(), Some(1), "{logs}");
    let v = json(o, logs);
    assert_eq!(v["verified"], false, "{logs}");
    assert_eq!(v["passes"], 0, "{logs}");
    assert_eq!(v["attempts"], 1, "not retried: {logs}");
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("retrying after"),
        "{logs}"
    );
    v["aborted"].as_str().unwrap_or_default().to_string()
}

#[test]
fn tls_authentication_failures_are_not_retried() {
    let pki = Pki::new("no-retry");
    let addr = format!("127.0.0.1:{}", free_port());
    let r = receiver(&pki, &addr);
    // The default --retries (2): a dropped link would be tried twice more, a certificate
    // the other side refuses is not.
    let untrusted = send(&addr, &pki.flags("client", "stranger-ca"));
    let refused = send(&addr, &pki.flags("stranger", "ca"));
    let source = send(&addr, &pki.flags("client", "ca"));
    let r = r.wait_with_output().unwrap();
    let logs = format!(
        "untrusted: {}\nrefused: {}\nsource: {}\nreceiver: {}",
        text(&untrusted),
        text(&refused),
        text(&source),
        text(&r)
    );
    let why = gave_up_at_once(&untrusted, &logs);
    assert!(
        why.starts_with("TLS: the destination's certificate is not signed by a CA in")
            && why.contains("stranger-ca.pem")
            && why.contains("not retried"),
        "{logs}"
    );
    let why = gave_up_at_once(&refused, &logs);
    assert!(
        why.starts_with("TLS: the destination refused this side") && why.contains("UnknownCA"),
        "{logs}"
    );
    assert!(source.status.success(), "{logs}");
    let d = json(&r, &logs);
    assert_eq!(d["verified"], true, "{logs}");
    // The readiness probe and one handshake per refused source: no retries came.
    assert_eq!(d["refused_connections"], 3, "{logs}");
    assert_eq!(d["sessions"], 1, "{logs}");
}

#[test]
fn tls_on_one_side_only_says_which_side_needs_it() {
    let pki = Pki::new("one-sided");
    // A TLS receiver, a plain source.
    let addr = format!("127.0.0.1:{}", free_port());
    let r = receiver(&pki, &addr);
    let plain = send(&addr, &[]);
    let source = send(&addr, &pki.flags("client", "ca"));
    let r = r.wait_with_output().unwrap();
    let logs = format!(
        "plain: {}\nsource: {}\nreceiver: {}",
        text(&plain),
        text(&source),
        text(&r)
    );
    let why = gave_up_at_once(&plain, &logs);
    assert!(
        why.contains("the destination speaks TLS") && why.contains("--tls-"),
        "{logs}"
    );
    assert!(source.status.success(), "{logs}");
    let d = json(&r, &logs);
    assert_eq!(d["verified"], true, "{logs}");
    assert_eq!(d["refused_connections"], 2, "{logs}");
    let refusals = strings(&d["refusals"]);
    assert!(
        refusals[1].contains("plain iovatrack Hello on a TLS receiver: the source needs --tls-*"),
        "{logs}"
    );
    // A plain receiver, a TLS source.
    let addr = format!("127.0.0.1:{}", free_port());
    let r = receiver_with(&addr, &[]);
    let tls = send(&addr, &pki.flags("client", "ca"));
    let source = send(&addr, &[]);
    let r = r.wait_with_output().unwrap();
    let logs = format!(
        "tls: {}\nsource: {}\nreceiver: {}",
        text(&tls),
        text(&source),
        text(&r)
    );
    let why = gave_up_at_once(&tls, &logs);
    assert!(
        why.contains("the destination does not speak TLS (is it running without --tls-*?)"),
        "{logs}"
    );
    assert!(source.status.success(), "{logs}");
    let d = json(&r, &logs);
    assert_eq!(d["verified"], true, "{logs}");
    assert_eq!(d["sessions"], 1, "{logs}");
    assert_eq!(d["refused_connections"], 2, "{logs}");
    let refusals = strings(&d["refusals"]);
    assert!(
        refusals[1].contains("a TLS ClientHello on a plain-TCP receiver: start it with --tls-*"),
        "{logs}"
    );
}
