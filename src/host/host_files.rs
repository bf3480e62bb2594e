//! Reading, on the host, files the guest may have written (anything in a read-write share):
//! never through a symbolic link that leads out of the directory they belong to, never a FIFO
//! or a device (which would block or never end), never more than a cap.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

/// The most cvm reads of a configuration file, a script or a git pointer from a project.
pub const MAX_PROJECT_FILE: u64 = 1 << 20;

/// Reads `path`; when it is inside `root` (by name), only by a way that stays inside `root`.
pub fn read(path: &Path, root: Option<&Path>, cap: u64) -> Result<Vec<u8>> {
    let shown = path.display();
    let file = match root.and_then(|root| path.strip_prefix(root).ok().map(|rest| (root, rest))) {
        Some((root, rest)) => {
            let dir = rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
                .with_context(|| format!("cannot open {}", root.display()))?;
            let how = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
            match rustix::fs::openat2(&dir, rest, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty(), how) {
                Err(rustix::io::Errno::XDEV) => bail!("cannot read {shown}: a symbolic link leads out of {}", root.display()),
                other => other.with_context(|| format!("cannot read {shown}"))?,
            }
        }
        None => rustix::fs::open(path, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty())
            .with_context(|| format!("cannot read {shown}"))?,
    };
    let stat = rustix::fs::fstat(&file).with_context(|| format!("cannot read {shown}"))?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        bail!("cannot read {shown}: not a regular file");
    }
    let mut bytes = Vec::new();
    std::fs::File::from(file).take(cap + 1).read_to_end(&mut bytes).with_context(|| format!("cannot read {shown}"))?;
    if bytes.len() as u64 > cap {
        bail!("cannot read {shown}: larger than {} KiB", cap >> 10);
    }
    Ok(bytes)
}

/// [`read`] as UTF-8 text.
pub fn read_text(path: &Path, root: Option<&Path>, cap: u64) -> Result<String> {
    String::from_utf8(read(path, root, cap)?).with_context(|| format!("{} is not UTF-8 text", path.display()))
}

/// How much of the end of a log is read: a panic ends a console log, and logs are the
/// guest's to fill.
const TAIL_BYTES: u64 = 256 << 10;

/// The last [`TAIL_BYTES`] of a log, or nothing.
pub fn read_tail(log: &Path) -> Vec<u8> {
    use std::io::{Seek, SeekFrom};
    let mut tail = Vec::new();
    if let Ok(mut file) = std::fs::File::open(log) {
        let len = file.metadata().map_or(0, |m| m.len());
        if file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES))).is_ok() {
            let _ = file.take(TAIL_BYTES).read_to_end(&mut tail);
        }
    }
    tail
}

/// The last `lines` lines of a log (within its last [`TAIL_BYTES`]).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = String::from_utf8_lossy(&read_tail(path)).into_owned();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `path` with `.` and `..` resolved by name (a file's `../data` is its sibling), as the
/// shell does; symlinks are the share checks' business.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(name) => out.push(name),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_out_fifos_devices_and_big_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("project");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(dir.path().join("secret"), "host secret").unwrap();
        std::fs::write(root.join("ok"), "fine").unwrap();
        std::os::unix::fs::symlink("../secret", root.join("out")).unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("dirout")).unwrap();
        std::os::unix::fs::symlink("../ok", root.join("sub/in")).unwrap();
        rustix::fs::mknodat(rustix::fs::CWD, root.join("fifo"), FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        std::fs::write(root.join("big"), vec![b'x'; 2048]).unwrap();
        let r = |name: &str| read_text(&root.join(name), Some(&root), 1024);
        assert_eq!(r("ok").unwrap(), "fine");
        assert_eq!(r("sub/in").unwrap(), "fine", "a link that stays inside is followed");
        for (name, says) in [
            ("out", "leads out"),
            ("dirout/secret", "leads out"),
            ("fifo", "not a regular file"),
            ("big", "larger than"),
            ("missing", "cannot read"),
        ] {
            let e = format!("{:#}", r(name).unwrap_err());
            assert!(e.contains(says), "{name}: {e}");
        }
        assert!(format!("{:#}", read(Path::new("/dev/zero"), None, 1024).unwrap_err()).contains("not a regular file"));
        assert_eq!(read(&dir.path().join("secret"), None, 1024).unwrap(), b"host secret", "outside any root: the user's own file");
    }
}
