//! TLS 1.3 with mutual X.509 authentication over TCP (rustls, ring provider): the
//! [`Tls`] transport, in the spirit of QEMU's `tls-creds-x509` with `verify-peer=on`.
//!
//! Each side holds its own certificate chain and key and one CA bundle. The destination
//! requires a client certificate signed by the CA; the source checks the destination's
//! certificate against the CA and a server name (the host it connects to, or a name set
//! with [`Tls::server_name`], QEMU's `tls-hostname`). Both handshakes complete inside
//! [`Transport::client`] / [`Transport::server`], within a deadline, so a stranger is
//! refused before it can send one frame, with a [`HandshakeError`] saying why.

use super::channel::{looks_like_frame, Channel, Sniff, Transport};
use rustls::client::Resumption;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, ConnectionCommon,
    InconsistentKeys, RootCertStore, ServerConfig, ServerConnection, SideData, StreamOwned,
};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The byte a destination sends, encrypted, once it has verified the source's
/// certificate. In TLS 1.3 the client's handshake ends before the server has checked the
/// client's certificate; waiting for this byte makes a refused source learn it inside
/// [`Transport::client`] (from the server's alert) rather than at its first frame.
const ACCEPTED: u8 = 0x01;

/// How long a handshake may take when the socket has no read timeout of its own.
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Loading the certificates and key, or naming the server.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read (missing, unreadable).
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file is not valid PEM.
    #[error("{}: not valid PEM: {reason}", path.display())]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What the PEM parser found.
        reason: String,
    },
    /// A certificate file holds no certificate.
    #[error("{}: no certificate in it (no `-----BEGIN CERTIFICATE-----` section){}", path.display(),
            if *holds_key { "; it holds a private key instead" } else { "" })]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// It holds a private key (a certificate and its key swapped).
        holds_key: bool,
    },
    /// A key file holds no private key.
    #[error("{}: no private key in it (no `-----BEGIN PRIVATE KEY-----`, `RSA PRIVATE KEY` or `EC PRIVATE KEY` section){}",
            path.display(), if *holds_certificate { "; it holds a certificate instead" } else { "" })]
    NoKey {
        /// The file.
        path: PathBuf,
        /// It holds a certificate (a certificate and its key swapped).
        holds_certificate: bool,
    },
    /// The private key is of a kind this TLS stack cannot sign with.
    #[error("{}: unusable private key: {source}", path.display())]
    UnusableKey {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The first certificate of a chain cannot be parsed.
    #[error("{}: unusable certificate: {source}", path.display())]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The private key is not the one the certificate was issued for.
    #[error("{}: this private key does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// A CA certificate cannot serve as a trust anchor.
    #[error("{}: CA certificate {index} is unusable as a trust anchor: {source}", path.display())]
    BadCa {
        /// The CA file.
        path: PathBuf,
        /// Its position in the file (0 first).
        index: usize,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// A server name that is neither a DNS name nor an IP address.
    #[error("{name:?} is not a TLS server name (a DNS name or an IP address)")]
    BadServerName {
        /// The name.
        name: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// rustls refused the client-certificate verifier.
    #[error("TLS client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The other end of a handshake, in the engine's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// The destination's view: its peer is a source.
    Source,
    /// The source's view: its peer is the destination.
    Destination,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Peer::Source => "source",
            Peer::Destination => "destination",
        })
    }
}

