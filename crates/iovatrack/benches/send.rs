//! The send path: guest pages framed by [`FrameWriter`] into loopback TCP sockets, each
//! drained by a reader thread, against a plain `write` of the same bytes in the same run.
//!
//! Every iteration moves 64 MiB of page data (16,384 pages) from a `GuestMemory` and
//! waits until the readers have received every byte, so a variant is timed end to end.
//! Two shapes: `contiguous` (frames of 256 pages, pass 0 over warm memory) and `scattered`
//! (every other page: frames of one page, a later pass's dirt).
//!
//! * `raw/N` (baseline): the same encoded bytes, prebuilt, written with `write_all` in
//!   1 MiB pieces over N sockets: what loopback TCP carries here.
//! * `bufwriter/1`: the engine's path before issue 10: each page copied out of guest
//!   memory into a frame buffer, `write_pages` through a 1 MiB `BufWriter` (which copies
//!   small frames a second time, and passes large ones through in two writes).
//! * `vectored/1`: the same copy out, then one `writev` of header, pages and CRC per
//!   frame, no `BufWriter`.
//! * `inplace/N`: `FrameWriter::buffered` + `write_pages_with`: pages copied out of guest
//!   memory straight into their frame in the send buffer, one `write` per 1 MiB; N
//!   sockets, one sender thread each, the frames dealt out as the engine does.
//!
//! `cargo bench -p iovatrack --bench send`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use iovatrack::migrate::guest::GuestMemory;
use iovatrack::migrate::wire::{FrameWriter, WireError, HEADER_LEN, PAGES_PREFIX_LEN, TRAILER_LEN};
use std::io::{BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;
const PAGES: u64 = 16_384;
const BATCH: usize = 1 << 20;
const STREAMS: [usize; 3] = [1, 2, 4];
/// Bytes a Pages frame adds to its data.
const FRAMING: usize = HEADER_LEN + PAGES_PREFIX_LEN + TRAILER_LEN;

/// A connected socket whose peer a thread drains, counting the bytes.
struct Conn {
    tx: TcpStream,
    got: Arc<AtomicU64>,
}

impl Conn {
    fn new() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        tx.set_nodelay(true).unwrap();
        let (mut rx, _) = l.accept().unwrap();
        let got = Arc::new(AtomicU64::new(0));
        let g = got.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4 << 20];
            while let Ok(n) = rx.read(&mut buf) {
                if n == 0 {
                    break;
                }
                g.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
        Conn { tx, got }
    }

    /// Wait until the reader has `n` more bytes than at `from`.
    fn drained(&self, from: u64, n: u64) {
        while self.got.load(Ordering::Relaxed) < from + n {
            std::thread::yield_now();
        }
    }
}

/// Guest memory holding the pages, and the runs of one pass (gpa, pages).
struct Setup {
    memory: GuestMemory,
    frames: Vec<(u64, u32)>,
}

impl Setup {
    fn new(scattered: bool) -> Self {
        let span = if scattered { 2 * PAGES } else { PAGES };
        let memory = GuestMemory::new(&[(0, span * PAGE)]).unwrap();
        memory
            .fill_with(0, span * PAGE, |a| {
                a.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
            })
            .unwrap();
        let frames = if scattered {
            (0..PAGES).map(|p| (2 * p * PAGE, 1)).collect()
        } else {
            (0..PAGES / 256).map(|f| (f * 256 * PAGE, 256)).collect()
        };
        Setup { memory, frames }
    }

    fn copy_out(&self, gpa: u64, count: u32, buf: &mut [u8]) {
        for (i, page) in buf.chunks_exact_mut(PAGE as usize).enumerate() {
            self.memory.read_page(gpa + i as u64 * PAGE, page).unwrap();
        }
        debug_assert_eq!(buf.len(), count as usize * PAGE as usize);
    }

    /// The frames as one stream's bytes, to write raw.
    fn encoded(&self) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new());
        self.write_frames(&mut w, &mut vec![0u8; 256 * PAGE as usize]);
        w.into_inner()
    }

    /// Every frame written by `w`, its pages copied out into `buf` first (the copy the
    /// in-place path saves), then flushed.
    fn write_frames<W: Write>(&self, w: &mut FrameWriter<W>, buf: &mut [u8]) {
        for &(gpa, n) in &self.frames {
            let b = &mut buf[..n as usize * PAGE as usize];
            self.copy_out(gpa, n, b);
            w.write_pages(gpa, n, b).unwrap();
        }
        w.flush().unwrap();
    }
}

