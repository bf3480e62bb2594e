use super::*;

const GUEST: u64 = 3;

fn guest_hdr(src_port: u32, dst_port: u32, op: u16) -> Header {
    Header { src_cid: GUEST, dst_cid: HOST_CID, src_port, dst_port, type_: TYPE_STREAM, op, buf_alloc: 64 * 1024, ..Default::default() }
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
    let h =
        Header { src_cid: 3, dst_cid: 2, src_port: 7, dst_port: 1024, len: 5, type_: 1, op: op::RW, flags: 3, buf_alloc: 9, fwd_cnt: 11 };
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
    let sent: usize = drain(&mut m)
        .iter()
        .map(|(h, d)| {
            assert_eq!(h.len as usize, d.len());
            d.len()
        })
        .sum();
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