/// Why a TLS handshake failed: the peer was not authenticated, refused this side, or did
/// not speak TLS. Carried inside the `io::Error` that [`Transport`] returns.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The source sent no client certificate.
    #[error("the source sent no client certificate")]
    NoClientCertificate,
    /// The peer's certificate does not chain to the CA.
    #[error("the {peer}'s certificate is not signed by a CA in {} (unknown CA)", ca.display())]
    UnknownCa {
        /// Whose certificate.
        peer: Peer,
        /// The CA file this side trusts.
        ca: PathBuf,
    },
    /// The destination's certificate does not name the host the source connected to.
    #[error("the destination's certificate is not valid for {expected}: {}",
            if presented.is_empty() { "it names no host (no subjectAltName)".to_string() }
            else { format!("it names only {}", presented.join(", ")) })]
    WrongName {
        /// The name the source checked.
        expected: String,
        /// The names the certificate carries.
        presented: Vec<String>,
    },
    /// The peer's certificate is unacceptable for another reason (expired, wrong key
    /// usage, bad signature).
    #[error("the {peer}'s certificate is unacceptable: {reason}")]
    BadCertificate {
        /// Whose certificate.
        peer: Peer,
        /// rustls's reason.
        reason: String,
    },
    /// The peer refused this side (a TLS alert).
    #[error("the {peer} refused this side: {} (TLS alert {alert:?})", alert_meaning(*alert))]
    Refused {
        /// Who refused.
        peer: Peer,
        /// Its alert.
        alert: AlertDescription,
    },
    /// The peer's bytes are not TLS.
    #[error("the {peer} does not speak TLS (is it running without --tls-*?): {detail}")]
    NotTls {
        /// Who.
        peer: Peer,
        /// What rustls found.
        detail: String,
    },
    /// A source of ours without TLS: its first bytes are a frame's (its Hello).
    #[error("plain iovatrack Hello on a TLS receiver: the source needs --tls-*")]
    PlainHello,
    /// No complete handshake within the deadline.
    #[error("no TLS handshake with the {peer} within {after:?}")]
    Timeout {
        /// Who went quiet.
        peer: Peer,
        /// The deadline.
        after: Duration,
    },
    /// The peer closed the connection during the handshake.
    #[error("the {0} closed the connection during the TLS handshake")]
    Closed(Peer),
    /// Any other TLS failure.
    #[error("TLS: {0}")]
    Tls(rustls::Error),
    /// A socket failure.
    #[error("{0}")]
    Io(io::Error),
}

impl HandshakeError {
    fn kind(&self) -> io::ErrorKind {
        match self {
            HandshakeError::Timeout { .. } => io::ErrorKind::TimedOut,
            HandshakeError::Closed(_) => io::ErrorKind::ConnectionAborted,
            HandshakeError::NotTls { .. } | HandshakeError::PlainHello | HandshakeError::Tls(_) => {
                io::ErrorKind::InvalidData
            }
            HandshakeError::Io(e) => e.kind(),
            _ => io::ErrorKind::PermissionDenied,
        }
    }
}

impl From<HandshakeError> for io::Error {
    fn from(e: HandshakeError) -> Self {
        io::Error::new(e.kind(), e)
    }
}

/// Whether a failed connection would fail the same way if tried again: a certificate one
/// side refuses, or a peer that does not speak TLS. The source gives up on those at once,
/// naming why, instead of spending its retries (and the receiver's refusal budget) on
/// them; a refused, reset or timed-out connection, or an unclassified TLS failure, is
/// retried. Looks for the [`HandshakeError`] [`Tls`] returns, or a bare `rustls::Error`
/// (another transport built on rustls).
pub(super) fn is_permanent(e: &io::Error) -> bool {
    let Some(inner) = e.get_ref() else {
        return false;
    };
    if let Some(h) = inner.downcast_ref::<HandshakeError>() {
        return match h {
            HandshakeError::NoClientCertificate
            | HandshakeError::UnknownCa { .. }
            | HandshakeError::WrongName { .. }
            | HandshakeError::BadCertificate { .. }
            | HandshakeError::NotTls { .. }
            | HandshakeError::PlainHello => true,
            HandshakeError::Refused { alert, .. } => permanent_alert(*alert),
            HandshakeError::Tls(t) => permanent_tls(t),
            HandshakeError::Timeout { .. } | HandshakeError::Closed(_) | HandshakeError::Io(_) => {
                false
            }
        };
    }
    inner
        .downcast_ref::<rustls::Error>()
        .is_some_and(permanent_tls)
}

/// [`is_permanent`] for a rustls error.
fn permanent_tls(e: &rustls::Error) -> bool {
    match e {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => true,
        rustls::Error::AlertReceived(a) => permanent_alert(*a),
        _ => false,
    }
}

/// [`is_permanent`] for an alert the peer sent: it refused a certificate (or the key's
/// signature), or shares no TLS version or parameters with this side. Each comes from
/// files and settings that stay as they are between attempts.
fn permanent_alert(a: AlertDescription) -> bool {
    matches!(
        a,
        AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateRequired
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::DecryptError
            | AlertDescription::ProtocolVersion
            | AlertDescription::HandshakeFailure
    )
}

