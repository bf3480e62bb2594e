//! The guest's way out: an HTTP proxy on the host that the guest reaches over vsock, which
//! lets a connection through only to an allowed host name, and writes every decision to an
//! audit log that outlives the VM.
//!
//! The guest has no network interface to the outside. Its agent relays 127.0.0.1:3128 to host
//! vsock port [`PROXY_PORT`], which is this proxy (`<vsock socket>_3128`). The proxy takes one
//! request per connection, `CONNECT host:port` (HTTPS and any TLS) or an absolute-form
//! `GET http://host/...` (plain HTTP), decides, connects, and then only relays bytes between
//! the guest and that one upstream. Names resolve on the host; loopback, private, link-local,
//! unspecified and multicast addresses (cloud metadata among them) are refused unless the user
//! mapped the name with `--add-host`.
//!
//! Where cvm itself must go through a proxy (its environment's `https_proxy`, as behind a
//! company's proxy, or cvm running inside another cvm VM), allowed connections are tunnelled
//! through that upstream with `CONNECT`, and the upstream resolves the names; names mapped with
//! `--add-host` are still reached directly.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::network::forward::{splice, Listening};
use crate::network::interception::{Note, SecretSwap};

pub use cvm_agent::protocol::PROXY_PORT;
/// The longest request head (request line and headers) the proxy reads.
const MAX_HEAD: usize = 16 * 1024;
/// The most headers a proxy request may have.
const MAX_HEADERS: usize = 100;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a proxied connection may carry nothing either way before the proxy ends it (as
/// Squid's `read_timeout` does): a silent connection the guest holds costs one of the
/// listener's `MAX_CONNECTIONS` for no longer than this.
pub const TUNNEL_IDLE: Duration = Duration::from_secs(15 * 60);

/// What a coding agent needs by default: Anthropic's API and the common package registries
/// and git hosts.
pub const DEFAULT_ALLOW: &[&str] = &[
    "api.anthropic.com",
    "*.anthropic.com",
    "claude.ai",
    "*.claude.ai",
    "claude.com",
    "*.claude.com",
    "registry.npmjs.org",
    "pypi.org",
    "files.pythonhosted.org",
    "crates.io",
    "*.crates.io",
    "proxy.golang.org",
    "sum.golang.org",
    "deb.debian.org",
    "security.debian.org",
    "github.com",
    "*.github.com",
    "*.githubusercontent.com",
    "gitlab.com",
    "bitbucket.org",
];

/// How the guest reaches the outside.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum NetworkMode {
    /// Allow-listed HTTP and HTTPS through the host's proxy.
    #[default]
    Proxy,
    /// Nothing leaves the VM.
    None,
    /// A network interface with raw TCP and UDP to anywhere the host reaches (passt): no
    /// allow-list, no audit log. Weaker; for tools the proxy cannot carry.
    Open,
}

/// The egress rules, as plain data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    pub mode: NetworkMode,
    /// Names (exact, or `*.domain` for its subdomains) a connection may go to.
    pub allow: Vec<String>,
    /// Names refused even when allowed.
    pub deny: Vec<String>,
    /// Names the user mapped to an address (docker's `--add-host`): used as given, private
    /// addresses included.
    pub hosts: Vec<(String, IpAddr)>,
    /// The proxy cvm itself must use (`host:port`), from [`upstream_from_env`].
    pub upstream: Option<String>,
}

/// The variables, first set first taken, that name the proxy cvm's own connections go through.
const UPSTREAM_VARIABLES: [&str; 4] = ["https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"];

/// The upstream proxy this process's environment names, as `host:port`: `http://host:port`
/// (a trailing `/` allowed) or `host:port`. A value cvm cannot use is an error, not ignored:
/// connections would otherwise fail later, less clearly.
pub fn upstream_from_env() -> Result<Option<String>, String> {
    let Some((name, value)) = UPSTREAM_VARIABLES.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()).map(|v| (n, v)))
    else {
        return Ok(None);
    };
    parse_upstream(&value).map(Some).map_err(|e| format!("{name}={value:?}: {e}"))
}

