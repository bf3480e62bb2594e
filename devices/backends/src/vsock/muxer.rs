//! The host side of vsock: guest stream connections bridged to host Unix sockets.
//!
//! The protocol is the one Firecracker documents. A host process connects to the VM's socket
//! and writes `CONNECT <port>\n`; once the guest accepts, it reads `OK <hostport>\n` and the
//! stream is the connection. A guest connection to host port P is connected to the Unix
//! socket `<socket>_P`.
//!
//! [`Muxer`] knows nothing about vrings: it takes the guest's packets one at a time and hands
//! out the packets the guest must receive, reading host data straight into the caller's
//! buffer. Everything it does to a host socket is non-blocking, and everything it buffers is
//! bounded by the credit it advertised, so a hostile guest can make it refuse (RST) but not
//! block or grow.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// The host's CID: where guest packets must be addressed.
pub const HOST_CID: u64 = 2;
/// The only socket type cvm supports (SOCK_STREAM).
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (virtio spec 5.10.6).
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}
/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// Receive buffer cvm advertises per connection: the most guest data it holds for a host
/// socket that is not reading.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Most connections at once; more are refused with RST.
pub const MAX_CONNECTIONS: usize = 4096;
/// Most control packets waiting for guest RX buffers; beyond that a flooding guest loses them.
const MAX_PENDING_CONTROL: usize = 8192;
/// Host ports cvm gives host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// `CONNECT 4294967295\n` and some slack.
const MAX_CONNECT_LINE: usize = 32;

const LISTENER_TOKEN: u64 = 0;

/// A vsock packet header as plain data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// Size of a packet header on the wire.
pub const HEADER_SIZE: usize = 44;

impl Header {
    /// The little-endian wire layout (virtio spec `struct virtio_vsock_hdr`, packed).
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Header {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().expect("2 bytes"));
        Header {
            src_cid: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
            dst_cid: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// A connection is named by (host port, guest port).
type Key = (u32, u32);

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host side asked (REQUEST sent); waiting for the guest's RESPONSE.
    HostConnecting,
    Established,
    /// cvm sent SHUTDOWN (the host socket hung up); waiting for the guest's RST.
    Closing,
}

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    /// Guest data not yet written to the host socket; bounded by CONN_BUF_ALLOC.
    to_host: VecDeque<u8>,
    /// Bytes of guest data written to the host socket, and how many of them the guest knows.
    fwd_cnt: u32,
    fwd_cnt_told: u32,
    /// Guest asked to stop sending to it / said it sends no more.
    peer_shut_send: bool,
    /// Bytes sent to the guest, and the guest's last word on its buffer.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// In the ready list, or waiting for credit.
    rx_queued: bool,
    credit_blocked: bool,
    interest: EventSet,
    /// The host socket hung up, or its end was read to the last byte: no longer watched.
    /// (epoll reports a hang-up whatever the interest, so a watched one would fire for as
    /// long as the guest keeps its end open.)
    unwatched: bool,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: State) -> Self {
        Self {
            stream,
            token,
            state,
            to_host: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            peer_shut_send: false,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_queued: false,
            credit_blocked: false,
            interest: EventSet::empty(),
            unwatched: false,
        }
    }

    /// Bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Writes buffered guest data to the host socket; returns false when the socket is gone.
    fn flush(&mut self) -> bool {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return false,
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if self.peer_shut_send {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        true
    }

    /// Whether the guest should hear about consumed bytes now rather than with later traffic.
    fn owes_credit_update(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.fwd_cnt_told) >= CONN_BUF_ALLOC / 2
    }
}

/// A host socket that connected to the VM's socket and has not finished its CONNECT line.
struct PendingConnect {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Bridges guest vsock streams and host Unix sockets.
pub struct Muxer {
    guest_cid: u64,
    socket_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<Key, Conn>,
    pending: HashMap<u64, PendingConnect>,
    tokens: HashMap<u64, Key>,
    next_token: u64,
    next_local_port: u32,
    control: VecDeque<Header>,
    rx_ready: VecDeque<Key>,
}

impl Muxer {
    /// Listens on `socket_path` for host connections to the guest `guest_cid`.
    pub fn new(guest_cid: u64, socket_path: &Path) -> io::Result<Self> {
        let listener = UnixListener::bind(socket_path)?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        Ok(Self {
            guest_cid,
            socket_path: socket_path.to_path_buf(),
            listener,
            epoll,
            conns: HashMap::new(),
            pending: HashMap::new(),
            tokens: HashMap::new(),
            next_token: LISTENER_TOKEN + 1,
            next_local_port: FIRST_LOCAL_PORT,
            control: VecDeque::new(),
            rx_ready: VecDeque::new(),
        })
    }

