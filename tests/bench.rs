//! End-to-end tests of `cvm bench run` on this host: boots real VMs on the QEMU engine and
//! measures them against bare QEMU, the reference, in the same run.
#![cfg(feature = "bench")]

mod common;

use common::{text, Env};

#[test]
fn bench_run_measures_an_exec_into_a_running_vm_against_a_fresh_run() {
    let Some(env) = Env::new() else { return };
    let out = env
        .cvm(&["bench", "run", "--runs", "1", "--vmm", "qemu", "--sessions", "2"])
        .env("CVM_KERNEL", &env.kernel)
        .env("CVM_MINIMAL_IMAGE", &env.image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(
        report.contains("cvm exec into a running VM (qemu), wall") && report.contains("ratio cvm exec (qemu) / cvm run --vmm qemu"),
        "{report}"
    );
    // Two sessions held at once: each holds at least its guest's kernel in RAM.
    let memory = report.lines().find_map(|l| l.strip_prefix("--vmm qemu, cold")).unwrap_or_else(|| panic!("no memory row in {report}"));
    let total: f64 = memory.split_whitespace().next().and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("{memory}"));
    assert!(total > 2.0 * 8.0, "2 sessions hold {total} MiB:\n{report}");
    env.assert_clean();
}

#[test]
fn bench_proxy_measures_direct_tunneled_and_swapped_requests_in_one_run() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cvm"))
        .args(["bench", "proxy", "--connections", "3", "--requests", "10"])
        .output()
        .unwrap();
    let stdout = common::text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", common::text(&out.stderr));
    for row in ["| direct (no proxy) | ", "| proxy, tunneled | ", "| proxy, secret swapped | "] {
        assert!(stdout.lines().filter(|l| l.starts_with(row)).count() == 1, "{row} in:\n{stdout}");
    }
}