fn parse_upstream(value: &str) -> Result<String, String> {
    let authority = value.strip_prefix("http://").unwrap_or(value).trim_end_matches('/');
    if authority.contains("://") {
        return Err("only an http:// proxy can be used".into());
    }
    if authority.contains('@') || authority.contains('/') {
        return Err("expected http://host:port".into());
    }
    let (host, port) = split_host_port(authority, None)?;
    Ok(if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") })
}

/// What commands in the guest get so that ordinary tools (curl, git, npm, pip, cargo) use the
/// proxy.
pub fn guest_environment() -> Vec<(Vec<u8>, Vec<u8>)> {
    let proxy = format!("http://127.0.0.1:{PROXY_PORT}").into_bytes();
    let local = b"localhost,127.0.0.1,::1".to_vec();
    let mut env = Vec::new();
    for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        env.push((name.as_bytes().to_vec(), proxy.clone()));
    }
    for name in ["NO_PROXY", "no_proxy"] {
        env.push((name.as_bytes().to_vec(), local.clone()));
    }
    env
}

/// Parses `--add-host NAME:IP` (an IPv6 address may follow the first colon).
pub fn parse_add_host(text: &str) -> Result<(String, IpAddr), String> {
    let (name, ip) = text.split_once(':').ok_or_else(|| format!("bad --add-host {text:?}: expected NAME:IP"))?;
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = ip.parse().map_err(|_| format!("bad --add-host {text:?}: {ip:?} is not an IP address"))?;
    if !valid_name(name) {
        return Err(format!("bad --add-host {text:?}: {name:?} is not a host name"));
    }
    Ok((name.to_ascii_lowercase(), ip))
}

/// Parses an `--allow`/`--deny` pattern: a host name, or `*.` and a domain, with `:PORT`
/// when it is for that port alone.
pub fn parse_pattern(text: &str) -> Result<String, String> {
    let bad = || format!("bad host pattern {text:?}: expected a name like api.example.com or *.example.com, with :PORT for one port");
    let (name, port) = split_pattern(text).ok_or_else(bad)?;
    if !valid_name(name.strip_prefix("*.").unwrap_or(name)) || port == Some(0) {
        return Err(bad());
    }
    Ok(text.to_ascii_lowercase())
}

/// A pattern's name part, without its port.
pub(crate) fn pattern_name(pattern: &str) -> &str {
    split_pattern(pattern).map_or(pattern, |(name, _)| name)
}

/// A pattern's name part and its port, if it names one; None when the port is not a number.
fn split_pattern(pattern: &str) -> Option<(&str, Option<u16>)> {
    match pattern.rsplit_once(':') {
        Some((name, port)) => Some((name, Some(port.parse().ok()?))),
        None => Some((pattern, None)),
    }
}

/// The ports a name mapped with `--add-host` may be reached on when the pattern that allows it
/// names none: a mapped name often points at the host's own loopback, where anything may listen.
pub const MAPPED_PORTS: [u16; 2] = [80, 443];

/// Whether `pattern` covers `host` (lower case) on `port`. One with no port covers every port,
/// but of a `mapped` name only [`MAPPED_PORTS`].
fn covers(pattern: &str, host: &str, port: u16, mapped: bool) -> bool {
    match split_pattern(pattern) {
        Some((name, Some(only))) => only == port && matches(name, host),
        Some((name, None)) => matches(name, host) && (!mapped || MAPPED_PORTS.contains(&port)),
        None => false,
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .all(|label| !label.is_empty() && label.len() <= 63 && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

/// Whether `name` (lower case) matches `pattern` (a name, or `*.` and a domain).
pub(crate) fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(domain) => name.len() > domain.len() + 1 && name.ends_with(domain) && name.as_bytes()[name.len() - domain.len() - 1] == b'.',
        None => pattern == name,
    }
}

/// Addresses the guest must never reach unless the user mapped a name to them.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || is_shared_v4(v4)
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_internal(IpAddr::V4(v4)),
            None => v6.is_loopback() || v6.is_unspecified() || v6.is_multicast() || is_unique_local(v6) || is_link_local_v6(v6),
        },
    }
}

