//! The buffered writer and frames built in place: the same bytes as the unbuffered
//! writer, written in batches, and nothing written when filling a frame fails.

use super::*;
use proptest::prelude::*;
use std::io::{self, Write};

/// A writer that records each write call's size.
#[derive(Default)]
struct Calls {
    bytes: Vec<u8>,
    writes: Vec<usize>,
}

impl Write for Calls {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes.extend_from_slice(buf);
        self.writes.push(buf.len());
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `frames` through a buffered writer of `batch`, Pages frames built in place.
fn buffered(frames: &[OwnedFrame], batch: usize) -> Calls {
    let mut w = FrameWriter::buffered(Calls::default(), batch);
    for f in frames {
        match f {
            Frame::Pages { gpa, count, data } => {
                w.write_pages_with(*gpa, *count, data.len(), |out| {
                    out.copy_from_slice(data);
                    Ok::<_, WireError>(())
                })
                .unwrap();
            }
            f => {
                w.write_frame(f).unwrap();
            }
        }
    }
    w.flush().unwrap();
    w.into_inner()
}

fn pages(gpa: u64, count: u32, fill: u8) -> OwnedFrame {
    Frame::Pages {
        gpa,
        count,
        data: Cow::Owned(vec![fill; (count as u64 * PAGE) as usize]),
    }
}

proptest! {
    /// Any mix of frames and batch sizes: byte for byte what the unbuffered writer
    /// writes, and no write call of more than one batch plus one frame.
    #[test]
    fn buffered_bytes_equal_unbuffered(
        picks in proptest::collection::vec((0usize..16, 0u32..5, any::<u8>()), 0..40),
        batch in 1usize..40_000,
    ) {
        let all = every_frame();
        let frames: Vec<OwnedFrame> = picks
            .iter()
            .map(|&(i, n, fill)| if i < all.len() { all[i].clone() } else { pages(0x4000, n.max(1), fill) })
            .collect();
        let got = buffered(&frames, batch);
        prop_assert_eq!(&got.bytes, &encode(&frames));
        let largest = frames.iter().map(|f| encode(std::slice::from_ref(f)).len()).max().unwrap_or(0);
        prop_assert!(got.writes.iter().all(|&n| n < batch + largest + 1));
    }
}

#[test]
fn small_frames_go_out_in_batches() {
    let frames: Vec<OwnedFrame> = (0..100).map(|i| pages(i * PAGE, 1, i as u8)).collect();
    let frame_len = encode(&frames[..1]).len();
    let got = buffered(&frames, 64 << 10);
    // 100 frames of 4132 bytes: a write per 16 frames (the 16th reaches the batch), and
    // the rest at flush.
    assert_eq!(
        frame_len,
        HEADER_LEN + PAGES_PREFIX_LEN + PAGE as usize + TRAILER_LEN
    );
    assert_eq!(got.writes.len(), 7, "{:?}", got.writes);
    assert!(got.writes[..6].iter().all(|&n| n == 16 * frame_len));
    // Unbuffered: at least a write per frame (this writer takes one slice per call).
    let mut w = FrameWriter::new(Calls::default());
    for f in &frames {
        w.write_frame(f).unwrap();
    }
    assert!(w.get_ref().writes.len() >= 100);
}

#[test]
fn a_failed_fill_writes_no_frame() {
    let mut w = FrameWriter::buffered(Calls::default(), 1 << 20);
    w.write_frame(&Frame::PassBegin { pass: 0, pages: 2 })
        .unwrap();
    let r = w.write_pages_with(0x1000, 2, 2 * PAGE as usize, |out| {
        out[..5].copy_from_slice(b"stale");
        Err(WireError::Closed)
    });
    assert!(matches!(r, Err(WireError::Closed)));
    assert_eq!(w.next_seq(), 1, "no sequence number used");
    // The next frame takes the failed one's place; the stream decodes whole.
    w.write_pages_with(0x1000, 1, PAGE as usize, |out| {
        out.fill(9);
        Ok::<_, WireError>(())
    })
    .unwrap();
    w.flush().unwrap();
    let frames = decode_all(&w.get_ref().bytes, &Limits::default()).unwrap();
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[1], pages(0x1000, 1, 9));
}

#[test]
fn oversized_frames_are_refused_before_filling() {
    let limits = Limits { max_payload: 64 };
    let mut w = FrameWriter::with_limits(Calls::default(), limits);
    let r = w.write_pages_with(
        0,
        1,
        64 - PAGES_PREFIX_LEN + 1,
        |_| -> Result<(), WireError> { panic!("filled a frame over the limit") },
    );
    assert!(matches!(
        r,
        Err(WireError::FrameTooLarge { len: 65, max: 64 })
    ));
    assert!(w.get_ref().writes.is_empty());
    // Unbuffered, a frame built in place goes out at once, in one write.
    w.write_pages_with(0, 1, 64 - PAGES_PREFIX_LEN, |out| {
        out.fill(1);
        Ok::<_, WireError>(())
    })
    .unwrap();
    assert_eq!(w.get_ref().writes, [HEADER_LEN + 64 + TRAILER_LEN]);
}

#[test]
fn the_send_buffer_is_reused_once_warm() {
    let batch = 8 * PAGE as usize;
    let mut w = FrameWriter::buffered(Calls::default(), batch);
    let run = |w: &mut FrameWriter<Calls>| {
        for i in 0..200u64 {
            let n = (i % 4 + 1) as u32;
            w.write_pages_with(i * PAGE, n, (n as u64 * PAGE) as usize, |out| {
                out.fill(3);
                Ok::<_, WireError>(())
            })
            .unwrap();
        }
        w.flush().unwrap();
    };
    run(&mut w);
    let out = (w.out.as_ptr(), w.out.len());
    // Never more than a batch plus one frame.
    assert!(out.1 < batch + HEADER_LEN + PAGES_PREFIX_LEN + 4 * PAGE as usize + TRAILER_LEN);
    run(&mut w);
    assert_eq!((w.out.as_ptr(), w.out.len()), out);
}
