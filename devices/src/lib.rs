//! cvm's devices. Each device is a small state machine behind the bus traits of `vm-device`:
//! the vmm maps it at an address and routes the guest's accesses to it.
//!
//! - [`legacy`]: the 8250 serial console, the i8042 reset line, the boot timer.
//! - [`virtio`]: the virtio-mmio transport and the devices that run inside the VMM.
//!
//! Only device models live here. The virtual guest that drives them in tests is
//! `cvm-virtual-guest` (devices/virtual-guest/); the host-side backends the vhost-user devices
//! talk to are `cvm-backends` (devices/backends/), which the VMM does not link.

pub mod legacy;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// An eventfd that a device raises: an irqfd (interrupt) or a VMM notification (reset).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(fd: EventFd) -> Self {
        Self(fd)
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
