//! The migration wire protocol: framed, versioned, checksummed frames from source to
//! destination (and acknowledgements back) over any byte stream, usually TCP.
//!
//! Every frame is, little-endian:
//!
//! ```text
//! magic "IOVT" | version u16 | type u16 | payload length u32 | sequence u64 | payload | CRC-32C u32
//! ```
//!
//! The CRC-32C (Castagnoli) covers header and payload, so any single corrupted byte (indeed
//! any burst up to 32 bits) is detected. Each direction numbers its frames from 0, strictly
//! by one. Lengths are bounded by [`Limits`] and checked before anything is allocated.
//!
//! [`FrameWriter`] and [`FrameReader`] move whole frames and reuse their buffers: once warmed
//! up, neither allocates per [`Frame::Pages`] frame, and page data is copied neither on
//! write (it goes straight from the caller's slice, or a buffered writer has the caller
//! copy it into its frame in place) nor on read (the frame borrows the reader's buffer).
//! [`Validator`] is the destination's check of what the source sends on the main channel:
//! layout, page runs inside one guest region, pass bookkeeping and frame order;
//! [`StreamValidator`] checks each extra channel of a session of several streams.
//!
//! Any error leaves the stream at an unknown position: the connection must be dropped.
//!
//! One concept a file, all re-exported here: `frame` (what a frame holds), `header` (the
//! fixed header, its constants and [`Limits`]), `body` (fixed-size bodies), `le` (the
//! little-endian cursor, shared with the saved vCPU state), `crc`, `codec` (payloads and
//! [`decode_all`]), `writer`, `reader`, `error`, and `validator` (the destination's
//! [`MemoryLayout`] and [`Validator`]).

mod body;
mod codec;
mod crc;
mod error;
mod frame;
mod header;
pub(crate) mod le;
mod reader;
mod validator;
mod writer;

#[cfg(test)]
mod tests;

pub use codec::decode_all;
pub use crc::crc32c;
pub use error::{LayoutDiff, LayoutProblem, Malformation, WireError};
pub use frame::{Frame, FrameKind, OwnedFrame};
pub use header::{
    Limits, DEFAULT_MAX_PAYLOAD, HEADER_LEN, MAGIC, PAGES_PREFIX_LEN, PROTOCOL_VERSION, TRAILER_LEN,
};
pub use reader::FrameReader;
pub use validator::{
    MemoryLayout, PagesTarget, StreamState, StreamStep, StreamValidator, Validator,
};
pub use writer::FrameWriter;
