//! The fuzz input as the peer's sessions.
//!
//! Raw inputs (first byte with [`RAW`] set) are the peer's bytes, session by session,
//! optionally with CRCs and sequence numbers repaired so mutations get past the checksum.
//! Structured inputs are decoded into frames of every kind with fuzzed fields, encoded by
//! the real [`FrameWriter`]: mostly a valid Hello first, then frames whose "auto" fields
//! follow the protocol (the next pass number, the pages a pass carried, the memory's real
//! hashes) so the stream gets deep, and whose other fields are whatever the fuzzer chose;
//! now and then a flipped byte, a cut, raw bytes or a sequence gap.

use crate::fixture::{self, DEVICES, PAGE, RAW, RAW_FIX_CRC, RAW_FIX_SEQ, REGIONS, SEPARATOR};
use crate::receiver::model::Model;
use crate::receiver::peer::Link;
use iovatrack::migrate::guest::hash_page_bytes;
use iovatrack::migrate::wire::{crc32c, Frame, FrameWriter, HEADER_LEN, TRAILER_LEN};
use iovatrack::range::IovaRange;
use libfuzzer_sys::arbitrary::Unstructured;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Frames one structured session may hold (bounds the work per input).
const MAX_OPS: usize = 48;

/// Where the input is.
pub enum Input<'a> {
    /// Raw sessions and their link behaviour.
    Raw {
        sessions: Vec<&'a [u8]>,
        fix_crc: bool,
        fix_seq: bool,
        link: Link,
    },
    /// Structured: sessions are decoded one at a time, as the destination's memory then
    /// is (a Verify with "auto" hashes needs it).
    Structured(Unstructured<'a>),
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        let Some((&mode, rest)) = data.split_first() else {
            return Input::Structured(Unstructured::new(&[]));
        };
        if mode & RAW == 0 {
            return Input::Structured(Unstructured::new(rest));
        }
        let mut sessions = Vec::new();
        let mut rest = rest;
        while sessions.len() < fixture::MAX_SESSIONS {
            match find(rest, SEPARATOR) {
                Some(at) => {
                    sessions.push(&rest[..at]);
                    rest = &rest[at + SEPARATOR.len()..];
                }
                None => {
                    sessions.push(rest);
                    break;
                }
            }
        }
        // Bits 2..=4: the destination's writes fail from that frame on (0: never).
        let fail = (mode >> 2) & 7;
        Input::Raw {
            sessions,
            fix_crc: mode & RAW_FIX_CRC != 0,
            fix_seq: mode & RAW_FIX_SEQ != 0,
            link: Link {
                fail_writes_from: (fail != 0).then(|| u32::from(fail - 1)),
                reset_at_end: mode & 0x20 != 0,
            },
        }
    }

    /// The next session's bytes and link, given the destination as the model sees it
    /// now; `None` when the input has no more sessions.
    pub fn next_session(&mut self, index: usize, model: &Model) -> Option<(Vec<u8>, Link)> {
        if index >= fixture::MAX_SESSIONS {
            return None;
        }
        match self {
            Input::Raw {
                sessions,
                fix_crc,
                fix_seq,
                link,
            } => {
                let mut bytes = sessions.get(index)?.to_vec();
                if *fix_crc || *fix_seq {
                    fix_frames(&mut bytes, *fix_crc, *fix_seq);
                }
                Some((bytes, *link))
            }
            Input::Structured(u) => {
                if u.is_empty() {
                    return None;
                }
                Some(structured(u, model))
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Walks frames by their length field, renumbering them from 0 and/or writing a correct
/// CRC into each trailer (as the `wire` target does).
pub fn fix_frames(bytes: &mut [u8], crc: bool, seq: bool) {
    let mut at = 0usize;
    let mut n = 0u64;
    while at + HEADER_LEN <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
        let Some(end) = at.checked_add(HEADER_LEN + len) else {
            return;
        };
        if end + TRAILER_LEN > bytes.len() {
            return;
        }
        if seq {
            bytes[at + 12..at + 20].copy_from_slice(&n.to_le_bytes());
        }
        if crc {
            let c = crc32c(&bytes[at..end]);
            bytes[end..end + TRAILER_LEN].copy_from_slice(&c.to_le_bytes());
        }
        n += 1;
        at = end + TRAILER_LEN;
    }
}

/// What the generator believes the stream's state is, to fill in "auto" fields.
#[derive(Default)]
struct Gen {
    next_pass: u32,
    in_pass: bool,
    /// Pages sent in the open pass, and in all closed passes.
    pass_pages: u64,
    total_pages: u64,
    /// Pages this session wrote, over the memory as it was.
    written: BTreeMap<u64, Vec<u8>>,
}

/// A number that is right most of the time, or whatever the fuzzer says.
fn auto(u: &mut Unstructured, right: u64) -> u64 {
    match u.int_in_range(0u8..=7).unwrap_or(0) {
        0 => u.arbitrary::<u64>().unwrap_or(0),
        1 => right.wrapping_add(1),
        2 => right.wrapping_sub(1),
        _ => right,
    }
}

/// The contents of page `gpa` written with `fill` (the address in it, so pages differ).
fn page_data(gpa: u64, fill: u8) -> Vec<u8> {
    run_data(gpa, 1, fill)
}

/// `count` pages from `gpa` as [`page_data`] makes them, built with bulk copies: a loop
/// a byte is instrumented per iteration and made this generator the target's bottleneck.
fn run_data(gpa: u64, count: u32, fill: u8) -> Vec<u8> {
    let mut d = vec![fill; count as usize * PAGE as usize];
    for (i, p) in d.chunks_exact_mut(PAGE as usize).enumerate() {
        p[..8].copy_from_slice(&gpa.wrapping_add(i as u64 * PAGE).to_le_bytes());
    }
    d
}

/// A page address: mostly inside a region, sometimes just past one, or anything.
fn gpa(u: &mut Unstructured) -> u64 {
    let pick = u.int_in_range(0u8..=15).unwrap_or(0);
    if pick == 15 {
        return u.arbitrary::<u64>().unwrap_or(0);
    }
    let (base, len) = REGIONS[pick as usize % REGIONS.len()];
    let pages = len / PAGE;
    base + u.int_in_range(0..=pages).unwrap_or(0) * PAGE
}

/// One structured session.
fn structured(u: &mut Unstructured, model: &Model) -> (Vec<u8>, Link) {
    let head = u.arbitrary::<u8>().unwrap_or(0);
    let link = Link {
        fail_writes_from: (head & 0x07 == 0x07).then(|| u32::from(head >> 5)),
        reset_at_end: head & 0x08 != 0,
    };
    let mut out = Vec::new();
    let mut w = FrameWriter::new(Vec::new());
    let mut g = Gen::default();
    // Mostly the right Hello first; else a wrong one, another frame, or none.
    let layout = fixture::layout();
    match u.int_in_range(0u8..=31).unwrap_or(0) {
        0 => {}
        1 => hello_variant(u, &mut w),
        _ => {
            let _ = w.write_frame(&layout.hello());
        }
    }
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        let op = u.int_in_range(0u8..=19).unwrap_or(0);
        if !frame_op(u, op, &mut w, &mut g, model) {
            // A byte-level op: take what is written so far and edit it.
            out.append(w.get_mut());
            match op {
                16 => {
                    // Flip one byte of what was sent.
                    if !out.is_empty() {
                        let at = u.int_in_range(0..=out.len() - 1).unwrap_or(0);
                        out[at] ^= u.int_in_range(1u8..=255).unwrap_or(1);
                    }
                }
                17 => {
                    // Cut the stream (the peer stops mid-frame or between frames).
                    let cut = u.int_in_range(0..=out.len().min(64)).unwrap_or(0);
                    out.truncate(out.len() - cut);
                    break;
                }
                18 => {
                    let n = u.int_in_range(0usize..=48).unwrap_or(0);
                    out.extend_from_slice(u.bytes(n).unwrap_or(&[]));
                }
                _ => {
                    // A sequence gap: a frame the destination never sees.
                    let _ = w.write_frame(&Frame::Commit);
                    w.get_mut().clear();
                }
            }
        }
    }
    out.append(w.get_mut());
    (out, link)
}

/// A Hello that differs from the destination's layout in one field.
fn hello_variant(u: &mut Unstructured, w: &mut FrameWriter<Vec<u8>>) {
    let layout = fixture::layout();
    let mut regions: Vec<IovaRange> = layout.regions().to_vec();
    let mut version = iovatrack::migrate::wire::PROTOCOL_VERSION;
    let mut page_size = PAGE;
    let mut kind = fixture::GUEST_KIND.to_string();
    let mut total = layout.total_pages();
    match u.int_in_range(0u8..=5).unwrap_or(0) {
        0 => version = u.arbitrary().unwrap_or(1),
        1 => page_size = u.arbitrary().unwrap_or(0),
        2 => kind = "kvm".into(),
        3 => {
            regions.pop();
        }
        4 => {
            let i = u.int_in_range(0..=regions.len() - 1).unwrap_or(0);
            regions[i].length = u.arbitrary().unwrap_or(0);
        }
        _ => total = u.arbitrary().unwrap_or(0),
    }
    let _ = w.write_frame(&Frame::Hello {
        version,
        guest_kind: Cow::Owned(kind),
        page_size,
        regions: Cow::Owned(regions),
        total_pages: total,
    });
}

/// Writes the frame(s) of `op`; false for the byte-level ops (16 and up).
fn frame_op(
    u: &mut Unstructured,
    op: u8,
    w: &mut FrameWriter<Vec<u8>>,
    g: &mut Gen,
    model: &Model,
) -> bool {
    let mut put = |f: &Frame<'_>| {
        let _ = w.write_frame(f);
    };
    match op {
        0..=3 => {
            // A whole pass, right but for what the fuzzer changes.
            let runs = u.int_in_range(0usize..=4).unwrap_or(0);
            let mut frames = Vec::new();
            let mut pages = 0u64;
            for _ in 0..runs {
                let at = gpa(u);
                let count = u.int_in_range(1u32..=3).unwrap_or(1);
                let fill = u.arbitrary::<u8>().unwrap_or(0);
                let data = run_data(at, count, fill);
                for i in 0..u64::from(count) {
                    let p = at.wrapping_add(i * PAGE);
                    g.written.insert(p, page_data(p, fill));
                }
                pages += u64::from(count);
                frames.push((at, count, data));
            }
            let pass = auto(u, u64::from(g.next_pass)) as u32;
            let announced = auto(u, pages);
            put(&Frame::PassBegin {
                pass,
                pages: announced,
            });
            for (at, count, data) in &frames {
                put(&Frame::Pages {
                    gpa: *at,
                    count: *count,
                    data: Cow::Borrowed(data),
                });
            }
            let sent = auto(u, pages);
            if u.ratio(1u8, 8).unwrap_or(false) {
                put(&Frame::PassCut {
                    pass,
                    pages_sent: sent,
                });
            } else {
                put(&Frame::PassEnd {
                    pass,
                    pages_sent: sent,
                });
            }
            g.next_pass = g.next_pass.wrapping_add(1);
            g.total_pages += pages;
        }
        4 => {
            let pass = auto(u, u64::from(g.next_pass)) as u32;
            let pages = u.int_in_range(0u64..=8).unwrap_or(0);
            put(&Frame::PassBegin { pass, pages });
            g.in_pass = true;
            g.pass_pages = 0;
        }
        5 => {
            // One run of pages, of any shape.
            let at = gpa(u);
            let count = u.int_in_range(0u32..=4).unwrap_or(0);
            let fill = u.arbitrary::<u8>().unwrap_or(0);
            let exact = count as usize * PAGE as usize;
            let len = if u.ratio(1u8, 8).unwrap_or(false) {
                u.int_in_range(0..=exact + 16).unwrap_or(0)
            } else {
                exact
            };
            let mut data = run_data(at, count, fill);
            data.resize(len, fill);
            if len == exact {
                for i in 0..u64::from(count) {
                    let p = at.wrapping_add(i * PAGE);
                    g.written.insert(p, page_data(p, fill));
                }
            }
            put(&Frame::Pages {
                gpa: at,
                count,
                data: Cow::Owned(data),
            });
            g.pass_pages += u64::from(count);
        }
        6 | 7 => {
            let pass = auto(u, u64::from(g.next_pass)) as u32;
            let sent = auto(u, g.pass_pages);
            if op == 6 {
                put(&Frame::PassEnd {
                    pass,
                    pages_sent: sent,
                });
            } else {
                put(&Frame::PassCut {
                    pass,
                    pages_sent: sent,
                });
            }
            g.next_pass = g.next_pass.wrapping_add(1);
            g.total_pages += g.pass_pages;
            g.in_pass = false;
        }
        8 | 9 => {
            let name = match u.int_in_range(0u8..=7).unwrap_or(0) {
                0 => Cow::Owned(String::from_utf8_lossy(u.bytes(4).unwrap_or(&[])).into()),
                k => Cow::Borrowed(DEVICES[k as usize % DEVICES.len()]),
            };
            let len = u.int_in_range(0usize..=2200).unwrap_or(0);
            let fill = u.arbitrary::<u8>().unwrap_or(0);
            let bytes = if u.ratio(3u8, 4).unwrap_or(true) {
                // A record as the device streams it: its length, then the state.
                let mut b = (len as u64).to_le_bytes().to_vec();
                b.resize(8 + len, fill);
                b
            } else {
                vec![fill; len]
            };
            put(&Frame::DeviceState {
                name,
                bytes: Cow::Owned(bytes),
            });
        }
        10 => {
            let index = u.int_in_range(0u32..=3).unwrap_or(0);
            let len = u.int_in_range(0usize..=1100).unwrap_or(0);
            let fill = u.arbitrary::<u8>().unwrap_or(0);
            put(&Frame::VcpuState {
                index,
                bytes: Cow::Owned(vec![fill; len]),
            });
        }
        11 => put(&Frame::Complete {
            total_pages: auto(u, g.total_pages),
            digest: u.arbitrary().unwrap_or(0),
        }),
        12 => {
            // Mostly the hashes of the memory as this session leaves it.
            let mut h = model_hashes(model, &g.written);
            match u.int_in_range(0u8..=7).unwrap_or(0) {
                0 => {
                    let i = u.int_in_range(0..=h.len() - 1).unwrap_or(0);
                    h[i] ^= 1;
                }
                1 => h.truncate(REGIONS.len()),
                2 => {
                    let n = u.int_in_range(0usize..=40).unwrap_or(0);
                    h = (0..n as u64).collect();
                }
                _ => {}
            }
            put(&Frame::Verify {
                digest: u.arbitrary().unwrap_or(0),
                region_hashes: Cow::Owned(h),
            });
        }
        13 => put(&Frame::Commit),
        14 => put(&Frame::Abort {
            reason: Cow::Borrowed("fuzz"),
        }),
        15 => match u.int_in_range(0u8..=4).unwrap_or(0) {
            0 => put(&Frame::HelloAck {
                session: u.arbitrary().unwrap_or(0),
            }),
            1 => put(&Frame::Ack { pass: 0 }),
            2 => put(&Frame::VerifyResult {
                ok: true,
                digest: 0,
                device_digest: 0,
                mismatched_regions: Cow::Borrowed(&[]),
            }),
            3 => put(&Frame::CommitAck),
            _ => put(&fixture::layout().hello()),
        },
        _ => return false,
    }
    true
}

/// The destination's page hashes once this session's pages are written.
fn model_hashes(model: &Model, written: &BTreeMap<u64, Vec<u8>>) -> Vec<u64> {
    let mut h = model.hashes();
    let mut i = 0;
    for &(a, n) in &REGIONS {
        for p in 0..n / PAGE {
            if let Some(d) = written.get(&(a + p * PAGE)) {
                h[i] = hash_page_bytes(d);
            }
            i += 1;
        }
    }
    h
}
