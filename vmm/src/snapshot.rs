//! Snapshots of a paused VM, and the files they live in.
//!
//! A snapshot is a directory of two files, both mode 0600:
//! - `state`: a header (magic, format version, the body's length and SHA-256) and the body, the
//!   [`Snapshot`] in postcard's encoding: every vCPU's state, the VM's interrupt controllers,
//!   PIT and clock, the serial port and each virtio-mmio transport with its queues;
//! - `memory`: guest RAM as a sparse file, its pages at their offsets in the RAM memfd (all-zero
//!   pages are holes);
//! - `disk-N`: the Nth writable disk as it was at the pause (the guest's page cache in `memory`
//!   describes it), copied sparse; a restore gives each writable disk a copy of it.
//!
//! It is written into a scratch directory beside its place and renamed into it, so a reader
//! sees a whole snapshot or none. A snapshot that does not read back whole (a bad header or
//! checksum, a short memory file) is refused with [`crate::Error::Snapshot`]; the caller boots
//! cold instead.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use cvm_devices::legacy::SerialConsoleState;
use cvm_devices::virtio::TransportState;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::arch::x86_64::state::{CpuState, VmState};
use crate::{Error, Result, VmConfig};

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";
const MAGIC: &[u8; 8] = b"cvmsnap\0";
/// Bumped whenever [`Snapshot`]'s encoding changes: an older snapshot is then refused.
const FORMAT: u32 = 2;
const HEADER_LEN: usize = 8 + 4 + 8 + 32;
/// No state body is near this; a larger length is a corrupt header.
const MAX_STATE_LEN: u64 = 64 << 20;
/// The largest state file a snapshot may have.
pub const MAX_STATE_FILE_LEN: u64 = HEADER_LEN as u64 + MAX_STATE_LEN;
const PAGE: usize = crate::layout::PAGE_SIZE as usize;

/// Everything of a paused VM but its memory.
#[derive(Serialize, Deserialize)]
pub struct Snapshot {
    pub memory_bytes: u64,
    pub vm: VmState,
    pub vcpus: Vec<CpuState>,
    pub serial: SerialConsoleState,
    /// The virtio-mmio transports in the order the builder makes them.
    pub transports: Vec<TransportState>,
    /// The size of each writable disk, in the VM's order.
    pub disks: Vec<u64>,
    /// Guest memory no device reads or writes, as guest-physical (start, end) ranges: the
    /// kernel's code, the initrd it keeps and its struct pages. Restored VMs map it private from the snapshot, and
    /// so share its pages (see [`crate::vstate::memory::restore_guest_memory`]).
    pub kernel_private: Vec<(u64, u64)>,
}

fn corrupt(dir: &Path, what: impl std::fmt::Display) -> Error {
    Error::Snapshot(format!("{}: {what}", dir.display()))
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::File { path: path.to_path_buf(), source }
}

impl Snapshot {
    /// Refuses a snapshot of another machine than `config` describes. (Which devices, in which
    /// order, is checked device by device as each transport is restored.)
    pub fn check_fits(&self, config: &VmConfig) -> Result<()> {
        if self.vcpus.len() != usize::from(config.vcpus) || self.memory_bytes != config.memory_bytes {
            return Err(Error::Snapshot(format!(
                "the snapshot is of a VM with {} vCPUs and {} MiB, not {} and {} MiB",
                self.vcpus.len(),
                self.memory_bytes >> 20,
                config.vcpus,
                config.memory_bytes >> 20
            )));
        }
        Ok(())
    }

