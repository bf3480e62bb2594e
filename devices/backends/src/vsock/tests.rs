//! The vsock backend driven by a virtual guest: packets through real split vrings in guest
//! RAM, as Linux's virtio_vsock driver posts them.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;

use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::muxer::{op, Header, HOST_CID, TYPE_STREAM};
use super::*;
use cvm_virtual_guest::GuestQueue;

const GUEST: u64 = 3;
const MEM_SIZE: u64 = 64 << 20;
/// Packet buffers start here, one 4 KiB page each (what Linux posts for RX).
const BUFFERS: u64 = 1 << 20;
const PAGE: u64 = 4096;

fn guest_header(src_port: u32, dst_port: u32, op: u16) -> Header {
    Header { src_cid: GUEST, dst_cid: HOST_CID, src_port, dst_port, type_: TYPE_STREAM, op, buf_alloc: 256 * 1024, ..Default::default() }
}

/// A guest with the backend's three queues set up in its RAM.
struct VirtualGuest {
    _dir: tempfile::TempDir,
    dir_path: std::path::PathBuf,
    mem: GuestMemoryMmap<()>,
    backend: VsockBackend,
    vrings: Vec<VringRwLock>,
    rx: GuestQueue,
    tx: GuestQueue,
    next_buffer: u64,
}

impl VirtualGuest {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let mut backend = VsockBackend::new(GUEST, Muxer::new(GUEST, &dir.path().join("v.sock")).unwrap());
        backend.update_memory(atomic.clone()).unwrap();
        let size = QUEUE_SIZE as u16;
        let mut base = 0x1000;
        let mut queues = Vec::new();
        let mut vrings = Vec::new();
        for _ in 0..NUM_QUEUES {
            let q = GuestQueue::new(base, size);
            base = (q.end() + 0xfff) & !0xfff;
            let vring = VringRwLock::new(atomic.clone(), size).unwrap();
            vring.set_queue_size(size);
            vring.set_queue_info(q.desc, q.avail, q.used).unwrap();
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            vrings.push(vring);
            queues.push(q);
        }
        assert!(base < BUFFERS);
        let mut queues = queues.into_iter();
        let (rx, tx) = (queues.next().unwrap(), queues.next().unwrap());
        let dir_path = dir.path().to_path_buf();
        Self { _dir: dir, dir_path, mem, backend, vrings, rx, tx, next_buffer: BUFFERS }
    }

    fn buffer(&mut self) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer += PAGE;
        if self.next_buffer >= MEM_SIZE {
            self.next_buffer = BUFFERS;
        }
        addr
    }

    /// Posts `n` RX buffers of one page each (header and data in one descriptor, as Linux).
    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let addr = self.buffer();
            self.rx.push(&self.mem, &[(addr, PAGE as u32, true)]);
        }
    }

    /// Queues one packet for sending: header and data in separate descriptors.
    fn send(&mut self, h: Header, data: &[u8]) {
        let hdr_addr = self.buffer();
        self.mem.write_slice(&Header::to_bytes(&Header { len: data.len() as u32, ..h }), GuestAddress(hdr_addr)).unwrap();
        if data.is_empty() {
            self.tx.push(&self.mem, &[(hdr_addr, HEADER_SIZE as u32, false)]);
        } else {
            let data_addr = self.buffer();
            self.mem.write_slice(data, GuestAddress(data_addr)).unwrap();
            self.tx.push(&self.mem, &[(hdr_addr, HEADER_SIZE as u32, false), (data_addr, data.len() as u32, false)]);
        }
    }

    /// The guest kicks TX; the backend processes it.
    fn kick_tx(&mut self) {
        self.backend.handle_event(TX as u16, EventSet::IN, &self.vrings, 0).unwrap();
    }

    /// A host socket became ready.
    fn host_event(&mut self) {
        self.backend.handle_event(MUXER_EVENT, EventSet::IN, &self.vrings, 0).unwrap();
    }

    /// Packets the backend put in RX buffers (those it could not use come back empty).
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.rx.take_used(&self.mem);
        used.into_iter()
            .filter(|&(_, len)| len > 0)
            .map(|(head, len)| {
                let addr: u64 = self.mem.read_obj(GuestAddress(self.rx.desc + 16 * u64::from(head))).unwrap();
                let mut bytes = vec![0u8; len as usize];
                self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
                let h = Header::from_bytes(bytes[..HEADER_SIZE].try_into().unwrap());
                assert_eq!(h.len as usize, len as usize - HEADER_SIZE, "used length = header + data");
                (h, bytes[HEADER_SIZE..].to_vec())
            })
            .collect()
    }

    /// A host listener for guest connections to `port`, with a backlog deep enough that a
    /// burst of connections is never refused for want of an accept.
    fn listen(&self, port: u32) -> UnixListener {
        let listener = UnixListener::bind(self.dir_path.join(format!("v.sock_{port}"))).unwrap();
        // SAFETY (test): listen again on our own socket only raises its backlog.
        assert_eq!(unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) }, 0);
        listener
    }
}

