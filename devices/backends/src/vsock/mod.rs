//! virtio-vsock as a vhost-user backend embedded in cvm.
//!
//! [`VsockBackend`] moves packets between the guest's vrings and the [`Muxer`], which bridges
//! them to host Unix sockets. [`VsockServer`] runs it on vhost-user-backend's threads for one
//! frontend: cvm's own VMM or QEMU's `vhost-user-vsock-device`.

pub mod muxer;
#[cfg(test)]
mod tests;

use std::io::{self, Read, Write};
use std::ops::Deref;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

pub use muxer::{Header, Muxer, HEADER_SIZE};

/// The device this backend serves (rx, tx and event queues).
const DEVICE: cvm_devices::virtio::VhostUserDeviceKind = cvm_devices::virtio::VhostUserDeviceKind::VSOCK;
const NUM_QUEUES: usize = DEVICE.num_queues;
const QUEUE_SIZE: usize = DEVICE.queue_size as usize;
const RX: usize = 0;
const TX: usize = 1;
/// The custom event id for the muxer's epoll fd (0..=NUM_QUEUES are the library's).
const MUXER_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Largest payload cvm accepts or produces in one packet (Linux uses up to 64 KiB).
const MAX_PKT_DATA: u32 = 64 * 1024;

type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// The device half: vrings in, muxer out.
pub struct VsockBackend {
    guest_cid: u64,
    muxer: Muxer,
    mem: Option<Mem>,
    scratch: Vec<u8>,
}

impl VsockBackend {
    pub fn new(guest_cid: u64, muxer: Muxer) -> Self {
        Self { guest_cid, muxer, mem: None, scratch: vec![0; MAX_PKT_DATA as usize] }
    }

    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    fn memory(&self) -> io::Result<GuestMemoryLoadGuard<GuestMemoryMmap<()>>> {
        self.mem.as_ref().map(|m| m.memory()).ok_or_else(|| io::Error::other("vsock: no guest memory yet"))
    }

    /// Takes every packet the guest queued for sending. A packet may spread over any number
    /// of device-readable descriptors (Linux 6.x sends the header and the data apart, and large
    /// data in several pieces); a chain that does not hold a whole packet is dropped.
    fn process_tx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let mem = self.memory()?;
        let mut used = false;
        loop {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem.deref());
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            match read_packet(mem.deref(), chain) {
                Ok((hdr, data)) => self.muxer.handle_guest_packet(&hdr, &data),
                Err(e) => tracing::debug!("vsock: dropped a TX chain: {e}"),
            }
            vring.add_used(head, 0).map_err(io::Error::other)?;
            used = true;
        }
        if used {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Fills the guest's RX buffers with whatever the muxer has for it.
    fn process_rx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let mem = self.memory()?;
        let mut used = false;
        while self.muxer.has_rx() {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem.deref());
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let mut writer = match Writer::new(mem.deref(), chain) {
                Ok(w) if w.available_bytes() >= HEADER_SIZE => w,
                result => {
                    tracing::debug!("vsock: unusable RX chain: {:?}", result.err());
                    vring.add_used(head, 0).map_err(io::Error::other)?;
                    used = true;
                    continue;
                }
            };
            let room = (writer.available_bytes() - HEADER_SIZE).min(self.scratch.len());
            let Some(hdr) = self.muxer.next_rx_packet(&mut self.scratch[..room]) else {
                vring.get_mut().get_queue_mut().go_to_previous_position();
                break;
            };
            let len = hdr.len as usize;
            writer.write_all(&hdr.to_bytes())?;
            writer.write_all(&self.scratch[..len])?;
            vring.add_used(head, (HEADER_SIZE + len) as u32).map_err(io::Error::other)?;
            used = true;
        }
        if used {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

/// Reads one packet (header, then `len` bytes of data) from a TX chain's readable buffers.
fn read_packet(mem: &GuestMemoryMmap<()>, chain: DescriptorChain<&GuestMemoryMmap<()>>) -> io::Result<(Header, Vec<u8>)> {
    let mut reader = Reader::new(mem, chain).map_err(|e| io::Error::other(format!("{e:?}")))?;
    let mut raw = [0u8; HEADER_SIZE];
    reader.read_exact(&mut raw)?;
    let hdr = Header::from_bytes(&raw);
    if hdr.len > MAX_PKT_DATA {
        return Err(io::Error::other(format!("{} bytes of data in one packet", hdr.len)));
    }
    let mut data = vec![0u8; hdr.len as usize];
    reader.read_exact(&mut data)?;
    Ok((hdr, data))
}

impl VhostUserBackendMut for VsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&mut self, _enabled: bool) {}

    /// The config space is the guest's CID, a little-endian u64.
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.guest_cid.to_le_bytes();
        let start = (offset as usize).min(config.len());
        let end = start.saturating_add(size as usize).min(config.len());
        let mut out = config[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&mut self, mem: Mem) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn reset_device(&mut self) {
        self.muxer.reset();
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(&mut self, device_event: u16, _evset: EventSet, vrings: &[VringRwLock], _thread: usize) -> io::Result<()> {
        if vrings.len() < NUM_QUEUES {
            return Ok(());
        }
        match device_event as usize {
            TX => self.process_tx(&vrings[TX])?,
            RX => {}
            _ if device_event == MUXER_EVENT => self.muxer.handle_host_events(),
            _ => return Ok(()),
        }
        // Whatever happened may have freed RX buffers or produced packets for the guest.
        if vrings[RX].get_ref().get_queue().ready() {
            self.process_rx(&vrings[RX])?;
        }
        Ok(())
    }
}

