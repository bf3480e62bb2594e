//! cvm's vhost-user frontend (the VMM's device) against cvm's backends, with the virtual guest
//! driving the virtio-mmio transport as Linux's driver does.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use cvm_backends::vsock::VsockServer;
use cvm_devices::virtio::{
    DeviceConfig, GuestMemory, Interrupt, MmioTransport, Subscriber, VhostUserDevice, VhostUserDeviceKind, FS_TAG_LEN,
};
use cvm_virtual_guest::{GuestQueue, MmioDriver};
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

/// A guest's vsock device on cvm's frontend, brought up by the virtual guest with its rings
/// at `base`.
fn bring_up(d: &MmioDriver, base: u64) -> Vec<GuestQueue> {
    d.negotiate();
    let queues: Vec<GuestQueue> = (0..3).map(|i| GuestQueue::new(base + i * 0x4000, 256)).collect();
    for (i, q) in queues.iter().enumerate() {
        d.setup_queue(i as u32, q);
    }
    d.driver_ok();
    assert_ne!(d.read(VIRTIO_MMIO_STATUS) & 4, 0, "DRIVER_OK accepted");
    queues
}

/// The guest posts RX buffers and asks, on TX, for a connection from its port `from` to host
/// port `to`.
fn request(d: &MmioDriver, mem: &GuestMemory, queues: &mut [GuestQueue], from: u32, to: u32) {
    for i in 0..8u64 {
        queues[0].push(mem, &[(0x10_0000 + i * 4096, 4096, true)]);
    }
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&GUEST_CID.to_le_bytes());
    hdr.extend_from_slice(&2u64.to_le_bytes());
    hdr.extend_from_slice(&from.to_le_bytes());
    hdr.extend_from_slice(&to.to_le_bytes());
    hdr.extend_from_slice(&0u32.to_le_bytes());
    hdr.extend_from_slice(&1u16.to_le_bytes()); // stream
    hdr.extend_from_slice(&1u16.to_le_bytes()); // REQUEST
    hdr.extend_from_slice(&[0u8; 4]);
    hdr.extend_from_slice(&65536u32.to_le_bytes());
    hdr.extend_from_slice(&0u32.to_le_bytes());
    mem.write_slice(&hdr, GuestAddress(0x20_0000)).unwrap();
    queues[1].push(mem, &[(0x20_0000, hdr.len() as u32, false)]);
    d.0.lock().unwrap().kick_events()[1].write(1).unwrap();
}

/// As [`request`], then waits for the host's end and the guest's RESPONSE.
fn connect(
    d: &MmioDriver,
    mem: &GuestMemory,
    irq: &EventFd,
    queues: &mut [GuestQueue],
    from: u32,
    to: u32,
    listener: &UnixListener,
) -> UnixStream {
    request(d, mem, queues, from, to);
    let (host, _) = listener.accept().unwrap();
    // Packets may come before the RESPONSE (credit updates); the TX and RX interrupts may
    // come one at a time.
    loop {
        assert!(wait_readable(irq), "no RESPONSE to the guest's port {from}");
        let _ = irq.read();
        assert_eq!(d.read(VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_INT_VRING, "used-buffer bit reported");
        let response = queues[0].take_used(mem).into_iter().any(|(head, _)| {
            let packet = 0x10_0000 + u64::from(head) * 4096;
            let dst_port: u32 = mem.read_obj(GuestAddress(packet + 20)).unwrap();
            let op: u16 = mem.read_obj(GuestAddress(packet + 30)).unwrap();
            op == 2 && dst_port == from
        });
        if response {
            break;
        }
    }
    host
}

/// Up, a connection, a reset (the backend stops its rings), up again with the rings
/// elsewhere, and a second connection: as a guest kernel that reloads its driver.
#[test]
fn a_guest_reaches_a_host_socket_through_the_frontend_and_the_backend_before_and_after_a_reset() {
    let dir = tempfile::tempdir().unwrap();
    let ram = tempfile::tempfile().unwrap();
    ram.set_len(16 << 20).unwrap();
    let mem: GuestMemory = GuestMemoryMmap::from_ranges_with_files(&[(GuestAddress(0), 16 << 20, Some(FileOffset::new(ram, 0)))]).unwrap();
    let vhost_path = dir.path().join("vsock.vhost");
    let server = VsockServer::start(GUEST_CID, &dir.path().join("v.sock"), UnixListener::bind(&vhost_path).unwrap()).unwrap();
    let listener = UnixListener::bind(dir.path().join("v.sock_1234")).unwrap();

    let kind = VhostUserDeviceKind { queue_size: 256, ..VhostUserDeviceKind::VSOCK };
    let device = VhostUserDevice::connect(UnixStream::connect(&vhost_path).unwrap(), kind, DeviceConfig::FromBackend).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let event_loop = EventManager::<Subscriber>::new().unwrap();
    let transport =
        MmioTransport::new(Box::new(device), mem.clone(), Arc::new(Interrupt::new(irq.try_clone().unwrap())), event_loop.remote_endpoint())
            .unwrap();
    let d = MmioDriver(Arc::new(Mutex::new(transport)));

    assert_eq!(d.read(VIRTIO_MMIO_DEVICE_ID), VhostUserDeviceKind::VSOCK.device_type);
    assert_eq!(u64::from(d.read(0x100)), GUEST_CID, "the guest CID from the backend's config space");
    let mut queues = bring_up(&d, 0x1000);
    let _first = connect(&d, &mem, &irq, &mut queues, 5000, 1234, &listener);

    d.write(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(d.read(VIRTIO_MMIO_STATUS), 0, "reset");
    // The backend has stopped the old rings: a request the guest leaves there is not served.
    request(&d, &mem, &mut queues, 5002, 1234);
    std::thread::sleep(std::time::Duration::from_millis(300));
    listener.set_nonblocking(true).unwrap();
    assert!(
        listener.accept().is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "the backend served a ring after the driver's reset"
    );
    listener.set_nonblocking(false).unwrap();
    let _ = irq.read();
    let mut queues = bring_up(&d, 0x4_0000);
    let _second = connect(&d, &mem, &irq, &mut queues, 5001, 1234, &listener);

    drop(d);
    server.join();
}