/// 100.64.0.0/10, carrier-grade NAT: not the public internet either.
fn is_shared_v4(ip: Ipv4Addr) -> bool {
    ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64
}

fn is_unique_local(ip: Ipv6Addr) -> bool {
    (ip.segments()[0] & 0xfe00) == 0xfc00
}

fn is_link_local_v6(ip: Ipv6Addr) -> bool {
    (ip.segments()[0] & 0xffc0) == 0xfe80
}

/// The proxy's answer to one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Allow(SocketAddr),
    /// Allowed, through the upstream proxy (`host:port`), which resolves the name.
    AllowVia(String),
    Deny(String),
}

impl EgressPolicy {
    /// Decides whether the guest may reach `host:port`, resolving the name on the host.
    pub fn decide(&self, host: &str, port: u16) -> Decision {
        let host = host.to_ascii_lowercase();
        if self.mode == NetworkMode::None {
            return Decision::Deny("the network is off (--network none)".into());
        }
        if self.deny.iter().any(|p| covers(p, &host, port, false)) {
            return Decision::Deny(format!("{host} is denied"));
        }
        let mapped = self.hosts.iter().find(|(name, _)| *name == host).map(|(_, ip)| *ip);
        if !self.allow.iter().any(|p| covers(p, &host, port, mapped.is_some())) {
            if mapped.is_some() && self.allow.iter().any(|p| covers(p, &host, MAPPED_PORTS[0], true)) {
                return Decision::Deny(format!(
                    "{host} is mapped with --add-host, so only its ports 80 and 443 are allowed without naming one (--allow {host}:{port})"
                ));
            }
            return Decision::Deny(format!("{host} is not on the allow list (--allow {host})"));
        }
        // A name the user mapped goes where they said, inside addresses included.
        if let Some(ip) = mapped {
            return Decision::Allow(SocketAddr::new(ip, port));
        }
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            if is_internal(ip) {
                return Decision::Deny(format!("{ip} is an internal address"));
            }
        }
        if let Some(upstream) = &self.upstream {
            return Decision::AllowVia(upstream.clone());
        }
        let addrs: Vec<SocketAddr> = match (host.as_str(), port).to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => return Decision::Deny(format!("{host} does not resolve: {e}")),
        };
        // Every address the name has must be public: a name that resolves partly inside is
        // refused whole (DNS rebinding).
        if let Some(inside) = addrs.iter().find(|a| is_internal(a.ip())) {
            return Decision::Deny(format!("{host} resolves to the internal address {} (map it with --add-host)", inside.ip()));
        }
        match addrs.first() {
            Some(addr) => Decision::Allow(*addr),
            None => Decision::Deny(format!("{host} has no address")),
        }
    }
}

/// One proxy request, as the guest sent it.
#[derive(Debug, PartialEq, Eq)]
pub struct ProxyRequest {
    pub host: String,
    pub port: u16,
    /// CONNECT: a tunnel. Otherwise the head to send upstream (origin-form request line).
    pub forward: Option<Vec<u8>>,
}

