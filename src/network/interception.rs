//! The egress proxy's secret swap. For a host that a proxied secret may be sent to
//! ([`crate::network::secrets`]), the proxy ends the guest's TLS itself, with a certificate for that
//! host from a CA made for this session (its certificate is in the guest's trust store; its
//! key never leaves this process), opens its own verified TLS connection to the real host,
//! and forwards each HTTP/1.1 request with the placeholders of that host's secrets replaced in
//! the request's headers, Basic credentials included. A placeholder meant for another host is
//! left as it is, and logged. Responses pass unchanged. Hosts without secrets are never
//! intercepted: the proxy tunnels them as they are.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use base64::Engine as _;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

use crate::network::secrets::Secret;

/// The longest request head, chunk line or trailer section the proxy reads.
const MAX_HEAD: usize = 64 * 1024;
/// The largest body the proxy holds to swap a secret in (`body = true`): larger ones pass as
/// they are. With the proxy's cap on connections, what a guest can make it hold is bounded.
const MAX_SWAP_BODY: u64 = 256 << 10;
/// The most headers a request may have.
const MAX_HEADERS: usize = 128;
/// How long each TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The only application protocol offered either way: requests are rewritten as HTTP/1.1.
const ALPN: &[u8] = b"http/1.1";

/// What an intercepted request did with placeholders, for the audit log.
#[derive(Debug, PartialEq, Eq)]
pub enum Note {
    /// `secret`'s placeholder was replaced by its value in `place` (a header's name, or the
    /// body).
    Swapped { secret: String, place: String },
    /// `secret`'s placeholder went to a host it is not for, as it was.
    NotSwapped { secret: String, place: String },
}

/// The session's CA and secrets, and the TLS configurations made from them.
pub struct SecretSwap {
    secrets: Vec<Secret>,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
    client: Arc<ClientConfig>,
    /// Server configurations by host name, made on first use.
    servers: Mutex<HashMap<String, Arc<ServerConfig>>>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl SecretSwap {
    /// A new CA, allowed to certify only the secrets' hosts, and a client that trusts what
    /// this host trusts (its system store, or `SSL_CERT_FILE`/`SSL_CERT_DIR`, as OpenSSL).
    pub fn new(secrets: Vec<Secret>) -> Result<SecretSwap> {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            anyhow::bail!(
                "no trusted CA certificate found on this host (install ca-certificates, or set SSL_CERT_FILE){}",
                found.errors.first().map(|e| format!(": {e}")).unwrap_or_default()
            );
        }
        SecretSwap::with_roots(secrets, roots)
    }

