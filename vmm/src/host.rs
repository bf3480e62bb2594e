//! What the host's KVM is: present, usable, and hardware or software (PVM).

use std::path::Path;

/// Why `/dev/kvm` cannot be used, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum KvmUnavailable {
    #[error("/dev/kvm does not exist: this host has no KVM. Enable virtualization (VT-x/AMD-V) in the firmware and load kvm_intel or kvm_amd; in a cloud VM, choose an instance type with nested virtualization")]
    Missing,
    #[error("permission denied opening /dev/kvm: add your user to the kvm group (sudo usermod -aG kvm $USER, then log in again), or run: sudo setfacl -m u:$USER:rw /dev/kvm")]
    PermissionDenied,
    #[error("cannot open /dev/kvm: {0}")]
    Other(std::io::Error),
    #[error("/dev/kvm speaks KVM API version {0}, not 12")]
    ApiVersion(i32),
    #[error("this host's KVM lacks {0}, which cvm needs")]
    MissingCapability(&'static str),
}

/// Opens `/dev/kvm` and checks the capabilities cvm relies on.
pub fn open_kvm() -> Result<kvm_ioctls::Kvm, KvmUnavailable> {
    use kvm_ioctls::Cap;
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => KvmUnavailable::Missing,
        libc::EACCES | libc::EPERM => KvmUnavailable::PermissionDenied,
        _ => KvmUnavailable::Other(std::io::Error::from_raw_os_error(e.errno())),
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(KvmUnavailable::ApiVersion(version));
    }
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel interrupt controller"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Ioeventfd, "ioeventfd"),
        (Cap::UserMemory, "user memory regions"),
        (Cap::Pit2, "the in-kernel PIT"),
        (Cap::ImmediateExit, "immediate exit"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(KvmUnavailable::MissingCapability(name));
        }
    }
    Ok(kvm)
}

/// True when `/dev/kvm` is PVM (`kvm_pvm`), a software hypervisor that runs small guests but
/// not a stock Linux kernel.
pub fn is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The one-line explanation for a guest that PVM could not emulate.
pub const PVM_CANNOT_RUN_LINUX: &str = "this host's /dev/kvm is PVM (kvm_pvm), a software hypervisor without hardware virtualization: it runs small guests but cannot run a stock Linux kernel. Use a host with hardware KVM (vmx/svm)";
