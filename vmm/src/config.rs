use std::path::PathBuf;

use crate::{Error, Result};

macro_rules! retain_initrd {
    () => {
        "retain_initrd"
    };
}

/// The kernel argument that keeps the initrd's memory reserved once unpacked, instead of
/// freeing it for reuse: memory no device then touches, which warm starts share.
pub const RETAIN_INITRD: &str = retain_initrd!();

/// The kernel command line `cvm boot` uses unless told otherwise: the console on the serial
/// port, reboot through the i8042 (which ends the VM), no wait on panic, and the initrd kept.
pub const DEFAULT_CMDLINE: &str = concat!("console=ttyS0 reboot=k panic=-1 ", retain_initrd!());

/// A virtual machine, as plain data. [`crate::Vm::create`] turns it into live objects.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// A vmlinux (ELF, PVH entry preferred, else its 64-bit entry) or a bzImage.
    pub kernel: PathBuf,
    /// An initramfs, loaded at the top of low memory.
    pub initrd: Option<PathBuf>,
    /// The kernel command line; the VMM appends its devices' `virtio_mmio.device=` arguments.
    pub cmdline: String,
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Give the guest a virtio-rng entropy device.
    pub rng: bool,
    /// Forward the host's standard input to the serial console.
    pub serial_input: bool,
    /// Where the serial console's output goes: this file, or the host's standard output.
    pub console_log: Option<PathBuf>,
    /// Devices served by vhost-user backends (cvm's own vsock and fs servers).
    pub vhost_user: Vec<VhostUserConfig>,
    /// Disk images as virtio-blk devices, in order: the first is the guest's /dev/vda.
    pub disks: Vec<DiskConfig>,
    /// A virtio-net device, for `--network open`.
    pub network: Option<NetConfig>,
    /// Read KVM's exit counters of every vCPU when the VM ends ([`crate::VmExit::exits`]).
    pub count_exits: bool,
    /// Pause the VM when the guest reaches its init (writes the boot timer), before its next
    /// instruction: where a warm-start snapshot is taken ([`crate::VmHandle::snapshot`]).
    pub pause_at_init: bool,
    /// Resume the snapshot in this directory instead of booting the kernel. The rest of the
    /// config must describe the same machine (vCPUs, memory, devices in the same order).
    pub restore: Option<PathBuf>,
}

/// A virtio-net device whose wire is a stream socket (QEMU's stream protocol: each frame after
/// its 32-bit big-endian length), as a userspace network stack such as passt serves it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// Where the network stack listens; the engine connects to it.
    pub socket: PathBuf,
    pub mac: [u8; 6],
}

/// A disk image file as the guest sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// Refused by the device itself, not only by a guest mount flag.
    pub read_only: bool,
}

/// A device whose queues a vhost-user backend serves.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VhostUserConfig {
    /// The backend's listening socket.
    pub socket: PathBuf,
    pub kind: VhostUserKind,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VhostUserKind {
    Vsock,
    /// virtio-fs; the guest mounts it by `tag` (the backend reports it in its config space
    /// too, but QEMU takes it as a property).
    Fs {
        tag: String,
    },
}

impl VhostUserKind {
    /// The device's config space: the vsock backend reports its CID; a file system's tag is
    /// the frontend's to give, as QEMU's `tag=` is.
    pub fn device_config(&self) -> cvm_devices::virtio::DeviceConfig {
        use cvm_devices::virtio::DeviceConfig;
        match self {
            VhostUserKind::Vsock => DeviceConfig::FromBackend,
            VhostUserKind::Fs { tag } => DeviceConfig::Local(cvm_devices::virtio::fs_config_space(tag)),
        }
    }

    pub fn device_kind(&self) -> cvm_devices::virtio::VhostUserDeviceKind {
        use cvm_devices::virtio::VhostUserDeviceKind;
        match self {
            VhostUserKind::Vsock => VhostUserDeviceKind::VSOCK,
            VhostUserKind::Fs { .. } => VhostUserDeviceKind::FS,
        }
    }
}

