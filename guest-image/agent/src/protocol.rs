//! The agent's control protocol: length-prefixed frames over one stream per exec.
//!
//! A frame is a little-endian u32 length (of what follows), a one-byte tag, and the payload.
//! The host opens a connection to [`CONTROL_PORT`] and sends [`Request::Exec`] (or
//! [`Request::Shutdown`]); then stdin, resizes and signals go one way, and output and the exit
//! status come back as [`Reply`] frames. The agent announces itself by connecting to the
//! host's [`READY_PORT`] and sending [`Reply::Ready`].
//!
//! Both ends treat the other as untrusted: every length is checked before it is used.

use std::io::{self, Read, Write};

/// Guest vsock port the agent serves execs on.
pub const CONTROL_PORT: u32 = 1024;
/// Host vsock port the agent connects to once it is ready.
pub const READY_PORT: u32 = 1025;
/// The egress proxy: the host's vsock port, and the guest's 127.0.0.1 port relayed to it.
pub const PROXY_PORT: u32 = 3128;
/// Where [`Step::TrustCa`] puts the proxy's CA certificate (what `NODE_EXTRA_CA_CERTS` names).
pub const PROXY_CA_FILE: &str = "/run/cvm/proxy-ca.pem";
/// Kernel command-line words the agent reads: `cvm.debug` (its messages on the console) and
/// `cvm.boot_test` (print [`BOOT_TEST_LINE`] and reset at once: a boot measured to init).
pub const CMDLINE_DEBUG: &str = "cvm.debug";
pub const CMDLINE_BOOT_TEST: &str = "cvm.boot_test";
/// How the agent's line under `cvm.boot_test` begins.
pub const BOOT_TEST_LINE: &str = "cvm-agent: init reached";
/// `cvm.snapshot_test`: print [`SNAPSHOT_TEST_BEFORE`], reach init (the boot timer, where `cvm boot
/// --snapshot` snapshots), then [`SNAPSHOT_TEST_TICKS`] lines `cvm-agent: tick N` 100 ms apart and
/// [`SNAPSHOT_TEST_DONE`], and reset: what a restored VM prints shows its timers, clock and
/// console work, and that it did not boot.
pub const CMDLINE_SNAPSHOT_TEST: &str = "cvm.snapshot_test";
pub const SNAPSHOT_TEST_BEFORE: &str = "cvm-agent: before the snapshot";
pub const SNAPSHOT_TEST_TICKS: u32 = 5;
pub const SNAPSHOT_TEST_DONE: &str = "cvm-agent: ticks done";
/// The largest frame either side accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// The most output or input one data frame carries.
pub const MAX_DATA: usize = 64 * 1024;

/// Rows and columns of a terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

/// A command to run. Byte strings, since Unix arguments need not be UTF-8.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exec {
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    pub cwd: Option<Vec<u8>>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Some: run on a new pseudo-terminal of this size; None: plain pipes.
    pub tty: Option<TtySize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Exec(Exec),
    Stdin(Vec<u8>),
    /// The host's stdin ended.
    StdinEof,
    Resize(TtySize),
    Signal(i32),
    /// Sync the disks, say so ([`Reply::Synced`]), and power off.
    Shutdown,
    /// Connect this stream to 127.0.0.1:port in the guest (a published port): answered with
    /// [`Reply::Done`], after which the connection carries the bytes both ways, or with
    /// [`Reply::Failed`].
    Forward {
        port: u16,
    },
    /// Prepare the guest before the first exec: the user, then the steps in order. Answered
    /// with [`Reply::Done`] or [`Reply::Failed`].
    Setup(Setup),
}

/// The guest user commands run as: the host user's name, ids and home path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: Vec<u8>,
}

