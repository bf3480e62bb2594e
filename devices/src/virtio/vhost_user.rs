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

pub struct VhostUserDevice {
    frontend: Frontend,
    kind: VhostUserDeviceKind,
    queue_sizes: Vec<u16>,
    backend_features: u64,
    config: Vec<u8>,
}

impl VhostUserDevice {
    /// Negotiates with the backend on `socket` what can be negotiated before the guest runs.
    pub fn connect(socket: UnixStream, kind: VhostUserDeviceKind) -> io::Result<Self> {
        let mut frontend = Frontend::from_stream(socket, kind.num_queues as u64);
        frontend.set_owner().map_err(vhost_err("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(vhost_err("GET_FEATURES"))?;
        let mut config = Vec::new();
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = frontend.get_protocol_features().map_err(vhost_err("GET_PROTOCOL_FEATURES"))?;
            let used = offered & WANTED_PROTOCOL_FEATURES;
            frontend.set_protocol_features(used).map_err(vhost_err("SET_PROTOCOL_FEATURES"))?;
            if used.contains(VhostUserProtocolFeatures::CONFIG) && kind.config_len > 0 {
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
        for (index, active) in queues.iter().enumerate() {
            let q = &active.queue;
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
            for index in 0..queues.len() {
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
        self.backend_features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let start = (offset as usize).min(self.config.len());
        let end = start.saturating_add(data.len()).min(self.config.len());
        data[..end - start].copy_from_slice(&self.config[start..end]);
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
