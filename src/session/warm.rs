//! Warm starts: sessions restored from a snapshot of a booted guest instead of booting one.
//!
//! The first session of a kind (its [`key`]: cvm's own executable, the kernel, the image and
//! template, vCPUs, memory, the device set) boots cold; its VM pauses where cvm-agent reaches
//! init (the boot timer), before it has talked to the host, and cvm writes a snapshot to
//! `$XDG_CACHE_HOME/cvm/snapshots/<key>` ([`cvm_vmm::snapshot`]). Later sessions with the same
//! key restore it. Nothing of a session is in a snapshot: its user, shares, environment,
//! secrets and network settings reach the guest after the snapshot point, in the agent's
//! set-up, which also sets the guest's clock and re-seeds its random number generator
//! ([`cvm_agent::protocol::Step::Fresh`]).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use cvm_vmm::snapshot::Snapshot;
use cvm_vmm::VmConfig;
use sha2::{Digest, Sha256};

/// What a restored session logs (at info level), before the snapshot's path.
pub const RESTORED: &str = "warm start: restored from";

/// Snapshots kept at most: each new one removes the least recently used beyond this.
pub const KEEP: usize = 8;

/// `$XDG_CACHE_HOME/cvm/snapshots`.
pub fn snapshots_dir() -> PathBuf {
    crate::project::images::cache_dir().join("snapshots")
}

