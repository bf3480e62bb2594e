//! End-to-end tests of `cvm bench run` on this host: boots real VMs on the QEMU engine and
//! measures them against bare QEMU, the reference, in the same run.

mod common;

use common::{text, Env};

#[test]
fn bench_run_measures_an_exec_into_a_running_vm_against_a_fresh_run() {
    let Some(env) = Env::new() else { return };
    let out = env.cvm(&["bench", "run", "--runs", "1", "--vmm", "qemu"]).env("CVM_KERNEL", &env.kernel).env("CVM_MINIMAL_IMAGE", &env.image).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(report.contains("cvm exec into a running VM (qemu), wall") && report.contains("ratio cvm exec (qemu) / cvm run --vmm qemu"), "{report}");
    env.assert_clean();
}
