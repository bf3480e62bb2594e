//! End-to-end tests of the guest's egress: commands in the VM reach an HTTP server on this
//! host's loopback only through cvm's proxy, by name, when allowed, and every decision lands
//! in the audit log. Full stack on the QEMU engine here, and on cvm's VMM with hardware KVM.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;

use common::{engine, text, Env};

/// An HTTP server on 127.0.0.1 answering every request with `body`.
fn server(body: &'static str) -> u16 {
    common::http_server(body).0
}

#[test]
fn an_allowed_name_reaches_the_host_server_and_everything_else_is_refused_and_logged() {
    let Some(env) = Env::new() else { return };
    let port = server("hello from the host");
    let url = format!("http://api.test:{port}/");
    let fetch = format!("wget -q -O - {url} 2>&1; s=$?; echo; echo status $s");
    let audit = env.home.path().join(".local/state/cvm/network.log");
    let engine = engine();
    let allow = format!("api.test:{port}");
    let out = env.run(engine, &["--add-host", "api.test:127.0.0.1", "--allow", &allow, "--", "sh", "-c", &fetch], b"");
    assert_eq!(text(&out.stdout), "hello from the host\nstatus 0\n", "[{engine}] {}", text(&out.stderr));

    let out = env.run(engine, &["--add-host", "api.test:127.0.0.1", "--", "sh", "-c", &fetch], b"");
    let stdout = text(&out.stdout);
    assert!(stdout.contains("403") && stdout.ends_with("status 1\n"), "[{engine}] not on the allow list: {stdout}");
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(log.lines().any(|l| l.contains(&format!(" allow api.test:{port} "))), "[{engine}] {log}");
    assert!(log.lines().any(|l| l.contains(&format!(" deny api.test:{port} ")) && l.contains("not on the allow list")), "[{engine}] {log}");

    // An address literal inside a private range, and the host's own loopback by address.
    let out = env.run(
        engine,
        &["--", "sh", "-c", &format!("wget -q -O - http://10.1.2.3/ 2>&1; wget -q -O - http://127.0.0.1:{port}/ 2>&1; echo done")],
        b"",
    );
    assert_eq!(text(&out.stdout).matches("403").count(), 2, "[{engine}] {}", text(&out.stdout));

    let out = env.run(engine, &["--network", "none", "--add-host", "api.test:127.0.0.1", "--allow", &allow, "--", "sh", "-c", &fetch], b"");
    assert!(text(&out.stdout).contains("403"), "[{engine}] --network none: {}", text(&out.stdout));
    env.assert_clean();
    let logs = std::process::Command::new(env!("CARGO_BIN_EXE_cvm"))
        .args(["logs", "--network"])
        .env("HOME", env.home.path())
        .env_remove("XDG_STATE_HOME")
        .output()
        .unwrap();
    assert_eq!(text(&logs.stdout), std::fs::read_to_string(&audit).unwrap(), "cvm logs --network shows the audit log");
}

/// A free port on the host's loopback (free when asked; the test binds it right after).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn a_published_guest_port_answers_on_the_host_and_a_host_port_answers_in_the_guest() {
    let Some(env) = Env::new() else { return };
    let host_port = server("from a host service");
    let published = free_port();
    let engine = engine();
    // The guest serves a page on its port 8000 and reads the host's service through
    // --host-port (wget -Y off: straight to the guest's 127.0.0.1, not the proxy).
    let script = format!(
        "mkdir -p /tmp/www && echo published > /tmp/www/index.html && httpd -p 127.0.0.1:8000 -h /tmp/www && \
         wget -Y off -q -O - http://127.0.0.1:{host_port}/ && echo && echo ready && sleep 600"
    );
    let mut child = env
        .command(engine, &["-p", &format!("{published}:8000"), "--host-port", &host_port.to_string(), "--", "sh", "-c", &script])
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    for _ in 0..2 {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        lines.push(line);
    }
    assert_eq!(lines, ["from a host service\n", "ready\n"], "[{engine}]");
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", published)).unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    conn.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.") && reply.ends_with("published\n"), "[{engine}] {reply}");
    child.kill().unwrap();
    child.wait().unwrap();
    env.assert_clean();
    let out = env.run(engine, &["-p", "8080", "--", "true"], b"");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[test]
