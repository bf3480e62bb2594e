//! The egress proxy as the guest's relay reaches it (a Unix socket, as vsock delivers it),
//! against HTTP servers on this host's loopback only.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use cvm::egress::{start_proxy, EgressPolicy, NetworkMode};
use cvm::forward::Listening;

/// An HTTP server on 127.0.0.1 that answers `count` requests with `body`.
fn server(body: &'static str, count: usize) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(count) {
            let mut conn = conn.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let request_line = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_string();
            let reply = format!("{body} ({request_line})");
            let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}", reply.len());
        }
    });
    port
}

struct Setup {
    // The proxy goes first: it wakes its accept loop through the socket in `dir`.
    _proxy: Listening,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(policy: EgressPolicy) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_proxy(&dir.path().join("vsock_3128"), policy, &dir.path().join("network.log"), "test".into()).unwrap();
        Setup { _proxy: proxy, dir }
    }

    fn ask(&self, request: &str) -> String {
        let mut conn = UnixStream::connect(self.dir.path().join("vsock_3128")).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        conn.write_all(request.as_bytes()).unwrap();
        let mut reply = String::new();
        let _ = conn.read_to_string(&mut reply);
        reply
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("network.log")).unwrap_or_default()
    }
}

fn policy(allow: &[&str], hosts: &[(&str, &str)]) -> EgressPolicy {
    EgressPolicy {
        allow: allow.iter().map(|s| s.to_string()).collect(),
        hosts: hosts.iter().map(|(n, ip)| (n.to_string(), ip.parse().unwrap())).collect(),
        ..EgressPolicy::default()
    }
}

#[test]
fn an_allowed_mapped_name_reaches_the_host_server_over_http_and_connect() {
    let port = server("hello from the host", 2);
    let s = Setup::new(policy(&["api.test"], &[("api.test", "127.0.0.1")]));
    let reply = s.ask(&format!("GET http://api.test:{port}/path?q=1 HTTP/1.1\r\nHost: api.test:{port}\r\n\r\n"));
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    assert!(reply.ends_with("hello from the host (GET /path?q=1 HTTP/1.1)"), "origin-form upstream: {reply}");

    let mut conn = UnixStream::connect(s.dir.path().join("vsock_3128")).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(conn, "CONNECT api.test:{port} HTTP/1.1\r\n\r\n").unwrap();
    let mut established = [0u8; 39];
    conn.read_exact(&mut established).unwrap();
    assert_eq!(&established, b"HTTP/1.1 200 Connection established\r\n\r\n");
    conn.write_all(b"GET /tunnel HTTP/1.1\r\n\r\n").unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    assert!(reply.ends_with("(GET /tunnel HTTP/1.1)"), "{reply}");
    let audit = s.audit();
    assert_eq!(audit.lines().filter(|l| l.contains(" allow api.test:")).count(), 2, "{audit}");
}

#[test]
fn refusals_are_403s_and_are_logged() {
    let port = server("must not be reached", 1);
    let s = Setup::new(policy(&["api.test"], &[("api.test", "127.0.0.1")]));
    for (target, why) in [
        (format!("other.test:{port}"), "not on the allow list"),
        (format!("127.0.0.1:{port}"), "not on the allow list"),
        (format!("10.0.0.1:{port}"), "not on the allow list"),
        ("169.254.169.254:80".to_string(), "not on the allow list"),
        (format!("localhost:{port}"), "not on the allow list"),
    ] {
        let reply = s.ask(&format!("CONNECT {target} HTTP/1.1\r\n\r\n"));
        assert!(reply.starts_with("HTTP/1.1 403 Forbidden"), "{target}: {reply}");
        assert!(reply.contains(why), "{target}: {reply}");
        assert!(s.audit().contains(&format!(" deny {target} ")), "{target} logged: {}", s.audit());
    }
    let reply = s.ask("GARBAGE\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    let huge = format!("GET http://api.test/ HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(64 * 1024));
    assert!(s.ask(&huge).starts_with("HTTP/1.1 400"), "an endless head is cut off");
}

#[test]
fn network_none_refuses_everything() {
    let port = server("must not be reached", 1);
    let mut p = policy(&["api.test"], &[("api.test", "127.0.0.1")]);
    p.mode = NetworkMode::None;
    let s = Setup::new(p);
    let reply = s.ask(&format!("GET http://api.test:{port}/ HTTP/1.1\r\n\r\n"));
    assert!(reply.starts_with("HTTP/1.1 403") && reply.contains("--network none"), "{reply}");
}

/// An HTTP proxy on 127.0.0.1 that takes `CONNECT` requests, records their targets, and
/// tunnels each to `port` on loopback (as if it resolved every name there), or refuses them
/// with 403 when `port` is None.
fn upstream_proxy(port: Option<u16>) -> (u16, std::sync::mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let _ = tx.send(String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_string());
            let Some(port) = port else {
                let _ = conn.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
                continue;
            };
            let origin = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").unwrap();
            let (mut from_guest, mut to_origin) = (conn.try_clone().unwrap(), origin.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut from_guest, &mut to_origin));
            let (mut origin, mut conn) = (origin, conn);
            std::thread::spawn(move || std::io::copy(&mut origin, &mut conn));
        }
    });
    (proxy_port, rx)
}

#[test]
fn behind_an_upstream_proxy_allowed_names_are_tunnelled_through_it() {
    // A name that resolves nowhere: only the upstream can reach it.
    let port = server("hello through the upstream", 2);
    let (proxy_port, targets) = upstream_proxy(Some(port));
    let mut p = policy(&["registry.test"], &[]);
    p.upstream = Some(format!("127.0.0.1:{proxy_port}"));
    let s = Setup::new(p);
    let reply = s.ask(&format!("GET http://registry.test:{port}/pkg HTTP/1.1\r\nHost: registry.test\r\n\r\n"));
    assert!(reply.ends_with("hello through the upstream (GET /pkg HTTP/1.1)"), "{reply}");
    assert_eq!(targets.recv_timeout(Duration::from_secs(5)).unwrap(), format!("CONNECT registry.test:{port} HTTP/1.1"));
    let reply = s.ask("CONNECT registry.test:443 HTTP/1.1\r\n\r\nGET /tls HTTP/1.1\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 200 Connection established\r\n\r\n") && reply.ends_with("(GET /tls HTTP/1.1)"), "{reply}");
    assert_eq!(targets.recv_timeout(Duration::from_secs(5)).unwrap(), "CONNECT registry.test:443 HTTP/1.1");
    // The allow list is still cvm's: nothing else reaches the upstream.
    assert!(s.ask("CONNECT elsewhere.test:443 HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 403"));
    assert!(targets.recv_timeout(Duration::from_millis(300)).is_err(), "a refused name never reaches the upstream");
    assert!(s.audit().contains(&format!("allow registry.test:443 via 127.0.0.1:{proxy_port}")), "{}", s.audit());
}

#[test]
fn an_upstream_that_refuses_is_a_502_with_its_answer() {
    let (proxy_port, _targets) = upstream_proxy(None);
    let mut p = policy(&["registry.test"], &[]);
    p.upstream = Some(format!("127.0.0.1:{proxy_port}"));
    let s = Setup::new(p);
    let reply = s.ask("CONNECT registry.test:443 HTTP/1.1\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 502") && reply.contains("HTTP/1.1 403 Forbidden"), "{reply}");
    assert!(s.audit().contains("fail registry.test:443 via"), "{}", s.audit());
}
