//! The egress proxy as the guest's relay reaches it (a Unix socket, as vsock delivers it),
//! against HTTP servers on this host's loopback only.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use cvm::network::egress::{start_proxy, EgressPolicy, NetworkMode};
use cvm::network::forward::Listening;
use cvm::network::interception::SecretSwap;
use cvm::network::loopback_https::{self, LoopbackHttps};
use cvm::network::secrets::Secret;
use std::sync::Arc;

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
        Setup::swapping(policy, None)
    }

    fn swapping(policy: EgressPolicy, swap: Option<Arc<SecretSwap>>) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_proxy(&dir.path().join("vsock_3128"), policy, swap, &dir.path().join("network.log"), "test".into()).unwrap();
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
    // A mapped name's port other than 80 and 443 is named in the allow list.
    let s = Setup::new(policy(&[&format!("api.test:{port}")], &[("api.test", "127.0.0.1")]));
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

/// A server that keeps a connection for as many requests as the client sends, until one says
/// `Connection: close`; records each request's head.
fn keep_alive_server() -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = std::io::BufReader::new(conn);
            loop {
                let mut head = String::new();
                while !head.ends_with("\r\n\r\n") {
                    let mut line = String::new();
                    if std::io::BufRead::read_line(&mut conn, &mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    head += &line;
                }
                if head.is_empty() {
                    break;
                }
                seen.lock().unwrap().push(head.clone());
                let close = head.to_ascii_lowercase().contains("connection: close");
                let _ = write!(conn.get_mut(), "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                if close {
                    break;
                }
            }
        }
    });
    (port, heads)
}

#[test]
fn each_plain_http_request_is_decided_alone_however_the_connection_is_kept() {
    let (port, heads) = keep_alive_server();
    let s = Setup::new(policy(&[&format!("api.test:{port}")], &[("api.test", "127.0.0.1"), ("other.test", "127.0.0.1")]));
    // curl's way: a second request, for a host the allow list leaves out, on the same proxy
    // connection; hop-by-hop headers meant for the proxy.
    let reply = s.ask(&format!(
        "GET http://api.test:{port}/one HTTP/1.1\r\nHost: api.test:{port}\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic eDp5\r\n\r\n\
         GET http://other.test:{port}/two HTTP/1.1\r\nHost: other.test:{port}\r\n\r\n"
    ));
    assert!(
        reply.starts_with("HTTP/1.1 200 OK") && reply.ends_with("ok") && reply.matches("HTTP/1.1").count() == 1,
        "one answer, then the end: {reply}"
    );
    let seen = heads.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "the second request reached the server: {seen:?}");
    assert!(seen[0].contains("Connection: close\r\n") && !seen[0].to_ascii_lowercase().contains("proxy-"), "{seen:?}");
    // The client's next connection is decided and logged like any.
    let reply = s.ask(&format!("GET http://other.test:{port}/two HTTP/1.1\r\nHost: other.test:{port}\r\n\r\n"));
    assert!(reply.starts_with("HTTP/1.1 403") && reply.contains("not on the allow list"), "{reply}");
    assert!(s.audit().contains(&format!(" deny other.test:{port} ")), "{}", s.audit());
    assert_eq!(heads.lock().unwrap().len(), 1);
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
    assert_eq!(
        targets.recv_timeout(Duration::from_secs(60)).expect("the upstream saw no CONNECT within 60 s"),
        format!("CONNECT registry.test:{port} HTTP/1.1")
    );
    let reply = s.ask("CONNECT registry.test:443 HTTP/1.1\r\n\r\nGET /tls HTTP/1.1\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 200 Connection established\r\n\r\n") && reply.ends_with("(GET /tls HTTP/1.1)"), "{reply}");
    assert_eq!(
        targets.recv_timeout(Duration::from_secs(60)).expect("the upstream saw no CONNECT within 60 s"),
        "CONNECT registry.test:443 HTTP/1.1"
    );
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

/// A guest's TLS client through the proxy: CONNECT `host:port`, TLS trusting `roots`, then
/// each of `requests` on the one connection; the answers.
fn https_through(s: &Setup, host: &str, port: u16, roots: rustls::RootCertStore, requests: &[String]) -> anyhow::Result<Vec<String>> {
    let conn = loopback_https::connect_through(&s.dir.path().join("vsock_3128"), host, port)?;
    let mut stream = loopback_https::tls_client(conn, host, roots)?;
    requests.iter().map(|r| loopback_https::exchange(&mut stream, r.as_bytes())).collect()
}