/// A certificate name as webpki lists it (`IpAddress(10.0.0.2)`, `DnsName("a.b")`), as
/// an operator writes it.
fn tidy_name(n: &str) -> String {
    let inner = |prefix: &str| n.strip_prefix(prefix).and_then(|x| x.strip_suffix(')'));
    match (inner("IpAddress("), inner("DnsName(")) {
        (Some(ip), _) => ip.to_string(),
        (_, Some(dns)) => dns.trim_matches('"').to_string(),
        _ => n.to_string(),
    }
}

/// What an alert a peer sent usually means, in words.
fn alert_meaning(a: AlertDescription) -> &'static str {
    match a {
        AlertDescription::UnknownCA => "it does not trust the CA that signed this side's certificate",
        AlertDescription::BadCertificate => "it rejected this side's certificate (a source does when the destination's certificate does not name the host it connected to)",
        AlertDescription::CertificateRequired => "it requires a certificate this side did not send",
        AlertDescription::CertificateExpired => "this side's certificate has expired or is not valid yet",
        AlertDescription::UnsupportedCertificate => "this side's certificate is not allowed for this use (extended key usage)",
        AlertDescription::DecryptError => "a signature did not verify (the certificate and key do not belong together?)",
        AlertDescription::ProtocolVersion => "no common TLS version (this side speaks TLS 1.3 only)",
        AlertDescription::HandshakeFailure => "no common TLS parameters",
        AlertDescription::DecodeError | AlertDescription::UnexpectedMessage => {
            "it could not parse what this side sent (is it speaking TLS?)"
        }
        _ => "see the alert",
    }
}

/// The TLS transport: one certificate chain and key, one CA bundle, for either side.
#[derive(Clone)]
pub struct Tls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    /// What the source checks the destination's certificate against (`None`: the IP
    /// address it connected to).
    server_name: Option<ServerName<'static>>,
    handshake_timeout: Duration,
    ca: PathBuf,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn bad_pem(path: &Path, e: pem::Error) -> TlsError {
    TlsError::BadPem {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Every certificate in a PEM file (at least one).
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_pem(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
            holds_key: PrivateKeyDer::from_pem_slice(&bytes).is_ok(),
        });
    }
    Ok(certs)
}

/// The private key in a PEM file.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
            holds_certificate: CertificateDer::pem_slice_iter(&bytes).any(|c| c.is_ok()),
        },
        e => bad_pem(path, e),
    })
}

impl Tls {
    /// Load this side's certificate chain (`cert`, leaf first), its private key (`key`)
    /// and the CA bundle both sides trust (`ca`), all PEM. Each error names its file.
    pub fn from_pem_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
        ca: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        let (cert, key, ca) = (cert.as_ref(), key.as_ref(), ca.as_ref());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certificates(cert)?;
        let key_der = private_key(key)?;
        let signer = provider
            .key_provider
            .load_private_key(key_der.clone_key())
            .map_err(|source| TlsError::UnusableKey {
                path: key.to_owned(),
                source,
            })?;
        // rustls would take a key it cannot compare ("unknown"); a mismatch, or a leaf
        // it cannot parse, is named here with its file.
        match CertifiedKey::new(chain.clone(), signer).keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
            Err(rustls::Error::InconsistentKeys(_)) => {
                return Err(TlsError::KeyMismatch {
                    cert: cert.to_owned(),
                    key: key.to_owned(),
                })
            }
            Err(source) => {
                return Err(TlsError::BadCertificate {
                    path: cert.to_owned(),
                    source,
                })
            }
        }
        let mut roots = RootCertStore::empty();
        for (index, c) in certificates(ca)?.into_iter().enumerate() {
            roots.add(c).map_err(|source| TlsError::BadCa {
                path: ca.to_owned(),
                index,
                source,
            })?;
        }
        let roots = Arc::new(roots);
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key_der.clone_key())?;
        // Every connection authenticates in full: no session tickets to resume from.
        server.send_tls13_tickets = 0;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key_der)?;
        client.resumption = Resumption::disabled();
        Ok(Tls {
            client: Arc::new(client),
            server: Arc::new(server),
            server_name: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            ca: ca.to_owned(),
        })
    }

    /// Check the destination's certificate against `name` (a DNS name, or an IP address
    /// the certificate must list as an IP SAN) instead of the address connected to.
    pub fn server_name(mut self, name: &str) -> Result<Self, TlsError> {
        self.server_name = Some(parse_server_name(name)?);
        Ok(self)
    }

    /// Check the destination's certificate against the host part of `addr` (`host:port`,
    /// `[v6]:port`): a DNS name as written, an IP address as an IP SAN.
    pub fn server_name_for_addr(self, addr: &str) -> Result<Self, TlsError> {
        self.server_name(host_of(addr))
    }

    /// The longest a handshake may take when the socket has no read timeout (default
    /// 10 s; a destination's socket brings its Hello timeout).
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }

    /// The deadline for a handshake on `tcp`: its read timeout, else ours.
    fn budget(&self, tcp: &TcpStream) -> Duration {
        tcp.read_timeout()
            .ok()
            .flatten()
            .unwrap_or(self.handshake_timeout)
    }
}