fn the_guest_uses_the_hosts_ssh_and_gpg_agents_and_curl_goes_through_the_proxy() {
    let Some(env) = Env::debian() else { return };
    let port = server("hello from the host");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let key = dir.path().join("key");
    // Each host tool with a deadline, and without the test's pipes for a daemon it starts
    // (gpg starts gpg-agent) to keep: a hang names the command.
    let run = |cmd: &mut std::process::Command| {
        let child = cmd
            .env("SSH_AUTH_SOCK", &sock)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = common::wait_output(child);
        assert!(out.status.success(), "{cmd:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let mut agent =
        std::process::Command::new("ssh-agent").arg("-D").arg("-a").arg(&sock).stdout(std::process::Stdio::null()).spawn().unwrap();
    let started = std::time::Instant::now();
    while !sock.exists() {
        assert!(started.elapsed() < common::deadline(), "ssh-agent made no socket");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    run(std::process::Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "cvm-test-key", "-f"]).arg(&key));
    run(std::process::Command::new("ssh-add").arg("-q").arg(&key));
    let host_list = run(std::process::Command::new("ssh-add").arg("-l"));
    // A host gpg-agent with one key, in a GNUPGHOME of the test's own.
    let gnupg = dir.path().join("gnupg");
    std::fs::create_dir(&gnupg).unwrap();
    std::fs::set_permissions(&gnupg, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    // The agent started first, with no pipe of the test's: gpg would start it holding one.
    let null = std::process::Stdio::null;
    let launched = std::process::Command::new("gpgconf")
        .args(["--launch", "gpg-agent"])
        .env("GNUPGHOME", &gnupg)
        .stdin(null())
        .stdout(null())
        .stderr(null())
        .status()
        .unwrap();
    assert!(launched.success(), "gpgconf --launch gpg-agent: {launched}");
    let gpg = |args: &[&str]| run(std::process::Command::new("gpg").args(["--batch", "--with-colons"]).args(args).env("GNUPGHOME", &gnupg));
    gpg(&["--passphrase", "", "--quick-gen-key", "cvm-test@example.com", "ed25519", "sign", "never"]);
    let keygrip =
        gpg(&["--with-keygrip", "-K"]).lines().find_map(|l| l.strip_prefix("grp:::::::::")).unwrap().trim_end_matches(':').to_string();
    let pubring = std::fs::metadata(gnupg.join("pubring.kbx")).unwrap().len();
    let engine = engine();
    // The issue's own example: curl, by name, through the proxy, to a host server; then
    // the host's GPG agent, asked whether it holds the key, and the public keyring.
    let script = format!(
        "ssh-add -D >/dev/null 2>&1 && echo emptied; echo pw | ssh-add -x >/dev/null 2>&1 && echo locked; \
         ssh-add -l; curl -s http://api.test:{port}/; echo; echo $GNUPGHOME; \
         printf 'HAVEKEY {keygrip}\\n' | socat - UNIX-CONNECT:$GNUPGHOME/S.gpg-agent; wc -c < $GNUPGHOME/pubring.kbx"
    );
    let out = env
        .command(
            engine,
            &["-A", "--gpg", "--add-host", "api.test:127.0.0.1", "--allow", &format!("api.test:{port}"), "--", "sh", "-c", &script],
        )
        .env("SSH_AUTH_SOCK", &sock)
        .env("GNUPGHOME", &gnupg)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = common::wait_output(out);
    assert_eq!(out.status.code(), Some(0), "[{engine}] {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let (first, gpg_part) = stdout.split_once("\n/run/cvm/gnupg\n").unwrap_or_else(|| panic!("[{engine}] no GNUPGHOME: {stdout}"));
    assert_eq!(
        first,
        format!("{host_list}hello from the host"),
        "[{engine}] the guest sees the host agent's key, and curl the host's page"
    );
    let gpg_lines: Vec<&str> = gpg_part.lines().collect();
    assert!(gpg_lines[0].starts_with("OK ") && gpg_lines[1] == "OK", "[{engine}] the host's gpg-agent holds the key: {gpg_part}");
    assert_eq!(gpg_lines[2], pubring.to_string(), "[{engine}] the public keyring reached the guest");
    assert!(host_list.contains("cvm-test-key"));
    assert!(!stdout.contains("emptied") && !stdout.contains("locked"), "[{engine}] the guest changed the host agent: {stdout}");
    assert_eq!(run(std::process::Command::new("ssh-add").arg("-l")), host_list, "[{engine}] the host agent keeps its key, unlocked");
    env.assert_clean();
    let _ = agent.kill();
    let _ = agent.wait();
    let _ = std::process::Command::new("gpgconf").args(["--kill", "gpg-agent"]).env("GNUPGHOME", &gnupg).status();
}

/// This host's address on its default route: not loopback, so reachable from an open guest.
fn host_address() -> std::net::IpAddr {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    // No packet is sent: connecting a UDP socket only picks the route and source address.
    probe.connect("192.0.2.1:9").unwrap();
    probe.local_addr().unwrap().ip()
}

#[test]
fn an_open_network_reaches_the_host_by_its_address_but_not_its_loopback() {
    let Some(env) = Env::new() else { return };
    let address = host_address();
    let listener = TcpListener::bind((address, 0)).unwrap();
    let open_port = listener.local_addr().unwrap().port();
    // `/` answers a line; `/big` 4 MiB, many jumbo frames.
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut head = [0u8; 1024];
            let n = conn.read(&mut head).unwrap_or(0);
            let body: Vec<u8> = if head[..n].starts_with(b"GET /big ") {
                (0..4u32 << 20).map(|i| (i % 253) as u8).collect()
            } else {
                b"raw network".to_vec()
            };
            let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = conn.write_all(&body);
        }
    });
    let loopback_port = server("loopback only");
    let engine = engine();
    // wget -Y off: no proxy, straight out of the guest's eth0.
    let script = format!(
        "cat /sys/class/net/eth0/address /sys/class/net/eth0/mtu; cat /etc/resolv.conf; wget -Y off -q -O - http://{address}:{open_port}/; echo; \
         wget -Y off -q -O - http://{address}:{open_port}/big | sha256sum | cut -d' ' -f1; \
         wget -Y off -q -T 5 -O - http://10.0.2.2:{loopback_port}/ 2>&1 || echo loopback refused"
    );
    let out = env.run(engine, &["--network", "open", "--", "sh", "-c", &script], b"");
    assert_eq!(out.status.code(), Some(0), "[{engine}] {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let big: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
    // The host's sha256sum of the same bytes.
    let digest = {
        let mut child = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&big).unwrap();
        text(&child.wait_with_output().unwrap().stdout).split(' ').next().unwrap().to_string()
    };
    assert!(stdout.starts_with(&format!("52:54:00:12:34:56\n9000\nnameserver 10.0.2.3\nraw network\n{digest}\n")), "[{engine}] {stdout}");
    assert!(stdout.ends_with("loopback refused\n") && !stdout.contains("loopback only"), "[{engine}] the host's loopback: {stdout}");
    env.assert_clean();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while passt_running() {
        assert!(std::time::Instant::now() < deadline, "[{engine}] passt outlived the session");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn proxy_rules_with_an_open_network_are_refused() {
    let Some(env) = Env::new() else { return };
    let out = env.run(engine(), &["--network", "open", "--allow", "api.test", "--", "true"], b"");
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("--network open has no allow-list"), "{}", text(&out.stderr));
    env.assert_clean();
}

/// Whether a passt that cvm started (known by its arguments) is still running.
fn passt_running() -> bool {
    let has = |haystack: &[u8], needle: &[u8]| haystack.windows(needle.len()).any(|w| w == needle);
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        has(&cmdline, b"--no-map-gw") && has(&cmdline, b"10.0.2.15")
    })
}

