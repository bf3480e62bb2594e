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