/// The embedded vsock device for one VM: a host socket for the Firecracker protocol, and a
/// vhost-user socket its frontend connects to once.
pub struct VsockServer {
    thread: Option<JoinHandle<()>>,
    /// The vhost-user socket, kept to wake a thread still waiting for its frontend.
    listener: UnixListener,
}

/// How long a dropped server waits for its thread once its frontend is gone.
const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl VsockServer {
    /// Starts serving: `vhost_user` is the (already listening) socket the frontend connects
    /// to; `host_socket` is where host processes connect with `CONNECT <port>`.
    pub fn start(guest_cid: u64, host_socket: &Path, vhost_user: UnixListener) -> io::Result<Self> {
        let muxer = Muxer::new(guest_cid, host_socket)?;
        let listener = vhost_user.try_clone()?;
        let (ready, set_up) = std::sync::mpsc::channel();
        // The daemon is made on its own thread, under the role's seccomp filter, so that its
        // vring worker (a thread it starts) is under it too.
        let thread = std::thread::Builder::new().name("vsock-vhost-user".into()).spawn(move || {
            let daemon = cvm_sandbox::seccomp::confine_thread(cvm_sandbox::seccomp::Role::VsockBackend).and_then(|()| {
                let muxer_fd = muxer.epoll_fd();
                let backend = Arc::new(RwLock::new(VsockBackend::new(guest_cid, muxer)));
                let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
                let daemon = VhostUserDaemon::new("cvm-vsock".into(), backend, mem).map_err(|e| io::Error::other(e.to_string()))?;
                for handler in daemon.get_epoll_handlers() {
                    handler.register_listener(muxer_fd, EventSet::IN, MUXER_EVENT as u64)?;
                }
                Ok(daemon)
            });
            let mut daemon = match daemon {
                Ok(daemon) => {
                    let _ = ready.send(Ok(()));
                    daemon
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            let mut listener = Listener::from(vhost_user);
            let result = daemon.start(&mut listener).and_then(|()| daemon.wait());
            if let Err(e) = result {
                tracing::debug!("vsock: vhost-user session ended: {e}");
            }
            for handler in daemon.get_epoll_handlers() {
                handler.send_exit_event();
            }
        })?;
        set_up.recv().map_err(|_| io::Error::other("the vsock backend's thread ended at its start"))??;
        Ok(Self { thread: Some(thread), listener })
    }

    /// Waits until the frontend disconnected and the backend threads stopped.
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for VsockServer {
    /// A server whose VM never connected would wait for it forever: shutting the listening
    /// socket down ends that wait. Once a frontend has connected, its going away ends the
    /// thread; the wait for that is bounded, for a frontend that outlives its server.
    fn drop(&mut self) {
        let _ = rustix::net::shutdown(&self.listener, rustix::net::Shutdown::Both);
        let Some(thread) = self.thread.take() else { return };
        let deadline = std::time::Instant::now() + STOP_TIMEOUT;
        while !thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            tracing::warn!("the vsock backend's thread did not stop within {STOP_TIMEOUT:?} of its VM; left to end with cvm");
        }
    }
}