    /// The state file's contents: the header, then the encoded body.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let body = postcard::to_stdvec(self).map_err(|e| Error::Snapshot(format!("cannot encode the state: {e}")))?;
        Ok(framed(&body))
    }

    /// Makes each of `disks` (the VM's writable disks, in order) a copy of the snapshot's.
    pub fn restore_disks(&self, dir: &Path, disks: &[PathBuf]) -> Result<()> {
        if disks.len() != self.disks.len() {
            return Err(Error::Snapshot(format!("the snapshot has {} writable disks, this VM {}", self.disks.len(), disks.len())));
        }
        for (index, (disk, &size)) in disks.iter().zip(&self.disks).enumerate() {
            let path = dir.join(format!("disk-{index}"));
            let from = File::open(&path).map_err(file_err(&path))?;
            if from.metadata().map_err(file_err(&path))?.len() != size {
                return Err(corrupt(dir, format!("disk-{index} is not {size} bytes")));
            }
            let to = std::fs::OpenOptions::new().write(true).open(disk).map_err(file_err(disk))?;
            to.set_len(0)
                .and_then(|()| to.set_len(size))
                .and_then(|()| copy_pages(&from, &to, size, true))
                .map(drop)
                .map_err(file_err(disk))?;
        }
        Ok(())
    }

    /// Reads the snapshot in `dir`; returns it with its memory file, open for reading.
    pub fn read(dir: &Path) -> Result<(Snapshot, File)> {
        let path = dir.join(STATE_FILE);
        let mut file = File::open(&path).map_err(file_err(&path))?;
        let mut header = Vec::with_capacity(HEADER_LEN);
        (&mut file).take(HEADER_LEN as u64).read_to_end(&mut header).map_err(file_err(&path))?;
        if !header.starts_with(MAGIC) {
            return Err(corrupt(dir, "not a cvm snapshot"));
        }
        if header.len() < HEADER_LEN {
            return Err(corrupt(dir, "the state file is shorter than its header"));
        }
        let format = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
        if format != FORMAT {
            return Err(corrupt(dir, format!("snapshot format {format}, this cvm reads {FORMAT}")));
        }
        let len = u64::from_le_bytes(header[12..20].try_into().unwrap_or_default());
        if len > MAX_STATE_LEN {
            return Err(corrupt(dir, "the state's length is corrupt"));
        }
        let mut body = Vec::with_capacity(len as usize);
        file.take(len).read_to_end(&mut body).map_err(file_err(&path))?;
        if body.len() as u64 != len || Sha256::digest(&body).as_slice() != &header[20..] {
            return Err(corrupt(dir, "the state is truncated or corrupt (checksum mismatch)"));
        }
        let snapshot: Snapshot = postcard::from_bytes(&body).map_err(|e| corrupt(dir, format!("cannot decode the state: {e}")))?;
        let path = dir.join(MEMORY_FILE);
        let memory = File::open(&path).map_err(file_err(&path))?;
        let size = memory.metadata().map_err(file_err(&path))?.len();
        if size != snapshot.memory_bytes {
            return Err(corrupt(dir, format!("the memory file has {size} bytes, not {}", snapshot.memory_bytes)));
        }
        Ok((snapshot, memory))
    }
}

/// Writes a snapshot whose state file holds `state` ([`Snapshot::encode`]), with the first
/// `memory_bytes` of guest RAM (`ram`) and the writable `disks` as they are now (the VM is
/// paused), to `dir`, replacing whatever snapshot was there. It only copies bytes: cvm writes
/// a jailed VMM's snapshot with this, without decoding what the VMM sent.
pub fn write(dir: &Path, state: &[u8], ram: &File, memory_bytes: u64, disks: &[PathBuf]) -> Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(parent).map_err(file_err(parent))?;
    let scratch = scratch_dir(dir);
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::DirBuilder::new().mode(0o700).create(&scratch).map_err(file_err(&scratch))?;
    let written = write_files(&scratch, state, ram, memory_bytes, disks).and_then(|()| {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(file_err(dir))?;
        }
        std::fs::rename(&scratch, dir).map_err(file_err(dir))
    });
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    written
}

fn write_files(dir: &Path, state: &[u8], ram: &File, memory_bytes: u64, disks: &[PathBuf]) -> Result<()> {
    let path = dir.join(STATE_FILE);
    let mut file = private_file(&path)?;
    file.write_all(state).and_then(|()| file.sync_all()).map_err(file_err(&path))?;

    let path = dir.join(MEMORY_FILE);
    let memory = private_file(&path)?;
    copy_pages(ram, &memory, memory_bytes, true).map_err(file_err(&path))?;
    memory.set_len(memory_bytes).and_then(|()| memory.sync_all()).map_err(file_err(&path))?;

    for (index, disk) in disks.iter().enumerate() {
        let from = File::open(disk).map_err(file_err(disk))?;
        let size = from.metadata().map_err(file_err(disk))?.len();
        let path = dir.join(format!("disk-{index}"));
        let to = private_file(&path)?;
        copy_pages(&from, &to, size, true).and_then(|_| to.set_len(size)).and_then(|()| to.sync_all()).map_err(file_err(&path))?;
    }
    Ok(())
}