/// A DNS name or an IP address (bare, or in brackets) as a TLS server name.
fn parse_server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => Ok(ServerName::IpAddress(ip.into())),
        Err(_) => ServerName::try_from(bare.to_owned()).map_err(|_| TlsError::BadServerName {
            name: name.to_owned(),
        }),
    }
}

/// The host part of `host:port`, `[v6]:port`, or of a bare host.
fn host_of(addr: &str) -> &str {
    if addr.parse::<IpAddr>().is_ok() {
        return addr;
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => addr,
    }
}

/// A TLS session over a TCP socket.
struct TlsChannel<C> {
    stream: StreamOwned<C, TcpStream>,
}

impl<C, S> Read for TlsChannel<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<S>>,
    S: SideData,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl<C, S> Write for TlsChannel<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<S>>,
    S: SideData,
{
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // rustls's stream, given nothing to send, would block reading instead.
        if buf.is_empty() {
            return Ok(0);
        }
        self.stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

impl<C, S> Channel for TlsChannel<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<S>> + Send,
    S: SideData,
{
    fn tcp(&self) -> Option<&TcpStream> {
        Some(&self.stream.sock)
    }
}

/// Drive `conn`'s handshake on `tcp` to its end by `deadline`. Each read is bounded by
/// the time left, and the deadline is checked between reads, so a peer trickling bytes
/// cannot stretch it (rustls's `complete_io` keeps reading while bytes come).
fn handshake<S: SideData>(
    conn: &mut ConnectionCommon<S>,
    tcp: &mut Sniff<TcpStream>,
    deadline: Instant,
) -> io::Result<()> {
    loop {
        while conn.wants_write() {
            conn.write_tls(tcp.get_mut())?;
        }
        if !conn.is_handshaking() {
            return Ok(());
        }
        read_some(conn, tcp, deadline)?;
    }
}

/// One read from `tcp` into `conn`, by `deadline`, and its processing. A TLS error goes
/// back as `InvalidData` around the `rustls::Error`, after the alert that tells the peer
/// why (best effort).
fn read_some<S: SideData>(
    conn: &mut ConnectionCommon<S>,
    tcp: &mut Sniff<TcpStream>,
    deadline: Instant,
) -> io::Result<()> {
    set_left(tcp.get_ref(), deadline)?;
    if conn.read_tls(tcp)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    conn.process_new_packets().map_err(|e| {
        let _ = conn.write_tls(tcp.get_mut());
        io::Error::new(io::ErrorKind::InvalidData, e)
    })?;
    Ok(())
}

/// The destination's first plaintext byte, by `deadline`.
fn confirmation(
    conn: &mut ClientConnection,
    tcp: &mut Sniff<TcpStream>,
    deadline: Instant,
) -> io::Result<u8> {
    loop {
        let mut b = [0u8; 1];
        match conn.reader().read(&mut b) {
            Ok(1) => return Ok(b[0]),
            Ok(_) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => read_some(conn, tcp, deadline)?,
            Err(e) => return Err(e),
        }
    }
}

/// Bound the next read by the time left to `deadline` (at least 1 ms: 0 means "none").
fn set_left(tcp: &TcpStream, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    tcp.set_read_timeout(Some(left.max(Duration::from_millis(1))))
}

/// What a failed handshake (or confirmation) means, seen from the side whose peer is
/// `peer`, which sent `head` first.
fn classify(e: io::Error, peer: Peer, head: &[u8], ca: &Path, budget: Duration) -> HandshakeError {
    use io::ErrorKind as K;
    // An iovatrack peer in the clear: a source's Hello, or a plain receiver's refusal
    // (an Abort frame, after which it may close or reset before rustls has a word).
    if looks_like_frame(head) {
        return match peer {
            Peer::Source => HandshakeError::PlainHello,
            Peer::Destination => HandshakeError::NotTls {
                peer,
                detail: "it answered with an iovatrack frame in the clear".into(),
            },
        };
    }
    match e.kind() {
        K::WouldBlock | K::TimedOut => {
            return HandshakeError::Timeout {
                peer,
                after: budget,
            }
        }
        K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => {
            return HandshakeError::Closed(peer)
        }
        _ => {}
    }
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return HandshakeError::Io(e);
    };
    match tls {
        rustls::Error::NoCertificatesPresented => HandshakeError::NoClientCertificate,
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            HandshakeError::UnknownCa {
                peer,
                ca: ca.to_owned(),
            }
        }
        rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected,
            presented,
        }) => HandshakeError::WrongName {
            expected: expected.to_str().into_owned(),
            presented: presented.iter().map(|n| tidy_name(n)).collect(),
        },
        rustls::Error::InvalidCertificate(CertificateError::NotValidForName) => {
            HandshakeError::WrongName {
                expected: "the name checked".into(),
                presented: Vec::new(),
            }
        }
        rustls::Error::InvalidCertificate(c) => HandshakeError::BadCertificate {
            peer,
            reason: c.to_string(),
        },
        rustls::Error::AlertReceived(alert) => HandshakeError::Refused {
            peer,
            alert: *alert,
        },
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => HandshakeError::NotTls {
            peer,
            detail: tls.to_string(),
        },
        other => HandshakeError::Tls(other.clone()),
    }
}

