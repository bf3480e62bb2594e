//! An HTTPS server on this host's loopback with a CA of its own, for `cvm bench proxy` and the
//! tests of the proxy's secret swap: it answers every request `ok`, keeps connections open,
//! and remembers each request's head and what application protocols its TLS client offered
//! (the proxy's client offers HTTP/1.1 only; curl offers h2 too).

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The longest request head the server reads.
const MAX_HEAD: usize = 64 * 1024;

/// One request the server answered.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    /// The request line and headers, as sent.
    pub head: String,
    /// The body, when it had a Content-Length.
    pub body: String,
    /// The application protocols the connection's client offered.
    pub offered_alpn: Vec<String>,
}

pub struct LoopbackHttps {
    port: u16,
    ca: rcgen::Certificate,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
}

impl LoopbackHttps {
    /// Serves on a free port of 127.0.0.1 with a certificate for `names`.
    pub fn start(names: &[&str]) -> Result<LoopbackHttps> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "cvm loopback test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let ca = params.self_signed(&ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))?;
        let certified = Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing));

        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (certified, record) = (certified.clone(), record.clone());
                std::thread::spawn(move || serve(conn, certified, &record));
            }
        });
        Ok(LoopbackHttps { port, ca, seen })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A trust store holding only the server's CA.
    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("a certificate rcgen made");
        roots
    }

    /// The requests answered so far.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A connection through the egress proxy at `socket` to `host:port`, by CONNECT, as the
/// guest's relay makes one; the proxy's refusal as an error.
pub fn connect_through(socket: &Path, host: &str, port: u16) -> Result<UnixStream> {
    let mut conn = UnixStream::connect(socket)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(conn, "CONNECT {host}:{port} HTTP/1.1\r\n\r\n")?;
    let mut established = [0u8; 39];
    conn.read_exact(&mut established)?;
    if &established != b"HTTP/1.1 200 Connection established\r\n\r\n" {
        let mut rest = String::new();
        let _ = conn.read_to_string(&mut rest);
        anyhow::bail!("{}{rest}", String::from_utf8_lossy(&established));
    }
    Ok(conn)
}

/// A TLS client session for `host` over `stream`, trusting `roots` only.
pub fn tls_client<S: Read + Write>(
    stream: S,
    host: &str,
    roots: rustls::RootCertStore,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, S>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = rustls::ClientConnection::new(Arc::new(config), host.to_string().try_into()?)?;
    Ok(rustls::StreamOwned::new(tls, stream))
}

/// Sends `request` and reads this server's answer to it (head and `ok`).
pub fn exchange(stream: &mut (impl Read + Write), request: &[u8]) -> Result<String> {
    stream.write_all(request)?;
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\nok\n") {
        if answer.len() >= MAX_HEAD || stream.read(&mut byte)? == 0 {
            anyhow::bail!("the answer ended early: {:?}", String::from_utf8_lossy(&answer));
        }
        answer.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// Serves one key, remembering what the client offered.
#[derive(Debug)]
struct Recording {
    key: Arc<CertifiedKey>,
    offered_alpn: Mutex<Vec<String>>,
}

impl ResolvesServerCert for Recording {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offered =
            hello.alpn().map(|protocols| protocols.map(|p| String::from_utf8_lossy(p).into_owned()).collect()).unwrap_or_default();
        *self.offered_alpn.lock().unwrap_or_else(|e| e.into_inner()) = offered;
        Some(self.key.clone())
    }
}

fn serve(conn: TcpStream, key: Arc<CertifiedKey>, seen: &Mutex<Vec<SeenRequest>>) -> Option<()> {
    let _ = conn.set_nodelay(true);
    let recording = Arc::new(Recording { key, offered_alpn: Mutex::new(Vec::new()) });
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_no_client_auth()
        .with_cert_resolver(recording.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = rustls::ServerConnection::new(Arc::new(config)).ok()?;
    let mut stream = rustls::StreamOwned::new(tls, conn);
    loop {
        let head = read_head(&mut stream).ok()??;
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.split_once(':').filter(|(n, _)| n.trim().eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string()))
        };
        let mut body = Vec::new();
        if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            skip_chunks(&mut stream).ok()?;
        } else {
            let length = header("content-length").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            (&mut stream).take(length).read_to_end(&mut body).ok()?;
        }
        let body = String::from_utf8_lossy(&body).into_owned();
        let offered_alpn = recording.offered_alpn.lock().unwrap_or_else(|e| e.into_inner()).clone();
        seen.lock().unwrap_or_else(|e| e.into_inner()).push(SeenRequest { head, body, offered_alpn });
        stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n").ok()?;
    }
}

/// The next request head, or None at the connection's end.
fn read_head(stream: &mut impl Read) -> io::Result<Option<String>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD || stream.read(&mut byte)? == 0 {
            return Ok(None);
        }
        head.push(byte[0]);
    }
    Ok(Some(String::from_utf8_lossy(&head).into_owned()))
}

/// Reads a chunked body and its trailers.
fn skip_chunks(stream: &mut impl Read) -> io::Result<()> {
    let line = |stream: &mut dyn Read| -> io::Result<String> {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            if line.len() >= MAX_HEAD || stream.read(&mut byte)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            line.push(byte[0]);
        }
        Ok(String::from_utf8_lossy(&line[..line.len() - 2]).into_owned())
    };
    loop {
        let size = u64::from_str_radix(line(stream)?.split(';').next().unwrap_or("").trim(), 16).map_err(io::Error::other)?;
        if size == 0 {
            while !line(stream)?.is_empty() {}
            return Ok(());
        }
        io::copy(&mut stream.take(size), &mut io::sink())?;
        line(stream)?;
    }
}