    /// Readable when a host socket needs attention: call [`Muxer::handle_host_events`].
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether [`Muxer::next_rx_packet`] may have something for the guest.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.rx_ready.is_empty()
    }

    /// Forgets every connection: the device was reset.
    pub fn reset(&mut self) {
        for (_, conn) in self.conns.drain() {
            let _ = self.epoll.ctl(ControlOperation::Delete, conn.stream.as_raw_fd(), EpollEvent::default());
        }
        self.tokens.retain(|_, _| false);
        for (_, p) in self.pending.drain() {
            let _ = self.epoll.ctl(ControlOperation::Delete, p.stream.as_raw_fd(), EpollEvent::default());
        }
        self.control.clear();
        self.rx_ready.clear();
    }

    /// Handles whatever the host sockets have for us, without blocking.
    pub fn handle_host_events(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: epoll_wait: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                let set = EventSet::from_bits_truncate(event.events);
                match event.data() {
                    LISTENER_TOKEN => self.accept_host_connections(),
                    token => self.handle_token(token, set),
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn new_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    fn accept_host_connections(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let token = self.new_token();
                    if self
                        .epoll
                        .ctl(ControlOperation::Add, stream.as_raw_fd(), EpollEvent::new(EventSet::IN, token))
                        .is_ok()
                    {
                        self.pending.insert(token, PendingConnect { stream, line: Vec::new() });
                        // Clients usually write the line right after connecting.
                        self.read_connect_line(token);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    fn handle_token(&mut self, token: u64, set: EventSet) {
        if self.pending.contains_key(&token) {
            self.read_connect_line(token);
            return;
        }
        let Some(&key) = self.tokens.get(&token) else { return };
        let Some(conn) = self.conns.get_mut(&key) else { return };
        if set.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) && !conn.to_host.is_empty() {
            if !conn.flush() {
                self.reset_conn(key);
                return;
            }
            let conn = self.conns.get_mut(&key).expect("just flushed");
            if conn.owes_credit_update() {
                let hdr = self.reply_header(key, op::CREDIT_UPDATE);
                self.push_control(hdr);
            }
        }
        let conn = self.conns.get_mut(&key).expect("still there");
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP) && !conn.rx_queued && !conn.credit_blocked {
            conn.rx_queued = true;
            self.rx_ready.push_back(key);
        }
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // What is left is read when the guest has room (the ready list and credit updates
            // drive that, not epoll).
            self.unwatch(key);
            return;
        }
        self.update_interest(key);
    }

    /// Reads the `CONNECT <port>\n` line a byte at a time, so no stream data is taken with it.
    fn read_connect_line(&mut self, token: u64) {
        let pending = self.pending.get_mut(&token).expect("caller checked");
        let mut byte = [0u8; 1];
        let port = loop {
            match pending.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect_line(&pending.line),
                Ok(1) if pending.line.len() < MAX_CONNECT_LINE => pending.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => break None,
            }
        };
        let pending = self.pending.remove(&token).expect("caller checked");
        let _ = self.epoll.ctl(ControlOperation::Delete, pending.stream.as_raw_fd(), EpollEvent::default());
        let Some(peer_port) = port else {
            tracing::debug!("vsock: bad CONNECT line from a host client");
            return;
        };
        let local_port = self.allocate_local_port(peer_port);
        let key = (local_port, peer_port);
        self.insert_conn(key, Conn::new(pending.stream, token, State::HostConnecting));
        let hdr = Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: local_port,
            dst_port: peer_port,
            type_: TYPE_STREAM,
            op: op::REQUEST,
            buf_alloc: CONN_BUF_ALLOC,
            ..Default::default()
        };
        self.push_control(hdr);
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }

    fn insert_conn(&mut self, key: Key, conn: Conn) {
        let token = conn.token;
        if self
            .epoll
            .ctl(ControlOperation::Add, conn.stream.as_raw_fd(), EpollEvent::new(EventSet::empty(), token))
            .is_err()
        {
            return;
        }
        self.tokens.insert(token, key);
        self.conns.insert(key, conn);
        self.update_interest(key);
    }

    fn remove_conn(&mut self, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            let _ = self.epoll.ctl(ControlOperation::Delete, conn.stream.as_raw_fd(), EpollEvent::default());
            self.tokens.remove(&conn.token);
        }
    }

    /// Drops the connection and tells the guest.
    fn reset_conn(&mut self, key: Key) {
        let hdr = self.reply_header(key, op::RST);
        self.remove_conn(key);
        self.push_control(hdr);
    }

    /// Stops watching the connection's host socket for good.
    fn unwatch(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        if !conn.unwatched {
            let _ = self.epoll.ctl(ControlOperation::Delete, conn.stream.as_raw_fd(), EpollEvent::default());
            conn.unwatched = true;
        }
    }

    /// Sets the epoll interest to what the connection needs: OUT while guest data waits, IN
    /// while it may send to the guest and is not already queued to.
    fn update_interest(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        if conn.unwatched {
            return;
        }
        let mut want = EventSet::empty();
        if !conn.to_host.is_empty() {
            want |= EventSet::OUT;
        }
        if conn.state == State::Established && !conn.rx_queued && !conn.credit_blocked {
            want |= EventSet::IN;
        }
        if want != conn.interest
            && self
                .epoll
                .ctl(ControlOperation::Modify, conn.stream.as_raw_fd(), EpollEvent::new(want, conn.token))
                .is_ok()
        {
            conn.interest = want;
        }
    }

    fn push_control(&mut self, hdr: Header) {
        if self.control.len() < MAX_PENDING_CONTROL {
            self.control.push_back(hdr);
        } else {
            tracing::debug!("vsock: control queue full; dropped op {}", hdr.op);
        }
    }

    /// A header from the host end of `key` to the guest end, carrying our credit.
    fn reply_header(&mut self, key: Key, op: u16) -> Header {
        let fwd_cnt = match self.conns.get_mut(&key) {
            Some(conn) => {
                conn.fwd_cnt_told = conn.fwd_cnt;
                conn.fwd_cnt
            }
            None => 0,
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            type_: TYPE_STREAM,
            op,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt,
            ..Default::default()
        }
    }

    /// Takes one packet from the guest's TX queue.
    pub fn handle_guest_packet(&mut self, hdr: &Header, data: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            if hdr.op != op::RST {
                let reply = Header {
                    src_cid: HOST_CID,
                    dst_cid: self.guest_cid,
                    src_port: hdr.dst_port,
                    dst_port: hdr.src_port,
                    type_: TYPE_STREAM,
                    op: op::RST,
                    ..Default::default()
                };
                self.push_control(reply);
            }
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                op::REQUEST => self.connect_to_host(key, hdr),
                op::RST => {}
                _ => {
                    let reply = self.reply_header(key, op::RST);
                    self.push_control(reply);
                }
            }
            return;
        };

        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        if conn.credit_blocked && conn.peer_credit() > 0 {
            conn.credit_blocked = false;
            if !conn.rx_queued {
                conn.rx_queued = true;
                self.rx_ready.push_back(key);
            }
        }

        match hdr.op {
            op::RESPONSE if conn.state == State::HostConnecting => {
                conn.state = State::Established;
                // Written straight into the socket buffer of a fresh connection: it fits.
                let ok = format!("OK {}\n", key.0);
                if conn.stream.write_all(ok.as_bytes()).is_err() {
                    self.reset_conn(key);
                    return;
                }
            }
            op::RW if conn.state != State::HostConnecting && !conn.peer_shut_send => {
                if conn.to_host.len() + data.len() > CONN_BUF_ALLOC as usize {
                    tracing::debug!("vsock: guest port {} overran its credit; resetting", key.1);
                    self.reset_conn(key);
                    return;
                }
                conn.to_host.extend(data);
                if !conn.flush() {
                    self.reset_conn(key);
                    return;
                }
                if self.conns[&key].owes_credit_update() {
                    let reply = self.reply_header(key, op::CREDIT_UPDATE);
                    self.push_control(reply);
                }
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => {
                let reply = self.reply_header(key, op::CREDIT_UPDATE);
                self.push_control(reply);
            }
            op::SHUTDOWN => {
                if hdr.flags & SHUTDOWN_SEND != 0 {
                    conn.peer_shut_send = true;
                    conn.flush();
                }
                if hdr.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                    // The guest closed its end; Linux waits for our RST to finish the close.
                    self.reset_conn(key);
                    return;
                }
            }
            op::RST => {
                self.remove_conn(key);
                return;
            }
            _ => {
                self.reset_conn(key);
                return;
            }
        }
        self.update_interest(key);
    }

    /// A guest connection to host port P: connect to `<socket>_P`, or refuse.
    fn connect_to_host(&mut self, key: Key, hdr: &Header) {
        let path = format!("{}_{}", self.socket_path.display(), key.0);
        let stream = if self.conns.len() + self.pending.len() < MAX_CONNECTIONS {
            connect_nonblocking(Path::new(&path)).ok()
        } else {
            None
        };
        let Some(stream) = stream else {
            let reply = self.reply_header(key, op::RST);
            self.push_control(reply);
            return;
        };
        let token = self.new_token();
        let mut conn = Conn::new(stream, token, State::Established);
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        self.insert_conn(key, conn);
        let reply = self.reply_header(key, op::RESPONSE);
        self.push_control(reply);
    }

    /// The next packet for the guest, with up to `buf.len()` bytes of data read into `buf`.
    /// None when there is nothing to send (the caller keeps its RX buffer).
    pub fn next_rx_packet(&mut self, buf: &mut [u8]) -> Option<Header> {
        if let Some(hdr) = self.control.pop_front() {
            return Some(hdr);
        }
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else { continue };
            conn.rx_queued = false;
            if conn.state != State::Established {
                continue;
            }
            let credit = conn.peer_credit() as usize;
            if credit == 0 {
                conn.credit_blocked = true;
                self.update_interest(key);
                continue;
            }
            let want = credit.min(buf.len());
            match conn.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    // The host end hung up: tell the guest, then wait for its RST.
                    conn.state = State::Closing;
                    let mut hdr = self.reply_header(key, op::SHUTDOWN);
                    hdr.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                    self.unwatch(key);
                    return Some(hdr);
                }
                Ok(n) => {
                    conn.rx_cnt = conn.rx_cnt.wrapping_add(n as u32);
                    conn.rx_queued = true;
                    self.rx_ready.push_back(key);
                    let mut hdr = self.reply_header(key, op::RW);
                    hdr.len = n as u32;
                    return Some(hdr);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                    self.update_interest(key);
                }
                Err(_) => {
                    let hdr = self.reply_header(key, op::RST);
                    self.remove_conn(key);
                    return Some(hdr);
                }
            }
        }
        None
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket_path);
    }
}

fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    line.strip_prefix("CONNECT ")?.parse().ok()
}

/// Connects without ever blocking: a listener with a full backlog counts as refusing.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2); the result is checked and owned right away.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: addr is a valid sockaddr_un that outlives the call; the length matches it.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: u64 = 3;

    fn guest_hdr(src_port: u32, dst_port: u32, op: u16) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 64 * 1024,
            ..Default::default()
        }
    }

    fn drain(m: &mut Muxer) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        while let Some(h) = m.next_rx_packet(&mut buf) {
            out.push((h, buf[..h.len as usize].to_vec()));
        }
        out
    }

    fn muxer() -> (tempfile::TempDir, Muxer) {
        let dir = tempfile::tempdir().unwrap();
        let m = Muxer::new(GUEST, &dir.path().join("v.sock")).unwrap();
        (dir, m)
    }

    #[test]
    fn header_wire_layout() {
        let h = Header { src_cid: 3, dst_cid: 2, src_port: 7, dst_port: 1024, len: 5, type_: 1, op: op::RW, flags: 3, buf_alloc: 9, fwd_cnt: 11 };
        let b = h.to_bytes();
        assert_eq!(&b[24..28], &5u32.to_le_bytes(), "len at offset 24");
        assert_eq!(&b[30..32], &op::RW.to_le_bytes(), "op at offset 30");
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn connect_line_parser_rejects_junk() {
        assert_eq!(parse_connect_line(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect_line(b"CONNECT 52\r"), Some(52));
        for bad in [&b"CONNECT"[..], b"CONNECT -1", b"CONNECT 99999999999", b"connect 5", b"CONNECT 5 6", b"\xff\xfe"] {
            assert_eq!(parse_connect_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn guest_connection_to_a_missing_host_port_is_refused() {
        let (_dir, mut m) = muxer();
        m.handle_guest_packet(&guest_hdr(5000, 1234, op::REQUEST), &[]);
        let out = drain(&mut m);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.op, op::RST);
        assert_eq!((out[0].0.src_port, out[0].0.dst_port), (1234, 5000));
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn guest_connection_reaches_the_host_listener_and_data_flows_both_ways() {
        let (dir, mut m) = muxer();
        let listener = UnixListener::bind(dir.path().join("v.sock_1234")).unwrap();
        m.handle_guest_packet(&guest_hdr(5000, 1234, op::REQUEST), &[]);
        let (mut host, _) = listener.accept().unwrap();
        assert_eq!(drain(&mut m)[0].0.op, op::RESPONSE);

        let mut rw = guest_hdr(5000, 1234, op::RW);
        rw.len = 5;
        m.handle_guest_packet(&rw, b"hello");
        let mut got = [0u8; 5];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");

        host.write_all(b"world").unwrap();
        m.handle_host_events();
        let out = drain(&mut m);
        assert_eq!(out[0].0.op, op::RW);
        assert_eq!(out[0].1, b"world");
        assert_eq!(out[0].0.fwd_cnt, 5, "the guest learns its 5 bytes were consumed");

        drop(host);
        m.handle_host_events();
        let out = drain(&mut m);
        assert_eq!(out[0].0.op, op::SHUTDOWN);
        m.handle_guest_packet(&guest_hdr(5000, 1234, op::RST), &[]);
        assert_eq!(m.connection_count(), 0);
    }

    /// A host client connects and asks for guest `port`: returns it and the REQUEST the guest
    /// gets.
    fn host_connect(dir: &tempfile::TempDir, m: &mut Muxer, port: u32) -> (UnixStream, Header) {
        let mut host = UnixStream::connect(dir.path().join("v.sock")).unwrap();
        host.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        m.handle_host_events();
        let out = drain(m);
        assert_eq!(out.len(), 1);
        (host, out[0].0)
    }

    #[test]
    fn host_connect_gets_ok_once_the_guest_accepts() {
        let (dir, mut m) = muxer();
        let (mut host, req) = host_connect(&dir, &mut m, 1024);
        assert_eq!((req.op, req.dst_port, req.dst_cid), (op::REQUEST, 1024, GUEST));
        m.handle_guest_packet(&guest_hdr(1024, req.src_port, op::RESPONSE), &[]);
        let mut line = [0u8; 64];
        let n = host.read(&mut line).unwrap();
        assert_eq!(std::str::from_utf8(&line[..n]).unwrap(), format!("OK {}\n", req.src_port));
    }

    #[test]
    fn host_connect_refused_by_the_guest_closes_the_host_socket() {
        let (dir, mut m) = muxer();
        let (mut host, req) = host_connect(&dir, &mut m, 9);
        m.handle_guest_packet(&guest_hdr(9, req.src_port, op::RST), &[]);
        let mut buf = [0u8; 8];
        assert_eq!(host.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn data_to_the_guest_stops_at_its_credit_and_resumes_on_update() {
        let (dir, mut m) = muxer();
        let listener = UnixListener::bind(dir.path().join("v.sock_7")).unwrap();
        let mut req = guest_hdr(100, 7, op::REQUEST);
        req.buf_alloc = 1000;
        m.handle_guest_packet(&req, &[]);
        let (mut host, _) = listener.accept().unwrap();
        drain(&mut m);
        host.write_all(&[7u8; 3000]).unwrap();
        m.handle_host_events();
        let sent: usize = drain(&mut m).iter().map(|(h, d)| {
            assert_eq!(h.len as usize, d.len());
            d.len()
        }).sum();
        assert_eq!(sent, 1000, "no more than the guest's buffer");
        let mut update = guest_hdr(100, 7, op::CREDIT_UPDATE);
        update.buf_alloc = 1000;
        update.fwd_cnt = 1000;
        m.handle_guest_packet(&update, &[]);
        let sent: usize = drain(&mut m).iter().map(|(_, d)| d.len()).sum();
        assert_eq!(sent, 1000);
    }

    #[test]
    fn a_guest_that_overruns_its_credit_is_reset() {
        let (dir, mut m) = muxer();
        let listener = UnixListener::bind(dir.path().join("v.sock_8")).unwrap();
        m.handle_guest_packet(&guest_hdr(100, 8, op::REQUEST), &[]);
        let (_host, _) = listener.accept().unwrap(); // never reads
        drain(&mut m);
        let chunk = vec![1u8; 64 * 1024];
        let mut rw = guest_hdr(100, 8, op::RW);
        rw.len = chunk.len() as u32;
        let mut reset = false;
        for _ in 0..64 {
            m.handle_guest_packet(&rw, &chunk);
            if drain(&mut m).iter().any(|(h, _)| h.op == op::RST) {
                reset = true;
                break;
            }
        }
        assert!(reset, "cvm must refuse data beyond the buffer it advertised");
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn hostile_headers_get_rst_and_never_a_connection() {
        let (dir, mut m) = muxer();
        let _listener = UnixListener::bind(dir.path().join("v.sock_1")).unwrap();
        let mut wrong_src = guest_hdr(1, 1, op::REQUEST);
        wrong_src.src_cid = 2;
        let mut wrong_dst = guest_hdr(1, 1, op::REQUEST);
        wrong_dst.dst_cid = 77;
        let mut dgram = guest_hdr(1, 1, op::REQUEST);
        dgram.type_ = 2;
        let mut unknown_op = guest_hdr(1, 1, 99);
        unknown_op.len = 0;
        for h in [wrong_src, wrong_dst, dgram, unknown_op, guest_hdr(1, 1, op::RW), guest_hdr(1, 1, op::SHUTDOWN)] {
            m.handle_guest_packet(&h, b"junk");
        }
        assert_eq!(m.connection_count(), 0);
        let out = drain(&mut m);
        assert!(out.iter().all(|(h, _)| h.op == op::RST && h.dst_cid == GUEST), "{out:?}");
    }

    // Cases: PROPTEST_CASES (scripts/test sets thousands; more by hand for a soak).
    proptest::proptest! {
        /// Any sequence of packets a guest can send: no panic, never more connections than
        /// the cap, and everything sent back is addressed from the host to this guest.
        #[test]
        fn any_packets_get_well_formed_answers(
            packets in proptest::collection::vec(
                (0u64..5, 0u64..5, 0u32..4, 0u32..4, 0u16..4, 0u16..9, 0u32..4, proptest::prelude::any::<u32>(), proptest::prelude::any::<u32>(), proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)),
                1..40,
            )
        ) {
            let (dir, mut m) = muxer();
            let _listeners: Vec<_> = (1..3).map(|p| UnixListener::bind(dir.path().join(format!("v.sock_{p}"))).unwrap()).collect();
            for (src_cid, dst_cid, src_port, dst_port, type_, op, flags, buf_alloc, fwd_cnt, data) in packets {
                let h = Header { src_cid, dst_cid, src_port, dst_port, len: data.len() as u32, type_, op, flags, buf_alloc, fwd_cnt };
                m.handle_guest_packet(&h, &data);
                m.handle_host_events();
                proptest::prop_assert!(m.connection_count() <= MAX_CONNECTIONS);
            }
            for (h, data) in drain(&mut m) {
                proptest::prop_assert_eq!((h.src_cid, h.dst_cid, h.type_), (HOST_CID, GUEST, TYPE_STREAM));
                proptest::prop_assert_eq!(h.len as usize, data.len());
            }
        }
    }

    /// Whether the muxer's epoll has anything to report.
    fn has_events(m: &Muxer) -> bool {
        // SAFETY (test): the fd is the muxer's own, open for the duration of the call.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(m.epoll_fd()) };
        let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
        rustix::event::poll(&mut fds, Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 })).unwrap() > 0
    }

    #[test]
    fn a_host_end_that_hangs_up_while_the_guest_holds_on_costs_nothing() {
        let (dir, mut m) = muxer();
        let listener = UnixListener::bind(dir.path().join("v.sock_1")).unwrap();
        m.handle_guest_packet(&guest_hdr(7, 1, op::REQUEST), &[]);
        assert_eq!(drain(&mut m)[0].0.op, op::RESPONSE);
        // The host side hangs up at once (as a listener past its connection cap does).
        drop(listener.accept().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(50));
        m.handle_host_events();
        let out = drain(&mut m);
        assert!(out.iter().any(|(h, _)| h.op == op::SHUTDOWN), "{out:?}");
        // The guest never sends its RST: the hang-up must not keep the event loop busy.
        m.handle_host_events();
        assert!(!has_events(&m), "a hung-up socket is still reported");
        assert_eq!(m.connection_count(), 1, "kept until the guest's RST");
        m.handle_guest_packet(&guest_hdr(7, 1, op::RST), &[]);
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn a_control_flood_is_bounded() {
        let (_dir, mut m) = muxer();
        for port in 0..(MAX_PENDING_CONTROL as u32 + 1000) {
            m.handle_guest_packet(&guest_hdr(port, 1, op::REQUEST), &[]);
        }
        assert_eq!(drain(&mut m).len(), MAX_PENDING_CONTROL);
    }
}
