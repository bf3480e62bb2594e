//! What the host's KVM is: present, usable, and hardware or software (PVM).

use std::path::Path;

/// Why `/dev/kvm` cannot be used, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum KvmUnavailable {
    #[error("{0} does not exist: this host has no KVM. Enable virtualization (VT-x/AMD-V) in the firmware and load kvm_intel or kvm_amd; in a cloud VM, choose an instance type with nested virtualization")]
    Missing(std::path::PathBuf),
    #[error("{0} is not in this container: start it with --device /dev/kvm (in Kubernetes, request devices.kubevirt.io/kvm from a KVM device plugin)")]
    NotInContainer(std::path::PathBuf),
    #[error("permission denied opening {0}: add your user to the kvm group (sudo usermod -aG kvm $USER, then log in again), or run: sudo setfacl -m u:$USER:rw /dev/kvm")]
    PermissionDenied(std::path::PathBuf),
    #[error("permission denied opening {0} in this container: start it with --group-add $(stat -c %g /dev/kvm), or --user root where /dev/kvm is root's only (mode 0600)")]
    PermissionDeniedInContainer(std::path::PathBuf),
    #[error("{0} may not be used here (EPERM: the device cgroup refuses it): pass it with --device /dev/kvm or a device rule (c 10:232 rwm), not a bind mount; in Kubernetes, request devices.kubevirt.io/kvm from a KVM device plugin")]
    DeviceNotAllowed(std::path::PathBuf),
    #[error("cannot use {0} as KVM: {1}")]
    Other(std::path::PathBuf, std::io::Error),
    #[error("{0} is not a KVM device (its KVM API version is {1}, not 12)")]
    ApiVersion(std::path::PathBuf, i32),
    #[error("this host's KVM lacks {0}, which cvm needs")]
    MissingCapability(&'static str),
    #[error("{PVM_CANNOT_RUN_LINUX}")]
    Pvm,
}

/// The KVM device: `/dev/kvm`, or `$CVM_KVM_DEVICE` (to point cvm at another node, and to
/// test what happens without one).
pub fn kvm_device() -> std::path::PathBuf {
    std::env::var_os("CVM_KVM_DEVICE").map_or_else(|| "/dev/kvm".into(), Into::into)
}

/// Opens the KVM device and checks the capabilities cvm relies on.
pub fn open_kvm() -> Result<kvm_ioctls::Kvm, KvmUnavailable> {
    open_kvm_at(kvm_device())
}

/// Opens `path` as the KVM device and checks the capabilities cvm relies on.
pub fn open_kvm_at(path: std::path::PathBuf) -> Result<kvm_ioctls::Kvm, KvmUnavailable> {
    use kvm_ioctls::Cap;
    let device =
        std::ffi::CString::new(path.clone().into_os_string().into_encoded_bytes()).map_err(|_| KvmUnavailable::Missing(path.clone()))?;
    let kvm = kvm_ioctls::Kvm::new_with_path(&device).map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV if in_container() => KvmUnavailable::NotInContainer(path.clone()),
        libc::ENOENT | libc::ENXIO | libc::ENODEV => KvmUnavailable::Missing(path.clone()),
        libc::EACCES if in_container() => KvmUnavailable::PermissionDeniedInContainer(path.clone()),
        libc::EACCES => KvmUnavailable::PermissionDenied(path.clone()),
        libc::EPERM => KvmUnavailable::DeviceNotAllowed(path.clone()),
        errno => KvmUnavailable::Other(path.clone(), std::io::Error::from_raw_os_error(errno)),
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(KvmUnavailable::ApiVersion(path, version));
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

/// Opens the KVM device and checks that it can run a stock Linux kernel: what cvm's VMM needs.
pub fn hardware_kvm() -> Result<(), KvmUnavailable> {
    open_kvm()?;
    if is_pvm() {
        return Err(KvmUnavailable::Pvm);
    }
    Ok(())
}

/// True inside a container: podman's marker file, the `container` variable (systemd's
/// convention, which podman follows), a Kubernetes pod's service variables, or docker's marker
/// file on an overlay root (machines built from a docker image keep the file on their own disk).
pub fn in_container() -> bool {
    let overlay_root = || {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        // Fields: id, parent, dev, root, mount point, options, optional..., "-", type, ...
        mounts.lines().any(|l| l.split(' ').nth(4) == Some("/") && l.split(" - ").nth(1).is_some_and(|t| t.starts_with("overlay ")))
    };
    Path::new("/run/.containerenv").exists()
        || std::env::var_os("container").is_some()
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || (Path::new("/.dockerenv").exists() && overlay_root())
}

/// True when `/dev/kvm` is PVM (`kvm_pvm`), a software hypervisor that runs small guests but
/// not a stock Linux kernel.
pub fn is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The host's time-stamp counter rate in kHz, when it is constant (`constant_tsc` and
/// `nonstop_tsc`): measured once against CLOCK_MONOTONIC_RAW over a few milliseconds.
pub fn tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
        let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
        if !(has("constant_tsc") && has("nonstop_tsc")) {
            return None;
        }
        let (tsc0, ns0) = tsc_and_clock();
        std::thread::sleep(std::time::Duration::from_millis(4));
        let (tsc1, ns1) = tsc_and_clock();
        let khz = u128::from(tsc1.checked_sub(tsc0)?) * 1_000_000 / u128::from(ns1.checked_sub(ns0).filter(|&ns| ns > 0)?);
        u64::try_from(khz).ok().filter(|&khz| khz > 0)
    })
}

/// A TSC reading and CLOCK_MONOTONIC_RAW (ns) taken as close together as three tries allow,
/// so that a preemption between the two does not skew the rate.
#[cfg(target_arch = "x86_64")]
fn tsc_and_clock() -> (u64, u64) {
    (0..3)
        .map(|_| {
            // SAFETY: rdtsc reads a counter; it has no memory effects and exists on every x86_64.
            let before = unsafe { core::arch::x86_64::_rdtsc() };
            let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: clock_gettime writes the timespec we pass and nothing else.
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_RAW, &mut now) };
            // SAFETY: as above.
            let after = unsafe { core::arch::x86_64::_rdtsc() };
            let ns = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
            (after - before, before / 2 + after / 2, ns)
        })
        .min_by_key(|&(gap, _, _)| gap)
        .map(|(_, tsc, ns)| (tsc, ns))
        .unwrap_or_default()
}

#[cfg(not(target_arch = "x86_64"))]
fn tsc_and_clock() -> (u64, u64) {
    (0, 0)
}

/// The one-line explanation for a guest that PVM could not emulate.
pub const PVM_CANNOT_RUN_LINUX: &str = "this host's /dev/kvm is PVM (kvm_pvm), a software hypervisor without hardware virtualization: it runs small guests but cannot run a stock Linux kernel. Use a host with hardware KVM (vmx/svm)";
