use super::*;

fn policy(allow: &[&str]) -> EgressPolicy {
    EgressPolicy { allow: allow.iter().map(|s| s.to_string()).collect(), ..EgressPolicy::default() }
}

#[test]
fn audit_lines_have_rfc3339_times_and_cannot_be_forged_from_the_guest() {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_633_600);
    let forged = "evil.test:443 x\r\n2025-12-02T00:00:00Z session=other allow api.anthropic.com:443 \u{1b}[2J";
    let line = audit_line(at, "s1", "deny", forged, "not on the allow list\u{85}");
    assert!(line.starts_with("2025-12-02T00:00:00Z session=s1 deny evil.test:443 x\\r\\n2025"), "{line}");
    assert_eq!(line.matches('\n').count(), 1, "one line, ended by its own newline: {line:?}");
    assert!(line.ends_with("\n") && !line.contains('\u{1b}') && !line.contains('\r') && !line.contains('\u{85}'), "{line:?}");
    assert!(line.contains("\\u{1b}[2J") && line.contains("\\u{85}"), "{line}");
}

#[test]
fn claude_code_s_own_hosts_are_allowed_by_default() {
    let p = EgressPolicy { allow: DEFAULT_ALLOW.iter().map(|s| s.to_string()).collect(), ..EgressPolicy::default() };
    for host in ["platform.claude.com", "claude.com", "api.anthropic.com", "claude.ai"] {
        let decision = p.decide(host, 443);
        assert!(!matches!(decision, Decision::Deny(ref why) if why.contains("allow list")), "{host}: {decision:?}");
    }
}

