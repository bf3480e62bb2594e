//! cvm-virtual-guest, the virtual guest for device tests and benchmarks (a dev-dependency, and
//! `cvm bench`'s with its `bench` feature; never part of the VMM): what Linux's virtio drivers do, done by
//! a host thread. It programs a virtio-mmio transport's registers ([`MmioDriver`]) and lays out
//! split virtqueues in guest RAM, posting buffers and reading back used ones ([`GuestQueue`]);
//! [`fuse::FuseGuest`] speaks FUSE to a virtio-fs backend through them.

pub mod fuse;

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use cvm_devices::virtio::MmioTransport;

/// Programs a transport's registers as Linux's virtio_mmio driver does. Generic over the
/// transport, so that cvm-devices' own unit tests (which build the crate a second time) can
/// drive theirs.
pub struct MmioDriver<T: MutDeviceMmio = MmioTransport>(pub Arc<Mutex<T>>);

impl<T: MutDeviceMmio> MmioDriver<T> {
    pub fn read(&self, offset: u32) -> u32 {
        let mut data = [0u8; 4];
        self.0.lock().unwrap().mmio_read(MmioAddress(0), offset.into(), &mut data);
        u32::from_le_bytes(data)
    }

    pub fn write(&self, offset: u32, value: u32) {
        self.0.lock().unwrap().mmio_write(MmioAddress(0), offset.into(), &value.to_le_bytes());
    }

    /// Reset, ACKNOWLEDGE, DRIVER, the high feature word with VIRTIO_F_VERSION_1, FEATURES_OK.
    pub fn negotiate(&self) {
        self.negotiate_with(0);
    }

    /// As `negotiate`, also taking the device-specific feature bits `low` (bits 0 to 31).
    pub fn negotiate_with(&self, low: u32) {
        self.write(VIRTIO_MMIO_STATUS, 0);
        self.write(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.write(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.write(VIRTIO_MMIO_DRIVER_FEATURES, low);
        self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.write(VIRTIO_MMIO_DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
        self.write(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK);
    }

    /// Tells the device where queue `index` lives and marks it ready.
    pub fn setup_queue(&self, index: u32, queue: &GuestQueue) {
        self.write(VIRTIO_MMIO_QUEUE_SEL, index);
        self.write(VIRTIO_MMIO_QUEUE_NUM, u32::from(queue.size));
        for (reg, addr) in
            [(VIRTIO_MMIO_QUEUE_DESC_LOW, queue.desc), (VIRTIO_MMIO_QUEUE_AVAIL_LOW, queue.avail), (VIRTIO_MMIO_QUEUE_USED_LOW, queue.used)]
        {
            self.write(reg, addr as u32);
            self.write(reg + 4, (addr >> 32) as u32);
        }
        self.write(VIRTIO_MMIO_QUEUE_READY, 1);
    }

    pub fn driver_ok(&self) {
        let status = self.read(VIRTIO_MMIO_STATUS);
        self.write(VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK);
    }
}

/// A split virtqueue in guest RAM, from the driver's side.
pub struct GuestQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl GuestQueue {
    /// A queue of `size` entries whose rings start at `base`.
    pub fn new(base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        Self { size, desc, avail, used, next_desc: 0, avail_idx: 0, used_seen: 0 }
    }

    /// Guest RAM the rings take.
    pub fn end(&self) -> u64 {
        self.used + 6 + 8 * u64::from(self.size)
    }

    /// Posts one chain of (address, length, device-writable) buffers; returns its head.
    pub fn push(&mut self, mem: &impl GuestMemory, buffers: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = if writable { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < buffers.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let at = self.desc + 16 * u64::from(index);
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(self.next_desc, GuestAddress(at + 14)).unwrap();
        }
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2)).unwrap();
        head
    }

    /// Whether the device wants a kick for what was just pushed: not while it says it is
    /// watching the ring (VRING_USED_F_NO_NOTIFY), as Linux's driver checks before kicking.
    pub fn needs_kick(&self, mem: &impl GuestMemory) -> bool {
        // The new available index must be visible before the flag is read (Linux: virtio_mb).
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let flags: u16 = mem.read_obj(GuestAddress(self.used)).unwrap();
        flags & VRING_USED_F_NO_NOTIFY as u16 == 0
    }

    /// The (head, length) pairs the device returned since the last call.
    pub fn take_used(&mut self, mem: &impl GuestMemory) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            out.push((mem.read_obj(GuestAddress(at)).unwrap(), mem.read_obj(GuestAddress(at + 4)).unwrap()));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}
