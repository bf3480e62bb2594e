//! virtio-net over a stream socket, for `--network open`: the peer is a userspace network
//! stack (passt) speaking QEMU's stream protocol, each Ethernet frame preceded by its length as
//! a 32-bit big-endian number. Frames the guest sends on the TX queue go out on the socket;
//! frames arriving on the socket fill the guest's RX buffers.
//!
//! The guest and the peer are both untrusted: a TX chain too short for its header or longer
//! than a frame can be is dropped, a frame from the peer that does not fit the guest's buffer
//! is dropped, and a peer that sends a nonsensical length is cut off. Both directions apply
//! backpressure (the socket is non-blocking and the VMM never waits on it): TX chains stay on
//! the queue while the socket is full, and the socket is left unread while the guest has no
//! RX buffers, so neither side can grow the VMM's memory.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, PoisonError};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF};
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vmm_sys_util::eventfd::EventFd;

use super::{ActiveQueue, GuestMemory, Interrupt, Subscriber, VirtioDevice};

const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// `struct virtio_net_hdr_v1` (flags, GSO type and sizes, checksum fields, num_buffers): it
/// leads every buffer both ways once VIRTIO_F_VERSION_1 is negotiated.
pub const NET_HDR_LEN: usize = 12;
/// The largest frame either side may send: a 64 KiB IP packet and its Ethernet header, as
/// passt's largest MTU allows.
pub const MAX_FRAME: usize = 65535 + 14;
/// Bytes buffered toward the socket before TX chains are left on the queue.
const OUT_LIMIT: usize = 256 * 1024;
/// Bytes read from the socket before it is left unread until the guest posts RX buffers.
const IN_LIMIT: usize = 256 * 1024;

/// A virtio-net device whose wire is `socket`.
pub struct Net {
    /// The wire while no worker has it: the active worker gives it back when dropped (after a
    /// reset), with any partial frame either way, so the stream's framing survives the reset.
    wire: Arc<Mutex<Option<Wire>>>,
    mac: [u8; 6],
}

/// The socket to the peer and what is in flight on it.
struct Wire {
    socket: UnixStream,
    outgoing: Vec<u8>,
    incoming: Vec<u8>,
    peer_gone: bool,
    hung_up: bool,
}

impl Net {
    pub fn new(socket: UnixStream, mac: [u8; 6]) -> Self {
        let wire = Wire { socket, outgoing: Vec::new(), incoming: Vec::new(), peer_gone: false, hung_up: false };
        Self { wire: Arc::new(Mutex::new(Some(wire))), mac }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        // No offloads: every frame is whole and checksummed, as the stream protocol carries it.
        // Mergeable RX buffers let a frame larger than one buffer (a jumbo MTU) arrive.
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_MRG_RXBUF)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Only the MAC address (bytes 0..6): status and the rest are not offered.
        super::read_config_bytes(&self.mac, offset, data);
    }

    fn activate(
        &mut self,
        features: u64,
        mem: GuestMemory,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<Interrupt>,
    ) -> io::Result<Option<Subscriber>> {
        let mut rx = None;
        let mut tx = None;
        for queue in queues {
            match queue.index {
                RX_QUEUE => rx = Some(queue),
                TX_QUEUE => tx = Some(queue),
                _ => {}
            }
        }
        let (Some(rx), Some(tx)) = (rx, tx) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "virtio-net needs its receive and transmit queues"));
        };
        // The transport stops a worker (and so gets the wire back) before it activates again.
        let wire = self.wire.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Wire { socket, outgoing, incoming, peer_gone, hung_up } =
            wire.ok_or_else(|| io::Error::other("virtio-net: activated while active"))?;
        socket.set_nonblocking(true)?;
        Ok(Some(Box::new(NetWorker {
            mem,
            rx: rx.queue,
            rx_kick: rx.kick,
            tx: tx.queue,
            tx_kick: tx.kick,
            interrupt,
            socket,
            outgoing,
            incoming,
            watching: EventSet::IN,
            peer_gone,
            hung_up,
            mergeable: features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            wire_home: self.wire.clone(),
        })))
    }
}