#[test]
fn a_proxied_secret_reaches_only_its_host_as_the_real_value_and_never_enters_the_guest() {
    let Some(env) = Env::debian() else { return };
    let engine = engine();
    let https = cvm::network::loopback_https::LoopbackHttps::start(&["secret.test", "other.test"]).unwrap();
    let port = https.port();
    let http = server("plain");
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let value = format!("cvmtestsecret{}x{nanos}", std::process::id());
    // The project holds the test server's CA, for the guest's pinned requests; cvm's own
    // connections trust it through SSL_CERT_FILE, as OpenSSL's do.
    let project = tempfile::tempdir().unwrap();
    std::fs::write(project.path().join("server-ca.pem"), https.ca_pem()).unwrap();
    let host_ca = env.home.path().join("server-ca.pem");
    std::fs::write(&host_ca, https.ca_pem()).unwrap();
    let config = env.home.path().join(".cvm.toml");
    std::fs::write(&config, "[secrets.proxied.API_TOKEN]\nhosts = [\"secret.test\"]\nenv = \"CVM_TEST_API_TOKEN\"\nbody = true\n").unwrap();
    let shown = env.cvm(&["config", "show"]).output().unwrap();
    assert!(
        text(&shown.stdout)
            .lines()
            .any(|l| l.starts_with("secrets.proxied.API_TOKEN") && l.contains("placeholder") && l.contains("secret.test")),
        "{}",
        text(&shown.stdout)
    );

    // The guest looks for the value's fixed part only (the whole value is never in its
    // hands), in a control file first.
    let script = format!(
        "P=cvmtest; P=${{P}}secret; echo \"token=$API_TOKEN ca=$NODE_EXTRA_CA_CERTS\"; \
         curl -sS https://secret.test:{port}/one -H \"Authorization: Bearer $API_TOKEN\" -d \"token=$API_TOKEN\"; echo \"swapped $?\"; \
         curl -sS --cacert server-ca.pem https://secret.test:{port}/pinned >/dev/null 2>&1; echo \"pinned $?\"; \
         curl -sS --cacert server-ca.pem https://other.test:{port}/two -H \"Authorization: Bearer $API_TOKEN\"; echo \"tunneled $?\"; \
         curl -sS -o /dev/null -w 'plain to its host %{{http_code}}\\n' http://secret.test:{port}/; \
         curl -sS http://other.test:{http}/three -H \"X-Token: $API_TOKEN\"; echo \" plain $?\"; \
         echo $P > /tmp/control; echo leaks: $(grep -rls \"$P\" /etc /run /home /tmp /root /var/tmp /proc/[0-9]*/environ 2>/dev/null)"
    );
    let project_arg = project.path().to_str().unwrap();
    let (allow_secret, allow_other, allow_other_http) =
        (format!("secret.test:{port}"), format!("other.test:{port}"), format!("other.test:{http}"));
    let hosts = [
        "--add-host",
        "secret.test:127.0.0.1",
        "--add-host",
        "other.test:127.0.0.1",
        "--allow",
        &allow_secret,
        "--allow",
        &allow_other,
        "--allow",
        &allow_other_http,
    ];
    let mut args = vec![project_arg, "-v"];
    args.extend(hosts);
    args.extend(["--", "sh", "-c", &script]);
    let child = env
        .command(engine, &args)
        .env("CVM_TEST_API_TOKEN", &value)
        .env("SSL_CERT_FILE", &host_ca)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = common::wait_output(child);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "[{engine}] {stdout}\n{stderr}");
    assert!(stdout.contains("token=cvm-placeholder-") && stdout.contains(" ca=/run/cvm/proxy-ca.pem\n"), "[{engine}] {stdout}");
    for expected in
        ["ok\nswapped 0\n", "pinned 60\n", "ok\ntunneled 0\n", "plain to its host 403\n", "plain plain 0\n", "leaks: /tmp/control\n"]
    {
        assert!(stdout.contains(expected), "[{engine}] {expected:?} in:\n{stdout}\n{stderr}");
    }
    assert!(
        !stdout.contains(&value) && !stderr.contains(&value),
        "[{engine}] the value was in the guest's output or the console: {stdout}\n{stderr}"
    );
    let seen = https.seen();
    let one = seen.iter().find(|r| r.head.starts_with("POST /one ")).unwrap_or_else(|| panic!("[{engine}] {seen:?}"));
    assert!(
        one.head.contains(&format!("Authorization: Bearer {value}\r\n"))
            && one.body == format!("token={value}")
            && one.offered_alpn == ["http/1.1"],
        "[{engine}] swapped, by the proxy's client: {one:?}"
    );
    let two = seen.iter().find(|r| r.head.starts_with("GET /two ")).unwrap_or_else(|| panic!("[{engine}] {seen:?}"));
    assert!(
        two.head.contains("Authorization: Bearer cvm-placeholder-") && two.offered_alpn.iter().any(|p| p == "h2"),
        "[{engine}] tunneled, the guest's curl: {two:?}"
    );
    let audit = std::fs::read_to_string(env.home.path().join(".local/state/cvm/network.log")).unwrap();
    for expected in [
        format!(" swap secret.test:{port} API_TOKEN in Authorization"),
        format!(" swap secret.test:{port} API_TOKEN in the body"),
        format!(" placeholder other.test:{http} API_TOKEN's placeholder sent in plain HTTP"),
        format!(" deny secret.test:{port} plain HTTP"),
    ] {
        assert!(audit.contains(&expected), "[{engine}] {expected:?} in:\n{audit}");
    }
    assert!(!audit.contains(&value), "[{engine}] {audit}");

    // A source that fails stops the session before the VM starts, saying which and why.
    std::fs::write(
        &config,
        "[secrets.proxied.API_TOKEN]\nhosts = [\"secret.test\"]\ncommand = [\"sh\", \"-c\", \"echo no login >&2; exit 4\"]\n",
    )
    .unwrap();
    let out = common::wait_output(env.command(engine, &[project_arg, "--", "true"]).stdin(std::process::Stdio::null()).spawn().unwrap());
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("secret API_TOKEN: command `sh -c echo no login >&2; exit 4`")
            && stderr.contains("no login"),
        "[{engine}] {stderr}"
    );
    env.assert_clean();
}