/// Parses a proxy request head with `httparse`: `CONNECT host:port HTTP/1.x` or `METHOD
/// http://host[:port]/path HTTP/1.x`, then headers. A `Host` header, when there is one, must
/// name the host the request goes to (no fronting one name for another); the head forwarded
/// for a plain request is rebuilt from the parsed parts, in origin form.
pub fn parse_request(head: &[u8]) -> Result<ProxyRequest, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(length)) if length == head.len() => {}
        Ok(httparse::Status::Complete(_)) => return Err("data after the request head".into()),
        Ok(httparse::Status::Partial) => return Err("an incomplete request head".into()),
        Err(e) => return Err(format!("a malformed request head: {e}")),
    }
    let (Some(method), Some(target), Some(version)) = (parsed.method, parsed.path, parsed.version) else {
        return Err("an incomplete request line".into());
    };
    let hosts: Vec<&httparse::Header> = parsed.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("host")).collect();
    let host_header = match hosts.as_slice() {
        [] => None,
        [one] => Some(std::str::from_utf8(one.value).map_err(|_| "a Host header that is not text")?.trim()),
        _ => return Err("more than one Host header".into()),
    };
    let (host, port, forward) = if method == "CONNECT" {
        let (host, port) = split_host_port(target, None)?;
        (host, port, None)
    } else {
        let after_scheme =
            target.strip_prefix("http://").ok_or_else(|| format!("{method} needs an absolute http:// URL, not {target:?}"))?;
        let (authority, path) = match after_scheme.find('/') {
            Some(i) => (&after_scheme[..i], &after_scheme[i..]),
            None => (after_scheme, "/"),
        };
        if authority.contains('@') {
            return Err("credentials in the URL are not forwarded".into());
        }
        let (host, port) = split_host_port(authority, Some(80))?;
        let mut forward = format!("{method} {path} HTTP/1.{version}\r\n").into_bytes();
        let hop_by_hop = hop_by_hop_headers(parsed.headers);
        for header in parsed.headers.iter().filter(|h| !hop_by_hop.iter().any(|n| h.name.eq_ignore_ascii_case(n))) {
            forward.extend_from_slice(header.name.as_bytes());
            forward.extend_from_slice(b": ");
            forward.extend_from_slice(header.value);
            forward.extend_from_slice(b"\r\n");
        }
        // One request per connection: the server must then answer this one only (RFC 9112,
        // 9.6), and the client's next request comes on a new connection, which the proxy
        // decides and logs anew. A kept-alive connection would carry later requests, for any
        // host, past the allow list.
        forward.extend_from_slice(b"Connection: close\r\n\r\n");
        (host, port, Some(forward))
    };
    if let Some(named) = host_header {
        let (named_host, _) = split_host_port(named, Some(port)).map_err(|e| format!("the Host header: {e}"))?;
        if !named_host.eq_ignore_ascii_case(&host) {
            return Err(format!("the Host header names {named_host:?}, not the request's {host:?}"));
        }
    }
    Ok(ProxyRequest { host, port, forward })
}

/// The headers of a request that are for the proxy hop, not the server: the standard ones and
/// those its `Connection` header names.
fn hop_by_hop_headers(headers: &[httparse::Header<'_>]) -> Vec<String> {
    let mut names: Vec<String> =
        ["connection", "proxy-connection", "keep-alive", "proxy-authorization", "te", "trailer", "upgrade"].map(String::from).to_vec();
    for header in headers.iter().filter(|h| h.name.eq_ignore_ascii_case("connection")) {
        names.extend(String::from_utf8_lossy(header.value).split(',').map(|n| n.trim().to_ascii_lowercase()).filter(|n| !n.is_empty()));
    }
    names
}

/// `host[:port]` or `[v6][:port]`, the host a name or an address.
pub(crate) fn split_host_port(authority: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (ip, after) = v6.split_once(']').ok_or_else(|| format!("bad address {authority:?}"))?;
        (ip.to_string(), after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("bad port in {authority:?}"))?,
        None => default_port.ok_or_else(|| format!("{authority:?} has no port"))?,
    };
    if host.is_empty() || !(valid_name(&host) || host.parse::<IpAddr>().is_ok()) {
        return Err(format!("bad host {host:?}"));
    }
    Ok((host, port))
}

/// Where decisions are written: `$XDG_STATE_HOME/cvm/network.log`, else
/// `~/.local/state/cvm/network.log`.
pub fn audit_log_path() -> PathBuf {
    crate::xdg_dir("XDG_STATE_HOME", ".local/state").join("cvm/network.log")
}

/// Appends decisions to the audit log, one line each.
#[derive(Clone)]
struct Audit(Arc<Mutex<std::fs::File>>, String);

impl Audit {
    fn open(path: &Path, session: String) -> io::Result<Audit> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::File::options().create(true).append(true).open(path)?;
        Ok(Audit(Arc::new(Mutex::new(file)), session))
    }

    fn record(&self, verdict: &str, target: &str, reason: &str) {
        let line = audit_line(SystemTime::now(), &self.1, verdict, target, reason);
        let _ = self.0.lock().unwrap_or_else(|e| e.into_inner()).write_all(line.as_bytes());
    }
}

