//! The fs backend as cvm runs it: a re-executed `cvm __fs-backend` in its sandbox, driven by
//! the virtual guest through cvm's vhost-user frontend. A guest that breaks the protocol can
//! end its own backend's process, never the process that stands for the VMM here, and never
//! reach the host outside the share.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::process::Command;
use std::time::{Duration, Instant};

use cvm_backends::fs::{FsBackend, Policy, ShareConfig};
use cvm_virtual_guest::fuse::{FuseGuest, ROOT};

struct Backend {
    dir: tempfile::TempDir,
    process: FsBackend,
    guest: FuseGuest,
}

fn start(guest_uid: u32) -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("file"), "shared\n").unwrap();
    std::fs::write(dir.path().join("secret"), "outside\n").unwrap();
    let socket = dir.path().join("fs.vhost");
    let listener = UnixListener::bind(&socket).unwrap();
    let config =
        ShareConfig { dir: share, tag: "t".into(), policy: Policy::default(), guest_uid, guest_gid: guest_uid, allow_no_sandbox: false };
    let mut command = Command::new(env!("CARGO_BIN_EXE_cvm"));
    command.arg("__fs-backend");
    let process = FsBackend::spawn(command, listener, &config).unwrap();
    let guest = FuseGuest::connect(&socket).unwrap();
    Backend { dir, process, guest }
}

impl Backend {
    fn exited_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.process.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn assert_outside_untouched(&self) {
        let mut names: Vec<_> =
            std::fs::read_dir(self.dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["fs.vhost", "secret", "share"]);
        assert_eq!(std::fs::read_to_string(self.dir.path().join("secret")).unwrap(), "outside\n");
    }
}

