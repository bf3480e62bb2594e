//! `cvm bench proxy`: what the egress proxy adds to an HTTPS request, tunneled and intercepted
//! to swap a secret, against the same request straight to the server, in one run. The server
//! is an HTTPS server on this host's loopback; the client stands where the guest's relay
//! does (the proxy's Unix socket), so the numbers are the proxy's own, without a VM.

use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use cvm::network::egress::{start_proxy, EgressPolicy};
use cvm::network::interception::SecretSwap;
use cvm::network::loopback_https::{connect_through, exchange, tls_client, LoopbackHttps};
use cvm::network::secrets::Secret;

#[derive(clap::Args)]
pub struct ProxyBench {
    /// New connections per path (each: connect, TLS handshake, one request).
    #[arg(long, default_value_t = 200)]
    connections: usize,
    /// Requests per path on one kept-alive connection.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
}

/// One open session of a path: sends a request, takes its answer.
type Exchange = Box<dyn FnMut(&[u8]) -> Result<()>>;

/// The ways a request reaches the server.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    Direct,
    Tunneled,
    Intercepted,
}

impl Path {
    const ALL: [Path; 3] = [Path::Direct, Path::Tunneled, Path::Intercepted];

    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct (no proxy)",
            Path::Tunneled => "proxy, tunneled",
            Path::Intercepted => "proxy, secret swapped",
        }
    }
}

pub fn run(args: ProxyBench) -> Result<()> {
    let server = LoopbackHttps::start(&["tunnel.test", "swap.test"])?;
    let port = server.port();
    let secret = Secret::new("BENCH_TOKEN".into(), vec!["swap.test".into()], "bench-secret-value".into())?;
    let placeholder = secret.placeholder.clone();
    let swap = Arc::new(SecretSwap::with_roots(vec![secret], server.roots())?);
    let mut session_ca = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(swap.ca_pem().as_bytes()) {
        session_ca.add(cert?)?;
    }
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("proxy.sock");
    let localhost = "127.0.0.1".parse()?;
    let policy = EgressPolicy {
        allow: vec![format!("tunnel.test:{port}"), format!("swap.test:{port}")],
        hosts: vec![("tunnel.test".into(), localhost), ("swap.test".into(), localhost)],
        ..EgressPolicy::default()
    };
    let _proxy = start_proxy(&socket, policy, Some(swap), &dir.path().join("network.log"), "bench".into())?;

    let request = |host: &str| format!("GET / HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {placeholder}\r\n\r\n").into_bytes();
    // One session per path: (host, trust) as the client sees them.
    let open = |path: Path| -> Result<Exchange> {
        match path {
            Path::Direct => {
                let tcp = TcpStream::connect(("127.0.0.1", port))?;
                tcp.set_nodelay(true)?;
                let mut tls = tls_client(tcp, "tunnel.test", server.roots())?;
                Ok(Box::new(move |r| exchange(&mut tls, r).map(drop)))
            }
            Path::Tunneled => {
                let mut tls = tls_client(connect_through(&socket, "tunnel.test", port)?, "tunnel.test", server.roots())?;
                Ok(Box::new(move |r| exchange(&mut tls, r).map(drop)))
            }
            Path::Intercepted => {
                let mut tls = tls_client(connect_through(&socket, "swap.test", port)?, "swap.test", session_ca.clone())?;
                Ok(Box::new(move |r| exchange(&mut tls, r).map(drop)))
            }
        }
    };
    let host = |path: Path| if path == Path::Intercepted { "swap.test" } else { "tunnel.test" };

    let mut per_connection: Vec<Vec<Duration>> = vec![Vec::new(); 3];
    let mut per_request: Vec<Vec<Duration>> = vec![Vec::new(); 3];
    // Warm-up: the intercepted host's certificate is made on first use.
    for path in Path::ALL {
        open(path)?(&request(host(path)))?;
    }
    for _ in 0..args.connections {
        for (i, path) in Path::ALL.into_iter().enumerate() {
            let started = Instant::now();
            open(path)?(&request(host(path)))?;
            per_connection[i].push(started.elapsed());
        }
    }
    let mut sessions: Vec<_> = Path::ALL.into_iter().map(open).collect::<Result<_>>()?;
    for _ in 0..args.requests {
        for (i, path) in Path::ALL.into_iter().enumerate() {
            let started = Instant::now();
            sessions[i](&request(host(path)))?;
            per_request[i].push(started.elapsed());
        }
    }
    let swapped = server.seen().iter().filter(|r| r.head.contains("bench-secret-value")).count();
    anyhow::ensure!(swapped == args.connections + args.requests + 1, "the server saw the secret swapped in {swapped} requests");

    println!(
        "cvm bench proxy on {}: {} new connections and {} kept-alive requests per path",
        super::HostFacts::read(),
        args.connections,
        args.requests
    );
    println!();
    println!("| path | new connection + request (median) | added | request on a kept-alive connection (median) | added |");
    println!("|---|---|---|---|---|");
    let connection_base = median(&mut per_connection[0]);
    let request_base = median(&mut per_request[0]);
    for (i, path) in Path::ALL.into_iter().enumerate() {
        let (c, r) = (median(&mut per_connection[i]), median(&mut per_request[i]));
        println!(
            "| {} | {} | {} | {} | {} |",
            path.name(),
            micros(c),
            micros(c.saturating_sub(connection_base)),
            micros(r),
            micros(r.saturating_sub(request_base))
        );
    }
    Ok(())
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn micros(d: Duration) -> String {
    format!("{} µs", d.as_micros())
}