    /// The same, trusting `roots` for the real hosts.
    pub fn with_roots(secrets: Vec<Secret>, roots: rustls::RootCertStore) -> Result<SecretSwap> {
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![ALPN.to_vec()];

        let ca_key = rcgen::KeyPair::generate().context("cannot make the session's CA key")?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "cvm session CA (secrets proxy)");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        // Were the key ever taken, it could vouch for these names only, and for no address.
        let mut permitted: Vec<String> =
            secrets.iter().flat_map(|s| s.hosts.iter()).map(|p| p.trim_start_matches("*.").to_string()).collect();
        permitted.sort();
        permitted.dedup();
        params.name_constraints = Some(rcgen::NameConstraints {
            permitted_subtrees: permitted.into_iter().map(rcgen::GeneralSubtree::DnsName).collect(),
            excluded_subtrees: vec![
                rcgen::GeneralSubtree::IpAddress(rcgen::CidrSubnet::V4([0; 4], [0; 4])),
                rcgen::GeneralSubtree::IpAddress(rcgen::CidrSubnet::V6([0; 16], [0; 16])),
            ],
        });
        let ca = params.self_signed(&ca_key).context("cannot make the session's CA")?;
        Ok(SecretSwap { secrets, ca, ca_key, client: Arc::new(client), servers: Mutex::new(HashMap::new()) })
    }

    /// The CA's certificate, for the guest's trust store.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    pub fn secrets(&self) -> &[Secret] {
        &self.secrets
    }

    /// Whether connections to `host` are intercepted: some secret may be sent there.
    pub fn intercepts(&self, host: &str) -> bool {
        self.secrets.iter().any(|s| s.applies_to(host))
    }

    /// The secrets whose placeholder is somewhere in `bytes`.
    pub fn placeholders_in<'a>(&'a self, bytes: &'a [u8]) -> impl Iterator<Item = &'a Secret> {
        self.secrets.iter().filter(move |s| contains(bytes, s.placeholder.as_bytes()))
    }

    fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>> {
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(config) = servers.get(host) {
            return Ok(config.clone());
        }
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![host.to_string()])?;
        params.distinguished_name.push(rcgen::DnType::CommonName, host);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.ca, &self.ca_key)?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        let config = Arc::new(config);
        servers.insert(host.to_string(), config.clone());
        Ok(config)
    }

    /// A verified TLS session with the real `host` over `stream`, its handshake done.
    pub fn connect_upstream(&self, host: &str, mut stream: TcpStream) -> Result<Upstream> {
        let name = ServerName::try_from(host.to_string()).map_err(|e| anyhow!("{host:?}: {e}"))?;
        let mut tls = ClientConnection::new(self.client.clone(), name)?;
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        while tls.is_handshaking() {
            tls.complete_io(&mut stream).map_err(|e| anyhow!("TLS with {host}: {e}"))?;
        }
        Ok(Upstream { stream, tls })
    }

    /// Serves the guest's side as `host` (what it sent after its CONNECT so far is `early`),
    /// then relays requests, rewritten, to `upstream` and responses back, until either side
    /// ends or nothing moves for `idle`. `note` hears what each request did with
    /// placeholders.
    pub fn relay(
        &self,
        guest: UnixStream,
        early: &[u8],
        host: &str,
        upstream: Upstream,
        idle: Duration,
        note: &dyn Fn(Note),
    ) -> Result<()> {
        let mut server = ServerConnection::new(self.server_config(host)?)?;
        let mut early = early;
        while !early.is_empty() {
            server.read_tls(&mut early)?;
        }
        let mut guest_io = &guest;
        guest.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        guest.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        while server.is_handshaking() {
            server.complete_io(&mut guest_io).map_err(|e| anyhow!("the guest's TLS handshake for {host}: {e}"))?;
        }
        let rewriter = RequestRewriter::new(host, &self.secrets);
        let mut client = upstream.tls;
        // The relay bounds what each side holds (it moves plaintext on only once the other
        // side has sent what it had); a held body is larger than rustls's own limit.
        client.set_buffer_limit(None);
        server.set_buffer_limit(None);
        Relay { guest, upstream: upstream.stream, server, client, rewriter }.run(idle, note)
    }
}

/// The proxy's own TLS session with the real host.
pub struct Upstream {
    stream: TcpStream,
    tls: ClientConnection,
}

/// Both TLS sessions of one intercepted connection, moved along by one thread.
struct Relay<'a> {
    guest: UnixStream,
    upstream: TcpStream,
    server: ServerConnection,
    client: ClientConnection,
    rewriter: RequestRewriter<'a>,
}