#[test]
fn the_sandboxed_backend_serves_its_share_as_the_host_user() {
    let me = rustix::process::geteuid().as_raw();
    // A guest user other than the host user: its files are the host user's on the host.
    let guest_uid = if me == 0 { 1000 } else { me };
    let mut b = start(guest_uid);
    let file = b.guest.lookup(ROOT, b"file").unwrap();
    assert_eq!(file.uid, guest_uid, "the host user's files belong to the guest user");
    let fh = b.guest.open(file.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(b.guest.read(file.nodeid, fh, 0, 100).unwrap(), b"shared\n");
    let mkdir = b.guest.request_as(cvm_virtual_guest::fuse::op::MKDIR, ROOT, b"\xed\x01\0\0\0\0\0\0made\0", 128, guest_uid, guest_uid);
    assert!(mkdir.is_ok(), "{mkdir:?}");
    let made = std::fs::metadata(b.dir.path().join("share/made")).unwrap();
    assert_eq!(made.uid(), me, "what the guest user makes is the host user's");
    assert!(b.guest.lookup(ROOT, b"..").is_err());
    b.assert_outside_untouched();
}

#[test]
fn chains_that_break_virtio_end_only_the_backend() {
    // Each case on a fresh backend: a reply buffer outside guest RAM, a request outside guest
    // RAM, a request with no reply buffer, a header that does not decode.
    type Chain = &'static [(u64, u32, bool)];
    let cases: [(&str, Chain, &[u8]); 4] = [
        ("reply outside RAM", &[(0x70_0000, 40, false), (1 << 40, 4096, true)], &[]),
        ("request outside RAM", &[(1 << 40, 40, false), (0x80_0000, 4096, true)], &[]),
        ("no reply buffer", &[(0x70_0000, 40, false)], &[]),
        ("short header", &[(0x70_0000, 12, false), (0x80_0000, 4096, true)], &[12, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]),
    ];
    for (what, chain, bytes) in cases {
        let mut b = start(1000);
        let mut lookup = vec![0u8; 40];
        lookup[..4].copy_from_slice(&46u32.to_le_bytes());
        lookup[4..8].copy_from_slice(&1u32.to_le_bytes());
        lookup[16..24].copy_from_slice(&ROOT.to_le_bytes());
        lookup.extend_from_slice(b"file\0\0");
        b.guest.write_ram(0x70_0000, if bytes.is_empty() { &lookup } else { bytes }).unwrap();
        b.guest.post_raw(chain).unwrap();
        // Either the backend refuses to go on (its process ends) or it still answers.
        if !b.exited_within(Duration::from_secs(2)) {
            assert!(b.guest.lookup(ROOT, b"file").is_ok(), "{what}: the backend neither ended nor answered");
        }
        b.assert_outside_untouched();
    }
}

#[cfg(feature = "bench")]
#[test]
fn bench_fs_measures_every_workload_and_says_when_the_reference_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cvm"))
        .args(["bench", "fs", "--size", "4M", "--random-reads", "50", "--files", "50", "--tree", "600", "--rounds", "1"])
        .args(["--virtiofsd", "/no/such/virtiofsd", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("no virtiofsd reference"), "{stderr}");
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| workload")).collect();
    assert_eq!(rows.len(), 5, "{stdout}");
    for row in rows {
        let cells: Vec<&str> = row.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
        let (host, cvm): (f64, f64) = (cells[1].parse().unwrap(), cells[2].parse().unwrap());
        assert!(host > 0.0 && cvm > 0.0, "{row}");
    }
    assert!(
        stdout.lines().next().is_some_and(|l| l.starts_with("cvm bench fs on ") && l.contains("Linux") && l.contains("4 MiB file")),
        "the host and sizes head the table: {stdout}"
    );
    assert!(stdout.lines().next().is_some_and(|l| l.contains("guest driver and servers on CPU ")), "pinned by default: {stdout}");
    assert!(
        stdout.contains("round range, cvm |") && stdout.contains("Round range: "),
        "the rounds' range is shown and explained: {stdout}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the bench's files are removed");

    let out = Command::new(env!("CARGO_BIN_EXE_cvm"))
        .args([
            "bench",
            "fs",
            "--json",
            "--size",
            "4M",
            "--random-reads",
            "50",
            "--files",
            "50",
            "--tree",
            "600",
            "--rounds",
            "1",
            "--virtiofsd",
            "/no/such/virtiofsd",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["sizes"]["file_bytes"], 4 << 20);
    assert!(report["host"]["kernel"].as_str().is_some_and(|k| !k.is_empty()), "{report}");
    let tables = report["tables"].as_array().unwrap();
    assert_eq!(tables.len(), 1, "{report}");
    assert_eq!(tables[0]["targets"], serde_json::json!(["host-native", "cvm backend"]), "{report}");
    let rows = tables[0]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5, "{report}");
    for row in rows {
        assert!(row["medians"]["cvm backend"].as_f64().unwrap() > 0.0 && row["cvm_over_host_native"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["cvm_over_virtiofsd"].is_null(), "no reference ran: {row}");
        assert_eq!(row["round_ranges"]["cvm backend"], 0.0, "one round has no range: {row}");
    }
}

#[test]
fn a_backend_ends_when_cvm_is_gone_even_before_a_frontend_came() {
    // As cvm starts it, by hand: the listener at fd 3, the lifeline's read end at fd 4. Then
    // the lifeline's write end, which only "cvm" (this test) holds, is closed: the backend,
    // sandboxed and waiting for a frontend that never comes, ends at once.
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("fs.vhost")).unwrap();
    let (lifeline_read, lifeline) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
    let config = ShareConfig {
        dir: dir.path().to_path_buf(),
        tag: "t".into(),
        policy: Policy::default(),
        guest_uid: 1000,
        guest_gid: 1000,
        allow_no_sandbox: false,
    };
    let mut command = Command::new(env!("CARGO_BIN_EXE_cvm"));
    command.arg("__fs-backend").args(config.to_args());
    cvm_sandbox::process::pass_fd(&mut command, listener.as_raw_fd(), 3);
    cvm_sandbox::process::pass_fd(&mut command, lifeline_read.as_raw_fd(), 4);
    let mut child = command.spawn().unwrap();
    drop((listener, lifeline_read));
    // Let it enter its sandbox (a PID namespace: the process that serves is a grandchild).
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "the backend waits for its frontend");
    drop(lifeline);
    let deadline = Instant::now() + Duration::from_secs(5);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the backend outlived its lifeline");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A status line of process `pid`.
fn status_line(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("{key} missing")).trim().to_string()
}

#[test]
fn the_serving_process_has_few_capabilities_and_a_seccomp_filter() {
    let b = start(1000);
    // The process that serves is the sandbox's innermost: the spawned process's child.
    let spawned = b.process.id();
    let children = std::fs::read_to_string(format!("/proc/{spawned}/task/{spawned}/children")).unwrap();
    let server: u32 = children.split_whitespace().next().map_or(spawned, |c| c.parse().unwrap());
    // The filter comes last: once it is there, so is the rest.
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_line(server, "Seccomp:") != "2" {
        assert!(Instant::now() < deadline, "no seccomp filter on the serving process");
        std::thread::sleep(Duration::from_millis(10));
    }
    // CHOWN, DAC_OVERRIDE, FOWNER, SETGID, SETUID: bits 0, 1, 3, 6, 7; none to regain.
    assert_eq!(status_line(server, "CapEff:"), "00000000000000cb");
    assert_eq!(status_line(server, "CapPrm:"), "00000000000000cb");
    assert_eq!(status_line(server, "CapBnd:"), "0000000000000000");
    assert_eq!(status_line(server, "NoNewPrivs:"), "1");
}
