//! Warm starts: on cvm's VMM the first `cvm run` of a kind boots and leaves a snapshot of its
//! guest, snapshotted where its init started; later ones restore it and behave as a cold one
//! does (the share, the exit status, the clock), with fresh entropy, and no session's data is
//! ever in the snapshot. On QEMU every session boots and no snapshot is made.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{engine, text, Env};
use cvm::session::warm::RESTORED;

fn snapshots(env: &Env) -> Vec<PathBuf> {
    let dir = env.home.path().join(".cache/cvm/snapshots");
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
    all.sort();
    all
}

/// `cvm run` in `project` with cvm's own messages on (`CVM_LOG=info`, the same for every run,
/// since it shapes the guest's command line and so the snapshot's key).
fn run(env: &Env, project: &Path, args: &[&str]) -> Output {
    let mut full = vec![project.to_str().unwrap()];
    full.extend_from_slice(args);
    let child = env.command(engine(), &full).env("CVM_LOG", "info").stdin(std::process::Stdio::null()).spawn().unwrap();
    common::wait_output(child)
}

fn ok(out: &Output) -> (String, String) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    (stdout, stderr)
}

/// Whether any file of `dir` holds `needle` (grep: a scan of guest RAM in this test's debug
/// build would take minutes in L1).
fn holds(dir: &Path, needle: &str) -> bool {
    let grep = std::process::Command::new("grep").args(["-rqF", "--", needle]).arg(dir).status().unwrap();
    assert!(grep.code().is_some_and(|c| c <= 1), "grep failed: {grep}");
    grep.success()
}

#[test]
fn a_second_session_restores_the_first_ones_guest() {
    let Some(env) = Env::debian() else { return };
    let project = tempfile::tempdir().unwrap();
    std::fs::write(project.path().join("hello.txt"), "hello from the host\n").unwrap();
    let marker = format!("marker-{}-{:?}", std::process::id(), std::time::SystemTime::now());

    let (stdout, stderr) =
        ok(&run(&env, project.path(), &["--env", &format!("MARKER={marker}"), "--", "sh", "-c", "cat hello.txt; echo $MARKER"]));
    assert!(stdout.contains("hello from the host") && stdout.contains(&marker), "{stdout}");
    assert!(!stderr.contains(RESTORED), "the first session boots: {stderr}");
    if engine() != "cvm" {
        assert_eq!(snapshots(&env), Vec::<PathBuf>::new(), "QEMU makes no snapshot");
        let (_, stderr) = ok(&run(&env, project.path(), &["--", "true"]));
        assert!(!stderr.contains(RESTORED), "{stderr}");
        return;
    }
    let made = snapshots(&env);
    assert_eq!(made.len(), 1, "one snapshot: {made:?}");
    assert!(holds(&made[0], "cvm-agent"), "the scan finds what guest RAM holds");
    assert!(!holds(&made[0], &marker), "a session's variable is in the snapshot");
    // What no device touches, which restored sessions share: the kernel's code and, found
    // through the guest's page tables, its struct pages (at least 64 bytes per 4 KiB page).
    let (state, _) = cvm_vmm::snapshot::Snapshot::read(&made[0]).unwrap();
    let struct_pages: u64 = state.kernel_private.iter().skip(1).map(|(start, end)| end - start).sum();
    assert!(state.kernel_private.len() >= 2 && struct_pages >= state.memory_bytes / 64, "{:#x?}", state.kernel_private);

    // Restored: the share both ways, the clock, the exit status.
    let host_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let out = run(&env, project.path(), &["--", "sh", "-c", "cat hello.txt; echo written > from-guest.txt; date +%s; exit 7"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(7), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains(RESTORED), "the second session is restored: {stderr}");
    assert!(stdout.contains("hello from the host"), "{stdout}");
    assert_eq!(std::fs::read_to_string(project.path().join("from-guest.txt")).unwrap(), "written\n");
    let guest_now: u64 = stdout.lines().last().and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("no date: {stdout}"));
    assert!(guest_now.abs_diff(host_now) < 120, "the restored guest's clock says {guest_now}, the host's {host_now}");

    // Two restored guests do not share their random numbers.
    let random = || ok(&run(&env, project.path(), &["--", "sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"])).0;
    let (first, second) = (random(), random());
    assert_ne!(first, second, "two restored sessions read the same random bytes");

    // --cold boots.
    let (_, stderr) = ok(&run(&env, project.path(), &["--cold", "--", "true"]));
    assert!(!stderr.contains(RESTORED), "{stderr}");

    // A corrupt snapshot: a warning, a cold boot, and a good snapshot again.
    let state = made[0].join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&state, bytes).unwrap();
    let (_, stderr) = ok(&run(&env, project.path(), &["--", "true"]));
    assert!(stderr.contains("checksum mismatch") && stderr.contains("booting cold"), "{stderr}");
    assert!(!stderr.contains(RESTORED), "{stderr}");
    let (_, stderr) = ok(&run(&env, project.path(), &["--", "true"]));
    assert!(stderr.contains(RESTORED), "made again: {stderr}");

    // cvm snapshot ls and rm.
    let key = made[0].file_name().unwrap().to_str().unwrap().to_string();
    let ls = ok(&env.cvm(&["snapshot", "ls"]).output().unwrap()).0;
    assert!(ls.contains(&key), "{ls}");
    ok(&env.cvm(&["snapshot", "rm", &key]).output().unwrap());
    assert_eq!(snapshots(&env), Vec::<PathBuf>::new());
    env.assert_clean();
}
