//! The QEMU engine: the same [`VmConfig`] run by Debian's `qemu-system-x86_64` on its microvm
//! machine, with guest RAM in a shared memfd and the vhost-user devices connected to cvm's own
//! backends. TCG where the host has no hardware KVM (this is how the full stack is tested on
//! PVM hosts), KVM where it has.
//!
//! QEMU dies with cvm: it gets SIGKILL when cvm's main thread exits, however cvm exits.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::{Error, Result, VhostUserKind, VmConfig};

/// How QEMU runs the guest's CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware KVM.
    Kvm,
    /// QEMU's software CPU: slow, but runs anywhere. Its TSC is the host's, so a guest told
    /// the host's rate (`tsc_early_khz`) need not calibrate it against the emulated PIT: a
    /// calibration that costs boot time under TCG and, on a loaded host, fails now and then,
    /// leaving the guest without a TSC clock (and a KVM inside it unable to run guests).
    Tcg { tsc_khz: Option<u64> },
}

impl Accel {
    /// KVM when the host has hardware virtualization, TCG otherwise (PVM included: QEMU
    /// cannot run a stock kernel there either).
    pub fn for_this_host() -> Accel {
        match crate::host::open_kvm() {
            Ok(_) if !crate::host::is_pvm() => Accel::Kvm,
            _ => Accel::Tcg { tsc_khz: crate::host::tsc_khz() },
        }
    }
}

#[derive(Clone, Debug)]
pub struct QemuOptions {
    pub binary: PathBuf,
    pub accel: Accel,
}

impl Default for QemuOptions {
    fn default() -> Self {
        Self { binary: "qemu-system-x86_64".into(), accel: Accel::for_this_host() }
    }
}

/// The virtio-mmio transports QEMU's microvm machine has without ACPI (`ioapic2` needs ACPI).
pub const MICROVM_TRANSPORTS: usize = 8;

