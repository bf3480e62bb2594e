//! A FUSE client that does what Linux's virtiofs driver does: it brings up a virtio-fs device
//! (cvm's vhost-user frontend on the virtio-mmio transport, guest RAM in a memfd the backend
//! maps) and sends FUSE requests through the request queue, one at a time, each a chain of a
//! device-readable request and a device-writable reply buffer. Its requests are built byte by
//! byte from the FUSE ABI, not from the server's own definitions, so the two are checked
//! against each other.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::EventManager;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{GuestQueue, MmioDriver};
use cvm_devices::virtio::{DeviceConfig, GuestMemory, Interrupt, MmioTransport, Subscriber, VhostUserDevice, VhostUserDeviceKind};

pub const ROOT: u64 = 1;
const RAM: u64 = 16 << 20;
const REQUEST_QUEUE: u32 = 1;
const QUEUE_SIZE: u16 = 256;
/// Where requests and replies are laid out in guest RAM, and how large each may be.
const IN_ADDR: u64 = 0x20_0000;
/// Replies come as Linux lays them out: the header in its own buffer, the payload in
/// page-aligned ones (where a read's data lands in the page cache).
const OUT_HEADER_ADDR: u64 = 0x5f_f000;
const OUT_ADDR: u64 = 0x60_0000;
/// Data that write requests carry in their own descriptor, as Linux's page-cache pages.
const DATA_ADDR: u64 = 0xa0_0000;
pub const MAX_PAYLOAD: u32 = 1 << 20;
const HEADER_IN: usize = 40;
const HEADER_OUT: u32 = 16;
/// A reply that does not come in this long means a stuck backend.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// FUSE opcodes this client sends.
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const RELEASE: u32 = 18;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const CREATE: u32 = 35;
    pub const BATCH_FORGET: u32 = 42;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
}

