//! Streams between host and guest besides execs, each a listener on one side and a relay over
//! vsock to the other:
//! - `-p HOSTPORT:GUESTPORT`: 127.0.0.1:HOSTPORT on the host, to 127.0.0.1:GUESTPORT in the
//!   guest (the agent's `Forward` request);
//! - `--host-port PORT`: 127.0.0.1:PORT in the guest, to 127.0.0.1:PORT on the host (a local
//!   database, an MCP server), through host vsock port [`HOST_PORT_BASE`] + PORT;
//! - `-A`: an `SSH_AUTH_SOCK` in the guest, to the host's SSH agent, through vsock port
//!   [`SSH_AGENT_PORT`], passing only the requests that list keys and sign with them
//!   ([`relay_ssh_agent`]): a guest cannot add, remove or lock the host's keys;
//! - `--gpg`: a `GNUPGHOME` in the guest holding the host's public keyring and an agent socket
//!   that reaches the host gpg-agent's extra socket (the one gpg made for remote use: it
//!   signs and decrypts, but cannot export or change keys), through vsock port
//!   [`GPG_AGENT_PORT`].

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cvm_agent::protocol::{self, Listen, Reply, Request, Step, CONTROL_PORT};

/// The host vsock port of the SSH agent relay.
pub const SSH_AGENT_PORT: u32 = 1029;
/// `--host-port P` is host vsock port HOST_PORT_BASE + P.
pub const HOST_PORT_BASE: u32 = 40_000;
/// Where the guest finds the SSH agent.
pub const GUEST_SSH_AUTH_SOCK: &str = "/run/cvm/ssh-agent.sock";
/// The host vsock port of the GPG agent relay.
pub const GPG_AGENT_PORT: u32 = 1030;
/// The guest's GNUPGHOME with `--gpg`: gpg looks for its agent there.
pub const GUEST_GNUPGHOME: &str = "/run/cvm/gnupg";
/// The public keyring files copied into the guest's GNUPGHOME, when the host has them.
const GPG_KEYRING_FILES: [&str; 2] = ["pubring.kbx", "trustdb.gpg"];
/// The keyring travels in the set-up request, whose frames are at most 1 MiB.
const MAX_GPG_KEYRING: u64 = 512 * 1024;

/// A stream either side of a relay.
pub trait Stream: Read + Write + Send + 'static {
    fn clone_stream(&self) -> io::Result<Box<dyn Stream>>;
    /// The other end sees the end of what this side sends.
    fn close_write(&self);
    /// Both ways end, for every handle of the stream.
    fn close(&self);
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

/// TCP and Unix streams are relayed alike: their std methods have the same names.
macro_rules! impl_stream {
    ($($stream:ty),*) => {$(
        impl Stream for $stream {
            fn clone_stream(&self) -> io::Result<Box<dyn Stream>> {
                Ok(Box::new(self.try_clone()?))
            }
            fn close_write(&self) {
                let _ = self.shutdown(Shutdown::Write);
            }
            fn close(&self) {
                let _ = self.shutdown(Shutdown::Both);
            }
            fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
                <$stream>::set_read_timeout(self, timeout)
            }
        }
    )*};
}
impl_stream!(TcpStream, UnixStream);

/// The most connections one listener serves at a time: past it, a new one is closed at once
/// (the guest is told no), so a flood costs the host a bounded number of threads and fds.
pub const MAX_CONNECTIONS: usize = 256;

/// Copies both ways until each side ends, passing each end on; with `idle`, ends both ways
/// once neither has carried a byte for that long.
pub fn splice(a: Box<dyn Stream>, b: Box<dyn Stream>, idle: Option<Duration>) {
    let (Ok(a_read), Ok(b_read)) = (a.clone_stream(), b.clone_stream()) else { return };
    let activity = Arc::new(Activity { start: Instant::now(), last: AtomicU64::new(0) });
    let forward_activity = activity.clone();
    let forward = std::thread::Builder::new().name("splice".into()).spawn(move || {
        let mut b = b;
        copy(a_read, &mut *b, idle, &forward_activity);
        b.close_write();
    });
    // No thread to spare: the connection ends (both streams are dropped).
    let Ok(forward) = forward else { return };
    let mut a = a;
    copy(b_read, &mut *a, idle, &activity);
    a.close_write();
    let _ = forward.join();
}