/// The active device.
pub struct NetWorker {
    mem: GuestMemory,
    rx: Queue,
    rx_kick: EventFd,
    tx: Queue,
    tx_kick: EventFd,
    interrupt: Arc<Interrupt>,
    socket: UnixStream,
    /// Framed bytes not yet taken by the socket.
    outgoing: Vec<u8>,
    /// Bytes read from the socket, not yet delivered as whole frames.
    incoming: Vec<u8>,
    /// What the socket is watched for now.
    watching: EventSet,
    /// The peer closed the socket or broke the protocol: frames are dropped from now on.
    peer_gone: bool,
    /// The socket reported a hang-up: only what is left to read matters.
    hung_up: bool,
    /// The driver took VIRTIO_NET_F_MRG_RXBUF: a frame may span several RX buffers.
    mergeable: bool,
    /// Where the wire goes back when this worker is dropped.
    wire_home: Arc<Mutex<Option<Wire>>>,
}

impl Drop for NetWorker {
    fn drop(&mut self) {
        // A second handle to the same socket (this one closes with the worker); without one
        // the device has no wire, and a later activation fails.
        match self.socket.try_clone() {
            Ok(socket) => {
                let (outgoing, incoming) = (std::mem::take(&mut self.outgoing), std::mem::take(&mut self.incoming));
                let wire = Wire { socket, outgoing, incoming, peer_gone: self.peer_gone, hung_up: self.hung_up };
                *self.wire_home.lock().unwrap_or_else(PoisonError::into_inner) = Some(wire);
            }
            Err(e) => tracing::warn!("virtio-net: the wire is lost with its worker: {e}"),
        }
    }
}

impl NetWorker {
    /// Moves TX frames to the socket while it takes them.
    fn transmit(&mut self) {
        let mut completed = 0;
        loop {
            self.flush();
            if self.outgoing.len() >= OUT_LIMIT {
                break;
            }
            let Some(chain) = self.tx.pop_descriptor_chain(&self.mem) else { break };
            let head = chain.head_index();
            if let Ok(mut reader) = Reader::new(&self.mem, chain) {
                let len = reader.available_bytes();
                // The header carries only offload hints, and none were negotiated: read past it.
                let mut header = [0u8; NET_HDR_LEN];
                if (NET_HDR_LEN..=NET_HDR_LEN + MAX_FRAME).contains(&len) && !self.peer_gone && reader.read_exact(&mut header).is_ok() {
                    let frame_len = len - NET_HDR_LEN;
                    let start = self.outgoing.len();
                    self.outgoing.extend_from_slice(&(frame_len as u32).to_be_bytes());
                    self.outgoing.resize(start + 4 + frame_len, 0);
                    if reader.read_exact(&mut self.outgoing[start + 4..]).is_err() {
                        self.outgoing.truncate(start);
                    }
                }
            }
            if self.tx.add_used(&self.mem, head, 0).is_err() {
                break;
            }
            completed += 1;
        }
        self.flush();
        if completed > 0 && self.tx.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_used_queue();
        }
    }

    /// Writes what the socket will take now.
    fn flush(&mut self) {
        while !self.outgoing.is_empty() && !self.peer_gone {
            match self.socket.write(&self.outgoing) {
                Ok(0) => self.cut_off("the network peer stopped reading"),
                Ok(n) => {
                    self.outgoing.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.cut_off(&format!("cannot write to the network peer: {e}")),
            }
        }
        if self.peer_gone {
            self.outgoing.clear();
        }
    }

    /// Reads what the socket has (up to the limit), then delivers whole frames to RX buffers.
    fn receive(&mut self) {
        let mut buf = [0u8; 64 * 1024];
        while !self.peer_gone && self.incoming.len() < IN_LIMIT {
            match self.socket.read(&mut buf) {
                Ok(0) => self.cut_off("the network peer closed its socket"),
                Ok(n) => self.incoming.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.cut_off(&format!("cannot read from the network peer: {e}")),
            }
        }
        self.deliver();
    }

    /// Fills RX buffers with whole frames from `incoming` while the guest has buffers.
    fn deliver(&mut self) {
        let mut consumed = 0;
        let mut completed = 0;
        let mut bad_length = None;
        let (rx, mem) = (&mut self.rx, &self.mem);
        while let Some(length) = self.incoming.get(consumed..consumed + 4) {
            let frame_len = u32::from_be_bytes(length.try_into().expect("4 bytes")) as usize;
            if frame_len == 0 || frame_len > MAX_FRAME {
                bad_length = Some(frame_len);
                break;
            }
            let Some(frame) = self.incoming.get(consumed + 4..consumed + 4 + frame_len) else { break };
            let Some(chains) = take_rx_buffers(rx, mem, self.mergeable, NET_HDR_LEN + frame_len) else { break };
            let fits = chains.iter().map(|(_, room)| room).sum::<usize>() >= NET_HDR_LEN + frame_len;
            let mut header = [0u8; NET_HDR_LEN];
            header[10..12].copy_from_slice(&(chains.len() as u16).to_le_bytes()); // num_buffers
                                                                                  // The header and the frame, spread over the buffers in order; a frame that does not
                                                                                  // fit is dropped and its buffers go back empty.
            let mut bytes = header.iter().chain(frame).copied();
            for (chain, room) in chains {
                let head = chain.head_index();
                let mut written = 0;
                if fits {
                    let part: Vec<u8> = bytes.by_ref().take(room).collect();
                    if let Ok(mut writer) = Writer::new(mem, chain) {
                        if writer.write_all(&part).is_ok() {
                            written = part.len() as u32;
                        }
                    }
                }
                if rx.add_used(mem, head, written).is_err() {
                    break;
                }
                completed += 1;
            }
            consumed += 4 + frame_len;
        }
        self.incoming.drain(..consumed.min(self.incoming.len()));
        if completed > 0 && self.rx.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_used_queue();
        }
        if let Some(frame_len) = bad_length {
            self.cut_off(&format!("the network peer sent a frame of {frame_len} bytes"));
        }
    }

    fn cut_off(&mut self, why: &str) {
        if !self.peer_gone {
            tracing::warn!("virtio-net: {why}; the guest's network is down");
        }
        self.peer_gone = true;
        self.incoming.clear();
        // The peer sees the link end rather than a device that silently ignores it.
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }

    /// Watches the socket for reading while there is room to read into, and for writing while
    /// frames wait for it.
    fn rewatch(&mut self, ops: &mut EventOps) {
        let mut want = EventSet::empty();
        if !self.peer_gone {
            if self.incoming.len() < IN_LIMIT {
                want |= EventSet::IN;
            }
            if !self.outgoing.is_empty() && !self.hung_up {
                want |= EventSet::OUT;
            }
        }
        if want == self.watching {
            return;
        }
        let socket = Events::new(&self.socket, want);
        let result = match (self.watching.is_empty(), want.is_empty()) {
            (true, _) => ops.add(socket),
            (false, true) => ops.remove(Events::new(&self.socket, self.watching)),
            (false, false) => ops.modify(socket),
        };
        match result {
            Ok(()) => self.watching = want,
            Err(e) => tracing::error!("virtio-net: cannot watch the socket: {e:?}"),
        }
    }
}

