//! virtio-blk: a disk image file as the guest's block device, read-only (the root image, shared
//! by every session) or read-write (a session's scratch disk). Requests run on the device's
//! own I/O thread, off the VMM's event loop (a slow disk never holds up the network, the
//! console or the other devices): reads, writes, flushes and the device ID; anything else is
//! UNSUPP.
//!
//! Every request is checked before it touches the file: the header must be whole, the data
//! must lie inside the disk (no overflow), a read's buffers must be device-writable and a
//! write's device-readable, and a read-only disk refuses writes itself (IOERR), whatever the
//! guest's mount flags say.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, Reader, Writer};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActiveQueue, GuestMemory, Interrupt, Subscriber, VirtioDevice};

const QUEUE_SIZE: u16 = 256;
const SECTOR: u64 = 512;
/// The request header: type (le32), reserved (le32), sector (le64).
const HEADER_LEN: usize = 16;
/// What GET_ID answers.
const DEVICE_ID: &[u8; VIRTIO_BLK_ID_BYTES as usize] = b"cvm-disk\0\0\0\0\0\0\0\0\0\0\0\0";
/// File I/O goes through a buffer of this size at most per step.
const CHUNK: usize = 128 * 1024;

/// A disk image as a virtio-blk device.
pub struct Block {
    file: File,
    read_only: bool,
    /// The disk's size in sectors (the file's size, rounded down to a sector).
    sectors: u64,
    io: IoThread,
}

impl Block {
    /// The device and its I/O thread, which confines itself to the VMM's system calls.
    pub fn new(file: File, read_only: bool) -> io::Result<Self> {
        let sectors = file.metadata()?.len() / SECTOR;
        if sectors == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a disk image must hold at least one 512-byte sector"));
        }
        Ok(Self { file, read_only, sectors, io: IoThread::start()? })
    }
}

const EXIT: u64 = 0;
const KICK: u64 = 1;

/// The thread that serves the queue. It starts with the device, before the VMM confines its
/// threads, so it confines itself; it gets the queue at each activation and gives it up at
/// each reset.
struct IoThread {
    shared: Arc<IoShared>,
    thread: Option<JoinHandle<()>>,
}

struct IoShared {
    /// The active queue. The thread holds the lock while it serves, so a reset that takes the
    /// queue waits for the requests in flight: after it, nothing touches the guest's rings.
    worker: Mutex<Option<BlockWorker>>,
    /// The queue's kick (while active) and `exit`.
    epoll: Epoll,
    exit: EventFd,
}

impl IoThread {
    fn start() -> io::Result<IoThread> {
        let shared = Arc::new(IoShared { worker: Mutex::new(None), epoll: Epoll::new()?, exit: EventFd::new(EFD_NONBLOCK)? });
        shared.epoll.ctl(ControlOperation::Add, shared.exit.as_raw_fd(), EpollEvent::new(EventSet::IN, EXIT))?;
        let (confined_tx, confined_rx) = std::sync::mpsc::channel();
        let serving = shared.clone();
        let thread = std::thread::Builder::new().name("virtio-blk".into()).spawn(move || {
            let confined = cvm_sandbox::seccomp::confine_thread(cvm_sandbox::seccomp::Role::Vmm);
            let ok = confined.is_ok();
            let _ = confined_tx.send(confined);
            if ok {
                serve(&serving);
            }
        })?;
        let io = IoThread { shared, thread: Some(thread) };
        confined_rx.recv().map_err(|_| io::Error::other("virtio-blk: the I/O thread did not start"))??;
        Ok(io)
    }

    fn activate(&self, worker: BlockWorker) -> io::Result<()> {
        let kick = worker.kick.as_raw_fd();
        *self.shared.lock_worker() = Some(worker);
        self.shared.epoll.ctl(ControlOperation::Add, kick, EpollEvent::new(EventSet::IN, KICK))
    }

    fn reset(&self) -> io::Result<()> {
        let mut worker = self.shared.lock_worker();
        match worker.take() {
            Some(worker) => self.shared.epoll.ctl(ControlOperation::Delete, worker.kick.as_raw_fd(), EpollEvent::default()),
            None => Ok(()),
        }
    }
}

impl IoShared {
    fn lock_worker(&self) -> std::sync::MutexGuard<'_, Option<BlockWorker>> {
        self.worker.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The I/O thread's loop: each kick serves what the guest has queued, until `exit`.
fn serve(shared: &IoShared) {
    let mut events = [EpollEvent::default(); 2];
    loop {
        let ready = match shared.epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("virtio-blk: the I/O thread cannot wait: {e}");
                return;
            }
        };
        for event in &events[..ready] {
            if event.data() == EXIT {
                return;
            }
            if let Some(worker) = shared.lock_worker().as_mut() {
                let _ = worker.kick.read();
                worker.process_queue();
            }
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        let _ = self.shared.exit.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only { 1 << VIRTIO_BLK_F_RO } else { 0 };
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Only the capacity (le64 at 0): everything else this device does not offer.
        super::read_config_bytes(&self.sectors.to_le_bytes(), offset, data);
    }

