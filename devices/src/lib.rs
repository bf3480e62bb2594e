//! cvm's devices. Each device is a small state machine behind the bus traits of `vm-device`:
//! the vmm maps it at an address and routes the guest's accesses to it.
//!
//! - [`legacy`]: the 8250 serial console, the i8042 reset line, the boot timer.
//! - [`virtio`]: the virtio-mmio transport and the devices that run inside the VMM.
//! - [`vsock`]: the embedded vhost-user vsock backend and its host Unix-socket muxer.
//! - [`virtual_guest`]: a test and benchmark driver that does what Linux's virtio drivers do.
//! - [`fs`]: the embedded vhost-user virtio-fs backend (virtiofsd's server) and its share rules.
//! - [`process`]: helper processes given descriptors at fixed numbers, dying with cvm.
//! - [`seccomp`]: the system calls each helper role may make.

pub mod fs;
pub mod legacy;
pub mod process;
pub mod seccomp;
pub mod virtio;
pub mod vsock;
pub mod virtual_guest;

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
