use super::*;

fn roundtrip_request(r: Request) {
    let bytes = r.encode();
    let got = read_request(&mut &bytes[..]).unwrap().unwrap();
    assert_eq!(got, r);
}

#[test]
fn requests_and_replies_roundtrip() {
    roundtrip_request(Request::Exec(Exec {
        argv: vec![b"sh".to_vec(), b"-c".to_vec(), vec![0xff, 0]],
        env: vec![(b"A".to_vec(), b"1=2".to_vec())],
        cwd: Some(b"/work dir".to_vec()),
        uid: Some(1000),
        gid: None,
        tty: Some(TtySize { rows: 24, cols: 80 }),
    }));
    roundtrip_request(Request::Exec(Exec::default()));
    roundtrip_request(Request::Stdin(vec![0; 70000]));
    for r in [Request::StdinEof, Request::Resize(TtySize { rows: 1, cols: 2 }), Request::Signal(15), Request::Shutdown] {
        roundtrip_request(r);
    }
    roundtrip_request(Request::Setup(Setup::default()));
    roundtrip_request(Request::Setup(sample_setup()));
    roundtrip_request(Request::Forward { port: 8080 });
    for r in [
        Reply::Ready("0.1.0".into()),
        Reply::Started { pid: 42 },
        Reply::Stdout(b"out".to_vec()),
        Reply::Stderr(vec![]),
        Reply::Failed("nope: not found".into()),
        Reply::Exited(ExitStatus::Code(3)),
        Reply::Exited(ExitStatus::Signal(9)),
        Reply::Synced,
        Reply::Done,
    ] {
        let bytes = r.encode();
        assert_eq!(read_reply(&mut &bytes[..]).unwrap().unwrap(), r);
    }
}

// Cases: PROPTEST_CASES (scripts/test sets thousands; more by hand for a soak).
proptest::proptest! {
    /// Whatever either side sends, the other decodes it or says why: never a panic.
    #[test]
    fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
        let _ = read_request(&mut &bytes[..]);
        let _ = read_reply(&mut &bytes[..]);
        if let Some((&tag, payload)) = bytes.split_first() {
            let _ = Request::decode(tag, payload);
            let _ = Reply::decode(tag, payload);
        }
    }

    #[test]
    fn any_exec_roundtrips(
        argv in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20), 0..6),
        env in proptest::collection::vec((proptest::collection::vec(proptest::prelude::any::<u8>(), 0..10), proptest::collection::vec(proptest::prelude::any::<u8>(), 0..10)), 0..4),
        cwd in proptest::option::of(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20)),
        uid in proptest::option::of(proptest::prelude::any::<u32>()),
        gid in proptest::option::of(proptest::prelude::any::<u32>()),
        tty in proptest::option::of((proptest::prelude::any::<u16>(), proptest::prelude::any::<u16>())),
    ) {
        roundtrip_request(Request::Exec(Exec { argv, env, cwd, uid, gid, tty: tty.map(|(rows, cols)| TtySize { rows, cols }) }));
    }
}

#[test]
fn hostile_frames_are_errors_not_panics() {
    // Oversized and empty frames.
    assert!(read_frame(&mut &(u32::MAX.to_le_bytes())[..]).is_err());
    assert!(read_frame(&mut &[0u8, 0, 0, 0][..]).is_err());
    // A frame cut short, and a clean end.
    assert!(read_frame(&mut &[10u8, 0, 0, 0, 1, 2][..]).is_err());
    assert!(read_frame(&mut &[][..]).unwrap().is_none());
    // Unknown tags, trailing bytes, a huge argv count with nothing behind it, a string
    // length past the end.
    assert!(matches!(Request::decode(200, &[]), Err(DecodeError::UnknownTag(200))));
    assert!(matches!(Request::decode(tag::STDIN_EOF, &[1]), Err(DecodeError::TrailingBytes)));
    assert!(matches!(Request::decode(tag::EXEC, &u32::MAX.to_le_bytes()), Err(DecodeError::Truncated)));
    assert!(matches!(Request::decode(tag::STDIN, &[9, 0, 0, 0, 1]), Err(DecodeError::Truncated)));
    assert!(matches!(Reply::decode(tag::READY, &[1, 0, 0, 0, 0xff]), Err(DecodeError::BadUtf8)));
    // Every prefix of a valid Exec fails cleanly.
    let full = Request::Exec(Exec { argv: vec![b"true".to_vec()], tty: Some(TtySize { rows: 5, cols: 5 }), ..Default::default() }).encode();
    for cut in 5..full.len() {
        assert!(Request::decode(tag::EXEC, &full[5..cut]).is_err(), "prefix {cut}");
    }
}

fn sample_setup() -> Setup {
    Setup {
        user: Some(User { name: "dev".into(), uid: 1000, gid: 100, home: b"/home/dev".to_vec() }),
        steps: vec![
            Step::Share { tag: "project".into(), target: b"/home/dev/my project".to_vec(), read_only: false },
            Step::Share { tag: "claude".into(), target: b"/run/cvm/fs/claude".to_vec(), read_only: true },
            Step::Overlay { lower: b"/run/cvm/fs/claude".to_vec(), target: b"/home/dev/.claude".to_vec() },
            Step::Bind {
                source: b"/run/cvm/fs/claude/.credentials.json".to_vec(),
                target: b"/home/dev/.claude/.credentials.json".to_vec(),
            },
            Step::File { target: b"/home/dev/.claude.json".to_vec(), contents: b"{}".to_vec() },
            Step::Relay { listen: Listen::Tcp(5432), host_port: 45432 },
            Step::Relay { listen: Listen::Unix(b"/run/cvm/ssh-agent.sock".to_vec()), host_port: 1029 },
            Step::Network {
                address: [10, 0, 2, 15].into(),
                prefix_len: 24,
                gateway: [10, 0, 2, 2].into(),
                nameserver: [10, 0, 2, 3].into(),
                mtu: 9000,
            },
            Step::TrustCa { pem: b"-----BEGIN CERTIFICATE-----\n".to_vec() },
            Step::Fresh { unix_nanos: 1_796_000_000_123_456_789, seed: vec![7; 32] },
        ],
    }
}

#[test]
fn hostile_setups_are_errors_not_panics() {
    let full = Request::Setup(sample_setup()).encode();
    for cut in 5..full.len() {
        assert!(Request::decode(tag::SETUP, &full[5..cut]).is_err(), "prefix {cut}");
    }
    // A mount count far beyond what follows, and an unknown mount kind.
    assert!(matches!(Request::decode(tag::SETUP, &[0, 0xff, 0xff, 0xff, 0x0f]), Err(DecodeError::Truncated)));
    let mut bad = vec![0u8, 1, 0, 0, 0, 9];
    bad.extend_from_slice(&[0; 8]);
    assert!(matches!(Request::decode(tag::SETUP, &bad), Err(DecodeError::UnknownTag(9))));
}

#[test]
fn shell_codes() {
    assert_eq!(ExitStatus::Code(3).shell_code(), 3);
    assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
}
