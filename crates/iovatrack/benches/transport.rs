//! What TLS costs the link: 1 MiB `Pages` frames pushed through a loopback TCP
//! connection, plain and TLS 1.3 (rustls, ring, mutual authentication), in the same run.
//!
//! * `pages_1mib/tcp` (baseline) and `pages_1mib/tls`: the source's `FrameWriter` over a
//!   1 MiB `BufWriter` (as the engine writes) sends one frame and flushes; a receiver
//!   thread reads and checks every frame (`FrameReader` over a 1 MiB `BufReader`, as the
//!   destination reads). Throughput is the page data per frame; both ends run at once, on
//!   the machine's two cores.
//! * `pages_1mib_cpu/tcp` and `pages_1mib_cpu/tls`: the same, timed in CPU time of the
//!   process (both ends), the cost a loaded machine disturbs least.
//! * `handshake/tcp` and `handshake/tls`: connect, accept, and each transport's
//!   `client`/`server` (for TLS: the whole mutual handshake and the destination's
//!   confirmation), per connection.
//!
//! Certificates (a CA, one host certificate for both ends) are made with rcgen in a
//! temporary directory. `cargo bench -p iovatrack --bench transport`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use iovatrack::migrate::engine::{Channel, PlainTcp, Tls, Transport};
use iovatrack::migrate::wire::{Frame, FrameReader, FrameWriter, WireError};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose as Eku, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use std::hint::black_box;
use std::io::{BufReader, BufWriter};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const PAGE: usize = 4096;
const PAGES: u32 = 256;
const BYTES: usize = PAGES as usize * PAGE;

/// A CA and a host certificate for 127.0.0.1, as PEM files in a fresh directory.
fn certificates() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("iovatrack-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "bench CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut host = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    host.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
    let cert = host.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("host.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("host-key.pem"), key.serialize_pem()).unwrap();
    dir
}

/// A connected pair over `t`: the source's channel, and the destination's receiving
/// thread (which reads frames until the source closes, and returns the pages it saw).
fn connect(t: Arc<dyn Transport>) -> (Box<dyn Channel>, JoinHandle<u64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = t.clone();
    let rx = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let ch = server.server(tcp).unwrap();
        let mut r = FrameReader::new(BufReader::with_capacity(1 << 20, ch));
        let mut pages = 0u64;
        loop {
            match r.read_frame() {
                Ok(Frame::Pages { data, .. }) => pages += (data.len() / PAGE) as u64,
                Ok(f) => panic!("unexpected {:?}", f.kind()),
                // The source closed (TLS without close_notify ends in an I/O error).
                Err(WireError::Closed | WireError::Io(_)) => return pages,
                Err(e) => panic!("{e}"),
            }
        }
    });
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    (t.client(tcp).unwrap(), rx)
}

fn page_data() -> Vec<u8> {
    (0..BYTES as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect()
}

fn transports() -> Vec<(&'static str, Arc<dyn Transport>)> {
    let dir = certificates();
    let tls = Tls::from_pem_files(
        dir.join("host.pem"),
        dir.join("host-key.pem"),
        dir.join("ca.pem"),
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    vec![("tcp", Arc::new(PlainTcp)), ("tls", Arc::new(tls))]
}

/// CPU time of the whole process (both ends of the connection), which another load on
/// the machine disturbs far less than wall time.
fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn bench_pages(c: &mut Criterion) {
    let data = page_data();
    for (name, t) in transports() {
        let (ch, rx) = connect(t);
        let mut w = FrameWriter::new(BufWriter::with_capacity(1 << 20, ch));
        let mut gpa = 0u64;
        let mut push = || {
            w.write_pages(gpa, PAGES, black_box(&data)).unwrap();
            w.flush().unwrap();
            gpa = (gpa + BYTES as u64) % (1 << 30);
        };
        let mut g = c.benchmark_group("pages_1mib");
        g.throughput(Throughput::Bytes(BYTES as u64));
        g.bench_function(name, |b| b.iter(&mut push));
        g.finish();
        // The same frames, timed in CPU seconds of both ends together.
        let mut g = c.benchmark_group("pages_1mib_cpu");
        g.throughput(Throughput::Bytes(BYTES as u64));
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = cpu_now();
                for _ in 0..iters {
                    push();
                }
                cpu_now() - start
            })
        });
        g.finish();
        drop(w);
        let pages = rx.join().unwrap();
        assert!(pages > 0, "{name}: nothing arrived");
    }
}

fn bench_handshake(c: &mut Criterion) {
    let mut g = c.benchmark_group("handshake");
    for (name, t) in transports() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = t.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        // Serves every connection until told to stop (by one more connection).
        let rx = std::thread::spawn(move || {
            for tcp in listener.incoming() {
                if stopped.load(SeqCst) {
                    return;
                }
                black_box(server.server(tcp.unwrap()).unwrap());
            }
        });
        g.bench_function(name, |b| {
            b.iter(|| {
                let tcp = TcpStream::connect(addr).unwrap();
                black_box(t.client(tcp).unwrap());
            })
        });
        stop.store(true, SeqCst);
        drop(TcpStream::connect(addr).unwrap());
        rx.join().unwrap();
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_pages, bench_handshake
}
criterion_main!(benches);
