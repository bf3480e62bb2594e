//! Helpers shared by the end-to-end tests.
#![allow(dead_code)] // each test crate uses its own subset

use std::path::PathBuf;

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
            assert!(std::env::var("CVM_REQUIRE_KERNEL").as_deref() != Ok("1"), "CVM_REQUIRE_KERNEL=1 but CVM_TEST_KERNEL/CVM_TEST_INITRAMFS are not set");
            eprintln!("skipped: CVM_TEST_KERNEL and CVM_TEST_INITRAMFS are not set (run scripts/test)");
            None
        }
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
