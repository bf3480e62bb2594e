//! The device manager: places each device on the MMIO or port bus, gives it an IRQ and its
//! kernel command-line entry, and wires its queue notifications and interrupts to KVM.

use std::sync::{Arc, Mutex};

use cvm_devices::virtio::{EventLoopHandle, Interrupt, MmioTransport, VirtioDevice, MMIO_WINDOW_SIZE};
use kvm_ioctls::{IoEventAddress, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::layout::*;
use crate::vstate::memory::GuestMemory;
use crate::{kvm_call, Error, Result};

/// Places devices on the buses: each gets its address range, its interrupt line and, for
/// virtio-mmio, its `virtio_mmio.device=` kernel argument.
pub(crate) struct DeviceManager<'a> {
    pub(crate) vm_fd: &'a VmFd,
    pub(crate) mem: GuestMemory,
    pub(crate) event_loop: EventLoopHandle,
    pub(crate) io: IoManager,
    pub(crate) cmdline: Cmdline,
    pub(crate) next_virtio_addr: u64,
    pub(crate) next_virtio_irq: u32,
    /// The virtio-mmio transports, in the order they were added (a snapshot's order).
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl<'a> DeviceManager<'a> {
    pub(crate) fn new(vm_fd: &'a VmFd, mem: GuestMemory, event_loop: EventLoopHandle, cmdline: &str) -> Result<Self> {
        let mut line = Cmdline::new(CMDLINE_MAX).map_err(|e| Error::Config(format!("command line: {e}")))?;
        if !cmdline.trim().is_empty() {
            line.insert_str(cmdline.trim()).map_err(|e| Error::Config(format!("kernel command line {cmdline:?}: {e}")))?;
        }
        Ok(Self {
            vm_fd,
            mem,
            event_loop,
            io: IoManager::new(),
            cmdline: line,
            next_virtio_addr: VIRTIO_MMIO_START,
            next_virtio_irq: VIRTIO_IRQ_START,
            transports: Vec::new(),
        })
    }

    pub(crate) fn add_pio(&mut self, port: u16, len: u16, device: Arc<dyn vm_device::DevicePio + Send + Sync>) -> Result<()> {
        let range = PioRange::new(PioAddress(port), len).map_err(bus_err)?;
        self.io.register_pio(range, device).map_err(bus_err)
    }

    pub(crate) fn add_mmio(&mut self, addr: u64, len: u64, device: Arc<dyn vm_device::DeviceMmio + Send + Sync>) -> Result<()> {
        let range = MmioRange::new(MmioAddress(addr), len).map_err(bus_err)?;
        self.io.register_mmio(range, device).map_err(bus_err)
    }

    pub(crate) fn add_virtio(&mut self, device: Box<dyn VirtioDevice>) -> Result<()> {
        if self.next_virtio_irq >= IRQ_COUNT {
            return Err(Error::Config("too many virtio devices".into()));
        }
        let (addr, irq) = (self.next_virtio_addr, self.next_virtio_irq);
        let irqfd = EventFd::new(EFD_NONBLOCK)?;
        self.vm_fd.register_irqfd(&irqfd, irq).map_err(kvm_call("wire a virtio interrupt"))?;
        let transport = MmioTransport::new(device, self.mem.clone(), Arc::new(Interrupt::new(irqfd)), self.event_loop.clone())?;
        for (queue, kick) in transport.kick_events().iter().enumerate() {
            let notify = IoEventAddress::Mmio(addr + u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY));
            self.vm_fd.register_ioevent(kick, &notify, queue as u32).map_err(kvm_call("wire a virtio queue notification"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.add_mmio(addr, MMIO_WINDOW_SIZE, transport.clone())?;
        self.transports.push(transport);
        self.cmdline
            .add_virtio_mmio_device(MMIO_WINDOW_SIZE, vm_memory::GuestAddress(addr), irq, None)
            .map_err(|e| Error::Config(format!("command line too long for the devices: {e}")))?;
        self.next_virtio_addr += MMIO_WINDOW_SIZE;
        self.next_virtio_irq += 1;
        Ok(())
    }

    pub(crate) fn finish(self) -> (IoManager, Cmdline, Vec<Arc<Mutex<MmioTransport>>>) {
        (self.io, self.cmdline, self.transports)
    }
}

pub(crate) fn bus_err(e: vm_device::bus::Error) -> Error {
    Error::Config(format!("device layout: {e}"))
}

pub(crate) fn event_err(e: event_manager::Error) -> Error {
    Error::Io(std::io::Error::other(format!("event loop: {e:?}")))
}