/// What a snapshot is valid for: a hash of everything that shapes the booted guest. A file is
/// known by its path, size, modification time and inode, so a rebuilt kernel, image or cvm is a
/// new key. None where a file cannot be read: such a session boots cold.
pub fn key(vm: &VmConfig) -> Option<String> {
    let mut hash = Sha256::new();
    let mut file = |path: &Path| -> Option<()> {
        let meta = std::fs::metadata(path).ok()?;
        hash.update(format!("{}\0{}\0{}\0{}\0{}\n", path.display(), meta.len(), meta.mtime(), meta.mtime_nsec(), meta.ino()));
        Some(())
    };
    file(&std::env::current_exe().ok()?)?;
    file(&vm.kernel)?;
    if let Some(initrd) = &vm.initrd {
        file(initrd)?;
    }
    let mut shape =
        format!("cmdline {}\ncpus {}\nmemory {}\nrng {}\nnet {}\n", vm.cmdline, vm.vcpus, vm.memory_bytes, vm.rng, vm.network.is_some());
    for disk in &vm.disks {
        if disk.read_only {
            file(&disk.path)?;
        } else {
            // A session's own disk: only its size shapes the guest (the snapshot keeps its contents).
            shape += &format!("writable disk {}\n", std::fs::metadata(&disk.path).ok()?.len());
        }
    }
    for device in &vm.vhost_user {
        shape += &format!("vhost-user {:?}\n", device.kind);
    }
    hash.update(shape);
    Some(hash.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// A kept snapshot.
#[derive(Debug)]
pub struct Entry {
    pub key: String,
    pub path: PathBuf,
    /// Bytes it takes on disk (its files are sparse).
    pub disk_bytes: u64,
    /// When a session last used (wrote or restored) it.
    pub used: SystemTime,
}

/// Every kept snapshot, most recently used first.
pub fn list() -> Vec<Entry> {
    let mut all: Vec<Entry> = std::fs::read_dir(snapshots_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().contains(".partial-") && e.path().join(cvm_vmm::snapshot::STATE_FILE).exists())
        .map(|e| {
            let path = e.path();
            let files = std::fs::read_dir(&path).into_iter().flatten().flatten();
            let disk_bytes = files.filter_map(|f| f.metadata().ok()).map(|m| m.blocks() * 512).sum();
            let used = std::fs::metadata(&path).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            Entry { key: e.file_name().to_string_lossy().into_owned(), path, disk_bytes, used }
        })
        .collect();
    all.sort_by_key(|e| std::cmp::Reverse(e.used));
    all
}

/// Removes the snapshot `key`. Sessions restored from it go on: their RAM maps its memory file,
/// which lives on until they end.
pub fn remove(key: &str) -> Result<()> {
    anyhow::ensure!(!key.is_empty() && key.chars().all(|c| c.is_ascii_hexdigit()), "{key:?} is not a snapshot key (see cvm snapshot ls)");
    let path = snapshots_dir().join(key);
    anyhow::ensure!(path.exists(), "no snapshot {key} (see cvm snapshot ls)");
    std::fs::remove_dir_all(&path).with_context(|| format!("cannot remove {}", path.display()))
}

/// How a session's VM starts, as far as snapshots go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// Booted, without a snapshot (`--cold`, QEMU, a kept scratch disk, no key).
    Cold,
    /// Booted, and snapshotted into this directory when the guest reaches init.
    ColdThenSnapshot(PathBuf),
    /// Restored from the snapshot in this directory.
    Warm(PathBuf),
}

/// Decides how `vm` starts, and sets it up to: a usable snapshot is restored, a missing one is
/// made. A snapshot that does not read back whole or does not fit is removed with a warning,
/// and made again.
pub fn plan(vm: &mut VmConfig) -> Start {
    let Some(key) = key(vm) else { return Start::Cold };
    let dir = snapshots_dir().join(key);
    if dir.exists() {
        match Snapshot::read(&dir).and_then(|(snapshot, _)| snapshot.check_fits(vm)) {
            Ok(()) => {
                touch(&dir);
                vm.restore = Some(dir.clone());
                return Start::Warm(dir);
            }
            Err(e) => {
                eprintln!("cvm: warning: {e}; booting cold and making it again");
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
    vm.pause_at_init = true;
    Start::ColdThenSnapshot(dir)
}

/// Marks a snapshot used now (the least recently used go first).
fn touch(dir: &Path) {
    let _ = std::fs::File::open(dir).and_then(|d| d.set_modified(SystemTime::now()));
}

/// Removes the least recently used snapshots beyond [`KEEP`], and what writers that died left
/// half-written (`<key>.partial-<pid>`, the pid gone).
pub fn prune() {
    for old in list().into_iter().skip(KEEP) {
        let _ = std::fs::remove_dir_all(&old.path);
    }
    for entry in std::fs::read_dir(snapshots_dir()).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((_, pid)) = name.rsplit_once(".partial-") {
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Waits for a VM started with [`Start::ColdThenSnapshot`] to reach init, and writes its
/// snapshot. Gives up at `deadline`, or as soon as `agent_spoke` (an agent that could not poke
/// the boot timer is ready without it). The VM runs on whatever happens; a failed snapshot is
/// a warning.
pub fn snapshot_at_init(vm: &cvm_vmm::VmProcess, dir: &Path, deadline: std::time::Instant, agent_spoke: impl Fn() -> bool) {
    while !vm.init_reached() {
        if vm.has_ended() || std::time::Instant::now() >= deadline || agent_spoke() {
            vm.resume();
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let started = std::time::Instant::now();
    match vm.snapshot(dir) {
        Ok(()) => {
            tracing::info!("warm start: snapshot written to {} in {:.0} ms", dir.display(), started.elapsed().as_secs_f64() * 1e3);
            prune();
        }
        Err(e) => eprintln!("cvm: warning: no warm-start snapshot: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cvm_vmm::DiskConfig;

    fn config(dir: &Path) -> VmConfig {
        let kernel = dir.join("vmlinux");
        let image = dir.join("root.erofs");
        let scratch = dir.join("scratch.ext4");
        for file in [&kernel, &image, &scratch] {
            if !file.exists() {
                std::fs::write(file, b"data").unwrap();
            }
        }
        VmConfig {
            disks: vec![DiskConfig { path: image, read_only: true }, DiskConfig { path: scratch, read_only: false }],
            ..VmConfig::new(kernel)
        }
    }

    #[test]
    fn the_key_follows_what_shapes_the_guest_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let base = config(dir.path());
        let key = key(&base).unwrap();
        assert_eq!(key.len(), 16);
        assert_eq!(super::key(&config(dir.path())).unwrap(), key, "the same machine");

        // A session's own scratch disk elsewhere, of the same size: the same kind.
        let other_scratch = dir.path().join("other.ext4");
        std::fs::write(&other_scratch, b"more").unwrap();
        let mut moved = base.clone();
        moved.disks[1].path = other_scratch;
        assert_eq!(super::key(&moved).unwrap(), key);

        let changed = |vm: VmConfig, what: &str| assert_ne!(super::key(&vm).unwrap(), key, "{what}");
        changed(VmConfig { memory_bytes: 1 << 30, ..base.clone() }, "memory");
        changed(VmConfig { vcpus: 4, ..base.clone() }, "vCPUs");
        changed(VmConfig { cmdline: format!("{} cvm.debug", base.cmdline), ..base.clone() }, "command line");
        let mut vsock = base.clone();
        vsock.vhost_user.push(cvm_vmm::VhostUserConfig { socket: dir.path().join("v"), kind: cvm_vmm::VhostUserKind::Vsock });
        changed(vsock, "devices");
        std::fs::write(dir.path().join("root.erofs"), b"a rebuilt image").unwrap();
        changed(base.clone(), "a rebuilt image");
        let mut gone = base.clone();
        gone.kernel = dir.path().join("missing");
        assert!(super::key(&gone).is_none(), "an unreadable kernel: no key, a cold boot");
    }

    #[test]
    fn only_snapshot_keys_are_removed() {
        for bad in ["", "..", "../../etc", "abc/def", "12ab.partial-1"] {
            assert!(remove(bad).is_err(), "{bad:?}");
        }
    }
}
