//! End-to-end tests of the guest's egress: commands in the VM reach an HTTP server on this
//! host's loopback only through cvm's proxy, by name, when allowed, and every decision lands
//! in the audit log. Full stack on the QEMU engine here, and on cvm's VMM with hardware KVM.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;

use common::{engines, text, Env};

/// An HTTP server on 127.0.0.1 answering every request with `body`.
fn server(body: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        }
    });
    port
}

#[test]
fn an_allowed_name_reaches_the_host_server_and_everything_else_is_refused_and_logged() {
    let Some(env) = Env::new() else { return };
    let port = server("hello from the host");
    let url = format!("http://api.test:{port}/");
    let fetch = format!("wget -q -O - {url} 2>&1; s=$?; echo; echo status $s");
    let audit = env.home.path().join(".local/state/cvm/network.log");
    for engine in engines() {
        let out = env.run(engine, &["--add-host", "api.test:127.0.0.1", "--allow", "api.test", "--", "sh", "-c", &fetch], b"");
        assert_eq!(text(&out.stdout), "hello from the host\nstatus 0\n", "[{engine}] {}", text(&out.stderr));

        let out = env.run(engine, &["--add-host", "api.test:127.0.0.1", "--", "sh", "-c", &fetch], b"");
        let stdout = text(&out.stdout);
        assert!(stdout.contains("403") && stdout.ends_with("status 1\n"), "[{engine}] not on the allow list: {stdout}");
        let log = std::fs::read_to_string(&audit).unwrap();
        assert!(log.lines().any(|l| l.contains(&format!(" allow api.test:{port} "))), "[{engine}] {log}");
        assert!(log.lines().any(|l| l.contains(&format!(" deny api.test:{port} ")) && l.contains("not on the allow list")), "[{engine}] {log}");

        // An address literal inside a private range, and the host's own loopback by address.
        let out = env.run(engine, &["--", "sh", "-c", &format!("wget -q -O - http://10.1.2.3/ 2>&1; wget -q -O - http://127.0.0.1:{port}/ 2>&1; echo done")], b"");
        assert_eq!(text(&out.stdout).matches("403").count(), 2, "[{engine}] {}", text(&out.stdout));

        let out = env.run(engine, &["--network", "none", "--add-host", "api.test:127.0.0.1", "--allow", "api.test", "--", "sh", "-c", &fetch], b"");
        assert!(text(&out.stdout).contains("403"), "[{engine}] --network none: {}", text(&out.stdout));
        env.assert_clean();
    }
    let logs = std::process::Command::new(env!("CARGO_BIN_EXE_cvm")).args(["logs", "--network"]).env("HOME", env.home.path()).env_remove("XDG_STATE_HOME").output().unwrap();
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
    for engine in engines() {
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
    }
    let out = env.run("qemu", &["-p", "8080", "--", "true"], b"");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[test]
fn the_guest_lists_the_keys_of_the_hosts_ssh_agent_and_curl_goes_through_the_proxy() {
    let Some(env) = Env::debian() else { return };
    let port = server("hello from the host");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let key = dir.path().join("key");
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.env("SSH_AUTH_SOCK", &sock).output().unwrap();
        assert!(out.status.success(), "{cmd:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let mut agent = std::process::Command::new("ssh-agent").arg("-D").arg("-a").arg(&sock).stdout(std::process::Stdio::null()).spawn().unwrap();
    while !sock.exists() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    run(std::process::Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "cvm-test-key", "-f"]).arg(&key));
    run(std::process::Command::new("ssh-add").arg("-q").arg(&key));
    let host_list = run(std::process::Command::new("ssh-add").arg("-l"));
    for engine in engines() {
        // The issue's own example: curl, by name, through the proxy, to a host server.
        let curl = format!("ssh-add -l; curl -s http://api.test:{port}/");
        let out = env
            .command(engine, &["-A", "--add-host", "api.test:127.0.0.1", "--allow", "api.test", "--", "sh", "-c", &curl])
            .env("SSH_AUTH_SOCK", &sock)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "[{engine}] {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), format!("{host_list}hello from the host"), "[{engine}] the guest sees the host agent's key, and curl the host's page");
        assert!(host_list.contains("cvm-test-key"));
        env.assert_clean();
    }
    let _ = agent.kill();
    let _ = agent.wait();
}