#[test]
fn secrets_are_swapped_in_only_on_their_own_hosts_and_never_cross_in_plain_http() {
    let https = LoopbackHttps::start(&["secret.test", "plain.test"]).unwrap();
    let port = https.port();
    let mut secret = Secret::new("API_TOKEN".into(), vec!["secret.test".into(), "unlisted.test".into()], "the-real-value".into()).unwrap();
    secret.body = true;
    // Beside the credential headers, a header its config names.
    secret.headers = vec!["x-key".into()];
    let placeholder = secret.placeholder.clone();
    let swap = Arc::new(SecretSwap::with_roots(vec![secret], https.roots()).unwrap());
    let mut session_ca = rustls::RootCertStore::empty();
    session_ca.add_parsable_certificates(certificates(&swap.ca_pem()));
    let http = server("plain", 1);
    let s = Setup::swapping(
        policy(
            &[&format!("secret.test:{port}"), &format!("plain.test:{port}"), &format!("plain.test:{http}")],
            &[("secret.test", "127.0.0.1"), ("plain.test", "127.0.0.1")],
        ),
        Some(swap),
    );

    // Two requests on one intercepted connection, the first with a body, the second chunked.
    let body = format!("{{\"key\":\"{placeholder}\"}}");
    let first = format!(
        "POST /one HTTP/1.1\r\nHost: secret.test:{port}\r\nAuthorization: Bearer {placeholder}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let second = format!(
        "POST /two HTTP/1.1\r\nHost: secret.test\r\nX-Key: {placeholder}\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{}\r\n0\r\n\r\n",
        &placeholder[..4]
    );
    // A body near the largest held: much more than rustls buffers by default.
    let large = format!("{}{placeholder}", "x".repeat(250_000));
    let third = format!("PUT /three HTTP/1.1\r\nContent-Length: {}\r\n\r\n{large}", large.len());
    let answers = https_through(&s, "secret.test", port, session_ca.clone(), &[first, second, third]).unwrap();
    assert!(answers.iter().all(|a| a.starts_with("HTTP/1.1 200 OK")), "{answers:?}");
    let seen = https.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen[2].body.len() == 250_000 + "the-real-value".len() && seen[2].body.ends_with("xthe-real-value"), "{}", seen[2].head);
    assert!(
        seen[0].head.contains("Authorization: Bearer the-real-value\r\n") && seen[1].head.contains("X-Key: the-real-value\r\n"),
        "{seen:?}"
    );
    assert_eq!(seen[0].body, "{\"key\":\"the-real-value\"}");
    assert_eq!(seen[0].offered_alpn, ["http/1.1"], "the proxy's own client reached the server");

    // The session CA vouches for secret.test only; the real server's CA is not what the
    // guest sees there.
    assert!(
        https_through(&s, "secret.test", port, https.roots(), &[String::new()]).is_err(),
        "an intercepted host shows the session's certificate"
    );

    // Another allowed host: tunneled as it is, the placeholder unswapped.
    let answers = https_through(
        &s,
        "plain.test",
        port,
        https.roots(),
        &[format!("GET /three HTTP/1.1\r\nHost: plain.test\r\nAuthorization: Bearer {placeholder}\r\n\r\n")],
    )
    .unwrap();
    assert_eq!(answers.len(), 1);
    let tunneled = https.seen().pop().unwrap();
    assert!(
        tunneled.head.contains(&format!("Bearer {placeholder}")) && tunneled.offered_alpn.is_empty(),
        "the test's own client reached the server: {tunneled:?}"
    );

    // Plain HTTP to the secret's host is refused; elsewhere its placeholder is logged.
    let reply = s.ask(&format!("GET http://secret.test:{port}/ HTTP/1.1\r\nAuthorization: {placeholder}\r\n\r\n"));
    assert!(reply.starts_with("HTTP/1.1 403") && reply.contains("use https"), "{reply}");
    // A secret's host the allow list leaves out is refused for that, whatever the scheme.
    let reply = s.ask("GET http://unlisted.test/ HTTP/1.1\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 403") && reply.contains("not on the allow list"), "{reply}");
    let reply = s.ask(&format!("GET http://plain.test:{http}/ HTTP/1.1\r\nX-Token: {placeholder}\r\n\r\n"));
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let audit = s.audit();
    for place in ["Authorization", "X-Key", "the body"] {
        assert!(audit.contains(&format!("swap secret.test:{port} API_TOKEN in {place}\n")), "{place}: {audit}");
    }
    assert!(audit.contains(&format!("deny secret.test:{port} plain HTTP to a host that secrets go to (API_TOKEN)")), "{audit}");
    assert!(audit.contains(&format!("placeholder plain.test:{http} API_TOKEN's placeholder sent in plain HTTP")), "{audit}");
    assert!(!audit.contains("the-real-value"), "{audit}");
}

fn certificates(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).map(|c| c.unwrap()).collect()
}
