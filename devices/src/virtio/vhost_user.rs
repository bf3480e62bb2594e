//! A generic vhost-user frontend: the guest's virtio-mmio device whose queues are served by a
//! backend on the other end of a Unix socket (cvm's embedded vsock and fs backends).
//!
//! Set-up follows the order cloud-hypervisor uses: owner, features, protocol features and the
//! config space at connect time; then, when the driver sets DRIVER_OK, the acknowledged
//! features, the memory table (the memfd behind guest RAM, so the backend maps the same
//! pages), and per queue its size, addresses, base, call and kick eventfds, and enable. The
//! call eventfd is the device's irqfd: the backend interrupts the guest directly, so the
//! transport must report "used buffer" in InterruptStatus without seeing the interrupt.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemory as _, GuestMemoryRegion};

use super::{ActiveQueue, GuestMemory, Interrupt, Subscriber, VirtioDevice};

/// The protocol features cvm uses when the backend offers them.
const WANTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::CONFIG;

fn vhost_err(what: &'static str) -> impl Fn(vhost::Error) -> io::Error {
    move |e| io::Error::other(format!("vhost-user {what}: {e}"))
}

/// What kind of device a backend provides, as the frontend needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VhostUserDeviceKind {
    pub device_type: u32,
    pub num_queues: usize,
    pub queue_size: u16,
    /// Bytes of config space to fetch from the backend (0: none).
    pub config_len: u32,
}

/// The vhost-user devices cvm's frontends (its own VMM's and QEMU's) give a guest, as the
/// guest sees them. The backends serve what these say; they never define it.
impl VhostUserDeviceKind {
    /// virtio-vsock: rx, tx and event queues; 1024-entry rings, as QEMU's
    /// vhost-user-vsock-device has; the config space is the guest's CID (le64).
    pub const VSOCK: VhostUserDeviceKind = VhostUserDeviceKind { device_type: 19, num_queues: 3, queue_size: 1024, config_len: 8 };
    /// virtio-fs: the high-priority queue and one request queue; the config space is the tag
    /// ([`FS_TAG_LEN`] bytes) and the number of request queues (le32).
    pub const FS: VhostUserDeviceKind =
        VhostUserDeviceKind { device_type: 26, num_queues: 2, queue_size: 1024, config_len: FS_TAG_LEN as u32 + 4 };
}

/// The longest tag a virtio-fs config space holds.
pub const FS_TAG_LEN: usize = 36;

/// A virtio-fs device's config space for `tag` (cut to [`FS_TAG_LEN`] bytes) and one request
/// queue: the frontend's to give, as QEMU's `tag=` is.
pub fn fs_config_space(tag: &str) -> Vec<u8> {
    let mut config = vec![0u8; VhostUserDeviceKind::FS.config_len as usize];
    let tag = &tag.as_bytes()[..tag.len().min(FS_TAG_LEN)];
    config[..tag.len()].copy_from_slice(tag);
    config[FS_TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
    config
}

/// Where a device's config space comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceConfig {
    /// Asked of the backend (GET_CONFIG), `config_len` bytes.
    FromBackend,
    /// Known to the frontend, as QEMU knows a file system's tag: the backend needs no config.
    Local(Vec<u8>),
}

pub struct VhostUserDevice {
    frontend: Frontend,
    kind: VhostUserDeviceKind,
    queue_sizes: Vec<u16>,
    backend_features: u64,
    config: Vec<u8>,
    /// The queues the backend serves now (handed over at activation, until a reset).
    started: Vec<usize>,
}