/// One step of the guest's set-up. Paths are guest paths; missing mount points are created
/// (owned by the user when under its home).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// The virtio-fs share `tag` at `target`.
    Share { tag: String, target: Vec<u8>, read_only: bool },
    /// An overlay at `target` with `lower` below and a fresh in-memory upper layer owned by
    /// the user: writes land in the guest and vanish with it.
    Overlay { lower: Vec<u8>, target: Vec<u8> },
    /// `source` (a file or a directory) bind-mounted on `target`; skipped when `source`
    /// does not exist.
    Bind { source: Vec<u8>, target: Vec<u8> },
    /// A file written at `target` with `contents` (the guest's own copy: changes stay in the
    /// guest).
    File { target: Vec<u8>, contents: Vec<u8> },
    /// Connections to `listen` in the guest are relayed to the host's vsock `host_port`
    /// (a service on the host's loopback, the host's SSH agent).
    Relay { listen: Listen, host_port: u32 },
    /// `--network open`: the guest's Ethernet interface gets `address`/`prefix_len` and `mtu`,
    /// a default route through `gateway`, and `nameserver` in /etc/resolv.conf.
    Network { address: std::net::Ipv4Addr, prefix_len: u8, gateway: std::net::Ipv4Addr, nameserver: std::net::Ipv4Addr, mtu: u16 },
    /// The host proxy's CA certificate (PEM): written at [`PROXY_CA_FILE`] and added to the
    /// system's trust store, so that the guest's TLS clients accept the proxy where it swaps
    /// secrets in.
    TrustCa { pem: Vec<u8> },
    /// The host's wall-clock time and fresh entropy: the guest's clock is set and its random
    /// number generator re-seeded. A guest restored from a snapshot has the snapshot's clock
    /// and generator state, shared with every other session restored from it.
    Fresh { unix_nanos: u64, seed: Vec<u8> },
}

/// Where a relay listens in the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// 127.0.0.1:port.
    Tcp(u16),
    /// A Unix socket, owned by the user.
    Unix(Vec<u8>),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Setup {
    pub user: Option<User>,
    pub steps: Vec<Step>,
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// The status a shell would give: the code, or 128 + the signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The agent is up and serving; its version.
    Ready(String),
    Started {
        pid: u32,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The command could not be started; followed by `Exited`.
    Failed(String),
    Exited(ExitStatus),
    /// Everything is on disk: the host may stop the VM without waiting for the power-off.
    Synced,
    /// The set-up asked for is in place.
    Done,
}

/// A frame that does not decode.
#[derive(Debug)]
pub enum DecodeError {
    UnknownTag(u8),
    Truncated,
    TrailingBytes,
    BadUtf8,
}

impl std::error::Error for DecodeError {}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::UnknownTag(t) => write!(f, "unknown frame tag {t}"),
            DecodeError::Truncated => f.write_str("truncated frame"),
            DecodeError::TrailingBytes => f.write_str("bytes after the end of a frame"),
            DecodeError::BadUtf8 => f.write_str("text that is not UTF-8"),
        }
    }
}

impl From<DecodeError> for io::Error {
    fn from(e: DecodeError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

mod tag {
    pub const EXEC: u8 = 1;
    pub const STDIN: u8 = 2;
    pub const STDIN_EOF: u8 = 3;
    pub const RESIZE: u8 = 4;
    pub const SIGNAL: u8 = 5;
    pub const SHUTDOWN: u8 = 6;
    pub const SETUP: u8 = 7;
    pub const FORWARD: u8 = 8;
    pub const READY: u8 = 64;
    pub const STARTED: u8 = 65;
    pub const STDOUT: u8 = 66;
    pub const STDERR: u8 = 67;
    pub const FAILED: u8 = 68;
    pub const EXITED_CODE: u8 = 69;
    pub const EXITED_SIGNAL: u8 = 70;
    pub const SYNCED: u8 = 71;
    pub const DONE: u8 = 72;
}

/// Builds a frame: reserve the length, append fields, patch the length.
struct Encoder(Vec<u8>);

impl Encoder {
    fn new(tag: u8) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&[0, 0, 0, 0, tag]);
        Self(buf)
    }
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(self, v: &[u8]) -> Self {
        let mut s = self.u32(v.len() as u32);
        s.0.extend_from_slice(v);
        s
    }
    fn opt_u32(self, v: Option<u32>) -> Self {
        match v {
            Some(v) => self.u8(1).u32(v),
            None => self.u8(0),
        }
    }
    fn finish(mut self) -> Vec<u8> {
        let len = (self.0.len() - 4) as u32;
        self.0[..4].copy_from_slice(&len.to_le_bytes());
        self.0
    }
}

/// Reads fields from a frame's payload, never past its end.
struct Decoder<'a>(&'a [u8]);