/// RX buffers for `needed` bytes, with the room each has: one buffer, or with mergeable
/// buffers as many as it takes. `None` (nothing taken) when the guest has not posted enough
/// yet. A guest whose whole ring cannot hold the frame gets it dropped rather than stalling
/// the link.
fn take_rx_buffers<'a>(
    rx: &mut Queue,
    mem: &'a GuestMemory,
    mergeable: bool,
    needed: usize,
) -> Option<Vec<(DescriptorChain<&'a GuestMemory>, usize)>> {
    let start = rx.next_avail();
    let mut chains = Vec::new();
    let mut room = 0;
    while room < needed && (chains.is_empty() || mergeable) {
        let Some(chain) = rx.pop_descriptor_chain(mem) else {
            if chains.len() < usize::from(rx.size()) {
                rx.set_next_avail(start);
                return None;
            }
            break;
        };
        let capacity = Writer::new(mem, chain.clone()).map_or(0, |w| w.available_bytes());
        room += capacity;
        chains.push((chain, capacity));
    }
    Some(chains)
}

impl MutEventSubscriber for NetWorker {
    fn init(&mut self, ops: &mut EventOps) {
        for events in
            [Events::new(&self.rx_kick, EventSet::IN), Events::new(&self.tx_kick, EventSet::IN), Events::new(&self.socket, EventSet::IN)]
        {
            if let Err(e) = ops.add(events) {
                tracing::error!("virtio-net: cannot watch a queue or the socket: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        use std::os::fd::AsRawFd;
        let fd = events.fd();
        if fd == self.rx_kick.as_raw_fd() {
            let _ = self.rx_kick.read();
            self.receive();
        } else if fd == self.tx_kick.as_raw_fd() {
            let _ = self.tx_kick.read();
            self.transmit();
        } else {
            if events.event_set().intersects(EventSet::OUT) {
                self.transmit();
            }
            // A hang-up is reported whatever is watched: stop watching for writes and read
            // what is left (when there is room), so a full buffer cannot spin the loop.
            self.hung_up |= events.event_set().intersects(EventSet::HANG_UP | EventSet::ERROR);
            if events.event_set().intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                self.receive();
            }
        }
        self.rewatch(ops);
    }
}

#[cfg(test)]
mod tests;
