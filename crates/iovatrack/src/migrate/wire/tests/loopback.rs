//! A whole migration's frames over a loopback TCP connection.

use super::*;
use std::net::{TcpListener, TcpStream};

/// Deterministic page contents, so the receiver can check every byte.
fn fill_page(gpa: u64, pass: u32, out: &mut [u8]) {
    let seed = gpa ^ (u64::from(pass) << 56);
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64).to_le_bytes());
    }
}

#[test]
fn loopback_tcp_stream_of_pages() {
    const FRAMES: u32 = 3000;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();

    let dest = std::thread::spawn(move || -> Result<(u64, u32), WireError> {
        let (sock, _) = listener.accept()?;
        let mut reader = FrameReader::new(std::io::BufReader::new(sock.try_clone()?));
        let mut writer = FrameWriter::new(sock);
        let mut v = Validator::new(layout());
        let mut expect = vec![0u8; 4 * PAGE as usize];
        let mut frames = 0u32;
        let mut pass = 0;
        loop {
            let frame = reader.read_frame()?;
            let target = v.validate(&frame)?;
            match &frame {
                Frame::Hello { .. } => {
                    writer.write_frame(&Frame::HelloAck { session: 42 })?;
                }
                Frame::PassBegin { pass: p, .. } => pass = *p,
                Frame::Pages { gpa, count, data } => {
                    assert!(target.is_some());
                    for k in 0..u64::from(*count) {
                        let page = &mut expect[..PAGE as usize];
                        fill_page(gpa + k * PAGE, pass, page);
                        let at = (k * PAGE) as usize;
                        assert_eq!(&data[at..at + PAGE as usize], &page[..]);
                    }
                    frames += 1;
                }
                Frame::PassEnd { pass, .. } => {
                    writer.write_frame(&Frame::Ack { pass: *pass })?;
                }
                Frame::Complete { .. } => {
                    writer.write_frame(&Frame::VerifyResult {
                        ok: true,
                        digest: 0,
                        device_digest: 0,
                        mismatched_regions: Cow::Borrowed(&[]),
                    })?;
                    return Ok((v.pages_received(), frames));
                }
                _ => {}
            }
        }
    });

    let sock = TcpStream::connect(addr).unwrap();
    let mut reader = FrameReader::new(sock.try_clone().unwrap());
    let mut writer = FrameWriter::new(sock);
    let l = layout();
    writer.write_frame(&l.hello()).unwrap();
    assert_eq!(
        reader.read_frame().unwrap(),
        Frame::HelloAck { session: 42 }
    );
    let mut data = vec![0u8; 4 * PAGE as usize];
    let mut total = 0u64;
    let passes = 2;
    for pass in 0..passes {
        let n = FRAMES / passes;
        let runs: Vec<(u64, u32)> = (0..n)
            .map(|i| {
                // Alternate between regions 0 and 1, runs of 1–4 pages.
                let base = if i % 2 == 0 { 0 } else { 0x1_0000_0000 };
                (base + u64::from(i) * 8 * PAGE, i % 4 + 1)
            })
            .collect();
        let pages: u64 = runs.iter().map(|r| u64::from(r.1)).sum();
        writer
            .write_frame(&Frame::PassBegin { pass, pages })
            .unwrap();
        for &(gpa, count) in &runs {
            let buf = &mut data[..(u64::from(count) * PAGE) as usize];
            for (k, page) in buf.chunks_exact_mut(PAGE as usize).enumerate() {
                fill_page(gpa + k as u64 * PAGE, pass, page);
            }
            writer.write_pages(gpa, count, buf).unwrap();
        }
        writer
            .write_frame(&Frame::PassEnd {
                pass,
                pages_sent: pages,
            })
            .unwrap();
        // Dirt stays pending until this Ack arrives.
        assert_eq!(reader.read_frame().unwrap(), Frame::Ack { pass });
        total += pages;
    }
    writer
        .write_frame(&Frame::Complete {
            total_pages: total,
            digest: 0,
        })
        .unwrap();
    assert!(matches!(
        reader.read_frame().unwrap(),
        Frame::VerifyResult { ok: true, .. }
    ));
    let (received, frames) = dest.join().unwrap().unwrap();
    assert_eq!(received, total);
    assert_eq!(frames, FRAMES);
}
