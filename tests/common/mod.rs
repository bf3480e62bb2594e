//! Helpers shared by the end-to-end tests.
#![allow(dead_code)] // each test crate uses its own subset

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn kvm_usable() -> bool {
    let usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if !usable {
        assert!(std::env::var("CVM_REQUIRE_KVM").as_deref() != Ok("1"), "CVM_REQUIRE_KVM=1 but /dev/kvm cannot be opened");
        eprintln!("skipped: /dev/kvm cannot be opened on this host");
    }
    usable
}

pub fn is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// The project's guest kernel and test initramfs, from scripts/build-kernel and
/// scripts/build-initramfs (scripts/test exports them).
pub fn linux_artifacts() -> Option<(PathBuf, PathBuf)> {
    let kernel = std::env::var_os("CVM_TEST_KERNEL").map(PathBuf::from);
    let initrd = std::env::var_os("CVM_TEST_INITRAMFS").map(PathBuf::from);
    match (kernel, initrd) {
        (Some(k), Some(i)) => Some((k, i)),
        _ => {
            assert!(
                std::env::var("CVM_REQUIRE_KERNEL").as_deref() != Ok("1"),
                "CVM_REQUIRE_KERNEL=1 but CVM_TEST_KERNEL/CVM_TEST_INITRAMFS are not set"
            );
            eprintln!("skipped: CVM_TEST_KERNEL and CVM_TEST_INITRAMFS are not set (run scripts/test)");
            None
        }
    }
}