#[test]
fn a_guest_connection_carries_data_both_ways() {
    let mut g = VirtualGuest::new();
    let listener = g.listen(1234);
    g.post_rx(16);
    g.send(guest_header(5000, 1234, op::REQUEST), &[]);
    g.kick_tx();
    assert_eq!(g.tx.take_used(&g.mem).len(), 1, "the TX chain is returned");
    let (mut host, _) = listener.accept().unwrap();
    let got = g.received();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.op, got[0].0.src_port, got[0].0.dst_port, got[0].0.dst_cid), (op::RESPONSE, 1234, 5000, GUEST));

    g.send(guest_header(5000, 1234, op::RW), b"ping");
    g.kick_tx();
    let mut buf = [0u8; 4];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    host.write_all(b"pong").unwrap();
    g.host_event();
    let got = g.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, op::RW);
    assert_eq!(got[0].1, b"pong");
}

#[test]
fn a_packet_spread_over_many_descriptors_arrives_whole() {
    // Linux 6.x sends the header and the data apart, and large data in several pieces.
    let mut g = VirtualGuest::new();
    let listener = g.listen(9);
    g.post_rx(4);
    g.send(guest_header(50, 9, op::REQUEST), &[]);
    g.kick_tx();
    let (mut host, _) = listener.accept().unwrap();
    let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let hdr = g.buffer();
    g.mem.write_slice(&Header { len: data.len() as u32, ..guest_header(50, 9, op::RW) }.to_bytes(), GuestAddress(hdr)).unwrap();
    let mut pieces = vec![(hdr, HEADER_SIZE as u32, false)];
    for piece in data.chunks(4096) {
        let at = g.buffer();
        g.mem.write_slice(piece, GuestAddress(at)).unwrap();
        pieces.push((at, piece.len() as u32, false));
    }
    g.tx.push(&g.mem, &pieces);
    g.kick_tx();
    let mut got = vec![0u8; data.len()];
    host.read_exact(&mut got).unwrap();
    assert!(got == data);
}

#[test]
fn hostile_descriptor_chains_are_consumed_without_harm() {
    let mut g = VirtualGuest::new();
    let _listener = g.listen(1);
    g.post_rx(4);
    let hdr = Header::to_bytes(&guest_header(7, 1, op::REQUEST));
    let a = g.buffer();
    g.mem.write_slice(&hdr, GuestAddress(a)).unwrap();
    // A device-writable header, a header cut short, a header outside guest RAM, a length far
    // past its data, and a zero-length descriptor.
    g.tx.push(&g.mem, &[(a, HEADER_SIZE as u32, true)]);
    g.tx.push(&g.mem, &[(a, 10, false)]);
    g.tx.push(&g.mem, &[(MEM_SIZE + 4096, HEADER_SIZE as u32, false)]);
    let long = g.buffer();
    g.mem.write_slice(&Header::to_bytes(&Header { len: 1 << 30, ..guest_header(7, 1, op::RW) }), GuestAddress(long)).unwrap();
    g.tx.push(&g.mem, &[(long, HEADER_SIZE as u32, false), (g.next_buffer, 10, false)]);
    g.tx.push(&g.mem, &[(a, 0, false)]);
    g.kick_tx();
    assert_eq!(g.tx.take_used(&g.mem).len(), 5, "every chain is returned");
    assert_eq!(g.backend.muxer().connection_count(), 0);

    // A read-only RX buffer and one too small for a header get nothing written.
    let mut g = VirtualGuest::new();
    let ro = g.buffer();
    g.rx.push(&g.mem, &[(ro, PAGE as u32, false)]);
    g.rx.push(&g.mem, &[(ro, 8, true)]);
    g.send(guest_header(7, 99, op::REQUEST), &[]); // refused: RST to deliver
    g.kick_tx();
    let used = g.rx.take_used(&g.mem);
    assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
}