/// The state file's contents for `body`: the header (magic, format, length, SHA-256), then it.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut state = Vec::with_capacity(HEADER_LEN + body.len());
    state.extend_from_slice(MAGIC);
    state.extend_from_slice(&FORMAT.to_le_bytes());
    state.extend_from_slice(&(body.len() as u64).to_le_bytes());
    state.extend_from_slice(&Sha256::digest(body));
    state.extend_from_slice(body);
    state
}

fn scratch_dir(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".partial-{}", std::process::id()));
    dir.with_file_name(name)
}

fn private_file(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(file_err(path))
}

/// The runs of data in the first `len` bytes of `file`, as (start, end) offsets: what lies
/// outside them are holes (a memfd's untouched pages, a sparse file's).
pub(crate) fn data_runs(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let mut runs = Vec::new();
    let mut offset = 0u64;
    while offset < len {
        // SAFETY: lseek on an fd we hold; it only moves the file offset.
        let data = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENXIO) { Ok(runs) } else { Err(e) };
            // no data after offset
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        let (start, end) = (data as u64, if hole < 0 { len } else { (hole as u64).min(len) });
        if start >= len {
            break;
        }
        runs.push((start, end));
        offset = end.max(offset + 1);
    }
    Ok(runs)
}

/// Copies the first `len` bytes of `from` into `to` at the same offsets, only where `from` has
/// data ([`data_runs`]), and returns those runs. With `skip_zero_pages`, all-zero pages are
/// left as holes in `to` too; without, each run is copied inside the kernel.
pub(crate) fn copy_pages(from: &File, to: &File, len: u64, skip_zero_pages: bool) -> std::io::Result<Vec<(u64, u64)>> {
    let runs = data_runs(from, len)?;
    copy_runs(from, to, &runs, skip_zero_pages)?;
    Ok(runs)
}

/// Copies each (start, end) run of `from` into `to` at the same offsets, as [`copy_pages`].
pub(crate) fn copy_runs(from: &File, to: &File, runs: &[(u64, u64)], skip_zero_pages: bool) -> std::io::Result<()> {
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; if skip_zero_pages { CHUNK } else { 0 }];
    for &(start, end) in runs {
        if !skip_zero_pages {
            send_run(from, to, start, end)?;
            continue;
        }
        let mut at = start;
        while at < end {
            let n = (end - at).min(CHUNK as u64) as usize;
            from.read_exact_at(&mut buf[..n], at)?;
            // One write per run of pages to keep: a syscall per page is what a restore in a
            // nested VM paid most for.
            let mut run_start = None;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                let keep = page.iter().any(|&b| b != 0);
                match (keep, run_start) {
                    (true, None) => run_start = Some(i * PAGE),
                    (false, Some(first)) => {
                        to.write_all_at(&buf[first..i * PAGE], at + first as u64)?;
                        run_start = None;
                    }
                    _ => {}
                }
            }
            if let Some(first) = run_start {
                to.write_all_at(&buf[first..n], at + first as u64)?;
            }
            at += n as u64;
        }
    }
    Ok(())
}

/// Copies bytes `start..end` of `from` to the same place in `to` inside the kernel
/// (`sendfile`): one copy, from the page cache into `to`, and no buffer in between.
fn send_run(from: &File, to: &File, start: u64, end: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let last_os_error = || Err(std::io::Error::last_os_error());
    // SAFETY: lseek on an fd we hold; it only moves the file offset sendfile writes at.
    if unsafe { libc::lseek(to.as_raw_fd(), start as libc::off_t, libc::SEEK_SET) } < 0 {
        return last_os_error();
    }
    let mut at = start as libc::off_t;
    while (at as u64) < end {
        let count = (end - at as u64).min(1 << 30) as usize;
        // SAFETY: both fds are ours; sendfile reads `from` at `at`, advancing it, and writes
        // at `to`'s offset.
        match unsafe { libc::sendfile(to.as_raw_fd(), from.as_raw_fd(), &mut at, count) } {
            n if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => continue,
            n if n < 0 => return last_os_error(),
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