impl<'a> Decoder<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        let len = self.u32()? as usize;
        Ok(self.take(len)?.to_vec())
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        String::from_utf8(self.bytes()?).map_err(|_| DecodeError::BadUtf8)
    }
    fn opt_u32(&mut self) -> Result<Option<u32>, DecodeError> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some(self.u32()?),
        })
    }
    /// A count of items that each take at least `min_item` bytes: bounded by what is left,
    /// so a hostile count cannot make us allocate.
    fn count(&mut self, min_item: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.0.len() {
            return Err(DecodeError::Truncated);
        }
        Ok(n)
    }
    fn tty(&mut self) -> Result<TtySize, DecodeError> {
        Ok(TtySize { rows: self.u16()?, cols: self.u16()? })
    }
    fn end(self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Request::Exec(e) => {
                let mut enc = Encoder::new(tag::EXEC).u32(e.argv.len() as u32);
                for a in &e.argv {
                    enc = enc.bytes(a);
                }
                enc = enc.u32(e.env.len() as u32);
                for (k, v) in &e.env {
                    enc = enc.bytes(k).bytes(v);
                }
                enc = match &e.cwd {
                    Some(c) => enc.u8(1).bytes(c),
                    None => enc.u8(0),
                };
                enc = enc.opt_u32(e.uid).opt_u32(e.gid);
                enc = match e.tty {
                    Some(t) => enc.u8(1).u16(t.rows).u16(t.cols),
                    None => enc.u8(0),
                };
                enc.finish()
            }
            Request::Stdin(d) => Encoder::new(tag::STDIN).bytes(d).finish(),
            Request::StdinEof => Encoder::new(tag::STDIN_EOF).finish(),
            Request::Resize(t) => Encoder::new(tag::RESIZE).u16(t.rows).u16(t.cols).finish(),
            Request::Signal(s) => Encoder::new(tag::SIGNAL).u32(*s as u32).finish(),
            Request::Shutdown => Encoder::new(tag::SHUTDOWN).finish(),
            Request::Forward { port } => Encoder::new(tag::FORWARD).u16(*port).finish(),
            Request::Setup(setup) => {
                let mut enc = Encoder::new(tag::SETUP);
                enc = match &setup.user {
                    Some(u) => enc.u8(1).bytes(u.name.as_bytes()).u32(u.uid).u32(u.gid).bytes(&u.home),
                    None => enc.u8(0),
                };
                enc = enc.u32(setup.steps.len() as u32);
                for m in &setup.steps {
                    enc = match m {
                        Step::Share { tag, target, read_only } => enc.u8(1).bytes(tag.as_bytes()).bytes(target).u8(u8::from(*read_only)),
                        Step::Overlay { lower, target } => enc.u8(2).bytes(lower).bytes(target),
                        Step::Bind { source, target } => enc.u8(3).bytes(source).bytes(target),
                        Step::File { target, contents } => enc.u8(4).bytes(target).bytes(contents),
                        Step::Relay { listen: Listen::Tcp(port), host_port } => enc.u8(5).u8(1).u16(*port).u32(*host_port),
                        Step::Relay { listen: Listen::Unix(path), host_port } => enc.u8(5).u8(2).bytes(path).u32(*host_port),
                        Step::Network { address, prefix_len, gateway, nameserver, mtu } => enc
                            .u8(6)
                            .u32(u32::from(*address))
                            .u8(*prefix_len)
                            .u32(u32::from(*gateway))
                            .u32(u32::from(*nameserver))
                            .u16(*mtu),
                        Step::TrustCa { pem } => enc.u8(7).bytes(pem),
                        Step::Fresh { unix_nanos, seed } => enc.u8(8).bytes(&unix_nanos.to_le_bytes()).bytes(seed),
                    };
                }
                enc.finish()
            }
        }
    }

    pub fn decode(tag: u8, payload: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder(payload);
        let req = match tag {
            tag::EXEC => {
                let n = d.count(4)?;
                let argv = (0..n).map(|_| d.bytes()).collect::<Result<_, _>>()?;
                let n = d.count(8)?;
                let env = (0..n).map(|_| Ok((d.bytes()?, d.bytes()?))).collect::<Result<_, _>>()?;
                let cwd = match d.u8()? {
                    0 => None,
                    _ => Some(d.bytes()?),
                };
                let uid = d.opt_u32()?;
                let gid = d.opt_u32()?;
                let tty = match d.u8()? {
                    0 => None,
                    _ => Some(d.tty()?),
                };
                Request::Exec(Exec { argv, env, cwd, uid, gid, tty })
            }
            tag::STDIN => Request::Stdin(d.bytes()?),
            tag::STDIN_EOF => Request::StdinEof,
            tag::RESIZE => Request::Resize(d.tty()?),
            tag::SIGNAL => Request::Signal(d.u32()? as i32),
            tag::SHUTDOWN => Request::Shutdown,
            tag::FORWARD => Request::Forward { port: d.u16()? },
            tag::SETUP => {
                let user = match d.u8()? {
                    0 => None,
                    _ => Some(User { name: d.string()?, uid: d.u32()?, gid: d.u32()?, home: d.bytes()? }),
                };
                // Each step is at least its kind and eight bytes (a TCP relay).
                let n = d.count(8)?;
                let steps = (0..n)
                    .map(|_| {
                        Ok(match d.u8()? {
                            1 => Step::Share { tag: d.string()?, target: d.bytes()?, read_only: d.u8()? != 0 },
                            2 => Step::Overlay { lower: d.bytes()?, target: d.bytes()? },
                            3 => Step::Bind { source: d.bytes()?, target: d.bytes()? },
                            4 => Step::File { target: d.bytes()?, contents: d.bytes()? },
                            5 => {
                                let listen = match d.u8()? {
                                    1 => Listen::Tcp(d.u16()?),
                                    2 => Listen::Unix(d.bytes()?),
                                    other => return Err(DecodeError::UnknownTag(other)),
                                };
                                Step::Relay { listen, host_port: d.u32()? }
                            }
                            6 => Step::Network {
                                address: d.u32()?.into(),
                                prefix_len: d.u8()?,
                                gateway: d.u32()?.into(),
                                nameserver: d.u32()?.into(),
                                mtu: d.u16()?,
                            },
                            7 => Step::TrustCa { pem: d.bytes()? },
                            8 => {
                                let nanos = d.bytes()?;
                                let unix_nanos = u64::from_le_bytes(nanos.try_into().map_err(|_| DecodeError::Truncated)?);
                                Step::Fresh { unix_nanos, seed: d.bytes()? }
                            }
                            other => return Err(DecodeError::UnknownTag(other)),
                        })
                    })
                    .collect::<Result<_, _>>()?;
                Request::Setup(Setup { user, steps })
            }
            other => return Err(DecodeError::UnknownTag(other)),
        };
        d.end()?;
        Ok(req)
    }
}