#[test]
fn upstream_proxies_are_parsed_or_refused() {
    assert_eq!(parse_upstream("http://127.0.0.1:3128"), Ok("127.0.0.1:3128".into()));
    assert_eq!(parse_upstream("http://proxy.corp:8080/"), Ok("proxy.corp:8080".into()));
    assert_eq!(parse_upstream("proxy.corp:8080"), Ok("proxy.corp:8080".into()));
    assert_eq!(parse_upstream("http://[::1]:3128"), Ok("[::1]:3128".into()));
    for bad in [
        "https://proxy:443",
        "socks5://p:1080",
        "http://user:pw@p:3128",
        "http://p",
        "http://p:0",
        "http://p:99999",
        "http://p:80/path",
        "",
        "http://:3128",
    ] {
        assert!(parse_upstream(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn with_an_upstream_allowed_names_go_through_it_and_mapped_ones_do_not() {
    let mut p = policy(&["api.test", "mapped.test", "10.0.0.1"]);
    p.hosts.push(("mapped.test".into(), "127.0.0.1".parse().unwrap()));
    p.upstream = Some("127.0.0.1:3128".into());
    assert_eq!(p.decide("api.test", 443), Decision::AllowVia("127.0.0.1:3128".into()), "the upstream resolves it");
    assert_eq!(p.decide("mapped.test", 80), Decision::Allow("127.0.0.1:80".parse().unwrap()));
    assert!(matches!(p.decide("other.test", 443), Decision::Deny(_)), "the allow list still decides");
    assert!(matches!(p.decide("10.0.0.1", 443), Decision::Deny(_)), "an internal address is still refused");
}

#[test]
fn patterns_match_names_and_their_subdomains_only() {
    assert!(matches("api.example.com", "api.example.com"));
    assert!(!matches("api.example.com", "xapi.example.com"));
    assert!(matches("*.example.com", "a.example.com"));
    assert!(matches("*.example.com", "a.b.example.com"));
    assert!(!matches("*.example.com", "example.com"));
    assert!(!matches("*.example.com", "evilexample.com"));
    assert!(!matches("*.example.com", "example.com.evil.org"));
    for bad in ["", "*", "*.", "a..b", "a b", "a/b", "a:b", "a:0", "a:65536", "a:", "*.:80", &"x".repeat(64)] {
        assert!(parse_pattern(bad).is_err(), "{bad:?}");
    }
    assert_eq!(parse_pattern("*.Example.COM"), Ok("*.example.com".into()));
    assert_eq!(parse_pattern("api.test:8080"), Ok("api.test:8080".into()));
    assert_eq!(parse_pattern("*.example.com:443"), Ok("*.example.com:443".into()));
}

#[test]
fn a_mapped_name_opens_only_the_web_ports_unless_its_port_is_named() {
    let mut p = policy(&["loop.test", "port.test:8080"]);
    p.hosts.push(("loop.test".into(), "127.0.0.1".parse().unwrap()));
    p.hosts.push(("port.test".into(), "127.0.0.1".parse().unwrap()));
    assert_eq!(p.decide("loop.test", 80), Decision::Allow("127.0.0.1:80".parse().unwrap()));
    assert_eq!(p.decide("loop.test", 443), Decision::Allow("127.0.0.1:443".parse().unwrap()));
    // The attack: a host Redis on the loopback through an allowed mapped name.
    assert!(matches!(p.decide("loop.test", 26379), Decision::Deny(r) if r.contains("--allow loop.test:26379")));
    assert_eq!(p.decide("port.test", 8080), Decision::Allow("127.0.0.1:8080".parse().unwrap()));
    assert!(matches!(p.decide("port.test", 443), Decision::Deny(r) if r.contains("not on the allow list")), "its one port only");
    assert!(matches!(p.decide("port.test", 8081), Decision::Deny(_)));
    p.deny.push("port.test:8080".into());
    assert!(matches!(p.decide("port.test", 8080), Decision::Deny(r) if r.contains("denied")));
    assert!(covers("*.a.test", "x.a.test", 9999, false), "a public name on any port");
    assert!(!covers("*.a.test:443", "x.a.test", 80, false));
}

#[test]
fn internal_addresses_are_recognized() {
    for ip in [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "100.64.0.1",
        "224.0.0.1",
        "::1",
        "fc00::1",
        "fe80::1",
        "::ffff:10.0.0.1",
        "::",
    ] {
        assert!(is_internal(ip.parse().unwrap()), "{ip}");
    }
    for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "100.128.0.1"] {
        assert!(!is_internal(ip.parse().unwrap()), "{ip}");
    }
}

#[test]
fn decisions() {
    let mut p = policy(&["api.test", "*.allowed.test", "localhost", "10.0.0.1"]);
    p.hosts.push(("api.test".into(), "127.0.0.1".parse().unwrap()));
    p.hosts.push(("mapped.test".into(), "127.0.0.1".parse().unwrap()));
    assert!(
        matches!(p.decide("mapped.test", 80), Decision::Deny(r) if r.contains("not on the allow list")),
        "a mapping is not an allowance"
    );
    assert_eq!(p.decide("api.test", 443), Decision::Allow("127.0.0.1:443".parse().unwrap()), "a mapped name may be internal");
    assert_eq!(p.decide("API.TEST", 80), Decision::Allow("127.0.0.1:80".parse().unwrap()));
    assert!(matches!(p.decide("other.test", 80), Decision::Deny(r) if r.contains("not on the allow list")));
    assert!(matches!(p.decide("localhost", 80), Decision::Deny(r) if r.contains("internal")), "allowed by name, but it resolves inside");
    assert!(matches!(p.decide("10.0.0.1", 80), Decision::Deny(r) if r.contains("internal")), "allowed by its text, but internal");
    assert!(matches!(p.decide("10.0.0.2", 80), Decision::Deny(r) if r.contains("not on the allow list")));
    assert!(matches!(p.decide("169.254.169.254", 80), Decision::Deny(_)), "cloud metadata");
    p.deny.push("api.test".into());
    assert!(matches!(p.decide("api.test", 80), Decision::Deny(r) if r.contains("denied")), "deny wins over a mapping");
    p.mode = NetworkMode::None;
    assert!(matches!(p.decide("x.allowed.test", 443), Decision::Deny(r) if r.contains("network is off")));
}

#[test]
fn add_host_specs() {
    assert_eq!(parse_add_host("api.test:127.0.0.1"), Ok(("api.test".into(), "127.0.0.1".parse().unwrap())));
    assert_eq!(parse_add_host("v6.test:[::1]"), Ok(("v6.test".into(), "::1".parse().unwrap())));
    assert_eq!(parse_add_host("v6.test:::1"), Ok(("v6.test".into(), "::1".parse().unwrap())));
    for bad in ["api.test", "api.test:", ":1.2.3.4", "api.test:999.1.1.1", "a b:1.2.3.4"] {
        assert!(parse_add_host(bad).is_err(), "{bad:?}");
    }
}

/// What every accepted request must be: a host and port the policy can judge, and a
/// forwarded head that is clean HTTP (no bare CR or LF, no control characters but tab).
fn check_accepted(r: &ProxyRequest) {
    assert!(r.port != 0 && (valid_name(&r.host) || r.host.parse::<IpAddr>().is_ok()), "{r:?}");
    if let Some(head) = &r.forward {
        assert!(head.ends_with(b"\r\n\r\n"), "{head:?}");
        for (i, &b) in head.iter().enumerate() {
            assert!(
                b >= 0x20 || b == b'\t' || (b == b'\r' && head.get(i + 1) == Some(&b'\n')) || (b == b'\n' && i > 0 && head[i - 1] == b'\r'),
                "byte {b:#x} at {i} in {head:?}"
            );
            assert_ne!(b, 0x7f);
        }
        // The request's headers, less hop-by-hop ones, and the proxy's `Connection: close`.
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS + 1];
        assert!(matches!(httparse::Request::new(&mut headers).parse(head), Ok(httparse::Status::Complete(n)) if n == head.len()));
    }
}

proptest::proptest! {
    #[test]
    fn any_bytes_get_an_answer(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
        if let Ok(r) = parse_request(&bytes) {
            check_accepted(&r);
        }
    }

    #[test]
    fn any_built_head_is_judged_by_its_real_host(
        method in "GET|POST|CONNECT|DELETE",
        host in "[a-z0-9]{1,8}(\\.[a-z]{1,4}){0,2}|\\[::1\\]|127\\.0\\.0\\.1|0x7f\\.1|2130706433",
        port in 0u32..70000,
        headers in proptest::collection::vec(("[A-Za-z-]{1,12}", "[ -~\t\r\n\x1b\x00]{0,24}"), 0..6),
    ) {
        let target = if method == "CONNECT" { format!("{host}:{port}") } else { format!("http://{host}:{port}/p") };
        let mut head = format!("{method} {target} HTTP/1.1\r\n");
        for (name, value) in &headers {
            head += &format!("{name}: {value}\r\n");
        }
        head += "\r\n";
        if let Ok(r) = parse_request(head.as_bytes()) {
            check_accepted(&r);
            proptest::prop_assert_eq!(r.port as u32, port);
            proptest::prop_assert_eq!(r.host.as_str(), host.trim_start_matches('[').trim_end_matches(']'));
        }
    }
}

#[test]
fn a_request_head_is_read_whole_before_its_deadline_or_not_at_all() {
    let (mut guest, proxy) = UnixStream::pair().unwrap();
    let mut reader = BufReader::new(proxy);
    guest.write_all(b"CONNECT a.test:443 HTTP/1.1\r\n\r\nafter").unwrap();
    let head = read_head(&mut reader, Instant::now() + Duration::from_secs(5)).unwrap();
    assert_eq!(head, b"CONNECT a.test:443 HTTP/1.1\r\n\r\n");
    assert_eq!(reader.buffer(), b"after", "what follows the head stays for the upstream");
    // A byte at a time, each well within a per-read timeout: the whole head's deadline ends it.
    let (guest, proxy) = UnixStream::pair().unwrap();
    let trickle = std::thread::spawn(move || {
        for _ in 0..40 {
            if (&guest).write_all(b"x").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let started = Instant::now();
    let e = read_head(&mut BufReader::new(proxy), started + Duration::from_millis(500)).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    // Without the whole-head deadline the 40 bytes would be read to their end (2 s) and
    // taken as a head.
    assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
    trickle.join().unwrap();
}

#[test]
fn requests_parse_and_hostile_ones_are_refused() {
    let r = parse_request(b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n").unwrap();
    assert_eq!((r.host.as_str(), r.port, r.forward), ("api.test", 443, None));
    let r = parse_request(b"GET http://api.test:8080/a/b?c=d HTTP/1.1\r\nHost: api.test\r\n\r\n").unwrap();
    assert_eq!((r.host.as_str(), r.port), ("api.test", 8080));
    assert_eq!(r.forward.unwrap(), b"GET /a/b?c=d HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n");
    let r = parse_request(b"GET http://plain.test HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!((r.port, r.forward.unwrap()), (80, b"GET / HTTP/1.0\r\nConnection: close\r\n\r\n".to_vec()));
    // Headers for the proxy hop stay here; the server is told this is the connection's one request.
    let r = parse_request(b"GET http://api.test/ HTTP/1.1\r\nHost: api.test\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nProxy-Authorization: Basic eA==\r\nAccept: */*\r\n\r\n").unwrap();
    assert_eq!(
        String::from_utf8(r.forward.unwrap()).unwrap(),
        "GET / HTTP/1.1\r\nHost: api.test\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    let r = parse_request(b"CONNECT [2606:4700::1111]:443 HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(r.host, "2606:4700::1111");
    for bad in [
        &b"CONNECT api.test HTTP/1.1\r\n\r\n"[..],
        b"CONNECT api.test:0 HTTP/1.1\r\n\r\n",
        b"CONNECT api.test:99999 HTTP/1.1\r\n\r\n",
        b"GET /relative HTTP/1.1\r\n\r\n",
        b"GET https://api.test/ HTTP/1.1\r\n\r\n",
        b"GET http://user:pw@api.test/ HTTP/1.1\r\n\r\n",
        b"GET http://a b/ HTTP/1.1\r\n\r\n",
        b"CONNECT evil.test/x:443 HTTP/1.1\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"\xff\xfe\r\n\r\n",
        b"",
        b"GET http://allowed.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n",
        b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n",
        b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nHost: evil.test\r\n\r\n",
        b"GET http://a.test/ HTTP/1.1\r\nX: a\rInjected: b\r\n\r\n",
        b"GET http://a.test/ HTTP/1.1\r\nX: \x1b[2Jcleared\r\n\r\n",
        b"GET http://a.test/ HTTP/1.1\r\n\r\nGET http://evil.test/ HTTP/1.1\r\n\r\n",
    ] {
        assert!(parse_request(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
    }
}