impl Transport for Tls {
    fn client(&self, tcp: TcpStream) -> io::Result<Box<dyn Channel>> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => ServerName::IpAddress(tcp.peer_addr()?.ip().into()),
        };
        let mut conn =
            ClientConnection::new(self.client.clone(), name).map_err(HandshakeError::Tls)?;
        let before = tcp.read_timeout()?;
        let budget = self.budget(&tcp);
        let deadline = Instant::now() + budget;
        let mut sock = Sniff::new(tcp);
        let fail = |e, head: &[u8]| -> io::Error {
            classify(e, Peer::Destination, head, &self.ca, budget).into()
        };
        handshake(&mut *conn, &mut sock, deadline).map_err(|e| fail(e, sock.head()))?;
        // The destination accepts this source's certificate, or says why not.
        let ok = confirmation(&mut conn, &mut sock, deadline).map_err(|e| fail(e, sock.head()))?;
        let tcp = sock.into_inner();
        if ok != ACCEPTED {
            return Err(HandshakeError::NotTls {
                peer: Peer::Destination,
                detail: format!("confirmation byte {ok:#04x}"),
            }
            .into());
        }
        tcp.set_read_timeout(before)?;
        let stream = StreamOwned::new(conn, tcp);
        log::info!(
            "TLS 1.3 with the destination ({:?})",
            stream.conn.negotiated_cipher_suite().map(|s| s.suite())
        );
        Ok(Box::new(TlsChannel { stream }))
    }

    fn server(&self, tcp: TcpStream) -> io::Result<Box<dyn Channel>> {
        let mut conn = ServerConnection::new(self.server.clone()).map_err(HandshakeError::Tls)?;
        let before = tcp.read_timeout()?;
        let budget = self.budget(&tcp);
        let deadline = Instant::now() + budget;
        let mut sock = Sniff::new(tcp);
        handshake(&mut *conn, &mut sock, deadline).map_err(|e| {
            io::Error::from(classify(e, Peer::Source, sock.head(), &self.ca, budget))
        })?;
        let tcp = sock.into_inner();
        tcp.set_read_timeout(before)?;
        let mut stream = StreamOwned::new(conn, tcp);
        stream.write_all(&[ACCEPTED])?;
        stream.flush()?;
        Ok(Box::new(TlsChannel { stream }))
    }

    fn name(&self) -> &'static str {
        "tls"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> String {
        parse_server_name(s).map_or_else(|e| format!("error: {e}"), |n| n.to_str().into_owned())
    }

    #[test]
    fn the_host_of_an_address_is_its_server_name() {
        assert_eq!(host_of("10.0.0.2:7000"), "10.0.0.2");
        assert_eq!(host_of("[::1]:7000"), "[::1]");
        assert_eq!(host_of("::1"), "::1");
        assert_eq!(host_of("dst.example:7000"), "dst.example");
        assert_eq!(host_of("dst.example"), "dst.example");
        assert_eq!(name(host_of("[::1]:7000")), "::1");
        assert_eq!(name("10.0.0.2"), "10.0.0.2");
        assert_eq!(name("dst.example"), "dst.example");
        assert!(matches!(
            parse_server_name("10.0.0.2"),
            Ok(ServerName::IpAddress(_))
        ));
        // Negative controls: what is neither a name nor an address is refused, naming it.
        assert_eq!(
            name("not a name!"),
            "error: \"not a name!\" is not a TLS server name (a DNS name or an IP address)"
        );
        assert!(name("dst.example:7000").starts_with("error"));
    }

    #[test]
    fn refused_certificates_are_permanent_and_broken_links_are_not() {
        let io = |e: HandshakeError| io::Error::from(e);
        let ca = PathBuf::from("ca.pem");
        let permanent = [
            io(HandshakeError::UnknownCa {
                peer: Peer::Destination,
                ca: ca.clone(),
            }),
            io(HandshakeError::WrongName {
                expected: "a.example".into(),
                presented: vec!["10.0.0.2".into()],
            }),
            io(HandshakeError::BadCertificate {
                peer: Peer::Destination,
                reason: "expired".into(),
            }),
            io(HandshakeError::NoClientCertificate),
            io(HandshakeError::Refused {
                peer: Peer::Destination,
                alert: AlertDescription::UnknownCA,
            }),
            io(HandshakeError::Refused {
                peer: Peer::Destination,
                alert: AlertDescription::BadCertificate,
            }),
            io(HandshakeError::Refused {
                peer: Peer::Destination,
                alert: AlertDescription::CertificateRequired,
            }),
            io(HandshakeError::NotTls {
                peer: Peer::Destination,
                detail: "corrupt message".into(),
            }),
            io(HandshakeError::Tls(rustls::Error::NoCertificatesPresented)),
            // A transport that hands rustls's error over bare.
            io::Error::new(
                io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            ),
            io::Error::new(
                io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(AlertDescription::BadCertificate),
            ),
            io::Error::new(
                io::ErrorKind::InvalidData,
                rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
            ),
        ];
        for e in &permanent {
            assert!(is_permanent(e), "{e}");
        }
        // Negative controls: what a link that is down, or a receiver not yet up, does.
        let transient = [
            io::Error::from(io::ErrorKind::ConnectionRefused),
            io::Error::new(io::ErrorKind::ConnectionReset, "10.0.0.2:7000: reset"),
            io::Error::from(io::ErrorKind::TimedOut),
            io(HandshakeError::Timeout {
                peer: Peer::Destination,
                after: Duration::from_secs(10),
            }),
            io(HandshakeError::Closed(Peer::Destination)),
            io(HandshakeError::Io(io::ErrorKind::BrokenPipe.into())),
            io(HandshakeError::Refused {
                peer: Peer::Destination,
                alert: AlertDescription::InternalError,
            }),
            io(HandshakeError::Tls(rustls::Error::General("?".into()))),
            io::Error::other("not TLS at all"),
        ];
        for e in &transient {
            assert!(!is_permanent(e), "{e}");
        }
    }

    #[test]
    fn certificate_names_read_as_written() {
        assert_eq!(tidy_name("IpAddress(10.0.0.2)"), "10.0.0.2");
        assert_eq!(tidy_name("DnsName(\"dst.example\")"), "dst.example");
        assert_eq!(tidy_name("Other(x)"), "Other(x)");
    }
}
