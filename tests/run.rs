//! End-to-end tests of `cvm run`: the real binary, the project's kernel and minimal image, the
//! agent over vsock through cvm's own vhost-user backend. Here the full stack runs on the QEMU
//! engine (TCG where KVM is not hardware); the same tests on cvm's VMM need hardware KVM.
//!
//! Every run gets its own XDG_RUNTIME_DIR, so "nothing left behind" is checked exactly.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{engines, is_pvm, kvm_usable, text, wait_output, Env};

#[test]
fn a_command_prints_and_its_exit_status_comes_back() {
    let Some(env) = Env::new() else { return };
    for engine in engines() {
        let out = env.run(engine, &["--", "sh", "-c", "echo $((6*7)); exit 3"], b"");
        assert_eq!(text(&out.stdout), "42\n", "[{engine}] stderr: {}", text(&out.stderr));
        assert_eq!(out.status.code(), Some(3), "[{engine}] stderr: {}", text(&out.stderr));
        let out = env.run(engine, &["--", "sh", "-c", "kill -9 $$"], b"");
        assert_eq!(out.status.code(), Some(128 + 9), "[{engine}] killed by signal 9");
        env.assert_clean();
    }
}

#[test]
fn binary_stdin_round_trips_and_stderr_stays_apart() {
    let Some(env) = Env::new() else { return };
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    for engine in engines() {
        let out = env.run(engine, &["--", "sh", "-c", "cat; echo to-stderr >&2"], &data);
        assert_eq!(out.status.code(), Some(0), "[{engine}] stderr: {}", text(&out.stderr));
        assert_eq!(out.stdout.len(), data.len(), "[{engine}]");
        assert!(out.stdout == data, "[{engine}] stdout differs from stdin");
        assert_eq!(text(&out.stderr), "to-stderr\n", "[{engine}]");
        env.assert_clean();
    }
}

#[test]
fn a_missing_command_exits_127() {
    let Some(env) = Env::new() else { return };
    let out = env.run("qemu", &["--", "no-such-command"], b"");
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out.stderr).contains("no-such-command: command not found"), "{}", text(&out.stderr));
}

#[test]
fn timeout_exits_124_and_leaves_nothing() {
    let Some(env) = Env::new() else { return };
    let started = Instant::now();
    let out = env.run("qemu", &["--timeout", "4s", "--", "sleep", "600"], b"");
    assert_eq!(out.status.code(), Some(124), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("timed out"), "{}", text(&out.stderr));
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
    env.assert_clean();
}

/// Every process below `pid`: children, their children, and so on.
fn descendants_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks {
            let path = task.unwrap().path().join("children");
            for child in std::fs::read_to_string(path).unwrap_or_default().split_whitespace() {
                let child: u32 = child.parse().unwrap();
                out.push(child);
                out.extend(descendants_of(child));
            }
        }
    }
    out
}

/// Alive and not a zombie.
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

#[test]
fn sigkill_of_cvm_leaves_nothing_running() {
    let Some(env) = Env::new() else { return };
    // With a project and a mount: their fs backends (and the sandboxes they fork) too.
    let project = env.home.path().join("p");
    std::fs::create_dir_all(&project).unwrap();
    let mount = format!("{}:/mnt/p:ro", project.display());
    let mut child = env.start_idle_session(&[project.to_str().unwrap(), "--mount", &mount]);
    let helpers = descendants_of(child.id());
    assert!(helpers.len() >= 5, "QEMU, the janitor and the fs backends: {helpers:?}");
    assert!(!env.leftovers().is_empty(), "the session directory exists while running");

    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while helpers.iter().any(|&p| running(p)) {
        assert!(Instant::now() < deadline, "still running after cvm was killed: {:?}", helpers.iter().filter(|&&p| running(p)).collect::<Vec<_>>());
        std::thread::sleep(Duration::from_millis(20));
    }
    env.assert_clean();
}

#[test]
fn a_guest_kernel_panic_is_reported_with_the_console() {
    let Some(env) = Env::new() else { return };
    // An initramfs whose /init cannot run: the kernel finds no init and panics.
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("init"), "not a program\n").unwrap();
    let image = root.path().join("broken.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("cd {} && echo init | cpio -o -H newc --quiet > {}", root.path().display(), image.display()))
        .status()
        .unwrap();
    assert!(status.success());
    let broken = Env { kernel: env.kernel.clone(), image, runtime: tempfile::tempdir().unwrap(), home: tempfile::tempdir().unwrap() };
    let out = broken.run("qemu", &["--", "true"], b"");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("stopped before its agent was ready"), "{stderr}");
    assert!(stderr.contains("Kernel panic"), "the console tail shows the panic: {stderr}");
    broken.assert_clean();
}