/// One line of the audit log, its time in RFC 3339 (UTC). The target and the reason carry what
/// the guest sent: their control characters are escaped, so that a request can neither start
/// a forged line (CR, LF) nor drive the terminal of whoever reads the log (ESC).
fn audit_line(at: SystemTime, session: &str, verdict: &str, target: &str, reason: &str) -> String {
    let time = humantime::format_rfc3339_seconds(at);
    format!("{time} session={session} {verdict} {} {}\n", escape_controls(target), escape_controls(reason))
}

fn escape_controls(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// Serves `policy` on `socket` (the VM's `<vsock socket>_3128`), swapping in `secrets` where
/// they may go, logging to `audit`; stops accepting when the result is dropped.
pub fn start_proxy(
    socket: &Path,
    policy: EgressPolicy,
    secrets: Option<Arc<SecretSwap>>,
    audit: &Path,
    session: String,
) -> io::Result<Listening> {
    let audit = Audit::open(audit, session)?;
    Listening::unix(socket, move |conn| serve(conn, &policy, secrets.as_deref(), &audit))
}

/// A connection to `target` through the HTTP proxy at `proxy`, by `CONNECT`.
fn tunnel(proxy: &str, target: &str) -> io::Result<TcpStream> {
    let addr = proxy.to_socket_addrs()?.next().ok_or_else(|| io::Error::other(format!("the proxy {proxy} has no address")))?;
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    write!(&stream, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")?;
    // Byte by byte up to the blank line: nothing of the tunnelled stream may be read here.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD || (&stream).read(&mut byte)? == 0 {
            return Err(io::Error::other(format!("the proxy {proxy} closed or sent too long an answer")));
        }
        head.push(byte[0]);
    }
    let status = String::from_utf8_lossy(&head[..head.iter().position(|&b| b == b'\r').unwrap_or(0)]).into_owned();
    let code = status.split(' ').nth(1).unwrap_or("");
    if !(status.starts_with("HTTP/1.") && code.len() == 3 && code.starts_with('2')) {
        return Err(io::Error::other(format!("the proxy {proxy} answered {status:?}")));
    }
    stream.set_read_timeout(None)?;
    Ok(stream)
}

/// Reads the request head: up to the blank line, at most MAX_HEAD bytes, all of it before
/// `deadline` (a guest that trickles bytes holds a connection no longer than that). What
/// follows the head stays in `reader`'s buffer.
fn read_head(reader: &mut BufReader<UnixStream>, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") && head.len() < MAX_HEAD {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        reader.get_ref().set_read_timeout(Some(left))?;
        let available = match reader.fill_buf() {
            // The socket's timeout: the deadline passed.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(io::ErrorKind::TimedOut.into()),
            other => other?,
        };
        if available.is_empty() {
            break;
        }
        // Line by line, so that nothing past the blank line is taken.
        let line = available.iter().position(|&b| b == b'\n').map_or(available.len(), |i| i + 1).min(MAX_HEAD - head.len());
        head.extend_from_slice(&available[..line]);
        reader.consume(line);
    }
    Ok(head)
}

