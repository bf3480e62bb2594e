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

    fn activate(&mut self, features: u64, mem: GuestMemory, queues: Vec<ActiveQueue>, interrupt: Arc<Interrupt>) -> io::Result<Option<Subscriber>> {
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
        let Wire { socket, outgoing, incoming, peer_gone, hung_up } = wire.ok_or_else(|| io::Error::other("virtio-net: activated while active"))?;
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
fn take_rx_buffers<'a>(rx: &mut Queue, mem: &'a GuestMemory, mergeable: bool, needed: usize) -> Option<Vec<(DescriptorChain<&'a GuestMemory>, usize)>> {
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
        for events in [Events::new(&self.rx_kick, EventSet::IN), Events::new(&self.tx_kick, EventSet::IN), Events::new(&self.socket, EventSet::IN)] {
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
mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use event_manager::EventManager;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;
    use crate::virtio::MmioTransport;
    use cvm_virtual_guest::{GuestQueue, MmioDriver};

    const RX_BUFFERS: u64 = 0x10_0000;
    const TX_BUFFERS: u64 = 0x20_0000;
    const BUFFER: u32 = 2048;
    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    /// A guest with one virtio-net device, its wire the other end of a socket pair, and the
    /// VMM's event loop on a thread of its own.
    struct NetGuest {
        mem: GuestMemory,
        driver: MmioDriver<MmioTransport>,
        rx: GuestQueue,
        tx: GuestQueue,
        wire: UnixStream,
        next_tx: u64,
        rx_posted: u64,
        stop: Arc<std::sync::atomic::AtomicBool>,
    }

    impl NetGuest {
        fn new() -> NetGuest {
            Self::with_features(0)
        }

        /// A guest whose driver takes the device-specific `features` besides VERSION_1.
        fn with_features(features: u32) -> NetGuest {
            let mem: GuestMemory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
            let (device_end, wire) = UnixStream::pair().unwrap();
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (endpoint_tx, endpoint_rx) = std::sync::mpsc::channel();
            let stopping = stop.clone();
            std::thread::spawn(move || {
                let mut event_loop = EventManager::<Subscriber>::new().unwrap();
                endpoint_tx.send(event_loop.remote_endpoint()).unwrap();
                while !stopping.load(std::sync::atomic::Ordering::SeqCst) {
                    let _ = event_loop.run_with_timeout(20);
                }
            });
            let transport = MmioTransport::new(Box::new(Net::new(device_end, MAC)), mem.clone(), Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())), endpoint_rx.recv().unwrap()).unwrap();
            let driver = MmioDriver(Arc::new(Mutex::new(transport)));
            driver.negotiate_with(features);
            let (rx, tx) = (GuestQueue::new(0x1000, QUEUE_SIZE), GuestQueue::new(0x8000, QUEUE_SIZE));
            driver.setup_queue(RX_QUEUE as u32, &rx);
            driver.setup_queue(TX_QUEUE as u32, &tx);
            driver.driver_ok();
            wire.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            NetGuest { mem, driver, rx, tx, wire, next_tx: TX_BUFFERS, rx_posted: 0, stop }
        }

        fn kick(&self, queue: usize) {
            self.driver.0.lock().unwrap().kick_events()[queue].write(1).unwrap();
        }

        /// Posts `count` receive buffers of `len` bytes.
        fn post_rx(&mut self, count: u64, len: u32) {
            for _ in 0..count {
                // Buffer N sits at slot N: the head index the device hands back finds it.
                let slot = self.rx_posted % u64::from(QUEUE_SIZE);
                self.rx.push(&self.mem, &[(RX_BUFFERS + slot * u64::from(len), len, true)]);
                self.rx_posted += 1;
            }
            self.kick(RX_QUEUE);
        }

        /// Sends `bytes` (header included) as one TX chain split in two descriptors.
        fn send_raw(&mut self, bytes: &[u8]) {
            let at = self.next_tx;
            self.next_tx += bytes.len() as u64 + 64;
            self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
            let split = bytes.len().min(5) as u32;
            self.tx.push(&self.mem, &[(at, split, false), (at + u64::from(split), bytes.len() as u32 - split, false)]);
            self.kick(TX_QUEUE);
        }

        fn send(&mut self, frame: &[u8]) {
            let mut bytes = vec![0u8; NET_HDR_LEN];
            bytes.extend_from_slice(frame);
            self.send_raw(&bytes);
        }

        /// The next frame on the wire, as the peer reads it.
        fn wire_frame(&mut self) -> Vec<u8> {
            let mut length = [0u8; 4];
            self.wire.read_exact(&mut length).unwrap();
            let mut frame = vec![0u8; u32::from_be_bytes(length) as usize];
            self.wire.read_exact(&mut frame).unwrap();
            frame
        }

        /// Waits for `count` used RX buffers; returns their contents (header stripped) by length.
        fn received(&mut self, count: usize, buffer_len: u32) -> Vec<Vec<u8>> {
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut out = Vec::new();
            while out.len() < count {
                assert!(Instant::now() < deadline, "only {} of {count} frames arrived", out.len());
                for (head, len) in self.rx.take_used(&self.mem) {
                    let mut bytes = vec![0u8; len as usize];
                    self.mem.read_slice(&mut bytes, GuestAddress(RX_BUFFERS + u64::from(head) * u64::from(buffer_len))).unwrap();
                    if len > 0 {
                        assert_eq!(u16::from_le_bytes([bytes[10], bytes[11]]), 1, "num_buffers");
                    }
                    out.push(bytes.get(NET_HDR_LEN..).unwrap_or_default().to_vec());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            out
        }

        /// The driver resets the device and brings it up again with rings elsewhere.
        fn reset_and_restart(&mut self) {
            self.driver.write(virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS, 0);
            assert_eq!(self.driver.read(virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS), 0);
            self.driver.negotiate();
            (self.rx, self.tx, self.rx_posted) = (GuestQueue::new(0x4_0000, QUEUE_SIZE), GuestQueue::new(0x4_8000, QUEUE_SIZE), 0);
            self.driver.setup_queue(RX_QUEUE as u32, &self.rx);
            self.driver.setup_queue(TX_QUEUE as u32, &self.tx);
            self.driver.driver_ok();
            let status = self.driver.read(virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS);
            assert_ne!(status & virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK, 0, "the device starts again after a reset: {status:#x}");
        }

        fn write_wire(&mut self, frame: &[u8]) {
            self.wire.write_all(&(frame.len() as u32).to_be_bytes()).unwrap();
            self.wire.write_all(frame).unwrap();
        }
    }

    impl Drop for NetGuest {
        fn drop(&mut self) {
            self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_reset_device_starts_again_on_the_same_wire_with_its_framing_kept() {
        let mut guest = NetGuest::new();
        guest.send(b"before the reset");
        assert_eq!(guest.wire_frame(), b"before the reset");
        // Half a frame from the peer, read by the device while the guest has no RX buffers.
        let frame: Vec<u8> = (0..1200u32).map(|i| (i * 7) as u8).collect();
        guest.wire.write_all(&(frame.len() as u32).to_be_bytes()).unwrap();
        guest.wire.write_all(&frame[..600]).unwrap();
        std::thread::sleep(Duration::from_millis(100));

        guest.reset_and_restart();
        guest.wire.write_all(&frame[600..]).unwrap();
        guest.post_rx(2, BUFFER);
        assert_eq!(guest.received(1, BUFFER), vec![frame], "the frame begun before the reset arrives whole");
        guest.send(b"after the reset");
        assert_eq!(guest.wire_frame(), b"after the reset");
    }

    #[test]
    fn config_space_holds_the_mac() {
        let guest = NetGuest::new();
        let mac: Vec<u8> = (0..6).map(|i| guest.driver.read(0x100 + i) as u8).collect();
        assert_eq!(mac, MAC);
    }

    #[test]
    fn frames_cross_both_ways_with_their_length_prefix() {
        let mut guest = NetGuest::new();
        let frame: Vec<u8> = (0..1500u32).map(|i| i as u8).collect();
        guest.send(&frame);
        guest.send(b"second frame");
        assert_eq!(guest.wire_frame(), frame);
        assert_eq!(guest.wire_frame(), b"second frame");

        guest.post_rx(4, BUFFER);
        guest.write_wire(&frame[..1000]);
        // A frame split across writes is put back together.
        guest.wire.write_all(&12u32.to_be_bytes()).unwrap();
        guest.wire.write_all(b"split ").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        guest.wire.write_all(b"in two").unwrap();
        let got = guest.received(2, BUFFER);
        assert_eq!(got[0], &frame[..1000]);
        assert_eq!(got[1], b"split in two");
    }

    #[test]
    fn hostile_tx_chains_are_dropped_and_the_device_goes_on() {
        let mut guest = NetGuest::new();
        guest.send_raw(&[0u8; NET_HDR_LEN - 1]); // shorter than its header
        guest.send_raw(&vec![0u8; NET_HDR_LEN + MAX_FRAME + 1]); // longer than any frame
        // A chain pointing outside guest RAM.
        guest.tx.push(&guest.mem, &[(0xffff_ffff_0000, 64, false)]);
        guest.kick(TX_QUEUE);
        guest.send(b"still working");
        assert_eq!(guest.wire_frame(), b"still working");
    }

    #[test]
    fn a_frame_too_big_for_the_buffer_is_dropped_and_the_next_fits() {
        let mut guest = NetGuest::new();
        guest.post_rx(2, 64);
        guest.write_wire(&[7u8; 200]);
        guest.write_wire(b"small");
        let got = guest.received(2, 64);
        assert!(got[0].is_empty(), "the oversized frame came back empty");
        assert_eq!(got[1], b"small");
    }

    #[test]
    fn frames_wait_for_rx_buffers_and_nothing_is_lost() {
        let mut guest = NetGuest::new();
        for i in 0..20u8 {
            guest.write_wire(&[i; 100]);
        }
        std::thread::sleep(Duration::from_millis(100));
        guest.post_rx(8, BUFFER);
        let mut got = guest.received(8, BUFFER);
        guest.post_rx(12, BUFFER);
        got.extend(guest.received(12, BUFFER));
        let firsts: Vec<u8> = got.iter().map(|f| f[0]).collect();
        assert_eq!(firsts, (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn with_mergeable_buffers_a_frame_spans_several_and_waits_until_there_are_enough() {
        let mut guest = NetGuest::with_features(1 << VIRTIO_NET_F_MRG_RXBUF);
        let frame: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
        guest.post_rx(2, 1000);
        guest.write_wire(&frame);
        std::thread::sleep(Duration::from_millis(100));
        assert!(guest.rx.take_used(&guest.mem).is_empty(), "two buffers cannot hold it: nothing is used yet");
        guest.post_rx(2, 1000);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut used = Vec::new();
        while used.len() < 3 {
            assert!(Instant::now() < deadline, "used so far: {used:?}");
            used.extend(guest.rx.take_used(&guest.mem));
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(used, [(0, 1000), (1, 1000), (2, 512)], "12 header bytes and 2500 frame bytes over three buffers");
        let mut bytes = Vec::new();
        for (head, len) in used {
            let mut part = vec![0u8; len as usize];
            guest.mem.read_slice(&mut part, GuestAddress(RX_BUFFERS + u64::from(head) * 1000)).unwrap();
            bytes.extend(part);
        }
        assert_eq!(u16::from_le_bytes([bytes[10], bytes[11]]), 3, "num_buffers");
        assert_eq!(bytes[NET_HDR_LEN..], frame[..]);
        // The fourth buffer is still the guest's, for the next frame.
        guest.write_wire(b"next");
        assert_eq!(guest.received(1, 1000), [b"next".to_vec()]);
    }

    #[test]
    fn a_nonsensical_length_cuts_the_peer_off_without_harm() {
        let mut guest = NetGuest::new();
        guest.post_rx(2, BUFFER);
        guest.wire.write_all(&u32::MAX.to_be_bytes()).unwrap();
        // The device may have cut the link already, after reading the length alone.
        let _ = guest.wire.write_all(&[0u8; 1024]);
        std::thread::sleep(Duration::from_millis(100));
        assert!(guest.rx.take_used(&guest.mem).is_empty(), "nothing was delivered");
        // The device ends the link: the peer reads the end of the stream.
        let mut rest = Vec::new();
        guest.wire.read_to_end(&mut rest).expect("the device shut the socket down");
        // The guest can still send; its frames are dropped and come back used.
        guest.send(b"into the void");
        let deadline = Instant::now() + Duration::from_secs(5);
        while guest.tx.take_used(&guest.mem).is_empty() {
            assert!(Instant::now() < deadline, "the TX chain never came back");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