impl Relay<'_> {
    fn run(mut self, idle: Duration, note: &dyn Fn(Note)) -> Result<()> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        self.guest.set_nonblocking(true)?;
        self.upstream.set_nonblocking(true)?;
        let mut buf = vec![0u8; 16 * 1024];
        let mut rewritten = Vec::new();
        let mut notes = Vec::new();
        let (mut guest_ended, mut upstream_ended) = (false, false);
        let timeout = Timespec { tv_sec: idle.as_secs() as i64, tv_nsec: 0 };
        loop {
            // Plaintext moves on only once the other side has sent what it had: a slow
            // reader holds back its writer, and no buffer grows without bound.
            if !self.client.wants_write() {
                guest_ended |= drain(&mut *self.server, &mut buf, |bytes| {
                    rewritten.clear();
                    let result = self.rewriter.feed(bytes, &mut rewritten, &mut notes);
                    notes.drain(..).for_each(note);
                    result.map_err(io::Error::other)?;
                    self.client.writer().write_all(&rewritten)
                })
                .inspect_err(|e| self.refuse(e))?;
            }
            if !self.server.wants_write() {
                upstream_ended |= drain(&mut *self.client, &mut buf, |bytes| self.server.writer().write_all(bytes))?;
            }
            flush(&mut *self.server, &self.guest)?;
            flush(&mut *self.client, &self.upstream)?;
            if guest_ended || upstream_ended {
                return self.close();
            }
            let guest_wants = interest(self.server.wants_read() && !self.client.wants_write(), self.server.wants_write());
            let upstream_wants = interest(self.client.wants_read() && !self.server.wants_write(), self.client.wants_write());
            let mut fds = [PollFd::new(&self.guest, guest_wants), PollFd::new(&self.upstream, upstream_wants)];
            match poll(&mut fds, Some(&timeout)) {
                Ok(0) => return self.close(),
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let ready = |fd: &PollFd| fd.revents().intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR);
            let (guest_ready, upstream_ready) = (ready(&fds[0]), ready(&fds[1]));
            if guest_ready {
                guest_ended |= receive(&mut *self.server, &self.guest)?;
            }
            if upstream_ready {
                upstream_ended |= receive(&mut *self.client, &self.upstream)?;
            }
        }
    }

    /// Tells the guest why its request went no further, as an HTTP answer.
    fn refuse(&mut self, e: &io::Error) {
        let body = format!("cvm: the secrets proxy refused the request: {e}\n");
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = self.server.writer().write_all(answer.as_bytes());
        let _ = self.close();
    }

    /// Ends both sessions cleanly, giving each side a moment to take what is left.
    fn close(&mut self) -> Result<()> {
        self.server.send_close_notify();
        self.client.send_close_notify();
        let _ = self.guest.set_nonblocking(false).and_then(|()| self.guest.set_write_timeout(Some(HANDSHAKE_TIMEOUT)));
        let _ = self.upstream.set_nonblocking(false).and_then(|()| self.upstream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)));
        while self.server.wants_write() && self.server.write_tls(&mut &self.guest).is_ok_and(|n| n > 0) {}
        while self.client.wants_write() && self.client.write_tls(&mut &self.upstream).is_ok_and(|n| n > 0) {}
        Ok(())
    }
}

fn interest(read: bool, write: bool) -> rustix::event::PollFlags {
    let mut flags = rustix::event::PollFlags::empty();
    if read {
        flags |= rustix::event::PollFlags::IN;
    }
    if write {
        flags |= rustix::event::PollFlags::OUT;
    }
    flags
}

/// Reads what the socket has into `conn`; says whether the peer has gone.
fn receive<D>(conn: &mut rustls::ConnectionCommon<D>, mut stream: impl Read) -> Result<bool> {
    let ended = match conn.read_tls(&mut stream) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(e) => return Err(e.into()),
    };
    conn.process_new_packets()?;
    Ok(ended)
}