fn serve(conn: UnixStream, policy: &EgressPolicy, secrets: Option<&SecretSwap>, audit: &Audit) {
    let Ok(writer) = conn.try_clone() else { return };
    let mut reader = BufReader::new(conn);
    let refuse = |mut w: &UnixStream, status: &str, message: &str| {
        let body = format!("cvm: {message}\n");
        let _ =
            write!(w, "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    };
    let head = match read_head(&mut reader, Instant::now() + CONNECT_TIMEOUT) {
        Ok(h) if h.ends_with(b"\r\n\r\n") => h,
        _ => {
            refuse(&writer, "400 Bad Request", "a proxy request must end its head with a blank line");
            return;
        }
    };
    let request = match parse_request(&head) {
        Ok(r) => r,
        Err(e) => {
            audit.record("deny", "-", &e);
            refuse(&writer, "400 Bad Request", &e);
            return;
        }
    };
    let target = match request.host.parse::<Ipv6Addr>() {
        Ok(_) => format!("[{}]:{}", request.host, request.port),
        Err(_) => format!("{}:{}", request.host, request.port),
    };
    let intercepted = secrets.filter(|s| s.intercepts(&request.host));
    if let (Some(swap), Some(head)) = (secrets, &request.forward) {
        for secret in swap.placeholders_in(head) {
            audit.record("placeholder", &target, &format!("{}'s placeholder sent in plain HTTP, not swapped", secret.name));
        }
    }
    // The allow list first; then a host that secrets go to takes HTTPS only, so that a value
    // never crosses the network in clear.
    let decision = match (policy.decide(&request.host, request.port), intercepted, &request.forward) {
        (Decision::Deny(reason), _, _) => Decision::Deny(reason),
        (_, Some(swap), Some(_)) => {
            let names: Vec<&str> = swap.secrets().iter().filter(|s| s.applies_to(&request.host)).map(|s| s.name.as_str()).collect();
            Decision::Deny(format!("plain HTTP to a host that secrets go to ({}): use https", names.join(", ")))
        }
        (allowed, _, _) => allowed,
    };
    let (connected, via) = match decision {
        Decision::Allow(addr) => (TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT), addr.to_string()),
        Decision::AllowVia(proxy) => (tunnel(&proxy, &target), format!("via {proxy}")),
        Decision::Deny(reason) => {
            audit.record("deny", &target, &reason);
            refuse(&writer, "403 Forbidden", &format!("egress to {target} refused: {reason}"));
            return;
        }
    };
    let upstream = match connected {
        Ok(s) => s,
        Err(e) => {
            audit.record("fail", &target, &format!("{via}: {e}"));
            refuse(&writer, "502 Bad Gateway", &format!("cannot reach {target}: {e}"));
            return;
        }
    };
    if let Some(swap) = intercepted {
        drop(writer);
        intercept(swap, reader, upstream, &request.host, &target, &via, audit);
        return;
    }
    audit.record("allow", &target, &via);
    let _ = reader.get_ref().set_read_timeout(None);
    let result = match &request.forward {
        None => (&writer).write_all(b"HTTP/1.1 200 Connection established\r\n\r\n"),
        Some(head) => (&upstream).write_all(head),
    };
    // Whatever the guest already sent past the head goes first; then both ways.
    if result.is_err() || (&upstream).write_all(reader.buffer()).is_err() {
        return;
    }
    drop(writer);
    splice(Box::new(reader.into_inner()), Box::new(upstream), Some(TUNNEL_IDLE));
}

/// A CONNECT to a host that secrets go to: TLS with the real host first (a failure is the
/// CONNECT's answer), then the guest's TLS ended here and its requests rewritten.
fn intercept(swap: &SecretSwap, guest: BufReader<UnixStream>, upstream: TcpStream, host: &str, target: &str, via: &str, audit: &Audit) {
    let answer = |text: &str| {
        let mut conn: &UnixStream = guest.get_ref();
        conn.write_all(text.as_bytes())
    };
    let upstream = match swap.connect_upstream(host, upstream) {
        Ok(upstream) => upstream,
        Err(e) => {
            audit.record("fail", target, &format!("{via}: {e:#}"));
            let body = format!("cvm: cannot reach {target}: {e:#}\n");
            let _ = answer(&format!(
                "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ));
            return;
        }
    };
    audit.record("allow", target, &format!("{via}, intercepted to swap secrets"));
    if answer("HTTP/1.1 200 Connection established\r\n\r\n").is_err() {
        return;
    }
    let early = guest.buffer().to_vec();
    let note = |note: Note| match note {
        Note::Swapped { secret, place } => audit.record("swap", target, &format!("{secret} in {place}")),
        Note::NotSwapped { secret, place } => {
            audit.record("placeholder", target, &format!("{secret}'s placeholder in {place}, not swapped: not one of its hosts"))
        }
    };
    if let Err(e) = swap.relay(guest.into_inner(), &early, host, upstream, TUNNEL_IDLE, &note) {
        audit.record("fail", target, &format!("{e:#}"));
    }
}

#[cfg(test)]
mod tests;