/// When a spliced connection last carried a byte either way.
struct Activity {
    start: Instant,
    /// Milliseconds from `start`.
    last: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        self.start.elapsed().saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }
}

/// One way of a [`splice`]: `from` into `to` until `from` ends, or until the connection has
/// been idle for `idle` (then both streams are closed, which ends the other way too).
fn copy(mut from: Box<dyn Stream>, to: &mut dyn Stream, idle: Option<Duration>, activity: &Activity) {
    let Some(idle) = idle else {
        let _ = io::copy(&mut from, to);
        return;
    };
    // Woken now and then to look at the other way's activity.
    if from.set_read_timeout(Some((idle / 4).min(Duration::from_secs(30)))).is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                activity.touch();
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => {
                if activity.quiet_for() >= idle {
                    from.close();
                    to.close();
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// Where a stoppable accept loop listens, so that dropping it can wake the loop.
enum Wake {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// An accept loop on its own thread, each connection handled on another, at most
/// [`MAX_CONNECTIONS`] at a time; stops accepting when dropped (connections under way end
/// with the VM).
pub struct Listening {
    stop: Arc<AtomicBool>,
    wake: Wake,
    open: Arc<AtomicUsize>,
}

impl Listening {
    fn spawn<S: Stream>(
        wake: Wake,
        mut accept: impl FnMut() -> io::Result<S> + Send + 'static,
        handle: impl Fn(S) + Send + Sync + 'static,
    ) -> io::Result<Listening> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let handle = Arc::new(handle);
        let open = Arc::new(AtomicUsize::new(0));
        let counted = open.clone();
        // The listener confines itself, and so every connection's thread it starts, before
        // it accepts the first.
        let (confined, is_confined) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new().name("listen".into()).spawn(move || {
            let result = cvm_sandbox::seccomp::confine_thread(cvm_sandbox::seccomp::Role::Listener);
            let failed = result.is_err();
            let _ = confined.send(result);
            if failed {
                return;
            }
            loop {
                let conn = accept();
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else {
                    // Out of fds, most likely: wait for some to close rather than spin.
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    continue;
                };
                if counted.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    counted.fetch_sub(1, Ordering::SeqCst);
                    continue; // dropped: closed at once
                }
                let (handle, done) = (handle.clone(), counted.clone());
                let served = std::thread::Builder::new().name("connection".into()).spawn(move || {
                    handle(conn);
                    done.fetch_sub(1, Ordering::SeqCst);
                });
                if served.is_err() {
                    counted.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })?;
        is_confined.recv().map_err(|_| io::Error::other("the listener's thread ended"))??;
        Ok(Listening { stop, wake, open })
    }

    /// Serves each connection to the Unix socket `path` with `handle`.
    pub fn unix(path: &Path, handle: impl Fn(UnixStream) + Send + Sync + 'static) -> io::Result<Listening> {
        let listener = UnixListener::bind(path)?;
        Self::spawn(Wake::Unix(path.to_path_buf()), move || listener.accept().map(|(s, _)| s), handle)
    }

    /// Serves each connection to 127.0.0.1:`port` with `handle`.
    pub fn tcp(port: u16, handle: impl Fn(TcpStream) + Send + Sync + 'static) -> io::Result<Listening> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
        let addr = listener.local_addr()?;
        Self::spawn(Wake::Tcp(addr), move || listener.accept().map(|(s, _)| s), handle)
    }
}

impl Listening {
    /// The connections being served now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        match &self.wake {
            Wake::Tcp(addr) => drop(TcpStream::connect(addr)),
            Wake::Unix(path) => {
                let _ = UnixStream::connect(path);
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// `-p HOSTPORT:GUESTPORT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Publish {
    pub host_port: u16,
    pub guest_port: u16,
}

/// Parses `-p HOSTPORT:GUESTPORT` (the host side is always 127.0.0.1).
pub fn parse_publish(text: &str) -> Result<Publish, String> {
    let port = |p: &str| {
        p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("bad port {p:?} in -p {text:?}: expected HOSTPORT:GUESTPORT"))
    };
    match text.split_once(':') {
        Some((host, guest)) => Ok(Publish { host_port: port(host)?, guest_port: port(guest)? }),
        None => Err(format!("bad -p {text:?}: expected HOSTPORT:GUESTPORT")),
    }
}

/// Parses `--host-port PORT`.
pub fn parse_host_port(text: &str) -> Result<u16, String> {
    text.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("bad --host-port {text:?}: expected a port number"))
}

/// What a session forwards, as plain data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForwardRequest {
    pub publish: Vec<Publish>,
    pub host_ports: Vec<u16>,
    /// The host agent's socket (`$SSH_AUTH_SOCK`) for `-A`.
    pub ssh_agent: Option<PathBuf>,
    /// The host's GPG agent for `--gpg`.
    pub gpg_agent: Option<GpgAgent>,
}

/// The host's GPG agent, as `--gpg` forwards it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpgAgent {
    /// The agent's extra socket.
    pub socket: PathBuf,
    /// Public keyring files (name, contents) for the guest's GNUPGHOME.
    pub keyring: Vec<(String, Vec<u8>)>,
}

impl GpgAgent {
    /// Finds the host's agent through `gpgconf` (starting it if it is not running) and reads
    /// the public keyring.
    pub fn from_host() -> Result<GpgAgent> {
        let gpgconf = |args: &[&str]| -> Result<String> {
            let out =
                std::process::Command::new("gpgconf").args(args).output().context("--gpg: cannot run gpgconf (Debian package gpgconf)")?;
            if !out.status.success() {
                bail!("--gpg: gpgconf {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        gpgconf(&["--launch", "gpg-agent"])?;
        let socket = PathBuf::from(gpgconf(&["--list-dirs", "agent-extra-socket"])?);
        if !socket.exists() {
            bail!("--gpg: the GPG agent has no extra socket at {} (is `extra-socket` disabled in gpg-agent.conf?)", socket.display());
        }
        let home = PathBuf::from(gpgconf(&["--list-dirs", "homedir"])?);
        let mut keyring = Vec::new();
        let mut total = 0;
        for name in GPG_KEYRING_FILES {
            let Ok(contents) = std::fs::read(home.join(name)) else { continue };
            total += contents.len() as u64;
            keyring.push((name.to_string(), contents));
        }
        if total > MAX_GPG_KEYRING {
            bail!(
                "--gpg: the public keyring in {} is {} KiB, more than the {} KiB cvm copies into the guest",
                home.display(),
                total >> 10,
                MAX_GPG_KEYRING >> 10
            );
        }
        Ok(GpgAgent { socket, keyring })
    }
}

impl ForwardRequest {
    /// The guest's set-up steps: its relays to the host.
    pub fn steps(&self) -> Vec<Step> {
        let mut steps: Vec<Step> =
            self.host_ports.iter().map(|p| Step::Relay { listen: Listen::Tcp(*p), host_port: HOST_PORT_BASE + u32::from(*p) }).collect();
        if self.ssh_agent.is_some() {
            steps.push(Step::Relay { listen: Listen::Unix(GUEST_SSH_AUTH_SOCK.as_bytes().to_vec()), host_port: SSH_AGENT_PORT });
        }
        if let Some(gpg) = &self.gpg_agent {
            // The relay first: it makes the directory, the user's alone.
            steps.push(Step::Relay {
                listen: Listen::Unix(format!("{GUEST_GNUPGHOME}/S.gpg-agent").into_bytes()),
                host_port: GPG_AGENT_PORT,
            });
            steps.extend(gpg.keyring.iter().map(|(name, contents)| Step::File {
                target: format!("{GUEST_GNUPGHOME}/{name}").into_bytes(),
                contents: contents.clone(),
            }));
        }
        steps
    }

    /// What commands get to find the forwards.
    pub fn environment(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut env = Vec::new();
        if self.ssh_agent.is_some() {
            env.push((b"SSH_AUTH_SOCK".to_vec(), GUEST_SSH_AUTH_SOCK.as_bytes().to_vec()));
        }
        if self.gpg_agent.is_some() {
            env.push((b"GNUPGHOME".to_vec(), GUEST_GNUPGHOME.as_bytes().to_vec()));
        }
        env
    }

    /// Starts the host ends: the guest's relays arrive on `<vsock>_<port>` in `dir`;
    /// published ports listen on 127.0.0.1 and reach the agent through `vsock`.
    pub fn start(&self, dir: &Path, vsock: &Path) -> Result<Vec<Listening>> {
        let mut listening = Vec::new();
        for &port in &self.host_ports {
            let socket = dir.join(format!("vsock_{}", HOST_PORT_BASE + u32::from(port)));
            listening.push(Listening::unix(&socket, move |guest| {
                if let Ok(host) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
                    splice(Box::new(guest), Box::new(host), None);
                }
            })?);
        }
        if let Some(agent) = &self.ssh_agent {
            if !agent.exists() {
                bail!("-A: the SSH agent socket {} does not exist (is ssh-agent running?)", agent.display());
            }
            let agent = agent.clone();
            listening.push(Listening::unix(&dir.join(format!("vsock_{SSH_AGENT_PORT}")), move |guest| relay_ssh_agent(guest, &agent))?);
        }
        if let Some(gpg) = &self.gpg_agent {
            listening.push(relay_to_socket(dir, GPG_AGENT_PORT, &gpg.socket)?);
        }
        for publish in &self.publish {
            let vsock = vsock.to_path_buf();
            let guest_port = publish.guest_port;
            let listener = Listening::tcp(publish.host_port, move |host| {
                if let Ok(guest) = open_guest_port(&vsock, guest_port) {
                    splice(Box::new(host), Box::new(guest), None);
                }
            })
            .with_context(|| {
                format!("-p {}:{}: cannot listen on 127.0.0.1:{}", publish.host_port, publish.guest_port, publish.host_port)
            })?;
            listening.push(listener);
        }
        Ok(listening)
    }
}

/// SSH agent messages (draft-miller-ssh-agent): a request's type byte after its length.
const SSH_AGENTC_REQUEST_IDENTITIES: u8 = 11;
const SSH_AGENTC_SIGN_REQUEST: u8 = 13;
const SSH_AGENTC_EXTENSION: u8 = 27;
const SSH_AGENT_FAILURE: u8 = 5;
/// The one extension passed: OpenSSH binds a forwarded agent to the session it serves.
const SESSION_BIND: &[u8] = b"session-bind@openssh.com";
/// The longest message OpenSSH's agent takes.
const MAX_AGENT_MESSAGE: usize = 256 << 10;
/// How long the host agent may take to answer (a key that asks for a touch or a PIN).
const AGENT_ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether the guest may make the agent request `message` (its type byte and contents): list
/// keys, sign, bind the session; never add, remove or lock keys.
fn ssh_agent_allows(message: &[u8]) -> bool {
    match message.first() {
        Some(&SSH_AGENTC_REQUEST_IDENTITIES | &SSH_AGENTC_SIGN_REQUEST) => true,
        Some(&SSH_AGENTC_EXTENSION) => message
            .get(1..5)
            .and_then(|n| n.try_into().ok())
            .map(u32::from_be_bytes)
            .is_some_and(|n| message.get(5..5 + n as usize) == Some(SESSION_BIND)),
        _ => false,
    }
}

/// One agent message from `from` (its length prefix taken off); None at a clean end.
fn read_agent_message(mut from: impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut length = [0u8; 4];
    match from.read_exact(&mut length) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        other => other?,
    }
    let length = u32::from_be_bytes(length) as usize;
    if length == 0 || length > MAX_AGENT_MESSAGE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("an agent message of {length} bytes")));
    }
    let mut message = vec![0u8; length];
    from.read_exact(&mut message)?;
    Ok(Some(message))
}

