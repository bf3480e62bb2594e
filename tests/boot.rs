//! End-to-end tests of `cvm boot`: the real binary, the real `/dev/kvm`, the project's
//! micro-guests (tests/guests/) and, where the host can run it, the project's Linux kernel.
//!
//! Tests that need a usable `/dev/kvm` skip with a one-line reason when there is none, unless
//! CVM_REQUIRE_KVM=1 (scripts/test sets it when /dev/kvm opens), where a skip is a failure.

mod common;

use common::{is_pvm, kvm_usable, linux_artifacts, processes_marked, text, Env};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn guest(name: &str) -> PathBuf {
    PathBuf::from(env!("CVM_MICRO_GUESTS")).join(format!("{name}.elf"))
}

fn cvm(args: &[&str]) -> Output {
    cvm_with_env(args, &[])
}

/// Runs cvm with a deadline: a hang is a test failure, not a stuck suite.
fn cvm_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cvm"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cvm");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("cvm {args:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().unwrap()
}

fn boot_guest(name: &str, extra: &[&str]) -> Output {
    let path = guest(name);
    let mut args = vec!["boot", "--kernel", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    cvm(&args)
}

#[test]
fn hello_guest_prints_pokes_the_boot_timer_and_resets() {
    if !kvm_usable() {
        return;
    }
    let out = boot_guest("hello", &["--timings"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "cvm micro-guest: hello from the guest\n");
    let stderr = text(&out.stderr);
    let timings = stderr.lines().find(|l| l.starts_with("cvm timings")).expect("timings line");
    let value = |name: &str| -> f64 {
        let mut words = timings.split_whitespace();
        words.find(|w| *w == name).unwrap();
        words.next().unwrap().parse().unwrap_or_else(|_| panic!("{name} has no value in {timings:?}"))
    };
    let (first, timer, exit) = (value("first-instruction"), value("boot-timer"), value("exit"));
    assert!(0.0 < first && first <= timer && timer <= exit, "{timings}");
}

/// The host processes of `cvm boot` runs marked with `marker` in their command line or their
/// environment (the VMM process and its teardown helper inherit cvm's environment).
/// Waits (10 s at most) until no process is marked with `marker`.
fn assert_all_gone(marker: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_marked(marker).is_empty() {
        assert!(Instant::now() < deadline, "processes of that cvm boot still run 10 s after {what}: {:?}", processes_marked(marker));
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The kernel's side of the VM's end runs in a helper after `cvm boot` has exited, and the VMM
/// process ends after reporting; both must be gone soon after, and must not hold the output
/// pipes (the wait above reads them to their end).
#[test]
fn nothing_is_left_running_after_the_vm_ends() {
    if !kvm_usable() {
        return;
    }
    let marker = format!("cvm-test-teardown-{}", std::process::id());
    let out = cvm_with_env(
        &["boot", "--kernel", guest("hello").to_str().unwrap(), "--append", &format!("console=ttyS0 {marker}")],
        &[("CVM_TEST_MARKER", &marker)],
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_all_gone(&marker, "it exited");
}

/// What `/proc/TASK/status` says, by field: TASK is a pid, or `PID/task/TID` for a thread.
fn status_field(task: impl std::fmt::Display, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{task}/status")).unwrap_or_default();
    status.lines().find_map(|line| line.strip_prefix(&format!("{field}:"))).unwrap_or_default().trim().to_string()
}

/// The VMM runs the guest in a jail of its own (Firecracker's jailer's): new user, mount, PID,
/// IPC and network namespaces, an empty root, no capabilities in any of its threads, its
/// seccomp filter, no new privileges, and (cvm being root) an unprivileged uid; and it ends
/// with the cvm that started it, even one killed.
#[test]
fn the_vmm_runs_jailed_and_ends_with_cvm() {
    if !kvm_usable() {
        return;
    }
    /// The ticker guest runs until killed: so is its cvm, whatever the test finds.
    struct KilledOnDrop(std::process::Child);
    impl Drop for KilledOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let marker = format!("cvm-test-jail-{}", std::process::id());
    let mut cvm = KilledOnDrop(
        Command::new(env!("CARGO_BIN_EXE_cvm"))
            .args(["boot", "--kernel", guest("ticker").to_str().unwrap()])
            .env("CVM_TEST_MARKER", &marker)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The VMM: the marked process that is its PID namespace's init (NSpid "HOST 1"), once its
    // guest runs (its first vCPU's thread started).
    let deadline = Instant::now() + Duration::from_secs(30);
    let runs = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "vcpu0"))
    };
    let vmm = loop {
        let found = processes_marked(&marker)
            .into_iter()
            .find(|&pid| status_field(pid, "NSpid").ends_with("\t1") && status_field(pid, "Seccomp") == "2" && runs(pid));
        if let Some(pid) = found {
            break pid;
        }
        assert!(Instant::now() < deadline, "no jailed VMM process within 30 s of cvm boot");
        if let Some(status) = cvm.0.try_wait().unwrap() {
            let mut stderr = String::new();
            let _ = std::io::Read::read_to_string(cvm.0.stderr.as_mut().unwrap(), &mut stderr);
            panic!("cvm boot ended early ({status}): {stderr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    for namespace in ["user", "mnt", "pid", "ipc", "net"] {
        let of = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/{namespace}")).unwrap();
        assert_ne!(of(&vmm.to_string()), of("self"), "the VMM shares cvm's {namespace} namespace");
    }
    let threads: Vec<u32> =
        std::fs::read_dir(format!("/proc/{vmm}/task")).unwrap().flatten().filter_map(|t| t.file_name().to_str()?.parse().ok()).collect();
    assert!(threads.len() >= 3, "the VMM's control, VM and vCPU threads: {threads:?}");
    for thread in &threads {
        let status = |field: &str| status_field(format!("{vmm}/task/{thread}"), field);
        if status("Name").starts_with("kvm-") {
            continue; // KVM's own worker (NX huge page recovery), the kernel's
        }
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(status(set), "0000000000000000", "thread {thread} ({}) holds capabilities ({set})", status("Name"));
        }
        assert_eq!(status("NoNewPrivs"), "1", "thread {thread} ({})", status("Name"));
        assert_eq!(status("Seccomp"), "2", "thread {thread} ({}) has no seccomp filter", status("Name"));
    }
    if rustix::process::getuid().is_root() {
        let uid = status_field(vmm, "Uid");
        assert!(
            uid.split_whitespace().all(|id| id.parse::<u32>().unwrap() >= cvm_vmm::jail::JAIL_ID_BASE),
            "cvm is root, the VMM must not be: Uid {uid}"
        );
        assert_eq!(status_field(vmm, "Groups"), "", "the VMM keeps no supplementary group");
    }
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{vmm}/root")).unwrap().collect();
    assert!(root.is_empty(), "the VMM's root is not empty: {root:?}");

    // cvm killed outright: the VMM sees its control socket close and stops its VM.
    drop(cvm);
    assert_all_gone(&marker, "cvm was killed");
}

#[test]
fn smp_guest_boots_with_several_vcpus() {
    if !kvm_usable() {
        return;
    }
    let out = boot_guest("hello", &["--cpus", "4"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("hello from the guest"));
}

#[test]
fn memory_map_matches_the_requested_size() {
    if !kvm_usable() {
        return;
    }
    for (size, last_ram) in [
        ("16M", "ram 00000000:00100000 00000000:00f00000 type 00000001"),
        ("1G", "ram 00000000:00100000 00000000:3ff00000 type 00000001"),
        // Above 3 GiB the RAM splits around the MMIO gap and resumes at 4 GiB.
        ("5G", "ram 00000001:00000000 00000000:80000000 type 00000001"),
    ] {
        let out = boot_guest("memory", &["--memory", size]);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{size}: {}", text(&out.stderr));
        assert!(stdout.contains("ram 00000000:00000000 00000000:0009fc00 type 00000001"), "{size}: {stdout}");
        assert!(stdout.contains("ram 00000000:0009fc00 00000000:00000400 type 00000002"), "{size}: MP table reserved: {stdout}");
        assert!(stdout.contains(last_ram), "{size}: {stdout}");
        assert!(stdout.contains("memory ok"), "{size}: the guest could not use its last page: {stdout}");
    }
}

#[test]
fn unmapped_mmio_and_virtio_registers() {
    if !kvm_usable() {
        return;
    }
    let out = boot_guest("mmio", &[]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "unmapped read ffffffff\n\
         virtio magic 74726976 version 00000002 device 00000004\n\
         features high 00000001\n\
         status 0000000b queue max 00000100 queue1 max 00000000 after reset 00000000\n"
    );
}

#[test]
fn triple_fault_ends_the_vm_with_its_reason() {
    if !kvm_usable() {
        return;
    }
    let out = boot_guest("triple-fault", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "about to triple fault\n");
    assert!(text(&out.stderr).contains("triple fault"), "stderr: {}", text(&out.stderr));
}

#[test]
fn halt_with_interrupts_off_ends_the_vm() {
    if !kvm_usable() {
        return;
    }
    let out = boot_guest("halt", &[]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "halting with interrupts off\n");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let hello = guest("hello");
    let hello = hello.to_str().unwrap();
    let dir = std::env::temp_dir().join(format!("cvm-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text_file = dir.join("notes.txt");
    std::fs::write(&text_file, "not a kernel\n").unwrap();
    let text_file = text_file.to_str().unwrap();

    // (arguments, environment, exit status, what stderr must say)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, i32, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["--kernel", "/no/such/kernel"], vec![], 1, "/no/such/kernel: No such file"),
        (vec!["--kernel", hello, "--initrd", "/no/such/initrd"], vec![], 1, "/no/such/initrd: No such file"),
        (vec!["--kernel", hello, "--memory", "64Q"], vec![], 2, "unknown unit"),
        (vec!["--kernel", hello, "--memory", "0"], vec![], 2, "greater than zero"),
        (vec!["--kernel", hello, "--memory", "1000T"], vec![], 1, "more than this host's"),
        (vec!["--kernel", hello, "--cpus", "0"], vec![], 1, "--cpus must be between 1 and"),
        (vec!["--kernel", hello], vec![("CVM_KVM_DEVICE", "/no/such/kvm")], 1, "/no/such/kvm does not exist: this host has no KVM"),
        (vec!["--kernel", hello], vec![("CVM_KVM_DEVICE", "/dev/null")], 1, "/dev/null is not a KVM device"),
    ];
    let mut cases = cases;
    if kvm_usable() {
        // These reach the kernel loader, after KVM opened.
        cases.push((vec!["--kernel", text_file], vec![], 1, "is not a kernel: neither an ELF vmlinux nor a bzImage"));
        cases.push((vec!["--kernel", "/bin/sh"], vec![], 1, "is not a kernel: an ELF file, but not a statically placed executable"));
    }
    for (args, env, code, message) in cases {
        let mut full = vec!["boot"];
        full.extend(args.iter().copied());
        let out = cvm_with_env(&full, &env);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: expected {message:?} in {stderr:?}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn stock_kernel_on_pvm_fails_fast_with_the_reason() {
    if !kvm_usable() || !is_pvm() {
        eprintln!("skipped: this host's KVM is not PVM");
        return;
    }
    let Some((kernel, initrd)) = linux_artifacts() else { return };
    let started = Instant::now();
    let out = cvm(&["boot", "--kernel", kernel.to_str().unwrap(), "--initrd", initrd.to_str().unwrap()]);
    let elapsed = started.elapsed();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("PVM") && stderr.contains("cannot run a stock Linux kernel"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}

/// The guest kernel and initramfs recipes, checked on QEMU's TCG where cvm's VMM cannot run
/// Linux: the configuration boots, finds both CPUs through the MP table, and reaches init.
#[test]
fn guest_kernel_reaches_init_under_qemu_tcg() {
    let Some((kernel, initrd)) = linux_artifacts() else { return };
    let out = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,acpi=off", "-accel", "tcg", "-m", "256M", "-smp", "2"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 reboot=k panic=-1 quiet cvm.boot_test"])
        .stdin(Stdio::null())
        .output()
        .expect("qemu-system-x86_64 (scripts/bootstrap installs it)");
    let stdout = text(&out.stdout);
    assert!(stdout.contains("cvm-agent: init reached, 2 cpus"), "stdout: {stdout}\nstderr: {}", text(&out.stderr));
}

/// cvm's VMM with a vhost-user device on the real /dev/kvm: the micro-guest's notifications
/// reach cvm's vsock backend through KVM ioeventfds, and its connection reaches a host socket.
#[test]
fn vsock_micro_guest_reaches_a_host_socket_through_the_vhost_user_backend() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("v.sock");
    let listener = std::os::unix::net::UnixListener::bind(dir.path().join("v.sock_5555")).unwrap();
    let host = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut line = String::new();
        std::io::Read::read_to_string(&mut conn, &mut line).unwrap();
        line
    });
    let out = boot_guest("vsock", &["--vsock", socket.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {}", text(&out.stderr));
    assert!(stdout.contains("cvm micro-guest: vsock connected and sent"), "{stdout}");
    assert_eq!(host.join().unwrap(), "hello from the micro-guest\n");
    assert!(!socket.exists(), "the host socket is removed with the VM");

    // Nobody listening on the port: the guest is refused (RST).
    let lonely = tempfile::tempdir().unwrap();
    let out = boot_guest("vsock", &["--vsock", lonely.path().join("v.sock").to_str().unwrap()]);
    assert!(text(&out.stdout).contains("the host refused the connection"), "{}", text(&out.stdout));
}

/// The full stack on this host's kind of KVM: where it is PVM, `--vmm cvm` says why it cannot
/// run and what to use instead.
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

/// The vCPU state machine a snapshot needs: a running guest's vCPUs park outside KVM_RUN on a
/// pause (its output stops), run on after a resume (it goes on), and are Exited at the end.
#[test]
fn a_running_guest_pauses_and_resumes() {
    use cvm_vmm::{ExitReason, VcpuState, Vm, VmConfig};
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let config = VmConfig { console_log: Some(console.clone()), memory_bytes: 64 << 20, ..VmConfig::new(guest("ticker")) };
    let vm = Vm::create(&config, Instant::now()).unwrap();
    let handle = vm.handle();
    let run = std::thread::spawn(move || vm.run());
    let printed = || std::fs::metadata(&console).map_or(0, |m| m.len());
    let grows = |what: &str| {
        let (before, deadline) = (printed(), Instant::now() + Duration::from_secs(10));
        while printed() <= before {
            assert!(Instant::now() < deadline, "{what}: the guest printed nothing in 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    grows("running");

    handle.pause(Duration::from_secs(5)).unwrap();
    assert_eq!(handle.vcpu_states(), vec![VcpuState::Paused]);
    std::thread::sleep(Duration::from_millis(100)); // what the console relay still held
    let paused_at = printed();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(printed(), paused_at, "a paused guest ran");

    handle.resume();
    grows("resumed");
    assert_eq!(handle.vcpu_states(), vec![VcpuState::Running]);

    handle.stop();
    let exit = run.join().unwrap().unwrap();
    assert_eq!(exit.reason, ExitReason::Stopped);
    assert_eq!(handle.vcpu_states(), vec![VcpuState::Exited]);
}

/// A snapshot taken where the guest reaches its init (the boot timer), restored in new VMs:
/// each prints what the guest printed after that point, from its counter in memory, and
/// nothing from before it.
#[test]
fn a_snapshot_at_init_resumes_there_in_new_vms() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("cache/snapshot");
    let out = boot_guest("counter", &["--memory", "64M", "--snapshot", snapshot.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(text(&out.stdout), "counter: booted\n0123456789\n", "the snapshotted VM runs on");
    assert!(stderr.contains("cvm: snapshot written to"), "{stderr}");
    for file in ["state", "memory"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(snapshot.join(file)).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let memory = std::fs::metadata(snapshot.join("memory")).unwrap();
    assert_eq!(memory.len(), 64 << 20);
    assert!(std::os::unix::fs::MetadataExt::blocks(&memory) * 512 < 1 << 20, "untouched guest RAM is a hole in the memory file");

    // Twice: a restore does not use the snapshot up.
    for run in 0..2 {
        let out = cvm(&["boot", "--restore", snapshot.to_str().unwrap(), "--memory", "64M", "--timings"]);
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "restore {run}: {stderr}");
        assert_eq!(text(&out.stdout), "0123456789\n", "restore {run}");
        assert!(stderr.contains("boot-timer -"), "a restored guest is past its init: {stderr}");
    }
}

/// A snapshot that does not fit or does not read back whole is refused with the reason, never
/// run.
#[test]
fn a_bad_snapshot_is_refused_with_the_reason() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    let out = boot_guest("counter", &["--memory", "64M", "--snapshot", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let restore = |snapshot: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["boot", "--restore", snapshot.to_str().unwrap(), "--memory", "64M"];
        args.extend_from_slice(extra);
        let out = cvm(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?} ran: {}", text(&out.stdout));
        assert_eq!(text(&out.stdout), "", "{args:?}: the guest ran");
        text(&out.stderr)
    };
    let copy = |name: &str| {
        let to = dir.path().join(name);
        std::fs::create_dir(&to).unwrap();
        for file in ["state", "memory"] {
            std::fs::copy(good.join(file), to.join(file)).unwrap();
        }
        to
    };

    assert!(restore(&good, &["--cpus", "2"]).contains("snapshot: the snapshot is of a VM with 1 vCPUs and 64 MiB, not 2 and 64 MiB"));
    let stderr = restore(&good, &["--vsock", dir.path().join("v.sock").to_str().unwrap()]);
    assert!(stderr.contains("the snapshot has 1 virtio devices, this VM 2"), "{stderr}");
    assert!(restore(&dir.path().join("none"), &[]).contains("none/state"));

    let truncated = copy("truncated");
    let state = std::fs::read(truncated.join("state")).unwrap();
    std::fs::write(truncated.join("state"), &state[..state.len() - 100]).unwrap();
    assert!(restore(&truncated, &[]).contains("truncated or corrupt"));

    let flipped = copy("flipped");
    let mut state = std::fs::read(flipped.join("state")).unwrap();
    let last = state.len() - 1;
    state[last] ^= 1;
    std::fs::write(flipped.join("state"), &state).unwrap();
    assert!(restore(&flipped, &[]).contains("checksum mismatch"));

    let short = copy("short");
    std::fs::OpenOptions::new().write(true).open(short.join("memory")).unwrap().set_len(1 << 20).unwrap();
    assert!(restore(&short, &[]).contains("the memory file has 1048576 bytes, not 67108864"));

    let foreign = copy("foreign");
    std::fs::write(foreign.join("state"), b"#!/bin/sh\necho not a snapshot\n").unwrap();
    assert!(restore(&foreign, &[]).contains("not a cvm snapshot"));
}
