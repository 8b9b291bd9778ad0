//! The TLS transport's deadlines: a peer that says nothing, or trickles a handshake a byte
//! at a time, is refused within the socket's read timeout (the destination's Hello
//! timeout) in total, not per read; a source facing a silent destination gives up within
//! its handshake timeout. A peer without TLS is named as such on either side.

use iovatrack::migrate::engine::{Tls, Transport};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose as Eku, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BUDGET: Duration = Duration::from_millis(300);

/// A CA and a host certificate for 127.0.0.1, loaded as a transport.
fn tls(test: &str) -> Tls {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("iovatrack-tls-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut host = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    host.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
    std::fs::write(
        dir.join("host.pem"),
        host.signed_by(&key, &issuer).unwrap().pem(),
    )
    .unwrap();
    std::fs::write(dir.join("host-key.pem"), key.serialize_pem()).unwrap();
    let t = Tls::from_pem_files(
        dir.join("host.pem"),
        dir.join("host-key.pem"),
        dir.join("ca.pem"),
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    t
}

/// The destination's side on an accepted socket with `BUDGET` as its read timeout, while
/// `peer` runs on the connecting socket; how long `server` took and what it said.
fn serve(t: Tls, peer: impl FnOnce(TcpStream) + Send + 'static) -> (Duration, std::io::Error) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let h = std::thread::spawn(move || peer(TcpStream::connect(addr).unwrap()));
    let (tcp, _) = listener.accept().unwrap();
    tcp.set_read_timeout(Some(BUDGET)).unwrap();
    let start = Instant::now();
    let err = match t.server(tcp) {
        Ok(_) => panic!("the handshake succeeded"),
        Err(e) => e,
    };
    let took = start.elapsed();
    h.join().unwrap();
    (took, err)
}

#[test]
fn a_silent_source_is_refused_within_the_hello_timeout() {
    let (took, err) = serve(tls("silent"), |s| {
        std::thread::sleep(BUDGET * 3);
        drop(s);
    });
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(
        err.to_string()
            .contains("no TLS handshake with the source within"),
        "{err}"
    );
    assert!(took >= BUDGET && took < BUDGET * 2, "{took:?}");
}

#[test]
fn a_trickling_source_cannot_stretch_the_handshake() {
    // A real ClientHello, one byte every 20 ms: each read would be within the timeout, the
    // whole would take seconds.
    let client = tls("trickle-client");
    let (took, err) = serve(tls("trickle"), move |mut s| {
        let hello = client_hello(&client);
        assert!(hello.len() > 100);
        for b in hello {
            if s.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(
        took < BUDGET * 2,
        "the deadline bounds the whole handshake: {took:?}"
    );
}

#[test]
fn a_source_gives_up_on_a_silent_destination() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        std::thread::sleep(BUDGET * 3);
        drop(s);
    });
    let t = tls("silent-destination").handshake_timeout(BUDGET);
    let start = Instant::now();
    let err = match t.client(TcpStream::connect(addr).unwrap()) {
        Ok(_) => panic!("the handshake succeeded"),
        Err(e) => e,
    };
    let took = start.elapsed();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(
        err.to_string()
            .contains("no TLS handshake with the destination within"),
        "{err}"
    );
    assert!(took >= BUDGET && took < BUDGET * 2, "{took:?}");
    hold.join().unwrap();
}

/// A Hello frame's first bytes, as a source without TLS sends them.
const PLAIN_HELLO: &[u8] = b"IOVT\x03\x00\x01\x00\x10\x00\x00\x00";

#[test]
fn a_plain_source_is_told_it_needs_tls() {
    let (_, err) = serve(tls("plain-source"), |mut s| {
        let _ = s.write_all(PLAIN_HELLO);
        let _ = std::io::Read::read(&mut s, &mut [0u8; 64]);
    });
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    assert_eq!(
        err.to_string(),
        "plain iovatrack Hello on a TLS receiver: the source needs --tls-*"
    );
}

#[test]
fn a_plain_destination_is_told_apart_from_a_broken_link() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // A receiver without TLS: it reads the ClientHello as a frame header, answers with an
    // Abort frame and closes.
    let plain = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = std::io::Read::read(&mut s, &mut [0u8; 20]);
        let _ = s.write_all(PLAIN_HELLO);
    });
    let t = tls("plain-destination").handshake_timeout(Duration::from_secs(5));
    let err = match t.client(TcpStream::connect(addr).unwrap()) {
        Ok(_) => panic!("the handshake succeeded"),
        Err(e) => e,
    };
    plain.join().unwrap();
    assert!(
        err.to_string()
            .starts_with("the destination does not speak TLS (is it running without --tls-*?)"),
        "{err}"
    );
}

/// The bytes of the ClientHello `t` sends, captured from a connection to a listener that
/// reads them and closes.
fn client_hello(t: &Tls) -> Vec<u8> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = Arc::new(t.clone().handshake_timeout(Duration::from_secs(5)));
    let h = std::thread::spawn(move || {
        let _ = t.client(TcpStream::connect(addr).unwrap());
    });
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut hello = Vec::new();
    let mut buf = [0u8; 4096];
    // The first record: a 5-byte header and its length.
    while hello.len() < 5 || hello.len() < 5 + u16::from_be_bytes([hello[3], hello[4]]) as usize {
        let n = std::io::Read::read(&mut s, &mut buf).unwrap();
        assert!(n > 0, "the client closed before its ClientHello");
        hello.extend_from_slice(&buf[..n]);
    }
    drop(s);
    h.join().unwrap();
    hello
}
