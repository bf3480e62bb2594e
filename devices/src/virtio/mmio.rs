use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use event_manager::SubscriberId;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActiveQueue, EventLoopHandle, GuestMemory, Interrupt, VirtioDevice};

/// Bytes of guest-physical address space each virtio-mmio device occupies.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2; // the modern (virtio 1.x) register layout
const VENDOR_ID: u32 = 0x0043_564d; // "MVC\0": cvm

/// The virtio-mmio transport (virtio 1.2, section 4.2.2): the register file and the device
/// status state machine between a Linux driver and a [`VirtioDevice`].
///
/// Status only moves forward (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK) until the driver
/// writes 0 to reset; features may only change between DRIVER and FEATURES_OK and must be a
/// subset of what the device offers; queues may only change before DRIVER_OK. Accesses outside
/// these rules are ignored, never fatal.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    event_loop: EventLoopHandle,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    /// The active device's worker, once the event loop has taken it.
    worker: Option<Arc<Mutex<Option<SubscriberId>>>>,
    /// The layout of each queue the device was activated with, by index: a snapshot's record
    /// of queues the device now holds.
    activated: Vec<Option<QueueState>>,
}

/// A queue as a snapshot keeps it: the driver's layout and where both sides are in it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

impl QueueState {
    fn of(queue: &Queue) -> Self {
        QueueState {
            size: queue.size(),
            ready: queue.ready(),
            desc_table: queue.desc_table(),
            avail_ring: queue.avail_ring(),
            used_ring: queue.used_ring(),
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
        }
    }

    /// Lays `queue` out as saved; refuses what the queue itself refuses (a size that is not a
    /// power of two, or above its maximum).
    fn apply(&self, queue: &mut Queue) -> std::io::Result<()> {
        queue.set_size(self.size);
        if queue.size() != self.size {
            return Err(invalid(format!("queue size {} refused", self.size)));
        }
        let halves = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
        let (low, high) = halves(self.desc_table);
        queue.set_desc_table_address(low, high);
        let (low, high) = halves(self.avail_ring);
        queue.set_avail_ring_address(low, high);
        let (low, high) = halves(self.used_ring);
        queue.set_used_ring_address(low, high);
        queue.set_next_avail(self.next_avail);
        queue.set_next_used(self.next_used);
        queue.set_ready(self.ready);
        Ok(())
    }
}

/// The transport's registers and queues, as a snapshot keeps them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    status: u32,
    driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    config_generation: u32,
    interrupt_status: u32,
    queues: Vec<QueueState>,
}

fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        event_loop: EventLoopHandle,
    ) -> std::io::Result<Self> {
        let queues = fresh_queues(device.as_ref());
        let kicks = (0..queues.len()).map(|_| EventFd::new(EFD_NONBLOCK)).collect::<std::io::Result<_>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            event_loop,
            queues,
            kicks,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            worker: None,
            activated: Vec::new(),
        })
    }

    /// The transport's state, for a snapshot of a paused VM. An active device's queues are
    /// saved at the used index it last published, which is also where it next reads: a
    /// snapshot is taken where every device has returned each buffer it took.
    pub fn save_state(&self) -> TransportState {
        let queues = if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            (0..self.queues.len())
                .map(|index| match self.activated.get(index).cloned().flatten() {
                    Some(mut queue) => {
                        let used_idx = self.mem.read_obj::<u16>(GuestAddress(queue.used_ring + 2)).unwrap_or(0);
                        queue.next_avail = u16::from_le(used_idx);
                        queue.next_used = queue.next_avail;
                        queue
                    }
                    None => QueueState::default(),
                })
                .collect()
        } else {
            self.queues.iter().map(QueueState::of).collect()
        };
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues,
        }
    }

    /// Puts a fresh transport (with the same device) in a saved state, starting the device if
    /// the driver had.
    pub fn restore_state(&mut self, state: &TransportState) -> std::io::Result<()> {
        if state.device_type != self.device.device_type() || state.queues.len() != self.queues.len() {
            return Err(invalid(format!(
                "saved device {} with {} queues is not this device {} with {}",
                state.device_type,
                state.queues.len(),
                self.device.device_type(),
                self.queues.len()
            )));
        }
        for (queue, saved) in self.queues.iter_mut().zip(&state.queues) {
            saved.apply(queue)?;
        }
        self.driver_features = state.driver_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        self.interrupt.restore_status(state.interrupt_status);
        if state.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate()?;
        }
        self.status = state.status;
        Ok(())
    }

    /// One eventfd per queue: the VMM registers each with KVM as an ioeventfd on QueueNotify
    /// (matching the queue index), so a notification never leaves the kernel.
    pub fn kick_events(&self) -> &[EventFd] {
        &self.kicks
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn queue_setup_allowed(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status,
            // No shared memory regions: a length of all ones says "absent".
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        let setup = self.queue_setup_allowed();
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                let negotiating = self.status & VIRTIO_CONFIG_S_DRIVER != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
                match self.driver_features_sel {
                    0 if negotiating => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
                    1 if negotiating => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
                    _ => tracing::debug!("virtio-mmio: feature write ignored"),
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM if setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16)
                }
            }
            VIRTIO_MMIO_QUEUE_READY if setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1)
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH if setup => {
                let high = offset == VIRTIO_MMIO_QUEUE_DESC_HIGH;
                if let Some(q) = self.selected_queue() {
                    if high {
                        q.set_desc_table_address(None, Some(value))
                    } else {
                        q.set_desc_table_address(Some(value), None)
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH if setup => {
                let high = offset == VIRTIO_MMIO_QUEUE_AVAIL_HIGH;
                if let Some(q) = self.selected_queue() {
                    if high {
                        q.set_avail_ring_address(None, Some(value))
                    } else {
                        q.set_avail_ring_address(Some(value), None)
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_USED_LOW | VIRTIO_MMIO_QUEUE_USED_HIGH if setup => {
                let high = offset == VIRTIO_MMIO_QUEUE_USED_HIGH;
                if let Some(q) = self.selected_queue() {
                    if high {
                        q.set_used_ring_address(None, Some(value))
                    } else {
                        q.set_used_ring_address(Some(value), None)
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Reached only when no ioeventfd caught the write (or for an unknown queue).
                if let Some(kick) = self.kicks.get(value as usize) {
                    let _ = kick.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.set_status(value),
            VIRTIO_MMIO_SHM_SEL => {}
            _ => tracing::debug!("virtio-mmio: write {value:#x} to {offset:#x} ignored"),
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & self.status != self.status {
            tracing::debug!("virtio-mmio: status {:#x} -> {value:#x} clears bits; ignored", self.status);
            return;
        }
        let added = value & !self.status;
        let mut next = value;
        if added & VIRTIO_CONFIG_S_DRIVER != 0 && self.status & VIRTIO_CONFIG_S_ACKNOWLEDGE == 0 && added & VIRTIO_CONFIG_S_ACKNOWLEDGE == 0
        {
            next &= !VIRTIO_CONFIG_S_DRIVER;
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            let acceptable = next & VIRTIO_CONFIG_S_DRIVER != 0
                && self.driver_features & !offered == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !acceptable {
                // The driver reads FEATURES_OK back and gives up on the device.
                next &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if next & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                next &= !VIRTIO_CONFIG_S_DRIVER_OK;
            } else if let Err(e) = self.activate() {
                tracing::warn!("virtio-mmio: device {} failed to start: {e}", self.device.device_type());
                next = (next & !VIRTIO_CONFIG_S_DRIVER_OK) | VIRTIO_CONFIG_S_NEEDS_RESET;
            }
        }
        self.status = next;
    }

    fn activate(&mut self) -> std::io::Result<()> {
        if let Some(bad) = self.queues.iter().position(|q| q.ready() && !q.is_valid(&self.mem)) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("queue {bad} does not fit in guest memory")));
        }
        let queues = std::mem::replace(&mut self.queues, fresh_queues(self.device.as_ref()));
        self.activated = queues.iter().map(|q| q.ready().then(|| QueueState::of(q))).collect();
        let active = queues
            .into_iter()
            .zip(&self.kicks)
            .enumerate()
            .filter(|(_, (q, _))| q.ready())
            .map(|(index, (queue, kick))| Ok(ActiveQueue { index, queue, kick: kick.try_clone()? }))
            .collect::<std::io::Result<Vec<_>>>()?;
        let worker = self.device.activate(self.driver_features, self.mem.clone(), active, self.interrupt.clone())?;
        if let Some(worker) = worker {
            // Handed over, not waited for: the vCPU that set DRIVER_OK goes back to the guest at
            // once, and the event loop takes the worker before any later message (a reset's).
            let id = Arc::new(Mutex::new(None));
            let taken = id.clone();
            self.event_loop
                .fire(move |ops| *taken.lock().unwrap_or_else(PoisonError::into_inner) = Some(ops.add_subscriber(worker)))
                .map_err(|e| std::io::Error::other(format!("event loop: {e:?}")))?;
            self.worker = Some(id);
        }
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(id) = self.worker.take() {
            // Waited for: once the driver has written 0 it may reuse the rings' memory, so the
            // worker must be gone before the vCPU goes back to the guest.
            let removed = self.event_loop.call_blocking(move |ops| -> Result<(), event_manager::Error> {
                match id.lock().unwrap_or_else(PoisonError::into_inner).take() {
                    Some(id) => ops.remove_subscriber(id).map(drop),
                    None => Ok(()),
                }
            });
            if let Err(e) = removed {
                tracing::warn!("virtio-mmio: cannot stop the device worker: {e:?}");
            }
        }
        if let Err(e) = self.device.reset() {
            tracing::warn!("virtio-mmio: device {} did not reset: {e}", self.device.device_type());
        }
        self.queues = fresh_queues(self.device.as_ref());
        self.activated.clear();
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.reset();
        self.status = 0;
    }
}

fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device.queue_max_sizes().iter().map(|&max| Queue::new(max).expect("device queue sizes are powers of two")).collect()
}

impl MutDeviceMmio for MmioTransport {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device.read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            let value = self.read_register(offset as u32);
            data.copy_from_slice(&value.to_le_bytes());
        } else {
            tracing::debug!("virtio-mmio: {}-byte read at {offset:#x} ignored", data.len());
            data.fill(0);
        }
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device.write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            self.config_generation = self.config_generation.wrapping_add(1);
        } else if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_register(offset as u32, u32::from_le_bytes(bytes));
        } else {
            tracing::debug!("virtio-mmio: {}-byte write at {offset:#x} ignored", data.len());
        }
    }
}