    fn activate(
        &mut self,
        _features: u64,
        mem: GuestMemory,
        mut queues: Vec<ActiveQueue>,
        interrupt: Arc<Interrupt>,
    ) -> io::Result<Option<Subscriber>> {
        let ActiveQueue { queue, kick, .. } =
            queues.pop().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "virtio-blk needs its queue"))?;
        // The worker gets its own handle, so that after a reset the next activation has one too.
        let file = self.file.try_clone()?;
        self.io.activate(BlockWorker {
            mem,
            queue,
            kick,
            interrupt,
            disk: Disk { file, read_only: self.read_only, sectors: self.sectors },
        })?;
        Ok(None)
    }

    fn reset(&mut self) -> io::Result<()> {
        self.io.reset()
    }
}

/// The active device.
pub struct BlockWorker {
    mem: GuestMemory,
    queue: Queue,
    kick: EventFd,
    interrupt: Arc<Interrupt>,
    disk: Disk,
}

/// Why a request failed, as the status byte says it.
enum Failure {
    /// The request is malformed or the I/O failed.
    IoErr,
    Unsupported,
}

impl BlockWorker {
    /// Serves every available request; returns how many were completed. A chain too broken to
    /// hold a status byte is returned with nothing written.
    pub fn process_queue(&mut self) -> usize {
        let disk = &self.disk;
        super::serve_queue("virtio-blk", &mut self.queue, &self.mem, &self.interrupt, |chain| disk.serve(&self.mem, chain))
    }
}

/// The disk behind the queue: the image file and its bounds.
struct Disk {
    file: File,
    read_only: bool,
    /// The disk's size in sectors.
    sectors: u64,
}

