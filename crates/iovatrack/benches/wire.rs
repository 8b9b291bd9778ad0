//! Wire codec throughput on one 1 MiB `Pages` frame (256 pages of 4 KiB), against a plain
//! memcpy of the same bytes in the same run.
//!
//! * `pages_1mib/memcpy` (baseline): the page data copied once into a reused buffer, the
//!   machine's copy bandwidth at this size.
//! * `pages_1mib/crc32c`: the frame checksum alone over the page data.
//! * `pages_1mib/encode`: `FrameWriter::write_pages` into a reused `Vec`: header, CRC, and
//!   one copy of the data into the `Vec` (the copy a socket write makes in the kernel).
//! * `pages_1mib/decode`: `FrameReader::read_frame` of that frame from memory: one copy
//!   into the reader's reused buffer, CRC, header and prefix parse; the data is borrowed.
//! * `pages_1mib/encode_decode`: both, per frame: the codec's whole cost per frame sent.
//!
//! Throughput is the page data (1 MiB) per iteration. Writer and reader are warm and
//! advance their sequence numbers in lockstep, so nothing is allocated in a timed loop;
//! `encode` and `decode` time only their half (`iter_custom`), doing the other untimed.
//! `cargo bench -p iovatrack --bench wire`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use iovatrack::migrate::wire::{crc32c, Frame, FrameReader, FrameWriter};
use std::hint::black_box;
use std::io::Cursor;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
const PAGES: u32 = 256;
const BYTES: usize = PAGES as usize * PAGE;

/// A writer and a reader joined by swapping their buffers, both warm.
struct Pipe {
    w: FrameWriter<Vec<u8>>,
    r: FrameReader<Cursor<Vec<u8>>>,
}

impl Pipe {
    fn new() -> Self {
        Self {
            w: FrameWriter::new(Vec::with_capacity(BYTES + 64)),
            r: FrameReader::new(Cursor::new(Vec::with_capacity(BYTES + 64))),
        }
    }

    fn encode(&mut self, data: &[u8]) {
        self.w.get_mut().clear();
        self.w.write_pages(0x1_0000_0000, PAGES, data).unwrap();
    }

    /// Decodes what `encode` wrote; returns the page bytes seen so the work is used.
    fn decode(&mut self) -> usize {
        std::mem::swap(self.w.get_mut(), self.r.get_mut().get_mut());
        self.r.get_mut().set_position(0);
        match self.r.read_frame().unwrap() {
            Frame::Pages { data, .. } => data.len(),
            f => panic!("decoded {:?}", f.kind()),
        }
    }
}

fn page_data() -> Vec<u8> {
    // Any contents will do (CRC and copies are data-independent); not zeros, so no page
    // is shared with the zero page.
    (0..BYTES as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect()
}

fn bench_pages(c: &mut Criterion) {
    let data = page_data();
    let mut g = c.benchmark_group("pages_1mib");
    g.throughput(Throughput::Bytes(BYTES as u64));

    let mut dst = vec![0u8; BYTES];
    g.bench_function("memcpy", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&data));
            black_box(&mut dst);
        })
    });

    g.bench_function("crc32c", |b| b.iter(|| crc32c(black_box(&data))));

    let mut pipe = Pipe::new();
    g.bench_function("encode", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                pipe.encode(black_box(&data));
                t += start.elapsed();
                black_box(pipe.decode());
            }
            t
        })
    });

    let mut pipe = Pipe::new();
    g.bench_function("decode", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                pipe.encode(&data);
                let start = Instant::now();
                black_box(pipe.decode());
                t += start.elapsed();
            }
            t
        })
    });

    let mut pipe = Pipe::new();
    g.bench_function("encode_decode", |b| {
        b.iter(|| {
            pipe.encode(black_box(&data));
            black_box(pipe.decode())
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_pages
}
criterion_main!(benches);