impl VhostUserDevice {
    /// Negotiates with the backend on `socket` what can be negotiated before the guest runs.
    pub fn connect(socket: UnixStream, kind: VhostUserDeviceKind, device_config: DeviceConfig) -> io::Result<Self> {
        let mut frontend = Frontend::from_stream(socket, kind.num_queues as u64);
        frontend.set_owner().map_err(vhost_err("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(vhost_err("GET_FEATURES"))?;
        let (mut config, from_backend) = match device_config {
            DeviceConfig::Local(bytes) => (bytes, false),
            DeviceConfig::FromBackend => (Vec::new(), true),
        };
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = frontend.get_protocol_features().map_err(vhost_err("GET_PROTOCOL_FEATURES"))?;
            let used = offered & WANTED_PROTOCOL_FEATURES;
            frontend.set_protocol_features(used).map_err(vhost_err("SET_PROTOCOL_FEATURES"))?;
            if from_backend && used.contains(VhostUserProtocolFeatures::CONFIG) && kind.config_len > 0 {
                let buf = vec![0u8; kind.config_len as usize];
                let (_, payload) =
                    frontend.get_config(0, kind.config_len, VhostUserConfigFlags::WRITABLE, &buf).map_err(vhost_err("GET_CONFIG"))?;
                config = payload;
            }
        }
        Ok(Self { frontend, kind, queue_sizes: vec![kind.queue_size; kind.num_queues], backend_features, config, started: Vec::new() })
    }

    fn setup_queues(&mut self, mem: &GuestMemory, queues: &[ActiveQueue], interrupt: &Interrupt) -> io::Result<()> {
        let host_addr = |addr: u64| -> io::Result<u64> {
            mem.get_host_address(GuestAddress(addr))
                .map(|p| p as u64)
                .map_err(|e| io::Error::other(format!("vhost-user: ring at {addr:#x} is not in guest RAM: {e}")))
        };
        for active in queues {
            let (index, q) = (active.index, &active.queue);
            self.frontend.set_vring_num(index, q.size()).map_err(vhost_err("SET_VRING_NUM"))?;
            let addrs = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host_addr(q.desc_table())?,
                used_ring_addr: host_addr(q.used_ring())?,
                avail_ring_addr: host_addr(q.avail_ring())?,
                log_addr: None,
            };
            self.frontend.set_vring_addr(index, &addrs).map_err(vhost_err("SET_VRING_ADDR"))?;
            // From where the driver is: 0 on a first start, the saved index on a restore.
            self.frontend.set_vring_base(index, q.next_avail()).map_err(vhost_err("SET_VRING_BASE"))?;
            self.frontend.set_vring_call(index, interrupt.irqfd()).map_err(vhost_err("SET_VRING_CALL"))?;
            self.frontend.set_vring_kick(index, &active.kick).map_err(vhost_err("SET_VRING_KICK"))?;
        }
        if self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            for index in queues.iter().map(|q| q.index) {
                self.frontend.set_vring_enable(index, true).map_err(vhost_err("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.kind.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        // Both are vhost-user's own bits, not the device's: never offered to the guest.
        self.backend_features & !(VhostUserVirtioFeatures::PROTOCOL_FEATURES | VhostUserVirtioFeatures::LOG_ALL).bits()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        features: u64,
        mem: GuestMemory,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<Interrupt>,
    ) -> io::Result<Option<Subscriber>> {
        let protocol = self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend.set_features(features | protocol).map_err(vhost_err("SET_FEATURES"))?;
        // A private mapping (in a restored guest, memory no device touches: the kernel's code,
        // its kept initrd, its struct pages) is the VMM's own: no other process can map it.
        let regions = mem
            .iter()
            .filter(|region| region.flags() & libc::MAP_PRIVATE == 0)
            .map(|region| {
                VhostUserMemoryRegionInfo::from_guest_region(region)
                    .map_err(|e| io::Error::other(format!("vhost-user: guest RAM at {:#x} cannot be shared: {e}", region.start_addr().0)))
            })
            .collect::<io::Result<Vec<_>>>()?;
        self.frontend.set_mem_table(&regions).map_err(vhost_err("SET_MEM_TABLE"))?;
        self.setup_queues(&mem, &queues, &interrupt)?;
        self.started = queues.iter().map(|q| q.index).collect();
        interrupt.set_signalled_by_backend();
        Ok(None)
    }

    /// The backend stops each queue it serves (GET_VRING_BASE), as the driver's reset asks;
    /// the next activation sets them up again from the start.
    fn reset(&mut self) -> io::Result<()> {
        let protocol = self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        for index in std::mem::take(&mut self.started) {
            if protocol {
                self.frontend.set_vring_enable(index, false).map_err(vhost_err("SET_VRING_ENABLE"))?;
            }
            self.frontend.get_vring_base(index).map_err(vhost_err("GET_VRING_BASE"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_systems_config_space_is_its_tag_cut_to_the_field_and_one_request_queue() {
        let config = fs_config_space("project");
        assert_eq!(config.len(), VhostUserDeviceKind::FS.config_len as usize);
        assert_eq!(&config[..7], b"project");
        assert!(config[7..FS_TAG_LEN].iter().all(|b| *b == 0));
        assert_eq!(config[FS_TAG_LEN..], 1u32.to_le_bytes());
        let long = "t".repeat(FS_TAG_LEN + 10);
        assert_eq!(&fs_config_space(&long)[..FS_TAG_LEN], &long.as_bytes()[..FS_TAG_LEN]);
    }
}