impl Disk {
    /// One request; returns the bytes written to the guest (data and status).
    fn serve(&self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
        let (Ok(mut reader), Ok(mut writer)) = (Reader::new(mem, chain.clone()), Writer::new(mem, chain)) else {
            return 0;
        };
        // The status is the last device-writable byte; without one there is nowhere to answer.
        let Some(data_room) = writer.available_bytes().checked_sub(1) else { return 0 };
        let mut status_writer = match writer.split_at(data_room) {
            Ok(status) => status,
            Err(_) => return 0,
        };
        let (status, data_written) = match self.request(&mut reader, &mut writer, data_room) {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(Failure::IoErr) => (VIRTIO_BLK_S_IOERR, 0),
            Err(Failure::Unsupported) => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        if status_writer.write_all(&[status as u8]).is_err() {
            return data_written as u32;
        }
        (data_written + 1) as u32
    }

    fn request(&self, reader: &mut Reader, writer: &mut Writer, data_room: usize) -> Result<usize, Failure> {
        let mut header = [0u8; HEADER_LEN];
        reader.read_exact(&mut header).map_err(|_| Failure::IoErr)?;
        let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        match kind {
            VIRTIO_BLK_T_IN => {
                let offset = self.range(sector, data_room)?;
                self.read_into(writer, offset, data_room)?;
                Ok(data_room)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(Failure::IoErr);
                }
                let len = reader.available_bytes();
                let offset = self.range(sector, len)?;
                self.write_from(reader, offset, len)?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.read_only {
                    self.file.sync_data().map_err(|_| Failure::IoErr)?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = data_room.min(DEVICE_ID.len());
                writer.write_all(&DEVICE_ID[..n]).map_err(|_| Failure::IoErr)?;
                Ok(n)
            }
            _ => Err(Failure::Unsupported),
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they lie on sector boundaries inside
    /// the disk.
    fn range(&self, sector: u64, len: usize) -> Result<u64, Failure> {
        let len = len as u64;
        if !len.is_multiple_of(SECTOR) {
            return Err(Failure::IoErr);
        }
        let end = sector.checked_add(len / SECTOR).ok_or(Failure::IoErr)?;
        if end > self.sectors {
            return Err(Failure::IoErr);
        }
        Ok(sector * SECTOR)
    }

    fn read_into(&self, writer: &mut Writer, mut offset: u64, len: usize) -> Result<(), Failure> {
        let mut buf = vec![0u8; len.min(CHUNK)];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            self.file.read_exact_at(&mut buf[..n], offset).map_err(|_| Failure::IoErr)?;
            writer.write_all(&buf[..n]).map_err(|_| Failure::IoErr)?;
            offset += n as u64;
            left -= n;
        }
        Ok(())
    }

    fn write_from(&self, reader: &mut Reader, mut offset: u64, len: usize) -> Result<(), Failure> {
        let mut buf = vec![0u8; len.min(CHUNK)];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            reader.read_exact(&mut buf[..n]).map_err(|_| Failure::IoErr)?;
            self.file.write_all_at(&buf[..n], offset).map_err(|_| Failure::IoErr)?;
            offset += n as u64;
            left -= n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const DISK_SECTORS: u64 = 64;

    fn mem() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    /// A disk whose sector N is filled with the byte N.
    fn disk() -> (tempfile::NamedTempFile, File) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        for s in 0..DISK_SECTORS {
            f.write_all(&[s as u8; SECTOR as usize]).unwrap();
        }
        let file = f.reopen().unwrap();
        (f, file)
    }

    fn header(mem: &GuestMemory, kind: u32, sector: u64) {
        let mut h = kind.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Runs one chain; returns (used length, status byte).
    fn run(mem: &GuestMemory, file: File, read_only: bool, chain: &[RawDescriptor]) -> (u32, u8) {
        let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
        vq.build_desc_chain(chain).unwrap();
        let queue: Queue = vq.create_queue().unwrap();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        let mut w = BlockWorker {
            mem: mem.clone(),
            queue,
            kick: EventFd::new(0).unwrap(),
            interrupt,
            disk: Disk { file, read_only, sectors: DISK_SECTORS },
        };
        assert_eq!(w.process_queue(), 1, "every chain comes back");
        let used_len: u32 = mem.read_obj(GuestAddress(w.queue.used_ring() + 8)).unwrap();
        (used_len, mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn request(data_len: u32, data_flags: u32) -> [RawDescriptor; 3] {
        [
            desc(HDR, 16, VRING_DESC_F_NEXT, 1),
            desc(DATA, data_len, data_flags | VRING_DESC_F_NEXT, 2),
            desc(STATUS, 1, VRING_DESC_F_WRITE, 0),
        ]
    }

    #[test]
    fn reads_writes_flushes_and_the_id() {
        let mem = mem();
        let (disk, file) = disk();
        header(&mem, VIRTIO_BLK_T_IN, 3);
        assert_eq!(run(&mem, file.try_clone().unwrap(), false, &request(1024, VRING_DESC_F_WRITE)), (1025, VIRTIO_BLK_S_OK as u8));
        let mut got = [0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got[..512].iter().all(|&b| b == 3) && got[512..].iter().all(|&b| b == 4));

        mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 10);
        assert_eq!(run(&mem, file.try_clone().unwrap(), false, &request(512, 0)), (1, VIRTIO_BLK_S_OK as u8));
        let mut on_disk = [0u8; 512];
        disk.as_file().read_exact_at(&mut on_disk, 10 * SECTOR).unwrap();
        assert_eq!(on_disk, [0xab; 512]);

        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(
            run(&mem, file.try_clone().unwrap(), false, &[desc(HDR, 16, VRING_DESC_F_NEXT, 1), desc(STATUS, 1, VRING_DESC_F_WRITE, 0)]).1,
            VIRTIO_BLK_S_OK as u8
        );
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(run(&mem, file, false, &request(20, VRING_DESC_F_WRITE)).1, VIRTIO_BLK_S_OK as u8);
        let mut id = [0u8; 8];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"cvm-disk");
    }

    #[test]
    fn a_read_only_disk_refuses_writes_itself() {
        let mem = mem();
        let (disk, file) = disk();
        mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(run(&mem, file, true, &request(512, 0)).1, VIRTIO_BLK_S_IOERR as u8);
        let mut on_disk = [0u8; 512];
        disk.as_file().read_exact_at(&mut on_disk, 0).unwrap();
        assert_eq!(on_disk, [0u8; 512], "the image is unchanged");
        let device = Block::new(disk.reopen().unwrap(), true).unwrap();
        assert_ne!(device.features() & (1 << VIRTIO_BLK_F_RO), 0, "and says it is read-only");
    }

    #[test]
    fn hostile_requests_fail_without_touching_the_disk_or_the_vmm() {
        let mem = mem();
        let (disk, file) = disk();
        let original = std::fs::read(disk.path()).unwrap();
        let cases: Vec<(&str, u32, u64, Vec<RawDescriptor>, u8)> = vec![
            ("read past the end", VIRTIO_BLK_T_IN, DISK_SECTORS - 1, request(1024, VRING_DESC_F_WRITE).to_vec(), VIRTIO_BLK_S_IOERR as u8),
            ("write past the end", VIRTIO_BLK_T_OUT, DISK_SECTORS, request(512, 0).to_vec(), VIRTIO_BLK_S_IOERR as u8),
            ("sector overflow", VIRTIO_BLK_T_OUT, u64::MAX, request(512, 0).to_vec(), VIRTIO_BLK_S_IOERR as u8),
            ("not a whole sector", VIRTIO_BLK_T_OUT, 0, request(100, 0).to_vec(), VIRTIO_BLK_S_IOERR as u8),
            ("read into a device-readable buffer", VIRTIO_BLK_T_IN, 0, request(512, 0).to_vec(), VIRTIO_BLK_S_OK as u8),
            ("unknown request", 0xdead, 0, request(512, 0).to_vec(), VIRTIO_BLK_S_UNSUPP as u8),
            ("discard", VIRTIO_BLK_T_DISCARD, 0, request(16, 0).to_vec(), VIRTIO_BLK_S_UNSUPP as u8),
            (
                "short header",
                VIRTIO_BLK_T_IN,
                0,
                vec![desc(HDR, 8, VRING_DESC_F_NEXT, 1), desc(STATUS, 1, VRING_DESC_F_WRITE, 0)],
                VIRTIO_BLK_S_IOERR as u8,
            ),
            (
                "data outside guest RAM",
                VIRTIO_BLK_T_OUT,
                0,
                vec![
                    desc(HDR, 16, VRING_DESC_F_NEXT, 1),
                    desc(0xffff_f000, 512, VRING_DESC_F_NEXT, 2),
                    desc(STATUS, 1, VRING_DESC_F_WRITE, 0),
                ],
                0xff,
            ),
        ];
        for (what, kind, sector, chain, want) in cases {
            header(&mem, kind, sector);
            let (_, status) = run(&mem, file.try_clone().unwrap(), false, &chain);
            assert_eq!(status, want, "{what}");
        }
        // No status byte at all: the chain comes back with nothing written.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(run(&mem, file.try_clone().unwrap(), false, &[desc(HDR, 16, 0, 0)]).0, 0);
        // A chain that loops back to its head comes back too (`run` checks), and the loop ends.
        run(&mem, file, false, &[desc(HDR, 16, VRING_DESC_F_NEXT, 1), desc(STATUS, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0)]);
        assert_eq!(std::fs::read(disk.path()).unwrap(), original, "no hostile request changed the disk");
    }

    /// Through the virtio-mmio transport as Linux drives it: requests are served by the I/O
    /// thread while the event loop does nothing, and after a reset the device serves a queue
    /// set up elsewhere.
    #[test]
    fn the_io_thread_serves_the_queue_before_and_after_a_reset() {
        use crate::virtio::MmioTransport;
        use cvm_virtual_guest::{GuestQueue, MmioDriver};
        use event_manager::EventManager;
        use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
        use virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS;

        let mem = mem();
        let (disk, _) = disk();
        // Never run: the device must not need the event loop.
        let event_loop = EventManager::<Subscriber>::new().unwrap();
        let transport = MmioTransport::new(
            Box::new(Block::new(disk.reopen().unwrap(), false).unwrap()),
            mem.clone(),
            Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            event_loop.remote_endpoint(),
        )
        .unwrap();
        let driver = MmioDriver(Arc::new(Mutex::new(transport)));
        let read_sector = |queue: &mut GuestQueue, sector: u64| -> u8 {
            header(&mem, VIRTIO_BLK_T_IN, sector);
            queue.push(&mem, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
            driver.0.lock().unwrap().kick_events()[0].write(1).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while queue.take_used(&mem).is_empty() {
                assert!(std::time::Instant::now() < deadline, "the I/O thread served nothing");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), VIRTIO_BLK_S_OK as u8);
            mem.read_obj(GuestAddress(DATA)).unwrap()
        };
        for (base, sector) in [(0x1000, 5), (0x4_0000, 9)] {
            driver.write(VIRTIO_MMIO_STATUS, 0);
            driver.negotiate();
            let mut queue = GuestQueue::new(base, QUEUE_SIZE);
            driver.setup_queue(0, &queue);
            driver.driver_ok();
            assert_ne!(driver.read(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK, 0);
            assert_eq!(read_sector(&mut queue, sector), sector as u8);
        }
    }

    #[test]
    fn the_capacity_is_in_the_config_space_and_empty_images_are_refused() {
        let (disk, _) = disk();
        let device = Block::new(disk.reopen().unwrap(), false).unwrap();
        let mut capacity = [0u8; 8];
        device.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), DISK_SECTORS);
        let mut past = [0xffu8; 4];
        device.read_config(60, &mut past);
        assert_eq!(past, [0; 4]);
        let empty = tempfile::tempfile().unwrap();
        assert!(Block::new(empty, true).is_err());
    }
}