#[test]
fn bad_input_gets_a_clear_error() {
    let Some(env) = Env::new() else { return };
    let no_kernel = Env { kernel: "/no/such/kernel".into(), image: env.image.clone(), runtime: tempfile::tempdir().unwrap(), home: tempfile::tempdir().unwrap() };
    let out = no_kernel.run("qemu", &["--", "true"], b"");
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("/no/such/kernel"), "{}", text(&out.stderr));

    let no_image = Env { kernel: env.kernel.clone(), image: "/no/such/image".into(), runtime: tempfile::tempdir().unwrap(), home: tempfile::tempdir().unwrap() };
    let out = no_image.run("qemu", &["--", "true"], b"");
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("/no/such/image"), "{}", text(&out.stderr));

    for args in [&["--timeout", "0", "--", "true"][..], &["--timeout", "soon", "--", "true"], &["--memory", "lots", "--", "true"]] {
        let out = env.run("qemu", args, b"");
        assert_eq!(out.status.code(), Some(2), "{args:?}: usage error expected; {}", text(&out.stderr));
    }
    env.assert_clean();
}

#[test]
fn the_cvm_engine_on_pvm_says_why_and_what_to_use() {
    let Some(env) = Env::new() else { return };
    if !(kvm_usable() && is_pvm()) {
        eprintln!("skipped: this host's KVM is not PVM");
        return;
    }
    let out = env.run("cvm", &["--", "true"], b"");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("PVM") && stderr.contains("--vmm qemu"), "{stderr}");
    env.assert_clean();
}

#[test]
fn the_vsock_socket_speaks_the_firecracker_protocol_to_host_tools() {
    // A host process reaches the guest agent through the VM's socket with CONNECT, as
    // Firecracker documents; the session's socket lives in the run directory.
    let Some(env) = Env::new() else { return };
    let mut child = env.start_idle_session(&[]);
    let session = env.leftovers().pop().expect("session directory");
    let socket: &Path = &session.join("vsock");
    let mut conn = std::os::unix::net::UnixStream::connect(socket).unwrap();
    conn.write_all(b"CONNECT 1024\n").unwrap();
    let mut reply = [0u8; 32];
    let n = conn.read(&mut reply).unwrap();
    assert!(reply[..n].starts_with(b"OK "), "{:?}", text(&reply[..n]));
    let mut refused = std::os::unix::net::UnixStream::connect(socket).unwrap();
    refused.write_all(b"CONNECT 4242\n").unwrap();
    assert_eq!(refused.read(&mut reply).unwrap(), 0, "a port nobody listens on is refused");
    child.kill().unwrap();
    child.wait().unwrap();
    env.assert_clean();
}

#[test]
fn with_a_terminal_the_command_gets_one_of_the_same_size() {
    // script(1) (util-linux) gives cvm a pseudo-terminal, as a user's terminal would.
    let Some(env) = Env::new() else { return };
    let inner = format!(
        "stty rows 33 cols 101; XDG_RUNTIME_DIR={} {} run --vmm qemu --kernel {} --image {} -- sh -c 'tty; stty size; read x; echo got $x; exit 7'",
        env.runtime.path().display(),
        env!("CARGO_BIN_EXE_cvm"),
        env.kernel.display(),
        env.image.display()
    );
    let mut child = Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (util-linux)");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let mut answered = false;
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if !answered && text(&seen).contains("33 101") {
                stdin.write_all(b"hello\r").unwrap();
                answered = true;
            }
        }
        text(&seen)
    });
    let status = wait_output(child).status;
    let seen = reader.join().unwrap();
    assert!(seen.contains("/dev/pts/"), "the command has a terminal: {seen:?}");
    assert!(seen.contains("33 101"), "of the host terminal's size: {seen:?}");
    assert!(seen.contains("got hello"), "keys reach it: {seen:?}");
    assert_eq!(status.code(), Some(7), "{seen:?}");
    env.assert_clean();
}

#[test]
fn shell_reads_its_commands_from_stdin_without_a_terminal() {
    let Some(env) = Env::new() else { return };
    for engine in engines() {
        let mut child = env.subcommand("shell", engine, &[]).stdin(std::process::Stdio::piped()).spawn().unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"echo in a shell; exit 4\n").unwrap();
        let out = wait_output(child);
        assert_eq!((out.status.code(), text(&out.stdout)), (Some(4), "in a shell\n".into()), "[{engine}] {}", text(&out.stderr));
        env.assert_clean();
    }
}