/// What a lookup or a creation returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub nodeid: u64,
    pub ino: u64,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Entry {
    /// An `EntryOut`: node id, generation, two validities and their nanoseconds, then `Attr`.
    fn parse(b: &[u8]) -> io::Result<Entry> {
        if b.len() < 128 {
            return Err(io::Error::other(format!("short entry reply ({} bytes)", b.len())));
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let attr = 40;
        Ok(Entry {
            nodeid: u64_at(0),
            ino: u64_at(attr),
            size: u64_at(attr + 8),
            mode: u32_at(attr + 60),
            uid: u32_at(attr + 68),
            gid: u32_at(attr + 72),
        })
    }
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

fn name(n: &[u8]) -> Vec<u8> {
    let mut v = n.to_vec();
    v.push(0);
    v
}

/// A guest with one virtio-fs device, driving it as Linux's driver would.
pub struct FuseGuest {
    mem: GuestMemory,
    driver: MmioDriver,
    transport: Arc<Mutex<MmioTransport>>,
    queue: GuestQueue,
    irq: EventFd,
    unique: u64,
    /// Requests posted, and the kicks they took (fewer where the device watched the ring).
    posted: u64,
    kicks: u64,
    /// Keeps the transport's remote endpoint valid.
    _event_loop: EventManager<Subscriber>,
}

impl FuseGuest {
    /// Connects to the vhost-user fs backend listening on `socket` and sends FUSE INIT.
    pub fn connect(socket: &Path) -> io::Result<FuseGuest> {
        let ram = memfd()?;
        ram.set_len(RAM)?;
        let mem: GuestMemory = GuestMemoryMmap::from_ranges_with_files(&[(GuestAddress(0), RAM as usize, Some(FileOffset::new(ram, 0)))])
            .map_err(|e| io::Error::other(format!("guest RAM: {e}")))?;
        let kind = VhostUserDeviceKind { queue_size: QUEUE_SIZE, ..VhostUserDeviceKind::FS };
        let device = VhostUserDevice::connect(UnixStream::connect(socket)?, kind, DeviceConfig::Local(vec![0; kind.config_len as usize]))?;
        let irq = EventFd::new(EFD_NONBLOCK)?;
        let event_loop = EventManager::<Subscriber>::new().map_err(|e| io::Error::other(format!("{e:?}")))?;
        let transport =
            MmioTransport::new(Box::new(device), mem.clone(), Arc::new(Interrupt::new(irq.try_clone()?)), event_loop.remote_endpoint())
                .map_err(|e| io::Error::other(format!("{e:?}")))?;
        let transport = Arc::new(Mutex::new(transport));
        let driver = MmioDriver(transport.clone());
        driver.negotiate();
        let hiprio = GuestQueue::new(0x1000, QUEUE_SIZE);
        let queue = GuestQueue::new(0x1_0000, QUEUE_SIZE);
        driver.setup_queue(0, &hiprio);
        driver.setup_queue(REQUEST_QUEUE, &queue);
        driver.driver_ok();
        let mut guest = FuseGuest { mem, driver, transport, queue, irq, unique: 0, posted: 0, kicks: 0, _event_loop: event_loop };
        // major 7, minor 31, max_readahead, flags: none.
        let init = [7u32, 31, 1 << 20, 0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>();
        guest.request(op::INIT, 0, &init, 256)?;
        Ok(guest)
    }

    /// Whether the device accepted DRIVER_OK (a broken backend makes the transport fail it).
    pub fn status(&self) -> u32 {
        self.driver.read(virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS)
    }

    /// Posts `chain` (address, length, device-writable) on the request queue and kicks unless
    /// the device is watching the ring; does not wait. Returns the chain's head. For hostile chains.
    pub fn post_raw(&mut self, chain: &[(u64, u32, bool)]) -> io::Result<u16> {
        let head = self.queue.push(&self.mem, chain);
        self.posted += 1;
        if self.queue.needs_kick(&self.mem) {
            self.kicks += 1;
            self.transport.lock().unwrap_or_else(|e| e.into_inner()).kick_events()[REQUEST_QUEUE as usize].write(1)?;
        }
        Ok(head)
    }

    /// Requests posted so far, and how many of them needed a kick.
    pub fn kicks(&self) -> (u64, u64) {
        (self.posted, self.kicks)
    }

    /// Writes raw bytes into guest RAM at `addr` (for hostile requests).
    pub fn write_ram(&self, addr: u64, bytes: &[u8]) -> io::Result<()> {
        self.mem.write_slice(bytes, GuestAddress(addr)).map_err(|e| io::Error::other(format!("{e}")))
    }

    /// Waits for the chain at `head` to come back; returns how many bytes the device wrote.
    /// Other chains returned meanwhile (hostile ones posted earlier) are passed over.
    pub fn wait_used(&mut self, head: u16) -> io::Result<u32> {
        let deadline = std::time::Instant::now() + REPLY_TIMEOUT;
        loop {
            if let Some(&(_, len)) = self.queue.take_used(&self.mem).iter().find(|(h, _)| *h == u32::from(head)) {
                return Ok(len);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the backend did not answer"));
            }
            let mut pfd = libc::pollfd { fd: self.irq.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one pollfd that outlives the call.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(100) as i32) };
            let _ = self.irq.read();
        }
    }

    /// Sends one request on `nodeid` and returns the reply's payload, or the error the
    /// server answered with.
    pub fn request(&mut self, opcode: u32, nodeid: u64, args: &[u8], reply_room: u32) -> io::Result<Vec<u8>> {
        self.request_as(opcode, nodeid, args, reply_room, 0, 0)
    }

    /// [`FuseGuest::request`] with the caller's uid and gid in the header.
    pub fn request_as(&mut self, opcode: u32, nodeid: u64, args: &[u8], reply_room: u32, uid: u32, gid: u32) -> io::Result<Vec<u8>> {
        let len = self.send(opcode, nodeid, args, None, reply_room, (uid, gid))?;
        let mut out = vec![0u8; len as usize];
        self.mem.read_slice(&mut out, GuestAddress(OUT_ADDR)).map_err(|e| io::Error::other(format!("{e}")))?;
        Ok(out)
    }

    /// Sends one request (with `data` as a second device-readable buffer, if any) and waits
    /// for its reply; returns the payload's length, which stays in guest RAM.
    fn send(
        &mut self,
        opcode: u32,
        nodeid: u64,
        args: &[u8],
        data: Option<(u64, u32)>,
        reply_room: u32,
        (uid, gid): (u32, u32),
    ) -> io::Result<u32> {
        let data_len = data.map_or(0, |(_, len)| len as usize);
        if args.len() > (MAX_PAYLOAD as usize + 4096) || reply_room > MAX_PAYLOAD {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "request too large for the virtual guest"));
        }
        self.unique += 1;
        let mut req = Vec::with_capacity(HEADER_IN + args.len());
        req.extend_from_slice(&((HEADER_IN + args.len() + data_len) as u32).to_le_bytes());
        req.extend_from_slice(&opcode.to_le_bytes());
        req.extend_from_slice(&self.unique.to_le_bytes());
        req.extend_from_slice(&nodeid.to_le_bytes());
        req.extend_from_slice(&uid.to_le_bytes());
        req.extend_from_slice(&gid.to_le_bytes());
        req.extend_from_slice(&1u32.to_le_bytes()); // pid
        req.extend_from_slice(&[0u8; 4]); // no extensions, padding
        req.extend_from_slice(args);
        self.write_ram(IN_ADDR, &req)?;
        let mut chain = vec![(IN_ADDR, req.len() as u32, false)];
        chain.extend(data.map(|(addr, len)| (addr, len, false)));
        // Forgetting has no reply: the server only returns the buffer.
        if opcode == op::FORGET || opcode == op::BATCH_FORGET {
            let head = self.post_raw(&chain)?;
            return self.wait_used(head).map(|_| 0);
        }
        chain.push((OUT_HEADER_ADDR, HEADER_OUT, true));
        if reply_room > 0 {
            chain.push((OUT_ADDR, reply_room, true));
        }
        let head = self.post_raw(&chain)?;
        let written = self.wait_used(head)?;
        if written < HEADER_OUT {
            return Err(io::Error::other(format!("reply of {written} bytes")));
        }
        let mut header = [0u8; HEADER_OUT as usize];
        self.mem.read_slice(&mut header, GuestAddress(OUT_HEADER_ADDR)).map_err(|e| io::Error::other(format!("{e}")))?;
        let error = i32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let unique = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        if unique != self.unique {
            return Err(io::Error::other(format!("reply to request {unique}, expected {}", self.unique)));
        }
        if error != 0 {
            return Err(errno(-error));
        }
        Ok(written - HEADER_OUT)
    }

    /// Fills the data area that [`FuseGuest::write_in_place`] sends from.
    pub fn fill_data(&self, bytes: &[u8]) -> io::Result<()> {
        if bytes.len() > MAX_PAYLOAD as usize {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "more data than the data area holds"));
        }
        self.write_ram(DATA_ADDR, bytes)
    }

    /// READ into guest RAM, as the kernel reads into its page cache: returns how many bytes
    /// came, without copying them out.
    pub fn read_in_place(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> io::Result<u32> {
        self.send(op::READ, nodeid, &Self::io_args(fh, offset, size), None, size, (0, 0))
    }

    /// WRITE of the first `size` bytes of the data area, in their own descriptor.
    pub fn write_in_place(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> io::Result<u32> {
        self.send(op::WRITE, nodeid, &Self::io_args(fh, offset, size), Some((DATA_ADDR, size.min(MAX_PAYLOAD))), 8, (0, 0))?;
        let mut written = [0u8; 4];
        self.mem.read_slice(&mut written, GuestAddress(OUT_ADDR)).map_err(|e| io::Error::other(format!("{e}")))?;
        Ok(u32::from_le_bytes(written))
    }

    pub fn lookup(&mut self, parent: u64, n: &[u8]) -> io::Result<Entry> {
        Entry::parse(&self.request(op::LOOKUP, parent, &name(n), 128)?)
    }

    /// Drops `count` lookups of `nodeid`, as the kernel does when it evicts an inode: the
    /// server may then close what it held for it.
    pub fn forget(&mut self, nodeid: u64, count: u64) -> io::Result<()> {
        self.send(op::FORGET, nodeid, &count.to_le_bytes(), None, 0, (0, 0)).map(drop)
    }

    pub fn getattr(&mut self, nodeid: u64) -> io::Result<Entry> {
        let reply = self.request(op::GETATTR, nodeid, &[0u8; 16], 104)?;
        // AttrOut: validity (8), nanoseconds (4), padding (4), then Attr: shaped as an entry
        // whose node id is this one.
        let mut entry = vec![0u8; 40];
        entry.extend_from_slice(reply.get(16..).unwrap_or_default());
        let mut e = Entry::parse(&entry)?;
        e.nodeid = nodeid;
        Ok(e)
    }

    pub fn mkdir(&mut self, parent: u64, n: &[u8], mode: u32) -> io::Result<Entry> {
        let mut args = mode.to_le_bytes().to_vec();
        args.extend_from_slice(&0u32.to_le_bytes());
        args.extend_from_slice(&name(n));
        Entry::parse(&self.request(op::MKDIR, parent, &args, 128)?)
    }

    pub fn mknod(&mut self, parent: u64, n: &[u8], mode: u32, rdev: u32) -> io::Result<Entry> {
        let mut args = Vec::new();
        for v in [mode, rdev, 0, 0] {
            args.extend_from_slice(&v.to_le_bytes());
        }
        args.extend_from_slice(&name(n));
        Entry::parse(&self.request(op::MKNOD, parent, &args, 128)?)
    }

    /// Creates and opens `n` for writing: (entry, file handle).
    pub fn create(&mut self, parent: u64, n: &[u8], mode: u32) -> io::Result<(Entry, u64)> {
        let mut args = Vec::new();
        for v in [(libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC) as u32, mode, 0, 0] {
            args.extend_from_slice(&v.to_le_bytes());
        }
        args.extend_from_slice(&name(n));
        let reply = self.request(op::CREATE, parent, &args, 128 + 16)?;
        let entry = Entry::parse(&reply)?;
        let fh =
            u64::from_le_bytes(reply.get(128..136).ok_or_else(|| io::Error::other("short create reply"))?.try_into().expect("8 bytes"));
        Ok((entry, fh))
    }

    pub fn open(&mut self, nodeid: u64, flags: i32) -> io::Result<u64> {
        let mut args = (flags as u32).to_le_bytes().to_vec();
        args.extend_from_slice(&0u32.to_le_bytes());
        let reply = self.request(op::OPEN, nodeid, &args, 16)?;
        Ok(u64::from_le_bytes(reply.get(..8).ok_or_else(|| io::Error::other("short open reply"))?.try_into().expect("8 bytes")))
    }

    pub fn opendir(&mut self, nodeid: u64) -> io::Result<u64> {
        let reply = self.request(op::OPENDIR, nodeid, &[0u8; 8], 16)?;
        Ok(u64::from_le_bytes(reply.get(..8).ok_or_else(|| io::Error::other("short opendir reply"))?.try_into().expect("8 bytes")))
    }

    fn io_args(fh: u64, offset: u64, size: u32) -> Vec<u8> {
        let mut args = Vec::with_capacity(40);
        args.extend_from_slice(&fh.to_le_bytes());
        args.extend_from_slice(&offset.to_le_bytes());
        args.extend_from_slice(&size.to_le_bytes());
        args.extend_from_slice(&[0u8; 20]); // read/write flags, lock owner, flags, padding
        args
    }

    pub fn read(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        self.request(op::READ, nodeid, &Self::io_args(fh, offset, size), size)
    }

    pub fn write(&mut self, nodeid: u64, fh: u64, offset: u64, data: &[u8]) -> io::Result<u32> {
        let mut args = Self::io_args(fh, offset, data.len() as u32);
        args.extend_from_slice(data);
        let reply = self.request(op::WRITE, nodeid, &args, 8)?;
        Ok(u32::from_le_bytes(reply.get(..4).ok_or_else(|| io::Error::other("short write reply"))?.try_into().expect("4 bytes")))
    }

    pub fn release(&mut self, nodeid: u64, fh: u64, dir: bool) -> io::Result<()> {
        let mut args = fh.to_le_bytes().to_vec();
        args.extend_from_slice(&[0u8; 16]);
        self.request(if dir { op::RELEASEDIR } else { op::RELEASE }, nodeid, &args, 0).map(drop)
    }

    /// Reads a whole directory with `opcode` (READDIR or READDIRPLUS): each entry, as
    /// (its entry part for READDIRPLUS, its name), until an empty reply.
    fn read_dir(&mut self, nodeid: u64, opcode: u32) -> io::Result<Vec<(Option<Entry>, Vec<u8>)>> {
        // READDIRPLUS puts an entry (128 bytes) before each dirent (24 bytes and the name).
        let entry_len = if opcode == op::READDIRPLUS { 128 } else { 0 };
        let fh = self.opendir(nodeid)?;
        let mut out = Vec::new();
        let mut offset = 0u64;
        loop {
            let reply = self.request(opcode, nodeid, &Self::io_args(fh, offset, 64 * 1024), 64 * 1024)?;
            if reply.is_empty() {
                break;
            }
            let mut at = 0;
            while at + entry_len + 24 <= reply.len() {
                let entry = (entry_len > 0).then(|| Entry::parse(&reply[at..at + entry_len])).transpose()?;
                let d = at + entry_len;
                offset = u64::from_le_bytes(reply[d + 8..d + 16].try_into().expect("8 bytes"));
                let len = u32::from_le_bytes(reply[d + 16..d + 20].try_into().expect("4 bytes")) as usize;
                out.push((entry, reply[d + 24..(d + 24 + len).min(reply.len())].to_vec()));
                at = d + ((24 + len + 7) & !7);
            }
        }
        self.release(nodeid, fh, true)?;
        Ok(out)
    }

    /// The names in a directory, `.` and `..` included (READDIR).
    pub fn list(&mut self, nodeid: u64) -> io::Result<Vec<Vec<u8>>> {
        Ok(self.read_dir(nodeid, op::READDIR)?.into_iter().map(|(_, name)| name).collect())
    }

    /// A directory's entries with their attributes (READDIRPLUS, as Linux reads directories
    /// when the server offers it); `.` and `..` left out. Each entry counts as a lookup.
    pub fn list_plus(&mut self, nodeid: u64) -> io::Result<Vec<(Vec<u8>, Entry)>> {
        Ok(self
            .read_dir(nodeid, op::READDIRPLUS)?
            .into_iter()
            .filter_map(|(entry, name)| entry.filter(|e| e.nodeid != 0 && name != b"." && name != b"..").map(|e| (name, e)))
            .collect())
    }

    /// Drops one lookup of each of `nodeids` in one request, as the kernel batches them.
    pub fn batch_forget(&mut self, nodeids: &[u64]) -> io::Result<()> {
        let mut args = (nodeids.len() as u32).to_le_bytes().to_vec();
        args.extend_from_slice(&[0u8; 4]);
        for node in nodeids {
            args.extend_from_slice(&node.to_le_bytes());
            args.extend_from_slice(&1u64.to_le_bytes());
        }
        self.send(op::BATCH_FORGET, 0, &args, None, 0, (0, 0)).map(drop)
    }

    pub fn unlink(&mut self, parent: u64, n: &[u8]) -> io::Result<()> {
        self.request(op::UNLINK, parent, &name(n), 0).map(drop)
    }

    pub fn rmdir(&mut self, parent: u64, n: &[u8]) -> io::Result<()> {
        self.request(op::RMDIR, parent, &name(n), 0).map(drop)
    }

    pub fn rename(&mut self, olddir: u64, old: &[u8], newdir: u64, new: &[u8]) -> io::Result<()> {
        let mut args = newdir.to_le_bytes().to_vec();
        args.extend_from_slice(&name(old));
        args.extend_from_slice(&name(new));
        self.request(op::RENAME, olddir, &args, 0).map(drop)
    }

    /// RENAME2: a rename with `RENAME_*` flags.
    pub fn rename2(&mut self, olddir: u64, old: &[u8], newdir: u64, new: &[u8], flags: u32) -> io::Result<()> {
        let mut args = newdir.to_le_bytes().to_vec();
        args.extend_from_slice(&flags.to_le_bytes());
        args.extend_from_slice(&0u32.to_le_bytes());
        args.extend_from_slice(&name(old));
        args.extend_from_slice(&name(new));
        self.request(op::RENAME2, olddir, &args, 0).map(drop)
    }

    pub fn link(&mut self, nodeid: u64, newparent: u64, n: &[u8]) -> io::Result<Entry> {
        let mut args = nodeid.to_le_bytes().to_vec();
        args.extend_from_slice(&name(n));
        Entry::parse(&self.request(op::LINK, newparent, &args, 128)?)
    }

    pub fn symlink(&mut self, parent: u64, n: &[u8], target: &[u8]) -> io::Result<Entry> {
        let mut args = name(n);
        args.extend_from_slice(&name(target));
        Entry::parse(&self.request(op::SYMLINK, parent, &args, 128)?)
    }

    pub fn readlink(&mut self, nodeid: u64) -> io::Result<Vec<u8>> {
        self.request(op::READLINK, nodeid, &[], 4096)
    }

    /// Truncates `nodeid` to `size` (SETATTR with FATTR_SIZE).
    pub fn truncate(&mut self, nodeid: u64, size: u64) -> io::Result<()> {
        self.setattr(nodeid, SetattrIn { size, ..SetattrIn::only(1 << 3) }) // FATTR_SIZE
    }

    /// SETATTR with the fields `attr.valid` names.
    pub fn setattr(&mut self, nodeid: u64, attr: SetattrIn) -> io::Result<()> {
        let mut args = vec![0u8; 88]; // struct fuse_setattr_in
        args[..4].copy_from_slice(&attr.valid.to_le_bytes());
        args[16..24].copy_from_slice(&attr.size.to_le_bytes());
        args[68..72].copy_from_slice(&attr.mode.to_le_bytes());
        args[76..80].copy_from_slice(&attr.uid.to_le_bytes());
        self.request(op::SETATTR, nodeid, &args, 104).map(drop)
    }
}

/// The fields of a SETATTR request the tests set; `valid` holds FATTR_* bits.
#[derive(Clone, Copy, Default)]
pub struct SetattrIn {
    pub valid: u32,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
}

impl SetattrIn {
    pub fn only(valid: u32) -> SetattrIn {
        SetattrIn { valid, ..SetattrIn::default() }
    }
}

fn memfd() -> io::Result<std::fs::File> {
    let fd = rustix::fs::memfd_create("cvm-virtual-guest", rustix::fs::MemfdFlags::CLOEXEC)?;
    Ok(std::fs::File::from(fd))
}
