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

use common::{broken_initramfs, engine, nested_scale, text, wait_output, Env};

#[test]
fn a_command_prints_and_its_exit_status_comes_back() {
    let Some(env) = Env::new() else { return };
    let engine = engine();
    let out = env.run(engine, &["--", "sh", "-c", "echo $((6*7)); exit 3"], b"");
    assert_eq!(text(&out.stdout), "42\n", "[{engine}] stderr: {}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(3), "[{engine}] stderr: {}", text(&out.stderr));
    let out = env.run(engine, &["--", "sh", "-c", "kill -9 $$"], b"");
    assert_eq!(out.status.code(), Some(128 + 9), "[{engine}] killed by signal 9");
    env.assert_clean();
}

#[test]
fn binary_stdin_round_trips_and_stderr_stays_apart() {
    let Some(env) = Env::new() else { return };
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let engine = engine();
    let out = env.run(engine, &["--", "sh", "-c", "cat; echo to-stderr >&2"], &data);
    assert_eq!(out.status.code(), Some(0), "[{engine}] stderr: {}", text(&out.stderr));
    assert_eq!(out.stdout.len(), data.len(), "[{engine}]");
    assert!(out.stdout == data, "[{engine}] stdout differs from stdin");
    assert_eq!(text(&out.stderr), "to-stderr\n", "[{engine}]");
    env.assert_clean();
}

/// `--vmm auto` (the default) takes cvm's VMM where /dev/kvm is hardware KVM and QEMU
/// elsewhere, and says which and why in one line.
#[test]
fn auto_picks_the_engine_this_host_can_run_and_says_why() {
    let Some(env) = Env::new() else { return };
    let out = env.run("auto", &["--", "sh", "-c", "exit 3"], b"");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
    let expected = match engine() {
        "cvm" => "cvm: using cvm's VMM: /dev/kvm is hardware KVM\n",
        _ => "cvm: using QEMU, since cvm's VMM cannot run here: this host's /dev/kvm is PVM",
    };
    assert!(stderr.starts_with(expected), "expected {expected:?}, got: {stderr}");
    assert_eq!(stderr.lines().filter(|l| l.contains("using")).count(), 1, "{stderr}");
    if engine() == "qemu" {
        // No KVM device at all: QEMU still runs the session.
        let out = wait_output(env.command("auto", &["--", "true"]).env("CVM_KVM_DEVICE", "/nonexistent").spawn().unwrap());
        assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).starts_with("cvm: using QEMU, since cvm's VMM cannot run here: /nonexistent does not exist"),
            "{}",
            text(&out.stderr)
        );
    }
    env.assert_clean();
}

#[test]
fn a_missing_command_exits_127() {
    let Some(env) = Env::new() else { return };
    let out = env.run(engine(), &["--", "no-such-command"], b"");
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out.stderr).contains("no-such-command: command not found"), "{}", text(&out.stderr));
}

#[test]
fn timeout_exits_124_and_leaves_nothing() {
    let Some(env) = Env::new() else { return };
    let started = Instant::now();
    let out = env.run(engine(), &["--timeout", "4s", "--", "sleep", "600"], b"");
    assert_eq!(out.status.code(), Some(124), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("timed out"), "{}", text(&out.stderr));
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
    env.assert_clean();
}

