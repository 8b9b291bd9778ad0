//! A session's extra streams: the Streams frame, each stream's Join, and the per-pass
//! barrier that waits for every stream before a pass is acknowledged.

use super::accept::Incoming;
use super::session::{is_disconnect, refuse, MainReader, Session, SessionEnd};
use super::streams::{Joined, StreamMsg};
use super::READ_BUFFER;
use super::{Destination, Refusal};
use crate::migrate::engine::channel::Channel;
use crate::migrate::engine::MigrateError;
use crate::migrate::wire::{
    Frame, FrameReader, FrameWriter, OwnedFrame, StreamState, StreamValidator, WireError,
};
use std::borrow::Cow;
use std::io;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Instant;

/// A session's joined streams, and the main channel's first frame after Hello when it was
/// not a Streams frame (the frame loop takes it first).
type Streams = (Vec<Joined>, Option<OwnedFrame>);

impl Destination {
    /// Read the main channel's first frame after Hello. A Streams frame asking for N > 1
    /// channels has N − 1 more join from `incoming` within the Hello timeout, each with a
    /// Join naming this memory's session id and its own index; anything else that connects
    /// meanwhile is refused and counted, as any stranger.
    pub(super) fn join_streams(
        &mut self,
        r: &mut MainReader,
        s: &mut Session,
        incoming: &mut dyn Incoming,
    ) -> Result<Result<Streams, SessionEnd>, MigrateError> {
        let first = match r.read_frame() {
            Ok(f) => f.into_owned(),
            Err(e) if is_disconnect(&e) => return Ok(Err(SessionEnd::Interrupted(e.to_string()))),
            Err(e) => return Ok(Err(refuse(s, e.into()))),
        };
        let Frame::Streams { count } = first else {
            return Ok(Ok((Vec::new(), Some(first))));
        };
        let v = s.v.as_mut().expect("set by the handshake");
        if let Err(e) = v.validate(&first) {
            return Ok(Err(refuse(s, e.into())));
        }
        let limit = self.limits.max_streams;
        if count > limit {
            return Ok(Err(refuse(s, Refusal::TooManyStreams { count, limit })));
        }
        if count > 1 && !incoming.accepts() {
            return Ok(Err(refuse(s, Refusal::OneChannel { count })));
        }
        let layout = v.layout().clone();
        let deadline = Instant::now() + self.limits.hello_timeout;
        let mut joined: Vec<Option<Joined>> = (1..count).map(|_| None).collect();
        while joined.iter().any(Option::is_none) {
            let Some((peer, opened)) = incoming.next(deadline)? else {
                let missing: Vec<usize> = (1..count as usize)
                    .filter(|i| joined[i - 1].is_none())
                    .collect();
                return Ok(Err(SessionEnd::Interrupted(format!(
                    "stream(s) {missing:?} of {count} did not join within {:?}",
                    self.limits.hello_timeout
                ))));
            };
            let channel = match opened {
                Ok(ch) => ch,
                Err(why) => {
                    self.refuse(&peer, &why, false)?;
                    continue;
                }
            };
            match self.join(channel, &layout, count, &joined) {
                Ok(j) => {
                    let i = j.v.stream() as usize - 1;
                    joined[i] = Some(j);
                }
                Err(why) => self.refuse(&peer, &why, false)?,
            }
        }
        self.report.streams = count;
        Ok(Ok((joined.into_iter().flatten().collect(), None)))
    }