fn write_agent_message(mut to: impl Write, message: &[u8]) -> io::Result<()> {
    to.write_all(&[&(message.len() as u32).to_be_bytes()[..], message].concat())
}

/// Serves one guest connection of `-A`: each request the guest may make goes to the host agent
/// at `agent` and its answer back; any other is answered with a failure and never reaches it.
fn relay_ssh_agent(guest: UnixStream, agent: &Path) {
    let Ok(host) = UnixStream::connect(agent) else { return };
    if host.set_read_timeout(Some(AGENT_ANSWER_TIMEOUT)).is_err() {
        return;
    }
    while let Ok(Some(request)) = read_agent_message(&guest) {
        let answer = if ssh_agent_allows(&request) {
            match write_agent_message(&host, &request).and_then(|()| read_agent_message(&host)) {
                Ok(Some(answer)) => answer,
                _ => return,
            }
        } else {
            tracing::info!("-A: refused an SSH agent request of type {} from the guest", request[0]);
            vec![SSH_AGENT_FAILURE]
        };
        if write_agent_message(&guest, &answer).is_err() {
            return;
        }
    }
}

/// Relays each guest connection to host vsock `port` to the Unix socket `target`.
fn relay_to_socket(dir: &Path, port: u32, target: &Path) -> Result<Listening> {
    let target = target.to_path_buf();
    Ok(Listening::unix(&dir.join(format!("vsock_{port}")), move |guest| {
        if let Ok(host) = UnixStream::connect(&target) {
            splice(Box::new(guest), Box::new(host), None);
        }
    })?)
}

