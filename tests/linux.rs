//! Linux on cvm's own VMM, through `cvm boot`: the project's kernel (vmlinux with its PVH
//! entry, and the bzImage) with the test initramfs, on 1, 2 and 4 vCPUs, and a kernel panic
//! as a failure whatever `panic=` says.
//!
//! These need hardware KVM: scripts/test runs them with CVM_TEST_ENGINE=cvm, directly where
//! /dev/kvm is hardware and inside an L1 VM (scripts/nested) where it is PVM or absent. With
//! CVM_TEST_ENGINE unset (a plain `cargo test` on such a host) they say so and pass.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{arg, broken_initramfs, engine, linux_artifacts, text, wait_output};

/// Makes cvm-agent print its readiness line and reset at once.
const BOOT_TEST_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet cvm.boot_test";

/// The kernel and initramfs, when this run is the cvm engine's.
fn artifacts() -> Option<(PathBuf, PathBuf)> {
    if std::env::var_os("CVM_TEST_ENGINE").is_none() {
        eprintln!("skipped: Linux on cvm's VMM runs with CVM_TEST_ENGINE=cvm (scripts/test: on hardware KVM, or in L1)");
        return None;
    }
    assert_eq!(engine(), "cvm", "these tests are cvm's VMM's alone");
    linux_artifacts()
}

fn cvm_boot(kernel: &Path, initrd: &Path, cpus: &str, append: &str) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_cvm"))
        .args([
            "boot",
            "--kernel",
            arg(kernel),
            "--initrd",
            arg(initrd),
            "--cpus",
            cpus,
            "--memory",
            "256M",
            "--timings",
            "--append",
            append,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_output(child)
}

/// Boots `image` (the vmlinux or the bzImage built beside it) to init and back.
fn boots_to_init(cpus: &str, image: &str) {
    let Some((vmlinux, initrd)) = artifacts() else { return };
    let out = cvm_boot(&vmlinux.with_file_name(image), &initrd, cpus, BOOT_TEST_CMDLINE);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains(&format!("cvm-agent: init reached, {cpus} cpus")), "{stdout}");
    assert!(!stdout.contains("Kernel panic") && !stdout.contains("BUG:"), "{stdout}");
    assert!(!stderr.contains("boot-timer -"), "the init's boot-timer poke was not seen: {stderr}");
    // KVM's exit counters, for `cvm bench boot`: a Linux boot exits thousands of times, some
    // of them to cvm for port and MMIO accesses.
    let exits = stderr.lines().find_map(|l| l.strip_prefix("cvm exits (all vCPUs):")).unwrap_or_else(|| panic!("no exit counts: {stderr}"));
    let count = |name: &str| -> u64 {
        let mut words = exits.split_whitespace();
        words.find(|w| *w == name).and_then(|_| words.next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no {name} in {exits}"))
    };
    assert!(count("exits") > 1000 && count("io_exits") + count("mmio_exits") > 0, "{exits}");
}

#[test]
fn vmlinux_boots_to_init_on_one_vcpu() {
    boots_to_init("1", "vmlinux");
}

#[test]
fn vmlinux_boots_to_init_on_two_vcpus() {
    boots_to_init("2", "vmlinux");
}

#[test]
fn vmlinux_boots_to_init_on_four_vcpus() {
    boots_to_init("4", "vmlinux");
}

#[test]
fn bzimage_boots_to_init() {
    boots_to_init("2", "bzImage");
}

#[test]
fn a_kernel_panic_fails_the_boot_whatever_panic_says() {
    let Some((kernel, _)) = artifacts() else { return };
    let dir = tempfile::tempdir().unwrap();
    let broken = broken_initramfs(dir.path());
    // panic=-1 resets at once (once taken for a clean exit), panic=0 spins for ever, panic=30
    // waits: each ends as a failure that names the panic, well before its own timeout.
    for panic in ["-1", "0", "30"] {
        let started = std::time::Instant::now();
        let out = cvm_boot(&kernel, &broken, "1", &format!("console=ttyS0 reboot=k panic={panic}"));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "panic={panic}: {stderr}");
        assert!(stderr.contains("cvm: the guest kernel panicked: Kernel panic - not syncing: "), "panic={panic}: {stderr}");
        assert!(text(&out.stdout).contains("Kernel panic - not syncing"), "panic={panic}: the console shows it");
        assert!(started.elapsed() < std::time::Duration::from_secs(25), "panic={panic} took {:?}", started.elapsed());
    }
}

/// Linux snapshotted where its init starts (`cvm boot --snapshot`, at the boot timer) resumes
/// there in new VMs, on two vCPUs: its timers, clock, interrupts and console work (the
/// agent's ticks, 100 ms apart), and it does not boot again.
#[test]
fn linux_snapshotted_at_init_resumes_there() {
    use cvm_agent::protocol::{SNAPSHOT_TEST_BEFORE, SNAPSHOT_TEST_DONE, SNAPSHOT_TEST_TICKS};
    let Some((kernel, initrd)) = artifacts() else { return };
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("snapshot");
    let run = |args: &[&str]| {
        let child = Command::new(env!("CARGO_BIN_EXE_cvm"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_output(child);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{args:?}\nstdout: {stdout}\nstderr: {stderr}");
        assert!(!stdout.contains("Kernel panic") && !stdout.contains("BUG:") && !stdout.contains("WARNING:"), "{stdout}");
        for tick in 1..=SNAPSHOT_TEST_TICKS {
            assert!(stdout.contains(&format!("cvm-agent: tick {tick}")), "{args:?}: no tick {tick}: {stdout}");
        }
        assert!(stdout.contains(&format!("{SNAPSHOT_TEST_DONE}, 2 cpus")), "{stdout}");
        (stdout, stderr)
    };
    let append = "console=ttyS0 reboot=k panic=-1 retain_initrd quiet cvm.snapshot_test";
    let (stdout, stderr) = run(&[
        "boot",
        "--kernel",
        arg(&kernel),
        "--initrd",
        arg(&initrd),
        "--cpus",
        "2",
        "--memory",
        "256M",
        "--append",
        append,
        "--snapshot",
        arg(&snapshot),
    ]);
    assert!(stdout.contains(SNAPSHOT_TEST_BEFORE), "{stdout}");
    assert!(stderr.contains("cvm: snapshot written to"), "{stderr}");
    // What no device touches: the kernel's code, the initrd it kept (its whole pages) and its
    // struct pages (64 bytes for each 4 KiB page).
    let (state, _) = cvm_vmm::snapshot::Snapshot::read(&snapshot).unwrap();
    let lens: Vec<u64> = state.kernel_private.iter().map(|(start, end)| end - start).collect();
    let initrd_len = std::fs::metadata(&initrd).unwrap().len();
    assert!(lens.len() == 3 && lens[1] == initrd_len / 4096 * 4096 && lens[2] >= (256 << 20) / 64, "{:#x?}", state.kernel_private);

    for restore in 0..2 {
        let (stdout, stderr) = run(&["boot", "--restore", arg(&snapshot), "--cpus", "2", "--memory", "256M", "--timings"]);
        assert!(!stdout.contains(SNAPSHOT_TEST_BEFORE), "restore {restore} booted: {stdout}");
        assert!(stderr.contains("boot-timer -"), "restore {restore}: {stderr}");
        // KVM mapped the snapshot's pages before the guest ran (`KVM_PRE_FAULT_MEMORY`).
        assert!(stderr.lines().any(|l| l.starts_with("cvm set-up") && l.contains(" prefault ")), "restore {restore}: {stderr}");
        eprintln!("restore {restore}: {}", stdout.lines().last().unwrap_or_default());
    }
}