impl VmConfig {
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            vcpus: 1,
            memory_bytes: 512 << 20,
            rng: true,
            serial_input: true,
            console_log: None,
            vhost_user: Vec::new(),
            disks: Vec::new(),
            network: None,
            count_exits: false,
            pause_at_init: false,
            restore: None,
        }
    }

    /// The virtio devices the VM gets, one virtio-mmio transport each, by kind: what a
    /// refusal names.
    pub fn virtio_devices(&self) -> Vec<&'static str> {
        let mut devices = Vec::new();
        if self.rng {
            devices.push("rng");
        }
        devices.extend(self.disks.iter().map(|_| "disk"));
        devices.extend(self.network.iter().map(|_| "network"));
        devices.extend(self.vhost_user.iter().map(|v| match v.kind {
            VhostUserKind::Vsock => "vsock",
            VhostUserKind::Fs { .. } => "share",
        }));
        devices
    }

    /// Refuses more virtio devices than `engine` has transports for, naming them.
    pub fn check_device_count(&self, engine: &str, transports: usize) -> Result<()> {
        let devices = self.virtio_devices();
        if devices.len() <= transports {
            return Ok(());
        }
        let mut counted: Vec<String> = Vec::new();
        for kind in ["rng", "disk", "network", "vsock", "share"] {
            match devices.iter().filter(|d| **d == kind).count() {
                0 => {}
                1 => counted.push(kind.to_string()),
                n => counted.push(format!("{n} {kind}s")),
            }
        }
        Err(Error::Config(format!(
            "this VM needs {} virtio devices ({}) and {engine} has room for {transports}: mount fewer directories (each --mount and share is one), or use --vmm cvm",
            devices.len(),
            counted.join(", ")
        )))
    }

    /// Checks what can be checked without touching KVM, so bad input fails fast and clearly,
    /// the same on either engine.
    pub fn validate(&self) -> Result<()> {
        self.check_device_count("cvm's VMM", (crate::layout::IRQ_COUNT - crate::layout::VIRTIO_IRQ_START) as usize)?;
        if self.vcpus == 0 || usize::from(self.vcpus) > crate::arch::x86_64::MAX_VCPUS {
            return Err(Error::Config(format!("--cpus must be between 1 and {}, not {}", crate::arch::x86_64::MAX_VCPUS, self.vcpus)));
        }
        if self.memory_bytes < crate::layout::MIN_MEMORY {
            return Err(Error::Config(format!("--memory must be at least {} MiB", crate::layout::MIN_MEMORY >> 20)));
        }
        if !self.memory_bytes.is_multiple_of(crate::layout::PAGE_SIZE) {
            return Err(Error::Config("--memory must be a whole number of 4 KiB pages".into()));
        }
        // A restored VM's kernel is in its snapshot's memory.
        let boots = self.restore.is_none();
        let kernel = boots.then_some(&self.kernel).into_iter().chain(self.initrd.as_ref().filter(|_| boots));
        for path in kernel.chain(self.disks.iter().map(|d| &d.path)) {
            let meta = std::fs::metadata(path).map_err(|source| Error::File { path: path.clone(), source })?;
            if !meta.is_file() {
                return Err(Error::Config(format!("{} is not a regular file", path.display())));
            }
        }
        if boots {
            crate::arch::x86_64::kernel_format(&self.kernel)?;
        }
        crate::vstate::memory::check_host_can_give(self.memory_bytes)?;
        Ok(())
    }
}