#[cfg(test)]
mod tests {
    //! A virtual guest: a driver thread does what Linux's virtio_mmio and virtio-rng drivers do
    //! (probe, negotiate, lay out a queue in guest RAM, go live, post a buffer, kick, take the
    //! interrupt) while this thread runs the VMM's event loop.

    use super::*;
    use crate::virtio::{Rng, Subscriber};
    use cvm_virtual_guest::MmioDriver as Driver;
    use event_manager::EventManager;
    use std::sync::Mutex;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const BUFFER: u64 = 0x10000;

    fn setup() -> (EventManager<Subscriber>, Arc<Mutex<MmioTransport>>, GuestMemory, EventFd) {
        let mem: GuestMemory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let event_loop = EventManager::<Subscriber>::new().unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let transport = MmioTransport::new(Box::new(Rng::new()), mem.clone(), interrupt, event_loop.remote_endpoint()).unwrap();
        (event_loop, Arc::new(Mutex::new(transport)), mem, irq)
    }

    /// Runs the event loop until `driver` finishes.
    fn run_with_driver<T: Send + 'static>(event_loop: &mut EventManager<Subscriber>, driver: impl FnOnce() -> T + Send + 'static) -> T {
        let handle = std::thread::spawn(driver);
        while !handle.is_finished() {
            event_loop.run_with_timeout(10).unwrap();
        }
        handle.join().unwrap()
    }

    /// Queue 0: 16 entries whose descriptor 0 is a 256-byte device-writable buffer, ready.
    fn lay_out_queue(d: &Driver<MmioTransport>, mem: &GuestMemory) {
        mem.write_obj(BUFFER, GuestAddress(DESC)).unwrap();
        mem.write_obj(256u32, GuestAddress(DESC + 8)).unwrap();
        mem.write_obj(VRING_DESC_F_WRITE as u16, GuestAddress(DESC + 12)).unwrap();
        d.write(VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(d.read(VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(d.read(VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
        d.write(VIRTIO_MMIO_QUEUE_NUM, 16);
        for (reg, addr) in [(VIRTIO_MMIO_QUEUE_DESC_LOW, DESC), (VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL), (VIRTIO_MMIO_QUEUE_USED_LOW, USED)] {
            d.write(reg, addr as u32);
            d.write(reg + 4, 0);
        }
        d.write(VIRTIO_MMIO_QUEUE_READY, 1);
    }

    /// Offers descriptor 0 as the `nth` available buffer (from 1), kicks, and runs the event
    /// loop until the device has used it.
    fn post_and_wait(event_loop: &mut EventManager<Subscriber>, d: &Driver<MmioTransport>, mem: &GuestMemory, nth: u16) {
        mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from((nth - 1) % 16))).unwrap();
        mem.write_obj(nth, GuestAddress(AVAIL + 2)).unwrap(); // avail idx
        d.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0); // no ioeventfd here: the transport kicks
        for _ in 0..100 {
            event_loop.run_with_timeout(10).unwrap();
            if mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() == nth {
                break;
            }
        }
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), nth, "used idx");
    }

    #[test]
    fn linux_style_probe_negotiation_and_one_request() {
        let (mut event_loop, transport, mem, irq) = setup();
        let d = Driver(transport.clone());
        assert_eq!(d.read(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(d.read(VIRTIO_MMIO_VERSION), 2);
        assert_eq!(d.read(VIRTIO_MMIO_DEVICE_ID), 4);
        d.negotiate();
        assert_eq!(d.read(VIRTIO_MMIO_STATUS), 0b1011, "FEATURES_OK accepted");

        lay_out_queue(&d, &mem);
        let t = transport.clone();
        let status = run_with_driver(&mut event_loop, move || {
            let d = Driver(t);
            d.write(VIRTIO_MMIO_STATUS, 0b1111); // DRIVER_OK: the worker joins the event loop
            d.read(VIRTIO_MMIO_STATUS)
        });
        assert_eq!(status, 0b1111);
        post_and_wait(&mut event_loop, &d, &mem, 1);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(USED + 8)).unwrap(), 256, "used len");
        assert_eq!(irq.read().unwrap(), 1, "interrupt raised");
        assert_eq!(d.read(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING, "used-buffer bit set");
        d.write(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(d.read(VIRTIO_MMIO_INTERRUPT_STATUS), 0);

        // Reset removes the worker from the event loop and clears the device.
        let t = transport.clone();
        run_with_driver(&mut event_loop, move || Driver(t).write(VIRTIO_MMIO_STATUS, 0));
        assert_eq!(d.read(VIRTIO_MMIO_STATUS), 0);
        assert!(transport.lock().unwrap().worker.is_none());
    }

    /// A live device's transport saved, and restored into a fresh transport on a fresh event
    /// loop (a new VM on the same memory): the device goes on from the saved used index.
    #[test]
    fn a_saved_transport_restores_live_where_it_was() {
        let (mut event_loop, transport, mem, _irq) = setup();
        let d = Driver(transport.clone());
        d.negotiate();
        lay_out_queue(&d, &mem);
        let t = transport.clone();
        run_with_driver(&mut event_loop, move || Driver(t).write(VIRTIO_MMIO_STATUS, 0b1111));
        post_and_wait(&mut event_loop, &d, &mem, 1);
        post_and_wait(&mut event_loop, &d, &mem, 2);
        let saved = transport.lock().unwrap().save_state();
        assert_eq!(saved.status, 0b1111);
        assert_eq!((saved.queues[0].next_avail, saved.queues[0].next_used, saved.queues[0].size), (2, 2, 16));
        assert!(saved.queues[0].ready);

        let mut event_loop = EventManager::<Subscriber>::new().unwrap();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let mut fresh = MmioTransport::new(Box::new(Rng::new()), mem.clone(), interrupt, event_loop.remote_endpoint()).unwrap();
        fresh.restore_state(&saved).unwrap();
        assert_eq!(fresh.save_state(), saved, "restored as saved");
        let fresh = Arc::new(Mutex::new(fresh));
        let d = Driver(fresh.clone());
        assert_eq!(d.read(VIRTIO_MMIO_STATUS), 0b1111);
        post_and_wait(&mut event_loop, &d, &mem, 3);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(USED + 4 + 8 * 2 + 4)).unwrap(), 256, "the third buffer used in the third slot");
    }

    /// A saved state that does not fit the device, or lays out a queue the transport refuses,
    /// is refused; nothing starts.
    #[test]
    fn a_saved_state_that_does_not_fit_is_refused() {
        let (_event_loop, transport, _mem, _irq) = setup();
        let good = transport.lock().unwrap().save_state();
        let refused = |state: TransportState| {
            let (_event_loop, transport, _mem, _irq) = setup();
            let mut t = transport.lock().unwrap();
            assert!(t.restore_state(&state).is_err(), "{state:?}");
            assert!(t.worker.is_none());
        };
        refused(TransportState { device_type: 19, ..good.clone() });
        refused(TransportState { queues: vec![], ..good.clone() });
        let mut odd = good.clone();
        odd.queues[0].size = 3;
        refused(odd);
        let mut outside = good.clone();
        outside.status = 0b1111;
        outside.queues[0] = QueueState { size: 16, ready: true, desc_table: 1 << 40, ..QueueState::default() };
        refused(outside);
    }

    #[test]
    fn hostile_register_sequences_are_ignored() {
        let (mut event_loop, transport, _mem, _irq) = setup();
        let d = Driver(transport.clone());
        // DRIVER_OK before negotiation, features without DRIVER, status bits cleared.
        d.write(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(d.read(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK, 0);
        d.write(VIRTIO_MMIO_STATUS, 0);
        d.write(VIRTIO_MMIO_DRIVER_FEATURES, u32::MAX);
        d.write(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        // Features the device does not offer: FEATURES_OK is refused.
        d.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        d.write(VIRTIO_MMIO_DRIVER_FEATURES, 1 << 5);
        d.write(VIRTIO_MMIO_STATUS, 0b1011);
        assert_eq!(d.read(VIRTIO_MMIO_STATUS), 0b0011);
        // A legacy (VERSION_1-less) driver is refused too.
        d.write(VIRTIO_MMIO_DRIVER_FEATURES, 0);
        d.write(VIRTIO_MMIO_STATUS, 0b1011);
        assert_eq!(d.read(VIRTIO_MMIO_STATUS), 0b0011);
        d.negotiate();
        // A queue outside guest memory: DRIVER_OK fails with NEEDS_RESET, nothing runs.
        d.write(VIRTIO_MMIO_QUEUE_SEL, 7);
        d.write(VIRTIO_MMIO_QUEUE_NUM, 16); // no such queue: ignored
        d.write(VIRTIO_MMIO_QUEUE_SEL, 0);
        d.write(VIRTIO_MMIO_QUEUE_NUM, 16);
        d.write(VIRTIO_MMIO_QUEUE_DESC_LOW, 0xffff_0000);
        d.write(VIRTIO_MMIO_QUEUE_DESC_HIGH, 0xffff);
        d.write(VIRTIO_MMIO_QUEUE_READY, 1);
        let t = transport.clone();
        let status = run_with_driver(&mut event_loop, move || {
            let d = Driver(t);
            d.write(VIRTIO_MMIO_STATUS, 0b1111);
            d.read(VIRTIO_MMIO_STATUS)
        });
        assert_eq!(status & VIRTIO_CONFIG_S_DRIVER_OK, 0);
        assert_ne!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        // Odd-sized and unaligned register accesses, and notifications for absent queues.
        let mut t = transport.lock().unwrap();
        t.mmio_write(MmioAddress(0), 0x70, &[0xff]);
        t.mmio_write(MmioAddress(0), 0x71, &[0, 0, 0, 0]);
        t.mmio_write(MmioAddress(0), u64::from(VIRTIO_MMIO_QUEUE_NOTIFY), &99u32.to_le_bytes());
        let mut byte = [0xaau8; 1];
        t.mmio_read(MmioAddress(0), 0, &mut byte);
        assert_eq!(byte, [0]);
        assert!(t.worker.is_none());
    }
}
