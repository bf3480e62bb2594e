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

mod connection;
mod packet;

use connection::{Conn, Key, State};
pub use packet::{op, Header, HEADER_SIZE, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

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
        epoll.ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, LISTENER_TOKEN))?;
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
                    if self.epoll.ctl(ControlOperation::Add, stream.as_raw_fd(), EpollEvent::new(EventSet::IN, token)).is_ok() {
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
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP)
            && !conn.rx_queued
            && !conn.credit_blocked
        {
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
        if self.epoll.ctl(ControlOperation::Add, conn.stream.as_raw_fd(), EpollEvent::new(EventSet::empty(), token)).is_err() {
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
            && self.epoll.ctl(ControlOperation::Modify, conn.stream.as_raw_fd(), EpollEvent::new(want, conn.token)).is_ok()
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
        let stream =
            if self.conns.len() + self.pending.len() < MAX_CONNECTIONS { connect_nonblocking(Path::new(&path)).ok() } else { None };
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
mod tests;