/// A path as a command-line argument.
pub fn arg(path: &std::path::Path) -> &str {
    path.to_str().unwrap()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A hang is a failure, not a stuck suite: 120 s, four times that inside L1 (scripts/nested
/// sets CVM_NESTED), where every VM exit of the guest under test is emulated by QEMU's TCG.
pub fn deadline() -> Duration {
    nested_scale(Duration::from_secs(120))
}

/// The hang bound for work that downloads from Debian's or npm's mirrors (a `cvm setup` of
/// packages), whose speed is the mirror's and not cvm's: 600 s, four times that inside L1.
pub fn download_deadline() -> Duration {
    nested_scale(Duration::from_secs(600))
}

/// `wait`, four times longer inside L1 (CVM_NESTED): how long clean-up may take there.
pub fn nested_scale(wait: Duration) -> Duration {
    if std::env::var_os("CVM_NESTED").is_some() {
        wait * 4
    } else {
        wait
    }
}

/// A `cvm run` environment: the project's kernel and image, a private XDG_RUNTIME_DIR (so
/// "nothing left behind" is checked exactly) and a private HOME (so `~/.claude` is the
/// test's own).
pub struct Env {
    pub kernel: PathBuf,
    pub image: PathBuf,
    pub runtime: tempfile::TempDir,
    pub home: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Option<Env> {
        let (kernel, image) = linux_artifacts()?;
        Some(Env { kernel, image, runtime: tempfile::tempdir().unwrap(), home: tempfile::tempdir().unwrap() })
    }

    /// The same with the Debian image (scripts/build-image; scripts/test exports it).
    pub fn debian() -> Option<Env> {
        let mut env = Env::new()?;
        match std::env::var_os("CVM_TEST_DEBIAN_IMAGE") {
            Some(image) => env.image = PathBuf::from(image),
            None => {
                assert!(
                    std::env::var("CVM_REQUIRE_KERNEL").as_deref() != Ok("1"),
                    "CVM_REQUIRE_KERNEL=1 but CVM_TEST_DEBIAN_IMAGE is not set"
                );
                eprintln!("skipped: CVM_TEST_DEBIAN_IMAGE is not set (run scripts/test)");
                return None;
            }
        }
        Some(env)
    }

    pub fn command(&self, engine: &str, args: &[&str]) -> Command {
        self.subcommand("run", engine, args)
    }

    /// `cvm SUBCOMMAND` (`run`, `setup`, `shell`) with this environment's engine, kernel and
    /// image; caches (templates) go under the private HOME.
    pub fn subcommand(&self, subcommand: &str, engine: &str, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cvm"));
        c.arg(subcommand).arg("--vmm").arg(engine).arg("--kernel").arg(&self.kernel).arg("--image").arg(&self.image);
        c.args(args)
            .env("XDG_RUNTIME_DIR", self.runtime.path())
            .env("HOME", self.home.path())
            .env("XDG_CACHE_HOME", self.home.path().join(".cache"))
            .env("XDG_STATE_HOME", self.home.path().join(".local/state"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// `cvm ARGS` with only this environment's directories: for commands that take no engine,
    /// kernel or image (`ps`, `exec`, `stop`, `config`).
    pub fn cvm(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cvm"));
        c.args(args)
            .env("XDG_RUNTIME_DIR", self.runtime.path())
            .env("HOME", self.home.path())
            .env("XDG_CACHE_HOME", self.home.path().join(".cache"))
            .env("XDG_STATE_HOME", self.home.path().join(".local/state"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Runs `cvm run` with `stdin` as its input.
    pub fn run(&self, engine: &str, args: &[&str], stdin: &[u8]) -> Output {
        self.run_within(engine, args, stdin, deadline())
    }

    /// [`Env::run`] with its own hang bound.
    pub fn run_within(&self, engine: &str, args: &[&str], stdin: &[u8], wait: Duration) -> Output {
        let mut child = self.command(engine, args).stdin(Stdio::piped()).spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        let data = stdin.to_vec();
        let feeder = std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let out = wait_output_within(child, wait);
        feeder.join().unwrap();
        out
    }

    /// Starts a session (with `args` before the command) whose command says "ready" and then
    /// waits; returns once it said so.
    pub fn start_idle_session(&self, args: &[&str]) -> Child {
        let mut all = args.to_vec();
        all.extend(["--", "sh", "-c", "echo ready; sleep 600"]);
        let mut child = self.command(engine(), &all).stdin(Stdio::null()).spawn().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        if line != "ready\n" {
            let mut e = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut e);
            panic!("the session did not start: {line:?}, stderr: {e}");
        }
        child
    }

    /// The session directories under this run's XDG_RUNTIME_DIR/cvm: none once cvm is gone.
    pub fn leftovers(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.runtime.path().join("cvm")) {
            Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    }

    pub fn assert_clean(&self) {
        let deadline = Instant::now() + nested_scale(Duration::from_secs(10));
        while !self.leftovers().is_empty() {
            assert!(Instant::now() < deadline, "left behind: {:?}", self.leftovers());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn wait_output(child: Child) -> Output {
    wait_output_within(child, deadline())
}

/// [`wait_output`] with its own hang bound, `wait`.
pub fn wait_output_within(child: Child, wait: Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    rx.recv_timeout(wait).unwrap_or_else(|_| {
        let consoles = console_tails(pid) + &threads(pid);
        // SAFETY (test): SIGKILL to our own hung child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let said = rx.recv_timeout(Duration::from_secs(10)).map(|out| text(&out.stderr)).unwrap_or_default();
        panic!("process {pid} did not finish within {wait:?}; its stderr: {said}{consoles}");
    })
}

/// Where each thread of process `pid` waits: its name, state, kernel wait channel and, where
/// this user may read it, its kernel stack.
fn threads(pid: u32) -> String {
    let mut out = format!("\n--- the threads of cvm ({pid}):");
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let read = |file: &str| std::fs::read_to_string(task.path().join(file)).unwrap_or_default();
        let stat = read("stat");
        let state = stat.rsplit_once(") ").map_or("?", |(_, rest)| &rest[..1]);
        let stack: Vec<String> =
            read("stack").lines().take(8).map(|l| l.trim_start_matches(|c: char| c != ' ').trim().to_string()).collect();
        let status = read("status");
        let signals: Vec<&str> = status.lines().filter(|l| l.starts_with("SigPnd") || l.starts_with("SigBlk")).collect();
        out += &format!(
            "\n{} {} {} wchan={} syscall={} {} {}",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            state,
            read("wchan"),
            read("syscall").trim(),
            signals.join(" "),
            stack.join(" < ")
        );
    }
    out
}

/// The last lines of the guest consoles of cvm process `pid`'s sessions (under the
/// XDG_RUNTIME_DIR it was given): what a hung guest was doing.
fn console_tails(pid: u32) -> String {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let Some(runtime) = environ.split(|b| *b == 0).find_map(|v| v.strip_prefix(b"XDG_RUNTIME_DIR=")) else { return String::new() };
    let sessions = Path::new(std::str::from_utf8(runtime).unwrap_or_default()).join("cvm");
    let mut tails = String::new();
    for dir in std::fs::read_dir(sessions).into_iter().flatten().flatten() {
        if let Ok(console) = std::fs::read_to_string(dir.path().join("console.log")) {
            let lines: Vec<&str> = console.lines().collect();
            tails += &format!("\n--- {}, its last lines:\n{}", dir.path().display(), lines[lines.len().saturating_sub(40)..].join("\n"));
        }
    }
    tails
}

/// The engine the full-stack tests run on: `CVM_TEST_ENGINE`, `qemu` unless told. scripts/test
/// runs the full-stack test binaries once per engine: `qemu` on the host, and `cvm` directly on
/// hardware KVM or inside an L1 VM (scripts/nested) where the host's /dev/kvm is PVM or absent.
/// An engine that cannot run here is a failure, never a skip.
pub fn engine() -> &'static str {
    let engine = match std::env::var("CVM_TEST_ENGINE").as_deref() {
        Ok("cvm") => "cvm",
        Ok("qemu") | Err(_) => "qemu",
        Ok(other) => panic!("CVM_TEST_ENGINE={other:?}: expected cvm or qemu"),
    };
    if engine == "cvm" {
        assert!(
            std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok() && !is_pvm(),
            "CVM_TEST_ENGINE=cvm needs hardware KVM (/dev/kvm, not PVM): run these tests inside L1 (scripts/nested)"
        );
    }
    engine
}

/// An initramfs whose /init cannot run: the kernel finds no init and panics.
pub fn broken_initramfs(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("init"), "not a program\n").unwrap();
    let image = dir.join("broken.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("cd {} && echo init | cpio -o -H newc --quiet > {}", dir.display(), image.display()))
        .status()
        .unwrap();
    assert!(status.success());
    image
}

/// An HTTP server on 127.0.0.1 answering `body`, that keeps the Host header of each request.
pub fn http_server(body: &'static str) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hosts = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = hosts.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).to_string();
            if let Some(host) = head.lines().find_map(|l| l.strip_prefix("Host: ")) {
                seen.lock().unwrap().push(host.to_string());
            }
            let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        }
    });
    (port, hosts)
}

/// Processes other than this one whose command line or environment contains `marker`.
pub fn processes_marked(marker: &str) -> Vec<u32> {
    let marked = |p: &Path, file: &str| std::fs::read(p.join(file)).is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker));
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| Some((p.file_name().to_str()?.parse().ok()?, p.path())))
        .filter(|&(pid, ref p)| pid != std::process::id() && (marked(p, "cmdline") || marked(p, "environ")))
        .map(|(pid, _)| pid)
        .collect()
}

/// `pid` and its command line, for a failure's message.
pub fn describe(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    format!("{pid} {}", String::from_utf8_lossy(&cmdline).replace('\0', " "))
}
