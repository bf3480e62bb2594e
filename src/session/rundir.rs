//! A session's private directory for its sockets and console log, removed however cvm ends.
//!
//! cvm removes it on a normal exit. For the exits it cannot clean up after (SIGKILL, a crash),
//! a janitor process, a re-executed `cvm __janitor DIR` in its own process group, waits for
//! the end of a pipe only cvm holds and removes the directory when that pipe closes.

use std::fs::DirBuilder;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustix::pipe::{pipe_with, PipeFlags};

/// Where session directories live: `$XDG_RUNTIME_DIR/cvm`, else `/tmp/cvm-<uid>`; made if
/// missing and checked each time ([`create_private_dir`]), since in `/tmp` another user may
/// have made it first.
pub fn runtime_base() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_dir() => dir.join("cvm"),
        _ => std::env::temp_dir().join(format!("cvm-{}", rustix::process::getuid().as_raw())),
    };
    create_private_dir(&base)?;
    Ok(base)
}

/// Creates `dir` mode 0700 if missing (its parent must exist), and checks it as it is, never
/// through a symbolic link: a directory this user owns that no one else can use, in a parent
/// where no one else can swap it for another (one others can write to must be sticky, as
/// `/tmp` is). Every later path through `dir` then leads where this check looked.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use rustix::fs::{Mode, OFlags};
    match DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
        _ => {}
    }
    let uid = rustix::process::getuid().as_raw();
    let opened = rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty());
    let fd = match opened {
        Err(rustix::io::Errno::LOOP) | Err(rustix::io::Errno::NOTDIR) => {
            bail!("{} is not a directory but a link or a file, which someone else may have put there: remove it, or set XDG_RUNTIME_DIR to a directory only you can use", dir.display())
        }
        other => other.with_context(|| format!("cannot open {}", dir.display()))?,
    };
    let stat = rustix::fs::fstat(&fd)?;
    let mode = stat.st_mode & 0o777;
    if stat.st_uid != uid || mode & 0o077 != 0 {
        bail!("{} must be a directory only you can use (owner {}, mode {mode:o}): remove it, or set XDG_RUNTIME_DIR to a directory only you can use", dir.display(), stat.st_uid);
    }
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let above = std::fs::metadata(parent).with_context(|| format!("cannot read {}", parent.display()))?;
    let others_write = above.permissions().mode() & 0o022 != 0;
    let sticky = above.permissions().mode() & libc::S_ISVTX != 0;
    if (above.uid() != uid && above.uid() != 0) || (others_write && !sticky) {
        bail!(
            "{} is in {}, where another user could replace it: set XDG_RUNTIME_DIR to a directory only you can use",
            dir.display(),
            parent.display()
        );
    }
    Ok(())
}

pub struct RunDir {
    path: PathBuf,
    janitor: Child,
    /// Closing this (cvm exiting, however) tells the janitor to clean up.
    _lifeline: std::os::fd::OwnedFd,
}

impl RunDir {
    pub fn create() -> Result<RunDir> {
        let base = runtime_base()?;
        let unique = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        let path = base.join(format!("{}-{unique:x}", std::process::id()));
        // The janitor first: cvm killed at any moment after the directory exists leaves it
        // to the janitor, never behind.
        let (read, write) = pipe_with(PipeFlags::CLOEXEC)?;
        let mut janitor = Command::new(crate::cvm_exe()?)
            .arg("__janitor")
            .arg(&path)
            .stdin(Stdio::from(read))
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .context("cannot start cvm's janitor process")?;
        if let Err(e) = DirBuilder::new().mode(0o700).create(&path) {
            let _ = janitor.kill();
            let _ = janitor.wait();
            return Err(e).with_context(|| format!("cannot create {}", path.display()));
        }
        Ok(RunDir { path, janitor, _lifeline: write })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        // Not waiting for the janitor would leave a zombie until cvm exits.
        let _ = self.janitor.kill();
        let _ = self.janitor.wait();
    }
}

/// `cvm __janitor DIR`: waits for cvm to go away (its stdin reaches end of file), then
/// removes DIR. Terminal signals do not stop it early.
pub fn janitor_main(dir: &Path) -> Result<()> {
    let base = runtime_base()?;
    if dir.parent() != Some(base.as_path()) {
        bail!("{} is not a cvm session directory", dir.display());
    }
    let ignored = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGHUP, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, ignored.clone())?;
    }
    cvm_sandbox::seccomp::confine_process(cvm_sandbox::seccomp::Role::Janitor)?;
    let mut sink = [0u8; 64];
    let mut stdin = io::stdin();
    loop {
        match stdin.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