/// QEMU's arguments for `config`.
pub fn arguments(config: &VmConfig, accel: Accel) -> Vec<OsString> {
    let mib = config.memory_bytes >> 20;
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    push(&["-M", "microvm,acpi=off,memory-backend=ram"]);
    match accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        // Every feature TCG can emulate (AVX2 included): Claude Code's binary needs more than
        // the default qemu64 model has.
        Accel::Tcg { .. } => push(&["-accel", "tcg", "-cpu", "max"]),
    }
    push(&["-m", &format!("{mib}M"), "-smp", &config.vcpus.to_string()]);
    push(&["-object", &format!("memory-backend-memfd,id=ram,size={mib}M,share=on")]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
    // QEMU's own seccomp filter: no obsolete calls, no privilege changes, no new processes,
    // no scheduler or resource changes.
    push(&["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]);
    // Modern (version 2) virtio-mmio, as cvm's own VMM: QEMU defaults to the legacy layout.
    push(&["-global", "virtio-mmio.force-legacy=false"]);
    // With a console log, QEMU's standard output goes to cvm, which bounds the log.
    push(&["-serial", "stdio"]);
    args.push("-kernel".into());
    args.push(config.kernel.clone().into());
    if let Some(initrd) = &config.initrd {
        args.push("-initrd".into());
        args.push(initrd.clone().into());
    }
    args.push("-append".into());
    args.push(match accel {
        Accel::Tcg { tsc_khz: Some(khz) } => format!("{} tsc_early_khz={khz}", config.cmdline).into(),
        _ => config.cmdline.clone().into(),
    });
    if config.rng {
        args.extend(["-device".into(), "virtio-rng-device".into()]);
    }
    for (index, disk) in config.disks.iter().enumerate() {
        let mut drive = OsString::from("file=");
        // QEMU's option syntax doubles a comma inside a value.
        drive.push(disk.path.to_string_lossy().replace(',', ",,"));
        drive.push(format!(",format=raw,if=none,id=disk{index},readonly={}", if disk.read_only { "on" } else { "off" }));
        args.extend(["-drive".into(), drive, "-device".into(), format!("virtio-blk-device,drive=disk{index}").into()]);
    }
    if let Some(net) = &config.network {
        let mut netdev = OsString::from("stream,id=net0,server=off,addr.type=unix,addr.path=");
        netdev.push(net.socket.to_string_lossy().replace(',', ",,"));
        let mac = net.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        args.extend(["-netdev".into(), netdev, "-device".into(), format!("virtio-net-device,netdev=net0,mac={mac}").into()]);
    }
    for (index, vhost) in config.vhost_user.iter().enumerate() {
        let mut chardev = OsString::from(format!("socket,id=vhost{index},path="));
        chardev.push(&vhost.socket);
        args.extend(["-chardev".into(), chardev]);
        let device = match &vhost.kind {
            VhostUserKind::Vsock => format!("vhost-user-vsock-device,chardev=vhost{index}"),
            VhostUserKind::Fs { tag } => format!(
                "vhost-user-fs-device,chardev=vhost{index},tag={tag},queue-size={}",
                cvm_devices::virtio::VhostUserDeviceKind::FS.queue_size
            ),
        };
        args.extend(["-device".into(), device.into()]);
    }
    args
}

/// A running QEMU.
pub struct QemuVm {
    child: Child,
    pidfd: OwnedFd,
    /// Copies the console into its log until QEMU exits.
    console_relay: Option<std::thread::JoinHandle<()>>,
}

impl QemuVm {
    pub fn spawn(config: &VmConfig, options: &QemuOptions) -> Result<QemuVm> {
        config.validate()?;
        config.check_device_count("QEMU's microvm machine", MICROVM_TRANSPORTS)?;
        let mut command = Command::new(&options.binary);
        command.args(arguments(config, options.accel)).stdin(Stdio::null());
        if config.console_log.is_some() {
            command.stdout(Stdio::piped());
        }
        // Its own process group: a Ctrl-C at the terminal is cvm's to forward, not QEMU's.
        command.process_group(0);
        cvm_sandbox::process::die_with_parent(&mut command);
        let mut child = command
            .spawn()
            .map_err(|e| Error::Config(format!("cannot start {}: {e} (Debian package qemu-system-x86)", options.binary.display())))?;
        let console_relay = match (&config.console_log, child.stdout.take()) {
            (Some(path), Some(stdout)) => {
                Some(crate::console_log::relay(stdout, path).map_err(|source| Error::File { path: path.clone(), source })?)
            }
            _ => None,
        };
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id(), 0) } as i32;
        if fd < 0 {
            return Err(Error::Io(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh pidfd that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(QemuVm { child, pidfd, console_relay })
    }

    /// Readable once QEMU has exited.
    pub fn exit_fd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    pub fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        let status = self.child.wait()?;
        self.console_written();
        Ok(status)
    }

    /// QEMU's exit status if it has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        let status = self.child.try_wait()?;
        if status.is_some() {
            self.console_written();
        }
        Ok(status)
    }

    /// Once QEMU has exited: waits until all it wrote to the console is in the log.
    fn console_written(&mut self) {
        if let Some(relay) = self.console_relay.take() {
            let _ = relay.join();
        }
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VhostUserConfig;

    #[test]
    fn arguments_carry_the_whole_config() {
        let mut config = VmConfig::new("/k/vmlinux");
        config.initrd = Some("/k/initrd".into());
        config.vcpus = 2;
        config.memory_bytes = 256 << 20;
        config.rng = false;
        config.console_log = Some("/run/x/console.log".into());
        config.vhost_user.push(VhostUserConfig { socket: "/run/x/vsock.vhost".into(), kind: VhostUserKind::Vsock });
        config
            .vhost_user
            .push(VhostUserConfig { socket: "/run/x/fs-project.vhost".into(), kind: VhostUserKind::Fs { tag: "project".into() } });
        config.disks.push(crate::DiskConfig { path: "/img/root,1.erofs".into(), read_only: true });
        config.network = Some(crate::NetConfig { socket: "/run/x/net.sock".into(), mac: [0x52, 0x54, 0, 0xab, 0xcd, 0xef] });
        let args: Vec<String> = arguments(&config, Accel::Tcg { tsc_khz: None }).into_iter().map(|a| a.into_string().unwrap()).collect();
        let line = args.join(" ");
        for want in [
            "-M microvm,acpi=off,memory-backend=ram",
            "-accel tcg",
            "-m 256M -smp 2",
            "memory-backend-memfd,id=ram,size=256M,share=on",
            "-serial stdio",
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-kernel /k/vmlinux -initrd /k/initrd",
            "-chardev socket,id=vhost0,path=/run/x/vsock.vhost -device vhost-user-vsock-device,chardev=vhost0",
            "-chardev socket,id=vhost1,path=/run/x/fs-project.vhost -device vhost-user-fs-device,chardev=vhost1,tag=project,queue-size=1024",
            "-no-reboot",
            "-netdev stream,id=net0,server=off,addr.type=unix,addr.path=/run/x/net.sock -device virtio-net-device,netdev=net0,mac=52:54:00:ab:cd:ef",
            "-drive file=/img/root,,1.erofs,format=raw,if=none,id=disk0,readonly=on -device virtio-blk-device,drive=disk0",
        ] {
            assert!(line.contains(want), "{want:?} missing from {line}");
        }
        assert!(!line.contains("virtio-rng"));
        let append = args.iter().position(|a| a == "-append").unwrap();
        assert_eq!(args[append + 1], config.cmdline, "the command line is one argument");
    }

    /// QEMU itself, stopped before it runs anything: it takes exactly [`MICROVM_TRANSPORTS`]
    /// virtio devices on cvm's machine options.
    #[test]
    fn microvm_has_the_transports_cvm_counts_on() {
        let binary = QemuOptions::default().binary;
        if Command::new(&binary).arg("--version").output().is_err() {
            return;
        }
        let starts = |devices: usize| {
            let mut command = Command::new(&binary);
            command.args(["-M", "microvm,acpi=off", "-global", "virtio-mmio.force-legacy=false", "-S", "-nodefaults", "-display", "none"]);
            for _ in 0..devices {
                command.args(["-device", "virtio-rng-device"]);
            }
            // Its monitor on stdin says quit once QEMU is up; one that cannot start ends first.
            command.args(["-monitor", "stdio"]);
            let mut child = command.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
            let _ = std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"quit\n");
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() || err.contains("No 'virtio-bus' bus found"), "{}: {err}", out.status);
            out.status.success()
        };
        assert!(starts(MICROVM_TRANSPORTS));
        assert!(!starts(MICROVM_TRANSPORTS + 1));
    }

    #[test]
    fn under_tcg_the_guest_is_told_the_hosts_tsc_rate() {
        let config = VmConfig::new("/k/vmlinux");
        let append = |accel| {
            let args: Vec<String> = arguments(&config, accel).into_iter().map(|a| a.into_string().unwrap()).collect();
            args[args.iter().position(|a| a == "-append").unwrap() + 1].clone()
        };
        assert_eq!(append(Accel::Tcg { tsc_khz: Some(2_596_134) }), format!("{} tsc_early_khz=2596134", config.cmdline));
        assert_eq!(append(Accel::Tcg { tsc_khz: None }), config.cmdline);
        assert_eq!(append(Accel::Kvm), config.cmdline, "KVM gives the guest kvmclock");
    }

    #[test]
    fn the_hosts_tsc_rate_is_measured_where_it_is_constant() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let constant = cpuinfo.contains(" constant_tsc") && cpuinfo.contains(" nonstop_tsc");
        match crate::host::tsc_khz() {
            // Between 100 MHz and 10 GHz: a rate, not noise.
            Some(khz) => assert!(constant && (100_000..10_000_000).contains(&khz), "{khz} kHz"),
            None => assert!(!constant, "a constant TSC must be measured"),
        }
    }
}
