//! The destination side: receive into the VMM's guest RAM, restore its devices, verify,
//! and hand the vCPU states back once the source commits.
//!
//! The destination serves one source but must survive everyone else who connects: a
//! connection that sends garbage, a Hello for another guest, more device state than the
//! limits allow, or nothing at all is refused (logged with the peer's address and why,
//! counted in [`DestReport::refused_connections`]) and the destination keeps waiting for
//! its source, within the accept timeout and at most [`DestLimits::max_refused`]
//! refusals. Its memory has a session id ([`Frame::HelloAck`]'s `session`): a refused peer
//! that wrote pages makes the memory untrustworthy, so those pages are zeroed and a new id
//! is chosen, and the source's next attempt starts over with pass 0.
//!
//! [`Frame::HelloAck`]: crate::migrate::wire::Frame::HelloAck

mod accept;
mod join;
mod session;
mod streams;

use super::channel::{Channel, PlainTcp, Transport};
use super::hooks::Verifier;
use super::MigrateError;
use crate::migrate::seams::{DeviceMigration, GuestRam};
use crate::migrate::wire::{Frame, FrameWriter, WireError};
use accept::{Acceptor, Incoming, NoIncoming};
use serde::Serialize;
use std::io::{self, Read};
use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use streams::PageSink;

/// What the destination saw and did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DestReport {
    /// The transport connections arrive over (`tcp`, `tls`).
    pub transport: &'static str,
    /// Sessions that got past Hello (the session budget counts those not refused).
    pub sessions: u32,
    /// Connections refused: garbage, a bad Hello, over a limit, or closed before Hello.
    pub refused_connections: u32,
    /// Why each connection was refused, with the peer's address, in order.
    pub refusals: Vec<String>,
    /// The memory's session id when the last session ended (what HelloAck carried).
    pub session_id: u64,
    /// Times the memory was reset (written pages zeroed, a new session id chosen) because
    /// a refused peer had written pages.
    pub memory_resets: u32,
    /// A session completed, the memory matched, and the source handed the guest over.
    pub verified: bool,
    /// Pages whose hash differed from the source's (for guests too large for a frame of
    /// page hashes, counted page by page in the regions whose hash differed).
    pub mismatched_pages: u64,
    /// The source refused the handover after a good memory verdict, and why (e.g. the
    /// device state received differs from what it sent).
    pub handover_refused: Option<String>,
    /// Pages received more than once within one pass.
    pub duplicate_pages_received: u64,
    /// Pages received over all sessions.
    pub pages_received: u64,
    /// Channels that carried pages in the last session past Hello (the main one and
    /// the streams that joined it).
    pub streams: u32,
    /// The guest ran on after resuming here (set by whoever resumes it).
    pub resumed: bool,
    /// The guest's counter when it resumed here, and a moment later (demo guests).
    pub counter: (u64, u64),
    /// Every device that sent state was restored (RESUMING → RUNNING with its bytes).
    pub device_state_restored: bool,
    /// Devices restored.
    pub devices_restored: u32,
    /// Hash of the restored device state (demo devices).
    pub device_state_digest: u64,
    /// The engine's digest of the device state the last session received (what its
    /// VerifyResult told the source).
    pub received_state_digest: u64,
    /// Why sessions ended early, in order.
    pub interrupted: Vec<String>,
}

/// A completed, verified and committed migration: what the VMM resumes from.
pub struct Received {
    /// What happened.
    pub report: DestReport,
    /// The vCPU states, in vCPU order (resume the guest from these).
    pub vcpu_states: Vec<Vec<u8>>,
}

/// The read buffer under each channel's frame reader. Small on purpose: a Pages frame's
/// payload (up to 1 MiB) then mostly bypasses it, read straight into the frame reader's
/// buffer, where a 1 MiB buffer held most of each payload and copied it once more, out of
/// a buffer too large for the cache: pass 0 of a 4 GiB guest ran at 1.83 GiB/s median with
/// 1 MiB and 2.48 GiB/s with 64 KiB (six alternating runs each, one stream).
pub(super) const READ_BUFFER: usize = 64 << 10;

/// What one session may make the destination hold or do, so a hostile peer cannot run it
/// out of memory or keep it from its source.
#[derive(Clone, Copy, Debug)]
pub struct DestLimits {
    /// Device-state bytes one device may receive in one session.
    pub device_state_bytes: u64,
    /// Device-state bytes all devices together may receive in one session.
    pub session_state_bytes: u64,
    /// vCPU states one session may send.
    pub max_vcpus: u32,
    /// Bytes of one vCPU state.
    pub vcpu_state_bytes: u64,
    /// Connections refused before the destination gives up.
    pub max_refused: u32,
    /// Read timeout once a session is past Hello (a live but slow source, e.g. one
    /// hashing a large guest before Complete, must fit in it).
    pub read_timeout: Duration,
    /// Read timeout for the Hello (a connection that sends nothing must not hold the
    /// destination long), and how long a session's extra streams may take to join.
    pub hello_timeout: Duration,
    /// Channels one session may carry pages over (each extra one is a receiving thread).
    pub max_streams: u32,
}