/// Runs `send(stream index, its socket)` on `n` threads (each returns the bytes it sent)
/// and waits until every byte is drained.
fn timed(conns: &[Conn], n: usize, send: impl Fn(usize, &TcpStream) -> u64 + Sync) -> Duration {
    let before: Vec<u64> = conns[..n]
        .iter()
        .map(|c| c.got.load(Ordering::Relaxed))
        .collect();
    let start = Instant::now();
    let sent: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = conns[..n]
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let send = &send;
                s.spawn(move || send(i, &c.tx))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((c, from), n) in conns.iter().zip(before).zip(sent) {
        c.drained(from, n);
    }
    start.elapsed()
}

fn bench_shape(c: &mut Criterion, conns: &[Conn], scattered: bool) {
    let setup = Setup::new(scattered);
    let encoded = setup.encoded();
    let name = if scattered { "scattered" } else { "contiguous" };
    let mut g = c.benchmark_group(format!("send_{name}"));
    g.throughput(Throughput::Bytes(PAGES * PAGE));

    for &n in &STREAMS {
        // The stream's bytes dealt out in whole 1 MiB pieces: the same total.
        g.bench_function(BenchmarkId::new("raw", n), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        timed(conns, n, |i, mut s| {
                            let mut sent = 0;
                            for piece in encoded.chunks(BATCH).skip(i).step_by(n) {
                                s.write_all(piece).unwrap();
                                sent += piece.len() as u64;
                            }
                            sent
                        })
                    })
                    .sum()
            })
        });
    }

    // One stream, pages copied out into a scratch buffer first: frames gathered by a
    // `BufWriter`, and each frame in one vectored write.
    let scratch = Mutex::new(vec![0u8; 256 * PAGE as usize]);
    let bw = Mutex::new(FrameWriter::new(BufWriter::with_capacity(
        BATCH,
        &conns[0].tx,
    )));
    g.bench_function(BenchmarkId::new("bufwriter", 1), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    timed(conns, 1, |_, _| {
                        setup.write_frames(&mut bw.lock().unwrap(), &mut scratch.lock().unwrap());
                        encoded.len() as u64
                    })
                })
                .sum()
        })
    });
    let vw = Mutex::new(FrameWriter::new(&conns[0].tx));
    g.bench_function(BenchmarkId::new("vectored", 1), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    timed(conns, 1, |_, _| {
                        setup.write_frames(&mut vw.lock().unwrap(), &mut scratch.lock().unwrap());
                        encoded.len() as u64
                    })
                })
                .sum()
        })
    });

    for &n in &STREAMS {
        // One warm writer per stream, kept across iterations as the engine keeps them.
        let writers: Vec<Mutex<FrameWriter<&TcpStream>>> = conns[..n]
            .iter()
            .map(|c| Mutex::new(FrameWriter::buffered(&c.tx, BATCH)))
            .collect();
        g.bench_function(BenchmarkId::new("inplace", n), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        // Frames dealt out as the engine deals them: whoever is free
                        // takes the next.
                        let next = AtomicUsize::new(0);
                        timed(conns, n, |i, _| {
                            let mut w = writers[i].lock().unwrap();
                            let mut sent = 0u64;
                            loop {
                                let k = next.fetch_add(1, Ordering::Relaxed);
                                let Some(&(gpa, n)) = setup.frames.get(k) else {
                                    break;
                                };
                                let len = n as usize * PAGE as usize;
                                w.write_pages_with(gpa, n, len, |d| {
                                    setup.copy_out(gpa, n, d);
                                    Ok::<_, WireError>(())
                                })
                                .unwrap();
                                sent += (FRAMING + len) as u64;
                            }
                            w.flush().unwrap();
                            sent
                        })
                    })
                    .sum()
            })
        });
    }
    g.finish();
}

fn bench_send(c: &mut Criterion) {
    let conns: Vec<Conn> = (0..*STREAMS.iter().max().unwrap())
        .map(|_| Conn::new())
        .collect();
    bench_shape(c, &conns, false);
    bench_shape(c, &conns, true);
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_send
}
criterion_main!(benches);
