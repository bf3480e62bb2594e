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
        let transport = MmioTransport::new(
            Box::new(Net::new(device_end, MAC)),
            mem.clone(),
            Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            endpoint_rx.recv().unwrap(),
        )
        .unwrap();
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
        assert_ne!(
            status & virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK,
            0,
            "the device starts again after a reset: {status:#x}"
        );
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
