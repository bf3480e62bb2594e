//! End-to-end tests of named, long-lived VMs: two at once, execs into a running VM while
//! another exec is open, `ps`, `logs`, `stop` and `rm`, and nothing left behind. Full stack on
//! the QEMU engine here, and on cvm's VMM with hardware KVM.

mod common;

use std::io::{BufRead, BufReader};

use common::{engine, nested_scale, text, wait_output, Env};

#[test]
fn two_named_vms_run_side_by_side_and_take_concurrent_execs() {
    let Some(env) = Env::new() else { return };
    let project = tempfile::tempdir().unwrap();
    std::fs::write(project.path().join("marker"), "in the project\n").unwrap();
    let project_path = project.path().canonicalize().unwrap();
    let project_str = project_path.to_str().unwrap();
    let engine = engine();
    let out = wait_output(env.subcommand("start", engine, &["--name", "alpha", project_str]).spawn().unwrap());
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(0), "alpha\n".into()), "[{engine}] {}", text(&out.stderr));
    let out = wait_output(env.subcommand("start", engine, &["--name", "beta", "-e", "CVM_TEST_SECRET=hunter2-for-beta"]).spawn().unwrap());
    assert_eq!(out.status.code(), Some(0), "[{engine}] {}", text(&out.stderr));
    let again = wait_output(env.subcommand("start", engine, &["--name", "alpha"]).spawn().unwrap());
    assert!(again.status.code() == Some(1) && text(&again.stderr).contains("already running"), "[{engine}] {}", text(&again.stderr));
    let bad = wait_output(env.subcommand("start", engine, &["--name", "../x"]).spawn().unwrap());
    assert_eq!(bad.status.code(), Some(2), "[{engine}] a bad name is a usage error");

    let ps: serde_json::Value = serde_json::from_slice(&env.cvm(&["ps", "--json"]).output().unwrap().stdout).unwrap();
    let listed: Vec<(&str, &str)> =
        ps.as_array().unwrap().iter().map(|v| (v["name"].as_str().unwrap(), v["status"].as_str().unwrap())).collect();
    assert_eq!(listed, [("alpha", "running"), ("beta", "running")], "[{engine}] {ps}");
    assert_eq!(ps[0]["project"], project_str, "[{engine}]");
    // A value given with -e reaches the VM's commands, but not the daemon's argv, which every
    // user of the host can read.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", ps[1]["pid"].as_u64().unwrap())).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains("hunter2"), "[{engine}] {:?}", String::from_utf8_lossy(&cmdline));
    let out = env.cvm(&["exec", "beta", "--", "sh", "-c", "echo $CVM_TEST_SECRET"]).output().unwrap();
    assert_eq!(text(&out.stdout), "hunter2-for-beta\n", "[{engine}] {}", text(&out.stderr));

    // An exec that stays open while others come and go.
    let mut open = env.cvm(&["exec", "alpha", "--", "sh", "-c", "echo started; sleep 600"]).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(open.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "started\n", "[{engine}]");

    let out = env.cvm(&["exec", "alpha", "--", "sh", "-c", "pwd; cat marker; echo kept > /tmp/state; exit 7"]).output().unwrap();
    assert_eq!(out.status.code(), Some(7), "[{engine}] {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{project_str}\nin the project\n"), "[{engine}] the exec runs in the project");
    let out = env.cvm(&["exec", "alpha", "--", "cat", "/tmp/state"]).output().unwrap();
    assert_eq!(text(&out.stdout), "kept\n", "[{engine}] the VM lives on between execs");
    let out = env.cvm(&["exec", "beta", "--", "sh", "-c", "cat /tmp/state 2>/dev/null || echo separate"]).output().unwrap();
    assert_eq!(text(&out.stdout), "separate\n", "[{engine}] two VMs share nothing");

    // Standard input reaches the command, as with `cvm run`.
    let mut cat = env.cvm(&["exec", "beta", "--", "cat"]).stdin(std::process::Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut cat.stdin.take().unwrap(), b"piped in\n").unwrap();
    assert_eq!(text(&wait_output(cat).stdout), "piped in\n", "[{engine}]");

    let logs = env.cvm(&["logs", "alpha"]).output().unwrap();
    assert!(text(&logs.stdout).contains("Linux version"), "[{engine}] the guest console: {}", text(&logs.stdout));

    // Following the console ends when the VM does.
    let follow = env.cvm(&["logs", "alpha", "--follow"]).spawn().unwrap();
    let stop = env.cvm(&["stop", "alpha"]).output().unwrap();
    assert_eq!(stop.status.code(), Some(0), "[{engine}] {}", text(&stop.stderr));
    let followed = wait_output(follow);
    assert!(followed.status.success() && text(&followed.stdout).contains("Linux version"), "[{engine}] logs --follow");
    let open_out = wait_output(open);
    assert_ne!(open_out.status.code(), Some(0), "[{engine}] the open exec ends with its VM");
    let gone = env.cvm(&["exec", "alpha", "--", "true"]).output().unwrap();
    assert!(gone.status.code() == Some(125) && text(&gone.stderr).contains("no VM called alpha"), "[{engine}] {}", text(&gone.stderr));

    let rm = env.cvm(&["rm", "beta"]).output().unwrap();
    assert_eq!(rm.status.code(), Some(0), "[{engine}] {}", text(&rm.stderr));
    assert_eq!(text(&env.cvm(&["ps", "--json"]).output().unwrap().stdout).trim(), "[]", "[{engine}]");

    // A daemon whose state directory was taken from under it still stops on SIGTERM.
    let out = wait_output(env.subcommand("start", engine, &["--name", "gamma"]).spawn().unwrap());
    assert_eq!(out.status.code(), Some(0), "[{engine}] {}", text(&out.stderr));
    let ps: serde_json::Value = serde_json::from_slice(&env.cvm(&["ps", "--json"]).output().unwrap().stdout).unwrap();
    let pid = ps[0]["pid"].as_u64().unwrap() as i32;
    std::fs::remove_dir_all(env.runtime.path().join("cvm/vms/gamma")).unwrap();
    // SAFETY (test): SIGTERM to the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + nested_scale(std::time::Duration::from_secs(30));
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(std::time::Instant::now() < deadline, "[{engine}] the daemon of gamma is still running");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    env.assert_clean();
}

#[test]
fn a_vm_that_cannot_start_says_why_and_leaves_nothing() {
    let Some(env) = Env::new() else { return };
    let out = env
        .cvm(&["start", "--name", "broken", "--vmm", engine(), "--kernel"])
        .arg(&env.kernel)
        .args(["--image", "/nonexistent/image"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("did not start") && text(&out.stderr).contains("/nonexistent/image"), "{}", text(&out.stderr));
    assert_eq!(text(&env.cvm(&["ps", "--json"]).output().unwrap().stdout).trim(), "[]");
    env.assert_clean();
}