impl Reply {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Reply::Ready(v) => Encoder::new(tag::READY).bytes(v.as_bytes()).finish(),
            Reply::Started { pid } => Encoder::new(tag::STARTED).u32(*pid).finish(),
            Reply::Stdout(d) => Encoder::new(tag::STDOUT).bytes(d).finish(),
            Reply::Stderr(d) => Encoder::new(tag::STDERR).bytes(d).finish(),
            Reply::Failed(m) => Encoder::new(tag::FAILED).bytes(m.as_bytes()).finish(),
            Reply::Exited(ExitStatus::Code(c)) => Encoder::new(tag::EXITED_CODE).u32(*c as u32).finish(),
            Reply::Exited(ExitStatus::Signal(s)) => Encoder::new(tag::EXITED_SIGNAL).u32(*s as u32).finish(),
            Reply::Synced => Encoder::new(tag::SYNCED).finish(),
            Reply::Done => Encoder::new(tag::DONE).finish(),
        }
    }

    pub fn decode(tag: u8, payload: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder(payload);
        let reply = match tag {
            tag::READY => Reply::Ready(d.string()?),
            tag::STARTED => Reply::Started { pid: d.u32()? },
            tag::STDOUT => Reply::Stdout(d.bytes()?),
            tag::STDERR => Reply::Stderr(d.bytes()?),
            tag::FAILED => Reply::Failed(d.string()?),
            tag::EXITED_CODE => Reply::Exited(ExitStatus::Code(d.u32()? as i32)),
            tag::EXITED_SIGNAL => Reply::Exited(ExitStatus::Signal(d.u32()? as i32)),
            tag::SYNCED => Reply::Synced,
            tag::DONE => Reply::Done,
            other => return Err(DecodeError::UnknownTag(other)),
        };
        d.end()?;
        Ok(reply)
    }
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes")));
    }
    let mut frame = vec![0u8; len];
    r.read_exact(&mut frame)?;
    let payload = frame.split_off(1);
    Ok(Some((frame[0], payload)))
}

pub fn read_request(r: &mut impl Read) -> io::Result<Option<Request>> {
    match read_frame(r)? {
        Some((tag, payload)) => Ok(Some(Request::decode(tag, &payload)?)),
        None => Ok(None),
    }
}

pub fn read_reply(r: &mut impl Read) -> io::Result<Option<Reply>> {
    match read_frame(r)? {
        Some((tag, payload)) => Ok(Some(Reply::decode(tag, &payload)?)),
        None => Ok(None),
    }
}

/// Writes a whole frame in one call, so frames from several threads never interleave when
/// the writer is shared behind a lock.
pub fn write_frame(w: &mut impl Write, frame: &[u8]) -> io::Result<()> {
    w.write_all(frame)
}

#[cfg(test)]
mod tests;