/// A stream to 127.0.0.1:`port` in the guest, through the agent.
fn open_guest_port(vsock: &Path, port: u16) -> io::Result<UnixStream> {
    let mut conn = crate::network::vsock::connect_port(vsock, CONTROL_PORT)?;
    protocol::write_frame(&mut conn, &Request::Forward { port }.encode())?;
    match protocol::read_reply(&mut conn)? {
        Some(Reply::Done) => Ok(conn),
        Some(Reply::Failed(message)) => Err(io::Error::new(io::ErrorKind::ConnectionRefused, message)),
        other => Err(io::Error::other(format!("unexpected answer to a forward: {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(parse_publish("8080:80"), Ok(Publish { host_port: 8080, guest_port: 80 }));
        for bad in ["8080", "0:80", "8080:0", "a:80", "8080:80:1", "70000:80", ":80", ""] {
            assert!(parse_publish(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_host_port("5432"), Ok(5432));
        assert!(parse_host_port("0").is_err() && parse_host_port("x").is_err());
    }

    #[test]
    fn the_ssh_agent_relay_passes_listing_and_signing_only() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        // A stand-in agent: records each request's type and answers SUCCESS (6).
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorded = seen.clone();
        std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            while let Ok(Some(request)) = read_agent_message(&conn) {
                recorded.lock().unwrap().push(request[0]);
                write_agent_message(&conn, &[6]).unwrap();
            }
        });
        let (guest, relay_end) = UnixStream::pair().unwrap();
        let relay = std::thread::spawn(move || relay_ssh_agent(relay_end, &socket));
        let ask = |message: &[u8]| {
            write_agent_message(&guest, message).unwrap();
            read_agent_message(&guest).unwrap().unwrap()
        };
        let bind = [&[SSH_AGENTC_EXTENSION][..], &(SESSION_BIND.len() as u32).to_be_bytes(), SESSION_BIND, b"rest"].concat();
        let other_extension = [&[SSH_AGENTC_EXTENSION][..], &4u32.to_be_bytes(), b"evil"].concat();
        assert_eq!(ask(&[SSH_AGENTC_REQUEST_IDENTITIES]), [6], "ssh-add -l");
        assert_eq!(ask(&[SSH_AGENTC_SIGN_REQUEST, 0, 0]), [6], "a signature");
        assert_eq!(ask(&bind), [6], "session-bind");
        // ssh-add -D, -d, a key added, -x (lock), -X (unlock), a smartcard, another extension.
        for refused in [&[19u8][..], &[18, 0], &[17, 0], &[22, 0], &[23, 0], &[20, 0], &other_extension] {
            assert_eq!(ask(refused), [SSH_AGENT_FAILURE], "{refused:?}");
        }
        assert_eq!(*seen.lock().unwrap(), [SSH_AGENTC_REQUEST_IDENTITIES, SSH_AGENTC_SIGN_REQUEST, SSH_AGENTC_EXTENSION]);
        // A length past the limit ends the connection.
        (&guest).write_all(&u32::MAX.to_be_bytes()).unwrap();
        relay.join().unwrap();
    }

    #[test]
    fn guest_steps_and_environment() {
        let none = ForwardRequest::default();
        assert!(none.steps().is_empty() && none.environment().is_empty());
        let gpg = GpgAgent { socket: "/tmp/S.gpg-agent.extra".into(), keyring: vec![("pubring.kbx".into(), b"keys".to_vec())] };
        let all = ForwardRequest { publish: vec![], host_ports: vec![5432], ssh_agent: Some("/tmp/agent".into()), gpg_agent: Some(gpg) };
        assert_eq!(
            all.steps(),
            [
                Step::Relay { listen: Listen::Tcp(5432), host_port: HOST_PORT_BASE + 5432 },
                Step::Relay { listen: Listen::Unix(GUEST_SSH_AUTH_SOCK.as_bytes().to_vec()), host_port: SSH_AGENT_PORT },
                Step::Relay { listen: Listen::Unix(b"/run/cvm/gnupg/S.gpg-agent".to_vec()), host_port: GPG_AGENT_PORT },
                Step::File { target: b"/run/cvm/gnupg/pubring.kbx".to_vec(), contents: b"keys".to_vec() },
            ]
        );
        assert_eq!(
            all.environment(),
            [
                (b"SSH_AUTH_SOCK".to_vec(), GUEST_SSH_AUTH_SOCK.as_bytes().to_vec()),
                (b"GNUPGHOME".to_vec(), GUEST_GNUPGHOME.as_bytes().to_vec())
            ]
        );
    }

    /// This process's thread and open fd counts.
    fn threads_and_fds() -> (usize, usize) {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let threads = status.lines().find_map(|l| l.strip_prefix("Threads:")).unwrap().trim().parse().unwrap();
        (threads, std::fs::read_dir("/proc/self/fd").unwrap().count())
    }

    #[test]
    fn a_connection_resolves_names_and_connects_under_the_listeners_filter() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("resolve.sock");
        let server = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = server.local_addr().unwrap().port();
        // What the proxy does for an allowed name: glibc's resolver (its files, its modules),
        // then a connection with a deadline.
        let _listening = Listening::unix(&socket, move |mut conn| {
            let said = match std::net::ToSocketAddrs::to_socket_addrs(&("localhost", port)).map(|mut a| a.find(SocketAddr::is_ipv4)) {
                Ok(Some(addr)) => match TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5)) {
                    Ok(_) => format!("connected to {addr}"),
                    Err(e) => format!("connect: {e}"),
                },
                other => format!("resolve: {other:?}"),
            };
            let _ = conn.write_all(said.as_bytes());
        })
        .unwrap();
        let mut answer = String::new();
        UnixStream::connect(&socket).unwrap().read_to_string(&mut answer).unwrap();
        assert_eq!(answer, format!("connected to 127.0.0.1:{port}"));
    }

    #[test]
    fn a_flood_of_connections_is_served_up_to_the_cap_and_told_no_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("flood.sock");
        // Each connection is held until its client goes: as a guest that never lets go would.
        let listening = Listening::unix(&socket, |conn| {
            let _ = io::copy(&mut &conn, &mut io::sink());
        })
        .unwrap();
        let before = threads_and_fds();
        let mut clients = Vec::new();
        for _ in 0..2000 {
            clients.push(UnixStream::connect(&socket).unwrap());
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while listening.open_connections() < MAX_CONNECTIONS && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let during = threads_and_fds();
        eprintln!(
            "2000 connections held: {} served, threads {} -> {}, fds {} -> {} (2000 of them the clients')",
            listening.open_connections(),
            before.0,
            during.0,
            before.1,
            during.1
        );
        assert_eq!(listening.open_connections(), MAX_CONNECTIONS);
        // Counted for the whole process: other tests of this binary run beside this one and
        // hold a few threads and fds of their own.
        let others = 16;
        assert!(during.0 <= before.0 + MAX_CONNECTIONS + others, "threads: {before:?} -> {during:?}");
        assert!(during.1 <= before.1 + 2000 + MAX_CONNECTIONS + others, "fds: {before:?} -> {during:?}");
        // Those past the cap were closed: their reads end at once.
        let refused = clients.iter().filter(|c| {
            c.set_read_timeout(Some(std::time::Duration::from_millis(1))).unwrap();
            matches!((&**c).read(&mut [0u8; 1]), Ok(0))
        });
        assert_eq!(refused.count(), 2000 - MAX_CONNECTIONS);
        // Once they go, new connections are served again.
        drop(clients);
        while listening.open_connections() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(listening.open_connections(), 0);
    }

    #[test]
    fn an_idle_splice_ends_both_ways_and_a_busy_one_does_not() {
        let idle = Duration::from_millis(400);
        let (a, mut a_peer) = UnixStream::pair().unwrap();
        let (b, mut b_peer) = UnixStream::pair().unwrap();
        let relay = std::thread::spawn(move || splice(Box::new(a), Box::new(b), Some(idle)));
        // Bytes one way only, every 100 ms for 2 s: the connection stays.
        let mut byte = [0u8; 1];
        let mut quiet = Instant::now();
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(100));
            a_peer.write_all(b"x").unwrap();
            b_peer.read_exact(&mut byte).unwrap();
            quiet = Instant::now();
        }
        assert!(!relay.is_finished(), "a busy connection was ended");
        // Then nothing: both ends are closed soon after the idle time.
        for peer in [&a_peer, &b_peer] {
            peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        let mut rest = Vec::new();
        b_peer.read_to_end(&mut rest).unwrap();
        a_peer.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        let waited = quiet.elapsed();
        assert!(waited >= idle && waited < idle * 4, "{waited:?}");
        relay.join().unwrap();
    }

    #[test]
    fn splice_carries_both_ways_and_passes_the_ends_on() {
        let (a, a_peer) = UnixStream::pair().unwrap();
        let (b, b_peer) = UnixStream::pair().unwrap();
        let relay = std::thread::spawn(move || splice(Box::new(a), Box::new(b), None));
        let (mut a_peer, mut b_peer) = (a_peer, b_peer);
        a_peer.write_all(b"ping").unwrap();
        a_peer.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        b_peer.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"ping");
        b_peer.write_all(b"pong").unwrap();
        b_peer.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        a_peer.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"pong");
        relay.join().unwrap();
    }
}
