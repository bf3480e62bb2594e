//! Virtio over MMIO: the transport ([`MmioTransport`]) and the devices that run inside the VMM.
//!
//! A device is a [`VirtioDevice`]: it describes itself (type, features, queues, config space)
//! and, once the driver sets DRIVER_OK, turns its queues into a worker that the VMM's event loop
//! runs. [`VhostUserDevice`] implements the same trait and hands its queues to a backend.

mod block;
mod mmio;
mod net;
mod rng;
mod vhost_user;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use event_manager::{MutEventSubscriber, RemoteEndpoint};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use block::Block;
pub use mmio::{MmioTransport, QueueState, TransportState, MMIO_WINDOW_SIZE};
pub use net::Net;
pub use rng::Rng;
pub use vhost_user::{fs_config_space, DeviceConfig, VhostUserDevice, VhostUserDeviceKind, FS_TAG_LEN};

/// What the VMM's event loop runs: device workers register their eventfds with it.
pub type Subscriber = Box<dyn MutEventSubscriber + Send>;
/// How a vCPU thread hands a newly activated device's worker to the event loop.
pub type EventLoopHandle = RemoteEndpoint<Subscriber>;

/// The guest RAM type every device sees.
pub type GuestMemory = GuestMemoryMmap<()>;

/// One ready queue handed to a device when the driver activates it.
pub struct ActiveQueue {
    /// The queue's index in the device (queues the driver left unused are not handed over).
    pub index: usize,
    pub queue: Queue,
    /// Written (by KVM through an ioeventfd, or by the transport) when the driver notifies.
    pub kick: EventFd,
}

/// A device's interrupt line: the InterruptStatus register and the irqfd behind it.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
    /// A vhost-user backend writes the irqfd itself, so the status bit is never raised here.
    signalled_by_backend: AtomicBool,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self { status: AtomicU32::new(0), irqfd, signalled_by_backend: AtomicBool::new(false) }
    }

    /// From now on InterruptStatus always reports "used buffer": Linux's virtio-mmio driver
    /// ignores an interrupt whose status is zero, and only the backend knows when it fired.
    pub fn set_signalled_by_backend(&self) {
        self.signalled_by_backend.store(true, Ordering::SeqCst);
    }

    /// Tells the driver that a queue has new used buffers.
    pub fn signal_used_queue(&self) {
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    /// Tells the driver that the configuration space changed.
    pub fn signal_config_change(&self) {
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("virtio: cannot raise the interrupt: {e}");
        }
    }

    fn status(&self) -> u32 {
        let backend = if self.signalled_by_backend.load(Ordering::SeqCst) { VIRTIO_MMIO_INT_VRING } else { 0 };
        self.status.load(Ordering::SeqCst) | backend
    }

    /// Back to the state of a fresh device.
    fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.signalled_by_backend.store(false, Ordering::SeqCst);
    }

    /// A saved InterruptStatus back in place, on a restore.
    fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// Serves every chain available on `queue` with `serve`, which returns how many bytes it wrote
/// into the chain; returns each as used and interrupts the driver if it asked to be told.
/// Returns how many chains were completed. Malformed chains (loops, out-of-bounds addresses,
/// bad indirect tables) are `serve`'s to answer; nothing here trusts them.
pub(crate) fn serve_queue(
    device: &str,
    queue: &mut Queue,
    mem: &GuestMemory,
    interrupt: &Interrupt,
    mut serve: impl FnMut(virtio_queue::DescriptorChain<&GuestMemory>) -> u32,
) -> usize {
    use virtio_queue::QueueT;
    let mut completed = 0;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let written = serve(chain);
        if let Err(e) = queue.add_used(mem, head, written) {
            tracing::warn!("{device}: cannot return a buffer: {e}");
            break;
        }
        completed += 1;
    }
    if completed > 0 && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used_queue();
    }
    completed
}

/// Answers a driver's read of `data.len()` bytes at `offset` in a config space whose contents
/// are `config`: bytes past its end read as zero, and no offset can overflow.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let start = usize::try_from(offset).unwrap_or(usize::MAX).min(config.len());
    let end = start.saturating_add(data.len()).min(config.len());
    data[..end - start].copy_from_slice(&config[start..end]);
}

/// The device half of a virtio device; [`MmioTransport`] is the bus half.
pub trait VirtioDevice: Send {
    /// The virtio device ID (4 for entropy, 19 for vsock, 26 for fs, ...).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let _ = offset;
        data.fill(0);
    }
    /// Writes to the device-specific configuration space; ignored unless the device has
    /// writable fields.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!("virtio: ignored config write of {} bytes at {offset:#x}", data.len());
    }
    /// The driver set DRIVER_OK with `features` acknowledged: start serving the queues.
    /// Returns the worker the event loop must run, if the device does its work there.
    fn activate(
        &mut self,
        features: u64,
        mem: GuestMemory,
        queues: Vec<ActiveQueue>,
        interrupt: std::sync::Arc<Interrupt>,
    ) -> std::io::Result<Option<Subscriber>>;
    /// The driver reset the device: whatever `activate` started on the device's side (not its
    /// worker, which the transport stops) must stop, so that a later `activate` starts afresh.
    fn reset(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn config_reads_past_the_end_or_at_absurd_offsets_read_zeroes() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        super::read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        for offset in [4, 1 << 40, u64::MAX] {
            let mut data = [0xffu8; 8];
            super::read_config_bytes(&config, offset, &mut data);
            assert_eq!(data, [0; 8], "offset {offset}");
        }
    }
}