/// Parses a memory size: a whole number with an optional binary unit (`K`, `M`, `G`, `T`,
/// optionally followed by `i`/`iB`/`B`), case-insensitive. A bare number means MiB, as in
/// QEMU's `-m` and Firecracker's `mem_size_mib`.
pub fn parse_memory_size(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!("invalid memory size {text:?}: expected a number like 512M or 2G"));
    }
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mi" | "mib" => 20,
        "k" | "kb" | "ki" | "kib" => 10,
        "g" | "gb" | "gi" | "gib" => 30,
        "t" | "tb" | "ti" | "tib" => 40,
        _ => return Err(format!("invalid memory size {text:?}: unknown unit {unit:?} (use K, M, G or T)")),
    };
    let value: u64 = digits.parse().map_err(|_| format!("invalid memory size {text:?}: too large"))?;
    let bytes = value.checked_mul(1 << shift).ok_or_else(|| format!("invalid memory size {text:?}: too large"))?;
    if bytes == 0 {
        return Err("memory size must be greater than zero".into());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_size("512M"), Ok(512 << 20));
        assert_eq!(parse_memory_size("2G"), Ok(2 << 30));
        assert_eq!(parse_memory_size("2gib"), Ok(2 << 30));
        assert_eq!(parse_memory_size("256"), Ok(256 << 20));
        assert_eq!(parse_memory_size("64K"), Ok(64 << 10));
        assert_eq!(parse_memory_size(" 1T "), Ok(1 << 40));
    }

    #[test]
    fn hostile_memory_sizes() {
        for bad in ["", "G", "-1G", "1.5G", "0", "0M", "12X", "1GG", "99999999999999999999", "17179869184T", "1 G"] {
            assert!(parse_memory_size(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn a_file_systems_config_space_carries_its_tag() {
        let config = VhostUserKind::Fs { tag: "project".into() }.device_config();
        let cvm_devices::virtio::DeviceConfig::Local(bytes) = config else { panic!("the frontend gives the tag") };
        assert_eq!(bytes.len(), 40);
        assert_eq!(&bytes[..8], b"project\0");
        assert!(bytes[8..36].iter().all(|&b| b == 0));
        assert_eq!(&bytes[36..], &1u32.to_le_bytes(), "one request queue");
        assert_eq!(VhostUserKind::Vsock.device_config(), cvm_devices::virtio::DeviceConfig::FromBackend);
    }

    #[test]
    fn validation() {
        let dir = std::env::temp_dir();
        let mut config = VmConfig::new(dir.join("no-such-kernel"));
        assert!(matches!(config.validate(), Err(Error::File { .. })));
        // This test program is an ELF file, but a program, not a kernel.
        config.kernel = std::env::current_exe().unwrap();
        assert!(matches!(config.validate(), Err(Error::NotAKernel { .. })));
        // The headers of a 64-bit x86 executable are what a vmlinux is checked for up front.
        let kernel = tempfile::NamedTempFile::new().unwrap();
        let mut header = [0u8; 64];
        header[..5].copy_from_slice(b"\x7fELF\x02");
        header[16..18].copy_from_slice(&2u16.to_le_bytes());
        header[18..20].copy_from_slice(&62u16.to_le_bytes());
        std::fs::write(kernel.path(), header).unwrap();
        config.kernel = kernel.path().to_path_buf();
        assert!(config.validate().is_ok());
        config.memory_bytes = 1 << 50;
        assert!(matches!(config.validate(), Err(Error::Config(ref why)) if why.contains("more than this host's")));
        config.memory_bytes = 64 << 20;
        config.vcpus = 0;
        assert!(config.validate().is_err());
        config.vcpus = 1;
        config.memory_bytes = 4096;
        assert!(config.validate().is_err());
        config.memory_bytes = 64 << 20;
        config.initrd = Some(dir.clone());
        assert!(config.validate().is_err(), "a directory is not an initrd");
    }

    #[test]
    fn more_devices_than_transports_are_refused_by_name() {
        let mut config = VmConfig::new("/k/vmlinux");
        config.rng = true;
        config.vhost_user.push(crate::VhostUserConfig { socket: "/v".into(), kind: VhostUserKind::Vsock });
        for tag in ["a", "b", "c"] {
            config.vhost_user.push(crate::VhostUserConfig { socket: "/s".into(), kind: VhostUserKind::Fs { tag: tag.into() } });
        }
        assert_eq!(config.virtio_devices(), ["rng", "vsock", "share", "share", "share"]);
        assert!(config.check_device_count("QEMU", 5).is_ok());
        let e = config.check_device_count("QEMU", 4).unwrap_err().to_string();
        assert!(e.contains("needs 5 virtio devices (rng, vsock, 3 shares) and QEMU has room for 4"), "{e}");
        for _ in 0..15 {
            config.vhost_user.push(crate::VhostUserConfig { socket: "/s".into(), kind: VhostUserKind::Fs { tag: "x".into() } });
        }
        assert!(
            matches!(config.validate(), Err(Error::Config(ref why)) if why.contains("cvm's VMM has room for 19")),
            "{:?}",
            config.validate()
        );
    }
}
