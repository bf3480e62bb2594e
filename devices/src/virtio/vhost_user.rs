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
    pub const FS: VhostUserDeviceKind = VhostUserDeviceKind { device_type: 26, num_queues: 2, queue_size: 1024, config_len: FS_TAG_LEN as u32 + 4 };
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
                let (_, payload) = frontend
                    .get_config(0, kind.config_len, VhostUserConfigFlags::WRITABLE, &buf)
                    .map_err(vhost_err("GET_CONFIG"))?;
                config = payload;
            }
        }
        Ok(Self { frontend, kind, queue_sizes: vec![kind.queue_size; kind.num_queues], backend_features, config })
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
            self.frontend.set_vring_base(index, 0).map_err(vhost_err("SET_VRING_BASE"))?;
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

    fn activate(&mut self, features: u64, mem: GuestMemory, queues: Vec<ActiveQueue>, interrupt: Arc<Interrupt>) -> io::Result<Option<Subscriber>> {
        let protocol = self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend.set_features(features | protocol).map_err(vhost_err("SET_FEATURES"))?;
        let regions = mem
            .iter()
            .map(|region| {
                VhostUserMemoryRegionInfo::from_guest_region(region)
                    .map_err(|e| io::Error::other(format!("vhost-user: guest RAM at {:#x} cannot be shared: {e}", region.start_addr().0)))
            })
            .collect::<io::Result<Vec<_>>>()?;
        self.frontend.set_mem_table(&regions).map_err(vhost_err("SET_MEM_TABLE"))?;
        self.setup_queues(&mem, &queues, &interrupt)?;
        interrupt.set_signalled_by_backend();
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    //! The frontend and cvm's vsock backend speaking vhost-user to each other, driven by a
    //! virtual guest through the virtio-mmio registers.

    use std::io::Write as _;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixListener;
    use std::sync::Mutex;

    use event_manager::EventManager;
    use virtio_bindings::virtio_mmio::*;
    use vm_memory::{Bytes, FileOffset, GuestMemoryMmap};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::virtual_guest::{GuestQueue, MmioDriver};
    use crate::virtio::MmioTransport;
    use crate::vsock::VsockServer;

    const GUEST_CID: u64 = 3;

    #[test]
    fn a_file_systems_config_space_is_its_tag_cut_to_the_field_and_one_request_queue() {
        let config = fs_config_space("project");
        assert_eq!(config.len(), VhostUserDeviceKind::FS.config_len as usize);
        assert_eq!(&config[..7], b"project");
        assert!(config[7..FS_TAG_LEN].iter().all(|b| *b == 0));
        assert_eq!(config[FS_TAG_LEN..], 1u32.to_le_bytes());
        let long = "t".repeat(FS_TAG_LEN + 10);
        assert_eq!(&fs_config_space(&long)[..FS_TAG_LEN], &long.as_bytes()[..FS_TAG_LEN]);
        // The backend's server takes tags of the same length.
        assert_eq!(FS_TAG_LEN, virtiofsd::vhost_user::MAX_TAG_LEN);
    }

    fn wait_readable(fd: &impl AsRawFd) -> bool {
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY (test): one pollfd that outlives the call.
        unsafe { libc::poll(&mut pfd, 1, 10_000) == 1 }
    }

    #[test]
    fn a_guest_reaches_a_host_socket_through_the_frontend_and_the_backend() {
        let dir = tempfile::tempdir().unwrap();
        let ram = tempfile::tempfile().unwrap();
        ram.set_len(16 << 20).unwrap();
        let mem: GuestMemory =
            GuestMemoryMmap::from_ranges_with_files(&[(GuestAddress(0), 16 << 20, Some(FileOffset::new(ram, 0)))]).unwrap();
        let vhost_path = dir.path().join("vsock.vhost");
        let server = VsockServer::start(GUEST_CID, &dir.path().join("v.sock"), UnixListener::bind(&vhost_path).unwrap()).unwrap();
        let host_listener = UnixListener::bind(dir.path().join("v.sock_1234")).unwrap();

        let kind = VhostUserDeviceKind { queue_size: 256, ..VhostUserDeviceKind::VSOCK };
        let device = VhostUserDevice::connect(UnixStream::connect(&vhost_path).unwrap(), kind, DeviceConfig::FromBackend).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let event_loop = EventManager::<Subscriber>::new().unwrap();
        let transport = MmioTransport::new(Box::new(device), mem.clone(), Arc::new(Interrupt::new(irq.try_clone().unwrap())), event_loop.remote_endpoint()).unwrap();
        let transport = Arc::new(Mutex::new(transport));
        let d = MmioDriver(transport.clone());

        assert_eq!(d.read(VIRTIO_MMIO_DEVICE_ID), VhostUserDeviceKind::VSOCK.device_type);
        assert_eq!(u64::from(d.read(0x100)), GUEST_CID, "the guest CID from the backend's config space");
        d.negotiate();
        let mut queues: Vec<GuestQueue> = (0..3).map(|i| GuestQueue::new(0x1000 + i * 0x4000, 256)).collect();
        for (i, q) in queues.iter().enumerate() {
            d.setup_queue(i as u32, q);
        }
        d.driver_ok();
        assert_ne!(d.read(VIRTIO_MMIO_STATUS) & 4, 0, "DRIVER_OK accepted");

        // RX buffers, then a connection request to host port 1234 on TX, and the kick.
        for i in 0..8u64 {
            queues[0].push(&mem, &[(0x10_0000 + i * 4096, 4096, true)]);
        }
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&GUEST_CID.to_le_bytes());
        hdr.extend_from_slice(&2u64.to_le_bytes());
        hdr.extend_from_slice(&5000u32.to_le_bytes());
        hdr.extend_from_slice(&1234u32.to_le_bytes());
        hdr.extend_from_slice(&0u32.to_le_bytes());
        hdr.extend_from_slice(&1u16.to_le_bytes()); // stream
        hdr.extend_from_slice(&1u16.to_le_bytes()); // REQUEST
        hdr.extend_from_slice(&[0u8; 4]);
        hdr.extend_from_slice(&65536u32.to_le_bytes());
        hdr.extend_from_slice(&0u32.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(0x20_0000)).unwrap();
        queues[1].push(&mem, &[(0x20_0000, hdr.len() as u32, false)]);
        transport.lock().unwrap().kick_events()[1].write(1).unwrap();

        let (mut host, _) = host_listener.accept().unwrap();
        assert!(wait_readable(&irq), "the backend interrupts the guest through the irqfd");
        assert_eq!(d.read(VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_INT_VRING, "used-buffer bit reported");
        // The TX and RX interrupts may come one at a time.
        let mut used = queues[0].take_used(&mem);
        while used.is_empty() {
            let _ = irq.read();
            assert!(wait_readable(&irq), "no RX interrupt");
            used = queues[0].take_used(&mem);
        }
        assert_eq!(used.len(), 1);
        let op: u16 = mem.read_obj(GuestAddress(0x10_0000 + 30)).unwrap();
        assert_eq!(op, 2, "RESPONSE");
        host.write_all(b"x").unwrap();

        drop(d);
        drop(transport);
        server.join();
    }
}