/// Hands `conn`'s received plaintext to `take`; says whether the peer has ended its side.
fn drain<D>(conn: &mut rustls::ConnectionCommon<D>, buf: &mut [u8], mut take: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<bool> {
    loop {
        match conn.reader().read(buf) {
            Ok(0) => return Ok(true),
            Ok(n) => take(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            // The peer closed without close_notify.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(true),
            Err(e) => return Err(e),
        }
    }
}

/// Sends what `conn` has to send, as far as the socket takes it now.
fn flush<D>(conn: &mut rustls::ConnectionCommon<D>, mut stream: impl Write) -> io::Result<()> {
    while conn.wants_write() {
        match conn.write_tls(&mut stream) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn replace_all(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while let Some(at) = rest.windows(needle.len()).position(|w| w == needle) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(with);
        rest = &rest[at + needle.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// Where the request stream is: which bytes come next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// A request head, up to its blank line.
    Head,
    /// This many bytes of a body with a Content-Length.
    Fixed(u64),
    /// This many bytes of a body held back, with its head, to swap secrets in.
    Held(u64),
    /// A chunked body's size line.
    ChunkSize,
    /// This many bytes of a chunk.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// The trailer section after the last chunk, up to its blank line.
    Trailer,
    /// Not HTTP any more (after an Upgrade): passed as it is.
    Raw,
}

/// A request head as rebuilt.
enum Rebuilt {
    /// Sent now, and what follows it.
    Send(Vec<u8>, State),
    /// Held, without its Content-Length and blank line, until its body of this length is
    /// whole, to swap secrets in that too.
    Hold(Vec<u8>, u64),
}

/// The guest's requests to one host, as a stream: each head is parsed (httparse), checked
/// and rebuilt with that host's placeholders swapped; bodies are framed by their
/// Content-Length or chunks and passed as they are.
pub struct RequestRewriter<'a> {
    host: String,
    secrets: &'a [Secret],
    state: State,
    /// The line (or head) read so far.
    pending: Vec<u8>,
    /// Bytes of the current trailer section.
    trailer: usize,
    /// A head without its Content-Length and blank line, and the body so far, while held.
    held_head: Vec<u8>,
    held_body: Vec<u8>,
}

impl<'a> RequestRewriter<'a> {
    pub fn new(host: &str, secrets: &'a [Secret]) -> RequestRewriter<'a> {
        RequestRewriter {
            host: host.to_ascii_lowercase(),
            secrets,
            state: State::Head,
            pending: Vec::new(),
            trailer: 0,
            held_head: Vec::new(),
            held_body: Vec::new(),
        }
    }

    /// Takes the next bytes from the guest; appends what goes upstream to `out`. An error
    /// ends the connection: what was appended before it may be sent, nothing after.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>, notes: &mut Vec<Note>) -> Result<(), String> {
        while !input.is_empty() {
            match self.state {
                State::Raw => {
                    out.extend_from_slice(input);
                    return Ok(());
                }
                State::Held(left) => {
                    let take = input.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    self.held_body.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    self.state = State::Held(left - take as u64);
                    if left == take as u64 {
                        let held = std::mem::take(&mut self.held_body);
                        let body = self.swap_body(&held, notes);
                        out.append(&mut self.held_head);
                        out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
                        out.extend_from_slice(&body);
                        self.state = State::Head;
                    }
                }
                State::Fixed(left) | State::ChunkData(left) => {
                    let take = input.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    let left = left - take as u64;
                    self.state = match (self.state, left) {
                        (State::Fixed(_), 0) => State::Head,
                        (State::Fixed(_), _) => State::Fixed(left),
                        (_, 0) => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                }
                State::Head | State::ChunkSize | State::ChunkEnd | State::Trailer => {
                    let end = input.iter().position(|&b| b == b'\n').map_or(input.len(), |i| i + 1);
                    if self.pending.len() + end > MAX_HEAD {
                        return Err(format!("a request head or chunk line longer than {MAX_HEAD} bytes"));
                    }
                    self.pending.extend_from_slice(&input[..end]);
                    input = &input[end..];
                    if self.pending.last() == Some(&b'\n') {
                        self.line(out, notes)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A whole line is pending.
    fn line(&mut self, out: &mut Vec<u8>, notes: &mut Vec<Note>) -> Result<(), String> {
        let line = &self.pending;
        if !line.ends_with(b"\r\n") {
            return Err("a line that does not end with CRLF".into());
        }
        match self.state {
            State::Head => {
                if !line.ends_with(b"\r\n\r\n") && line.len() > 2 {
                    return Ok(());
                }
                match self.head(notes)? {
                    Rebuilt::Send(head, next) => {
                        out.extend_from_slice(&head);
                        self.state = next;
                    }
                    Rebuilt::Hold(head, length) => {
                        self.held_head = head;
                        self.state = State::Held(length);
                    }
                }
            }
            State::ChunkSize => {
                let text = std::str::from_utf8(&line[..line.len() - 2]).map_err(|_| "a chunk size that is not text")?;
                let digits = text.split(';').next().unwrap_or("").trim();
                if digits.is_empty() || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!("a bad chunk size {digits:?}"));
                }
                let size = u64::from_str_radix(digits, 16).map_err(|e| e.to_string())?;
                out.extend_from_slice(line);
                self.state = if size == 0 { State::Trailer } else { State::ChunkData(size) };
                self.trailer = 0;
            }
            State::ChunkEnd => {
                if line.as_slice() != b"\r\n" {
                    return Err("chunk data longer than its size".into());
                }
                out.extend_from_slice(line);
                self.state = State::ChunkSize;
            }
            State::Trailer => {
                self.trailer += line.len();
                if self.trailer > MAX_HEAD {
                    return Err(format!("a trailer section longer than {MAX_HEAD} bytes"));
                }
                out.extend_from_slice(line);
                if line.as_slice() == b"\r\n" {
                    self.state = State::Head;
                }
            }
            State::Fixed(_) | State::Held(_) | State::ChunkData(_) | State::Raw => unreachable!("no lines in a body"),
        }
        self.pending.clear();
        Ok(())
    }

    /// The pending head, rebuilt with placeholders swapped.
    fn head(&self, notes: &mut Vec<Note>) -> Result<Rebuilt, String> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&self.pending) {
            Ok(httparse::Status::Complete(n)) if n == self.pending.len() => {}
            Ok(_) => return Err("an incomplete request head".into()),
            Err(e) => return Err(format!("a malformed request head: {e}")),
        }
        let (Some(method), Some(target), Some(version)) = (parsed.method, parsed.path, parsed.version) else {
            return Err("an incomplete request line".into());
        };
        // An absolute-form target goes where it names, whatever Host says: only this host's.
        if let Some(rest) = target.strip_prefix("http://").or_else(|| target.strip_prefix("https://")) {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
            let (named, _) =
                crate::network::egress::split_host_port(authority, Some(443)).map_err(|e| format!("the request target: {e}"))?;
            if !named.eq_ignore_ascii_case(&self.host) {
                return Err(format!("the request target names {named:?}, not {:?}", self.host));
            }
        }
        for secret in self.secrets.iter().filter(|s| contains(target.as_bytes(), s.placeholder.as_bytes())) {
            notes.push(Note::NotSwapped { secret: secret.name.clone(), place: "the request target (only headers are swapped)".into() });
        }
        let mut head = format!("{method} {target} HTTP/1.{version}\r\n").into_bytes();
        let mut unframed = head.clone();
        let (mut lengths, mut chunked, mut upgrade, mut hosts, mut expects) = (Vec::new(), false, method == "CONNECT", 0, false);
        for header in parsed.headers.iter() {
            let name = header.name;
            if name.eq_ignore_ascii_case("host") {
                hosts += 1;
                let value = std::str::from_utf8(header.value).map_err(|_| "a Host header that is not text")?.trim();
                let (named, _) = crate::network::egress::split_host_port(value, Some(443)).map_err(|e| format!("the Host header: {e}"))?;
                if !named.eq_ignore_ascii_case(&self.host) {
                    return Err(format!("the Host header names {named:?}, not {:?}", self.host));
                }
            } else if name.eq_ignore_ascii_case("content-length") {
                let value = std::str::from_utf8(header.value)
                    .ok()
                    .map(str::trim)
                    .filter(|v| !v.is_empty() && v.len() <= 19 && v.bytes().all(|b| b.is_ascii_digit()));
                lengths.push(value.and_then(|v| v.parse::<u64>().ok()).ok_or("a bad Content-Length")?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                if chunked || !header.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    return Err("a Transfer-Encoding other than one chunked".into());
                }
                chunked = true;
            } else if name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            } else if name.eq_ignore_ascii_case("expect") {
                expects = true;
            }
            let line = [name.as_bytes(), b": ", &self.swap(name, header.value, notes), b"\r\n"].concat();
            head.extend_from_slice(&line);
            if !name.eq_ignore_ascii_case("content-length") {
                unframed.extend_from_slice(&line);
            }
        }
        head.extend_from_slice(b"\r\n");
        if hosts > 1 {
            return Err("more than one Host header".into());
        }
        // Either framing, never both, and one length: anything else is how requests are
        // smuggled past a proxy.
        lengths.dedup();
        let next = match (chunked, lengths.as_slice()) {
            (true, []) => State::ChunkSize,
            (true, _) => return Err("both Content-Length and Transfer-Encoding".into()),
            (false, [] | [0]) if upgrade => State::Raw,
            (false, [] | [0]) => State::Head,
            (false, [length]) => State::Fixed(*length),
            (false, _) => return Err("Content-Length headers that disagree".into()),
        };
        // A client waiting for "100 Continue" sends no body until the server answers: it is
        // never held.
        let swaps_bodies = self.secrets.iter().any(|s| s.body && s.applies_to(&self.host));
        match next {
            State::Fixed(length) if swaps_bodies && length <= MAX_SWAP_BODY && !expects => Ok(Rebuilt::Hold(unframed, length)),
            _ => Ok(Rebuilt::Send(head, next)),
        }
    }

    /// A held body with the placeholders of the secrets swapped in bodies on this host.
    fn swap_body(&self, body: &[u8], notes: &mut Vec<Note>) -> Vec<u8> {
        let mut body = body.to_vec();
        for secret in self.secrets {
            if !contains(&body, secret.placeholder.as_bytes()) {
                continue;
            }
            if secret.body && secret.applies_to(&self.host) {
                body = replace_all(&body, secret.placeholder.as_bytes(), secret.value().as_bytes());
                notes.push(Note::Swapped { secret: secret.name.clone(), place: "the body".into() });
            } else {
                notes.push(Note::NotSwapped { secret: secret.name.clone(), place: "the body".into() });
            }
        }
        body
    }

    /// A header's value with the placeholders of this host's secrets replaced, inside Basic
    /// credentials too.
    fn swap(&self, name: &str, value: &[u8], notes: &mut Vec<Note>) -> Vec<u8> {
        let mut value = self.swap_in(name, value, notes);
        let is_authorization = name.eq_ignore_ascii_case("authorization") || name.eq_ignore_ascii_case("proxy-authorization");
        if is_authorization && value.len() > 6 && value[..6].eq_ignore_ascii_case(b"basic ") {
            let engine = base64::engine::general_purpose::STANDARD;
            if let Ok(credentials) = engine.decode(value[6..].trim_ascii()) {
                let swapped = self.swap_in(name, &credentials, notes);
                if swapped != credentials {
                    value = [&value[..6], engine.encode(swapped).as_bytes()].concat();
                }
            }
        }
        value
    }

    fn swap_in(&self, name: &str, value: &[u8], notes: &mut Vec<Note>) -> Vec<u8> {
        let mut value = value.to_vec();
        for secret in self.secrets {
            if !contains(&value, secret.placeholder.as_bytes()) {
                continue;
            }
            if secret.applies_to(&self.host) && secret.goes_in(name) {
                value = replace_all(&value, secret.placeholder.as_bytes(), secret.value().as_bytes());
                notes.push(Note::Swapped { secret: secret.name.clone(), place: name.to_string() });
            } else if secret.applies_to(&self.host) {
                notes.push(Note::NotSwapped {
                    secret: secret.name.clone(),
                    place: format!("header {name} (not a credential header, nor one its config names)"),
                });
            } else {
                notes.push(Note::NotSwapped { secret: secret.name.clone(), place: format!("header {name}") });
            }
        }
        value
    }
}

#[cfg(test)]
mod tests;
