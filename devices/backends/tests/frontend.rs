//! cvm's vhost-user frontend (the VMM's device) against cvm's backends, with the virtual guest
//! driving the virtio-mmio transport as Linux's driver does.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use cvm_backends::vsock::VsockServer;
use cvm_devices::virtio::{DeviceConfig, GuestMemory, Interrupt, MmioTransport, Subscriber, VhostUserDevice, VhostUserDeviceKind, FS_TAG_LEN};
use cvm_devices::virtual_guest::{GuestQueue, MmioDriver};
use event_manager::EventManager;
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const GUEST_CID: u64 = 3;

#[test]
fn the_fs_backend_takes_tags_as_long_as_the_device_gives() {
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