/// Every process below `pid`: children, their children, and so on (read from each process's
/// parent in /proc, which every kernel has).
fn descendants_of(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // The parent is the second field after the command, which is in parentheses.
            let parent = stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()?;
            Some((child, parent))
        })
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parents {
            if parent == p {
                out.push(child);
                frontier.push(child);
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
    // The janitor and the fs backends with their sandboxes; QEMU too on its engine (cvm's VMM
    // is threads of cvm itself).
    let expected = if engine() == "qemu" { 5 } else { 4 };
    assert!(helpers.len() >= expected, "the janitor, the fs backends (and QEMU): {helpers:?}");
    assert!(!env.leftovers().is_empty(), "the session directory exists while running");

    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + nested_scale(Duration::from_secs(10));
    while helpers.iter().any(|&p| running(p)) {
        assert!(
            Instant::now() < deadline,
            "still running after cvm was killed: {:?}",
            helpers.iter().filter(|&&p| running(p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    env.assert_clean();
}

#[test]
fn a_guest_kernel_panic_is_reported_with_the_console() {
    let Some(env) = Env::new() else { return };
    let root = tempfile::tempdir().unwrap();
    let image = broken_initramfs(root.path());
    let broken = Env { kernel: env.kernel.clone(), image, runtime: tempfile::tempdir().unwrap(), home: tempfile::tempdir().unwrap() };
    let out = broken.run(engine(), &["--", "true"], b"");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("stopped before its agent was ready"), "{stderr}");
    assert!(stderr.contains("the guest kernel panicked: Kernel panic - not syncing: "), "{stderr}");
    assert!(stderr.contains("guest console (up to the panic):"), "the console lines that led to it: {stderr}");
    broken.assert_clean();
}

#[test]
fn bad_input_gets_a_clear_error() {
    let Some(env) = Env::new() else { return };
    let no_kernel = Env {
        kernel: "/no/such/kernel".into(),
        image: env.image.clone(),
        runtime: tempfile::tempdir().unwrap(),
        home: tempfile::tempdir().unwrap(),
    };
    let out = no_kernel.run(engine(), &["--", "true"], b"");
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("/no/such/kernel"), "{}", text(&out.stderr));

    let no_image = Env {
        kernel: env.kernel.clone(),
        image: "/no/such/image".into(),
        runtime: tempfile::tempdir().unwrap(),
        home: tempfile::tempdir().unwrap(),
    };
    let out = no_image.run(engine(), &["--", "true"], b"");
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("/no/such/image"), "{}", text(&out.stderr));

    // Refused before either engine starts, at once and with the reason (the QEMU engine used
    // to sit out the agent's 60 s, or end in QEMU's own words).
    let not_a_kernel = Env {
        kernel: "/etc/passwd".into(),
        image: env.image.clone(),
        runtime: tempfile::tempdir().unwrap(),
        home: tempfile::tempdir().unwrap(),
    };
    let started = Instant::now();
    let out = not_a_kernel.run(engine(), &["--", "true"], b"");
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("/etc/passwd") && text(&out.stderr).contains("neither an ELF vmlinux nor a bzImage"),
        "{}",
        text(&out.stderr)
    );
    let out = env.run(engine(), &["--memory", "1T", "--", "true"], b"");
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("more than this host's"), "{}", text(&out.stderr));
    assert!(started.elapsed() < nested_scale(Duration::from_secs(10)), "refused up front, not after a boot: {:?}", started.elapsed());

    for args in [&["--timeout", "0", "--", "true"][..], &["--timeout", "soon", "--", "true"], &["--memory", "lots", "--", "true"]] {
        let out = env.run(engine(), args, b"");
        assert_eq!(out.status.code(), Some(2), "{args:?}: usage error expected; {}", text(&out.stderr));
    }
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
        "stty rows 33 cols 101; XDG_RUNTIME_DIR={} {} run --vmm {} --kernel {} --image {} -- sh -c 'printf \"A\\033]52;c;ZXZpbA==\\007B\\033[31mC\\n\"; tty; stty size; read x; echo got $x; exit 7'",
        env.runtime.path().display(),
        env!("CARGO_BIN_EXE_cvm"),
        engine(),
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
    // The guest's clipboard write never reaches the terminal; its colours do.
    assert!(seen.contains("AB\u{1b}[31mC") && !seen.contains("]52;"), "{seen:?}");
    assert_eq!(status.code(), Some(7), "{seen:?}");
    env.assert_clean();
}

#[test]
fn shell_reads_its_commands_from_stdin_without_a_terminal() {
    let Some(env) = Env::new() else { return };
    let engine = engine();
    let mut child = env.subcommand("shell", engine, &[]).stdin(std::process::Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"echo in a shell; exit 4\n").unwrap();
    let out = wait_output(child);
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(4), "in a shell\n".into()), "[{engine}] {}", text(&out.stderr));
    env.assert_clean();
}