    /// One connection's Join: this memory's session id, an index not taken yet. On a
    /// refusal the peer is told why (best effort).
    fn join(
        &self,
        channel: Box<dyn Channel>,
        layout: &crate::migrate::wire::MemoryLayout,
        count: u32,
        joined: &[Option<Joined>],
    ) -> Result<Joined, Refusal> {
        let tcp = channel
            .tcp()
            .map(std::net::TcpStream::try_clone)
            .transpose()
            .map_err(|e| Refusal::Wire(e.into()))?;
        // The reader goes on with the stream (it may hold its first pages already).
        let mut r = FrameReader::new(io::BufReader::with_capacity(READ_BUFFER, channel));
        let checked = match r.read_frame() {
            Ok(f) => StreamValidator::join(layout.clone(), &f, self.session_id, count)
                .and_then(|v| match joined.get(v.stream() as usize - 1) {
                    Some(Some(_)) => Err(WireError::UnexpectedFrame {
                        frame: f.kind(),
                        state: StreamState::Joined,
                    }),
                    _ => Ok(v),
                })
                .map_err(Refusal::Wire),
            Err(e) => Err(Refusal::Wire(e)),
        };
        let v = match checked {
            Ok(v) => v,
            Err(why) => {
                let _ = FrameWriter::new(r.get_mut().get_mut()).write_frame(&Frame::Abort {
                    reason: Cow::Owned(why.to_string()),
                });
                return Err(why);
            }
        };
        if let Some(t) = &tcp {
            // Joined: as the main channel past Hello.
            let timeouts = t
                .set_read_timeout(Some(self.limits.read_timeout))
                .and_then(|()| t.set_write_timeout(Some(self.limits.read_timeout)));
            timeouts.map_err(|e| Refusal::Wire(e.into()))?;
        }
        Ok(Joined { r, tcp, v })
    }

    /// Before pass `pass`'s PassEnd (or PassCut) is checked: wait until every extra stream
    /// has ended its share of the pass (all its pages written), and add their pages to the
    /// pass's count. `Some` ends the session.
    pub(super) fn barrier(
        &mut self,
        s: &mut Session,
        pass: u32,
    ) -> Result<Option<SessionEnd>, MigrateError> {
        let v = s.v.as_mut().expect("set by the handshake");
        // Only for the pass in progress; anything else fails the frame check next.
        if s.ended.is_empty() || v.state() != StreamState::InPass || v.pass() != pass {
            return Ok(None);
        }
        let Some(rx) = &s.rx else {
            return Ok(None);
        };
        let wait = self.limits.read_timeout;
        let deadline = Instant::now() + wait;
        loop {
            let behind: Vec<usize> = (0..s.ended.len())
                .filter(|&i| s.ended[i].0 <= pass)
                .collect();
            let Some(&first) = behind.first() else {
                return Ok(None);
            };
            if let Some(why) = &s.ended[first].1 {
                return Ok(Some(SessionEnd::Interrupted(format!(
                    "stream {} ended before pass {pass} did: {why}",
                    first + 1
                ))));
            }
            let msg = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    let streams: Vec<usize> = behind.iter().map(|i| i + 1).collect();
                    return Ok(Some(SessionEnd::Interrupted(format!(
                        "pass {pass}: stream(s) {streams:?} did not end it within {wait:?}"
                    ))));
                }
            };
            match msg {
                StreamMsg::PassDone {
                    stream,
                    pass: p,
                    pages,
                } => {
                    s.ended[stream as usize - 1].0 = p.wrapping_add(1);
                    let v = s.v.as_mut().expect("set by the handshake");
                    if let Err(e) = v.add_stream_pages(p, pages) {
                        return Ok(Some(refuse(s, e.into())));
                    }
                }
                StreamMsg::Ended {
                    stream,
                    breach: Some(why),
                    ..
                } => return Ok(Some(refuse(s, Refusal::Stream { stream, why }))),
                StreamMsg::Ended {
                    stream,
                    why,
                    breach: None,
                } => s.ended[stream as usize - 1].1 = Some(why),
                StreamMsg::Local(e) => return Err(e.into()),
            }
        }
    }

    /// After the session: a stream's protocol breach (the session is refused for it) or
    /// the destination's own failure writing its pages, if one happened.
    pub(super) fn stream_failure(&self, s: &mut Session) -> Option<Result<Refusal, MigrateError>> {
        let rx = s.rx.as_ref()?;
        rx.try_iter().find_map(|m| match m {
            StreamMsg::Ended {
                stream,
                breach: Some(why),
                ..
            } => Some(Ok(Refusal::Stream { stream, why })),
            StreamMsg::Local(e) => Some(Err(e.into())),
            _ => None,
        })
    }
}