/// Where a hostile descriptor may point: a buffer, the end of RAM, past it, or page zero.
fn chain_address(choice: u8, buffer: u64) -> u64 {
    match choice % 4 {
        0 => buffer,
        1 => MEM_SIZE - 8,
        2 => MEM_SIZE + 4096,
        _ => 0,
    }
}

// Cases: PROPTEST_CASES (scripts/test sets thousands; more by hand for a soak).
proptest::proptest! {
    /// Any descriptor chains on TX and RX, with any header bytes: each is given back, nothing
    /// is written outside what the guest made writable, and the backend goes on serving.
    #[test]
    fn any_descriptor_chains_are_given_back(
        chains in proptest::collection::vec(
            proptest::collection::vec((proptest::prelude::any::<u8>(), proptest::sample::select(&[0u32, 1, 10, 44, 45, 4096, 65536, u32::MAX][..]), proptest::prelude::any::<bool>()), 1..5),
            1..8,
        ),
        header in proptest::collection::vec(proptest::prelude::any::<u8>(), HEADER_SIZE),
        rx_chains in proptest::collection::vec((proptest::prelude::any::<u8>(), proptest::sample::select(&[0u32, 8, 44, 4096][..]), proptest::prelude::any::<bool>()), 0..4),
    ) {
        let mut g = VirtualGuest::new();
        let _listener = g.listen(1);
        for (choice, len, write) in rx_chains {
            let addr = chain_address(choice, g.buffer());
            g.rx.push(&g.mem, &[(addr, len, write)]);
        }
        for chain in &chains {
            let descriptors: Vec<(u64, u32, bool)> = chain.iter().map(|&(choice, len, write)| {
                let addr = chain_address(choice, g.buffer());
                if addr + HEADER_SIZE as u64 <= MEM_SIZE {
                    g.mem.write_slice(&header, GuestAddress(addr)).unwrap();
                }
                (addr, len, write)
            }).collect();
            g.tx.push(&g.mem, &descriptors);
        }
        g.kick_tx();
        g.host_event();
        proptest::prop_assert_eq!(g.tx.take_used(&g.mem).len(), chains.len(), "every TX chain is given back");
        // Still serving: a well-formed connection request gets its answer.
        g.post_rx(4);
        g.send(guest_header(7, 1, op::REQUEST), &[]);
        g.kick_tx();
        proptest::prop_assert!(g.received().iter().any(|(h, _)| h.op == op::RESPONSE && h.dst_port == 7));
    }
}

#[test]
fn host_data_stops_at_the_guest_credit() {
    let mut g = VirtualGuest::new();
    let listener = g.listen(77);
    g.post_rx(64);
    g.send(Header { buf_alloc: 4096, ..guest_header(100, 77, op::REQUEST) }, &[]);
    g.kick_tx();
    let (mut host, _) = listener.accept().unwrap();
    g.received();
    host.write_all(&vec![9u8; 64 * 1024]).unwrap();
    g.host_event();
    let delivered: usize = g.received().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(delivered, 4096, "no more than the guest's buffer");
    g.send(Header { buf_alloc: 4096, fwd_cnt: 4096, ..guest_header(100, 77, op::CREDIT_UPDATE) }, &[]);
    g.kick_tx();
    let delivered: usize = g.received().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(delivered, 4096, "the next 4 KiB after the credit update");
}

#[test]
fn a_thousand_connections() {
    let mut g = VirtualGuest::new();
    let listener = g.listen(2000);
    let acceptor = std::thread::spawn(move || (0..1000).map(|_| listener.accept().unwrap().0).collect::<Vec<_>>());
    g.post_rx(1000);
    for port in 0..1000 {
        g.send(guest_header(10_000 + port, 2000, op::REQUEST), &[]);
    }
    g.kick_tx();
    let streams = acceptor.join().unwrap();
    assert_eq!(streams.len(), 1000);
    let got = g.received();
    assert_eq!(got.iter().filter(|(h, _)| h.op == op::RESPONSE).count(), 1000);
    assert_eq!(g.backend.muxer().connection_count(), 1000);
}