impl Default for DestLimits {
    fn default() -> Self {
        DestLimits {
            device_state_bytes: 64 << 20,
            session_state_bytes: 256 << 20,
            max_vcpus: 1024,
            vcpu_state_bytes: 1 << 20,
            max_refused: 64,
            read_timeout: Duration::from_secs(60),
            hello_timeout: Duration::from_secs(10),
            max_streams: 32,
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The peer broke the protocol (garbage, bad checksum, wrong Hello, frame order).
    #[error("protocol: {0}")]
    Wire(#[from] WireError),
    /// The connection ended (or went silent) before a Hello.
    #[error("no Hello: {0}")]
    NoHello(WireError),
    /// One device was sent more state than [`DestLimits::device_state_bytes`].
    #[error(
        "device {device:?}: {bytes} bytes of state in this session, over the limit of {limit}"
    )]
    DeviceStateLimit {
        /// The device.
        device: String,
        /// Bytes including the refused frame.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// All devices together were sent more than [`DestLimits::session_state_bytes`].
    #[error("{bytes} bytes of device state in this session, over the limit of {limit}")]
    SessionStateLimit {
        /// Bytes including the refused frame.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The transport refused the peer (a failed TLS handshake: no or an unknown
    /// certificate).
    #[error("{transport} handshake: {error}")]
    Handshake {
        /// The transport.
        transport: &'static str,
        /// What failed.
        error: io::Error,
    },
    /// A TLS ClientHello where this receiver, running plain TCP, expected a Hello: the
    /// source runs TLS and this side does not.
    #[error("a TLS ClientHello on a plain-TCP receiver: start it with --tls-*")]
    TlsClientHello,
    /// A migration into this memory was committed: the guest was handed over and may be
    /// running on it, so no later connection may write to it (nor, refused, zero it).
    #[error("the guest was already handed over (a migration into this memory was committed)")]
    HandedOver,
    /// More vCPU states than [`DestLimits::max_vcpus`].
    #[error("more than {limit} vCPU states")]
    TooManyVcpus {
        /// The limit.
        limit: u32,
    },
    /// More streams than [`DestLimits::max_streams`].
    #[error("{count} streams asked, the limit is {limit}")]
    TooManyStreams {
        /// Streams the source asked for.
        count: u32,
        /// The limit.
        limit: u32,
    },
    /// Several streams on a channel served without a way to accept more
    /// ([`Destination::serve_channel`]).
    #[error("{count} streams asked, but this destination serves one channel")]
    OneChannel {
        /// Streams the source asked for.
        count: u32,
    },
    /// An extra stream broke the protocol while the session went on.
    #[error("stream {stream}: {why}")]
    Stream {
        /// The stream.
        stream: u32,
        /// What it did.
        why: WireError,
    },
    /// A vCPU state over [`DestLimits::vcpu_state_bytes`].
    #[error("vCPU state {index}: {bytes} bytes, over the limit of {limit}")]
    VcpuStateLimit {
        /// vCPU index.
        index: u32,
        /// Its size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
}

/// A random session id (never 0, which a source uses for "none yet").
fn new_session_id() -> u64 {
    let mut b = [0u8; 8];
    let from_os = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    let id = match from_os {
        Ok(()) => u64::from_ne_bytes(b),
        Err(_) => {
            // std seeds each RandomState from the OS at least once per thread, and
            // the clock separates ids of one thread.
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            h.finish()
        }
    };
    id.max(1)
}

/// The destination: receives into `memory` over connections from a listener until one
/// completes (a retry after a dropped or cancelled session continues into the same
/// memory), restores the devices, verifies, and waits for the source's Commit.
pub struct Destination {
    memory: Arc<dyn GuestRam>,
    devices: Vec<Box<dyn DeviceMigration>>,
    verifier: Option<Arc<dyn Verifier>>,
    /// The vCPU kinds this destination can resume (`None`: any).
    vcpu_kinds: Option<Vec<String>>,
    limits: DestLimits,
    vcpus: Vec<Vec<u8>>,
    report: DestReport,
    /// Where pages land, from every stream.
    sink: Arc<PageSink>,
    /// The memory's session id.
    session_id: u64,
    verify_result: Option<bool>,
    /// Set by a source in the same process that failed before connecting.
    give_up: Arc<AtomicBool>,
    /// How accepted connections become channels.
    transport: Arc<dyn Transport>,
    /// A verified session was committed: the memory is the guest's now.
    handed_over: bool,
}

/// What one connection came to.
pub enum Served {
    /// A verified (or not) migration; when verified, committed.
    Complete(Box<Received>),
    /// The source went away or aborted: its next attempt continues into this memory.
    Interrupted(String),
    /// Not a source of ours, or one that broke the protocol or a limit (counted in
    /// [`DestReport::refused_connections`]).
    Refused,
}

impl Destination {
    /// A destination receiving into `memory` (zeroed, as a new guest's RAM is), restoring
    /// `devices` (matched by name).
    pub fn new(memory: Arc<dyn GuestRam>, devices: Vec<Box<dyn DeviceMigration>>) -> Self {
        let session_id = new_session_id();
        let sink = Arc::new(PageSink::new(Arc::clone(&memory)));
        Destination {
            memory,
            devices,
            verifier: None,
            vcpu_kinds: None,
            limits: DestLimits::default(),
            vcpus: Vec::new(),
            report: DestReport {
                session_id,
                transport: PlainTcp.name(),
                ..DestReport::default()
            },
            sink,
            session_id,
            verify_result: None,
            give_up: Arc::new(AtomicBool::new(false)),
            transport: Arc::new(PlainTcp),
            handed_over: false,
        }
    }

    /// Accept connections over `transport` (TLS, to authenticate the source) instead of
    /// plain TCP.
    pub fn transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.report.transport = transport.name();
        self.transport = transport;
        self
    }

    /// Verify with `verifier` (the source must use the same one).
    pub fn verifier(mut self, verifier: Arc<dyn Verifier>) -> Self {
        self.verifier = Some(verifier);
        self
    }

    /// Accept only vCPU state of this kind (the kind this destination can resume).
    pub fn vcpu_kind(self, kind: impl Into<String>) -> Self {
        self.vcpu_kinds([kind])
    }

    /// Accept only vCPU state of these kinds (those this destination can resume): a
    /// source of another kind is refused at Hello, before any page moves.
    pub fn vcpu_kinds(mut self, kinds: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.vcpu_kinds = Some(kinds.into_iter().map(Into::into).collect());
        self
    }

    /// Bound what a session may make this destination hold, and its timeouts.
    pub fn limits(mut self, limits: DestLimits) -> Self {
        self.limits = limits;
        self
    }

    /// What this destination saw so far (also after [`Destination::run`] failed).
    pub fn report(&self) -> &DestReport {
        &self.report
    }

    /// The memory's session id (what the next HelloAck carries).
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// A flag that makes [`Destination::run`] stop waiting for a connection.
    pub fn give_up_flag(&self) -> Arc<AtomicBool> {
        self.give_up.clone()
    }

    /// The received memory.
    pub fn memory(&self) -> &Arc<dyn GuestRam> {
        &self.memory
    }

    /// The devices (after [`Destination::run`], restored).
    pub fn devices(&self) -> &[Box<dyn DeviceMigration>] {
        &self.devices
    }

    /// Serve sessions until one completes, `max_sessions` were interrupted, more than
    /// [`DestLimits::max_refused`] connections were refused, or no source gets past Hello
    /// within `accept_timeout` (from the start, or from the last session that did). A
    /// verified, committed session returns the vCPU states; a session whose memory did not
    /// match returns with `verified: false` and none.
    pub fn run(
        &mut self,
        listener: &TcpListener,
        max_sessions: u32,
        accept_timeout: Duration,
    ) -> Result<Received, MigrateError> {
        listener.set_nonblocking(true)?;
        let mut deadline = Instant::now() + accept_timeout;
        let transport = self.transport.clone();
        let give_up = self.give_up.clone();
        let mut acceptor = Acceptor {
            listener,
            transport: transport.as_ref(),
            limits: self.limits,
            give_up: &give_up,
        };
        // Sessions of a source of ours (past Hello, not refused): a stranger uses none.
        let mut tries = 0u32;
        while tries < max_sessions {
            let Some((tcp, peer)) = acceptor.accept(deadline)? else {
                return Err(MigrateError::Destination(format!(
                    "no source connected within {accept_timeout:?} ({} session(s), {} refused connection(s) before)",
                    self.report.sessions, self.report.refused_connections
                )));
            };
            let peer = peer.to_string();
            let channel = match acceptor.open(tcp) {
                Ok(ch) => ch,
                Err(why) => {
                    self.refuse(&peer, &why, false)?;
                    continue;
                }
            };
            // Its extra streams, if it asks for several, come through the same listener
            // and transport.
            match self.serve_from(channel, &peer, &mut acceptor)? {
                Served::Complete(received) => return Ok(*received),
                Served::Interrupted(_) => {
                    tries += 1;
                    deadline = Instant::now() + accept_timeout;
                }
                Served::Refused => {}
            }
        }
        Err(MigrateError::Destination(format!(
            "no session completed in {max_sessions} tries: {}",
            self.report.interrupted.join("; ")
        )))
    }

    /// Serve one connection that is already open (over whatever transport the VMM
    /// brings; [`Destination::run`] calls it for each accepted socket). `peer` names the
    /// other end in logs and refusals. A source asking for several streams is refused:
    /// there is no way to accept them here ([`Destination::run`] has its listener). Once a
    /// migration was committed here, every later connection is refused
    /// ([`Refusal::HandedOver`]) without a byte read: the memory is the running guest's.
    pub fn serve_channel(
        &mut self,
        channel: Box<dyn Channel>,
        peer: &str,
    ) -> Result<Served, MigrateError> {
        self.serve_from(channel, peer, &mut NoIncoming)
    }

    /// One connection, and the extra streams of its session from `incoming`.
    fn serve_from(
        &mut self,
        channel: Box<dyn Channel>,
        peer: &str,
        incoming: &mut dyn Incoming,
    ) -> Result<Served, MigrateError> {
        if self.handed_over {
            // Whoever this is, the guest may already run on this memory: tell them why
            // (best effort) and touch nothing.
            let why = Refusal::HandedOver;
            let _ = FrameWriter::new(channel).write_frame(&Frame::Abort {
                reason: why.to_string().into(),
            });
            self.refuse(peer, &why, false)?;
            return Ok(Served::Refused);
        }
        let wrote_before = self.sink.counts().0;
        let end = self.serve(channel, incoming)?;
        (
            self.report.pages_received,
            self.report.duplicate_pages_received,
        ) = self.sink.counts();
        Ok(match end {
            session::SessionEnd::Complete => {
                self.report.verified = self.verify_result == Some(true);
                // Complete and verified means committed (a failed verdict completes
                // without a Commit and leaves the guest with the source).
                self.handed_over = self.report.verified;
                self.report.session_id = self.session_id;
                Served::Complete(Box::new(Received {
                    report: self.report.clone(),
                    vcpu_states: std::mem::take(&mut self.vcpus),
                }))
            }
            session::SessionEnd::HandoverRefused(why) => {
                // The source found the device state (or memory) differs: it keeps the
                // guest, and nothing here may resume it.
                log::warn!("destination: the source refused the handover: {why}");
                self.report.verified = false;
                self.report.handover_refused = Some(why);
                self.report.session_id = self.session_id;
                Served::Complete(Box::new(Received {
                    report: self.report.clone(),
                    vcpu_states: Vec::new(),
                }))
            }
            session::SessionEnd::Interrupted(why) => {
                log::info!(
                    "destination: session {} from {peer} interrupted: {why}; keeping memory for a retry",
                    self.report.sessions
                );
                self.report.interrupted.push(why.clone());
                Served::Interrupted(why)
            }
            session::SessionEnd::Refused(why) => {
                let wrote = self.sink.counts().0 > wrote_before;
                self.refuse(peer, &why, wrote)?;
                Served::Refused
            }
        })
    }

    /// Count and log a refusal; a refused peer that wrote pages costs the memory its
    /// session id (and the pages it wrote), so no source continues into what a stranger
    /// may have changed.
    fn refuse(&mut self, peer: &str, why: &Refusal, wrote: bool) -> Result<(), MigrateError> {
        self.report.refused_connections += 1;
        let line = format!("{peer}: {why}");
        log::warn!("destination: refused connection from {line}");
        self.report.refusals.push(line);
        if wrote {
            self.reset_memory()?;
        }
        if self.report.refused_connections > self.limits.max_refused {
            return Err(MigrateError::Destination(format!(
                "{} connections refused (limit {}), last from {peer}: {why}",
                self.report.refused_connections, self.limits.max_refused
            )));
        }
        Ok(())
    }

    /// Zero every page written since the memory was created (or last reset), and choose a
    /// new session id: the memory is again what a new destination's is.
    fn reset_memory(&mut self) -> Result<(), MigrateError> {
        self.sink.zero_written()?;
        self.session_id = new_session_id();
        self.report.session_id = self.session_id;
        self.report.memory_resets += 1;
        log::warn!(
            "destination: memory reset after a refused session wrote to it; new session id {:#x}",
            self.session_id
        );
        Ok(())
    }
}
