use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes};

use super::{ActiveQueue, GuestMemory, Interrupt, Subscriber, VirtioDevice};

const QUEUE_SIZE: u16 = 256;
/// The most entropy one request gets: a driver that posts huge buffers gets them partly filled
/// (which virtio-rng allows), so a hostile guest cannot make the VMM spin on one chain.
const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// virtio-rng: the guest's entropy source, filled from the host's `getrandom`.
#[derive(Debug, Default)]
pub struct Rng;

impl Rng {
    pub fn new() -> Self {
        Self
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn activate(
        &mut self,
        _features: u64,
        mem: GuestMemory,
        mut queues: Vec<ActiveQueue>,
        interrupt: Arc<Interrupt>,
    ) -> std::io::Result<Option<Subscriber>> {
        let ActiveQueue { queue, kick, .. } =
            queues.pop().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "virtio-rng needs its queue"))?;
        Ok(Some(Box::new(RngWorker { mem, queue, kick, interrupt })))
    }
}

/// The active device: answers each request on the queue with random bytes.
pub struct RngWorker {
    mem: GuestMemory,
    queue: Queue,
    kick: vmm_sys_util::eventfd::EventFd,
    interrupt: Arc<Interrupt>,
}

impl RngWorker {
    /// Serves every available request. Returns how many were completed. Malformed chains
    /// (loops, out-of-bounds addresses, bad indirect tables) end the chain, never the VMM.
    pub fn process_queue(&mut self) -> usize {
        let mut entropy = [0u8; 4096];
        let mem = &self.mem;
        super::serve_queue("virtio-rng", &mut self.queue, mem, &self.interrupt, |chain| {
            let mut written = 0usize;
            for desc in chain.writable() {
                let mut left = (desc.len() as usize).min(MAX_BYTES_PER_REQUEST - written);
                let mut addr = desc.addr();
                while left > 0 {
                    let n = left.min(entropy.len());
                    if getrandom(&mut entropy[..n]).is_err() || mem.write_slice(&entropy[..n], addr).is_err() {
                        left = 0;
                        continue;
                    }
                    written += n;
                    left -= n;
                    addr = addr.unchecked_add(n as u64);
                }
                if written >= MAX_BYTES_PER_REQUEST {
                    break;
                }
            }
            written as u32
        })
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, which we own.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        } else {
            filled += n as usize;
        }
    }
    Ok(())
}

impl MutEventSubscriber for RngWorker {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.kick, EventSet::IN)) {
            tracing::error!("virtio-rng: cannot watch the queue: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.kick.read();
        self.process_queue();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    fn worker(mem: &GuestMemory, descs: &[RawDescriptor]) -> (RngWorker, Arc<Interrupt>) {
        let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
        vq.build_desc_chain(descs).unwrap();
        let queue: Queue = vq.create_queue().unwrap();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        let w = RngWorker { mem: mem.clone(), queue, kick: EventFd::new(0).unwrap(), interrupt: interrupt.clone() };
        (w, interrupt)
    }

    fn mem() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    #[test]
    fn fills_writable_buffers_and_interrupts() {
        let mem = mem();
        let (mut w, interrupt) = worker(&mem, &[desc(0x10_0000, 512, VRING_DESC_F_WRITE, 0)]);
        assert_eq!(w.process_queue(), 1);
        let mut buf = [0u8; 512];
        mem.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
        assert!(buf.iter().any(|&b| b != 0), "buffer was not filled");
        assert_eq!(w.queue.next_used(), 1);
        assert_eq!(interrupt.status() & VIRTIO_MMIO_INT_VRING_BIT, VIRTIO_MMIO_INT_VRING_BIT);
        assert_eq!(interrupt.irqfd().read().unwrap(), 1);
    }

    const VIRTIO_MMIO_INT_VRING_BIT: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;

    #[test]
    fn read_only_and_out_of_bounds_buffers_get_nothing() {
        let mem = mem();
        let chain = [desc(0x10_0000, 64, VRING_DESC_F_NEXT, 1), desc(0xffff_ff00, 4096, VRING_DESC_F_WRITE, 0)];
        let (mut w, _) = worker(&mem, &chain);
        assert_eq!(w.process_queue(), 1, "the chain is completed, with nothing written");
        let used_len: u32 = mem.read_obj(GuestAddress(w.queue.used_ring() + 4 + 4)).unwrap();
        assert_eq!(used_len, 0);
        let mut buf = [0u8; 64];
        mem.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(buf, [0u8; 64], "a device-readable buffer must not be written");
    }

    #[test]
    fn huge_requests_are_capped() {
        let mem = mem();
        let (mut w, _) = worker(&mem, &[desc(0x20_0000, 0x80_0000, VRING_DESC_F_WRITE, 0)]);
        assert_eq!(w.process_queue(), 1);
        let used_len: u32 = mem.read_obj(GuestAddress(w.queue.used_ring() + 4 + 4)).unwrap();
        assert_eq!(used_len as usize, MAX_BYTES_PER_REQUEST);
    }

    #[test]
    fn a_looping_chain_does_not_hang() {
        let mem = mem();
        let chain = [
            desc(0x10_0000, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            desc(0x10_1000, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0),
        ];
        let (mut w, _) = worker(&mem, &chain);
        // The chain points back at its head: the iterator stops after queue-size descriptors.
        assert_eq!(w.process_queue(), 1);
    }
}
