//! virtio-fs as a vhost-user backend embedded in cvm: virtiofsd's passthrough file system and
//! FUSE server (the `virtiofsd` crate as a library) behind cvm's [`PolicyFs`], one backend per
//! share, each in its own re-executed cvm process inside virtiofsd's sandbox.
//!
//! [`FsBackend::spawn`] starts that process with the backend's listening socket as fd 3 and
//! the share's [`ShareConfig`] as arguments; the process calls [`serve`], which enters the
//! sandbox (a mount, PID and network namespace where the host allows it, a chroot as root
//! otherwise, and nothing as a last resort, said once in the log), serves one frontend and
//! returns when it disconnects. The process dies with cvm (PR_SET_PDEATHSIG at each fork).

mod git_guard;
pub mod policy;
#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use virtiofsd::passthrough::{self, CachePolicy, PassthroughFs};
use virtiofsd::sandbox::{Sandbox, SandboxMode};
use virtiofsd::soft_idmap::cmdline::IdMap;
use virtiofsd::vhost_user::VhostUserFsBackendBuilder;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use policy::{Policy, PolicyFs};

/// virtio device ID of a file system.
pub const DEVICE_TYPE: u32 = 26;
/// The high-priority queue and one request queue.
pub const NUM_QUEUES: usize = 2;
pub const QUEUE_SIZE: usize = 1024;
/// The config space: the tag (36 bytes) and the number of request queues (le32).
pub const CONFIG_LEN: u32 = 40;
/// The longest tag the config space holds.
pub const MAX_TAG_LEN: usize = virtiofsd::vhost_user::MAX_TAG_LEN;
/// The fd the backend process finds its listening socket on.
const LISTENER_FD: i32 = 3;

/// One share's backend, as plain data: what it serves and under which rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareConfig {
    /// The host directory.
    pub dir: PathBuf,
    /// The name the guest mounts it by.
    pub tag: String,
    pub policy: Policy,
    /// The guest user whose files are the host user's: its uid and gid map to the host user
    /// the backend runs as (so a root host still has an unprivileged guest user).
    pub guest_uid: u32,
    pub guest_gid: u32,
}

impl ShareConfig {
    /// Checks what the guest and the sandbox need: a usable tag and an existing directory.
    pub fn validate(&self) -> io::Result<()> {
        if self.tag.is_empty() || self.tag.len() > MAX_TAG_LEN || self.tag.contains(['\0', ',', '=']) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad share tag {:?}", self.tag)));
        }
        if !self.dir.is_absolute() || !self.dir.is_dir() {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{} is not a directory", self.dir.display())));
        }
        // virtiofsd's sandbox takes the path as text.
        if self.dir.to_str().is_none() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a UTF-8 path, which the file server needs", self.dir.display())));
        }
        Ok(())
    }

    /// The backend process's arguments; [`ShareConfig::from_args`] reads them back.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--dir".into(), self.dir.clone().into(), "--tag".into(), self.tag.clone().into()];
        args.extend(["--uid".into(), self.guest_uid.to_string().into(), "--gid".into(), self.guest_gid.to_string().into()]);
        if self.policy.read_only {
            args.push("--read-only".into());
        }
        for name in self.policy.visible.iter().flatten() {
            args.extend(["--visible".into(), name.into()]);
        }
        if self.policy.git_dir {
            args.push("--git-dir".into());
        }
        if let Some(name) = &self.policy.writable_file {
            args.extend(["--writable-file".into(), name.into()]);
        }
        args
    }

    pub fn from_args(args: impl IntoIterator<Item = OsString>) -> Result<ShareConfig, String> {
        let mut args = args.into_iter();
        let (mut dir, mut tag, mut uid, mut gid) = (None, None, None, None);
        let mut policy = Policy::default();
        while let Some(flag) = args.next() {
            let flag = flag.to_str().ok_or("arguments must be UTF-8 flags")?.to_string();
            let switch = match flag.as_str() {
                "--read-only" => Some(&mut policy.read_only),
                "--git-dir" => Some(&mut policy.git_dir),
                _ => None,
            };
            if let Some(switch) = switch {
                *switch = true;
                continue;
            }
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let text = || value.to_str().map(str::to_string).ok_or_else(|| format!("{flag} must be UTF-8"));
            let id = || text()?.parse::<u32>().map_err(|_| format!("{flag} needs a number"));
            match flag.as_str() {
                "--dir" => dir = Some(PathBuf::from(&value)),
                "--tag" => tag = Some(text()?),
                "--uid" => uid = Some(id()?),
                "--gid" => gid = Some(id()?),
                "--visible" => policy.visible.get_or_insert_with(Vec::new).push(text()?),
                "--writable-file" => policy.writable_file = Some(text()?),
                other => return Err(format!("unknown argument {other}")),
            }
        }
        Ok(ShareConfig {
            dir: dir.ok_or("--dir is required")?,
            tag: tag.ok_or("--tag is required")?,
            policy,
            guest_uid: uid.ok_or("--uid is required")?,
            guest_gid: gid.ok_or("--gid is required")?,
        })
    }
}

/// A running backend process; killed and reaped when dropped.
pub struct FsBackend {
    child: Child,
}

impl FsBackend {
    /// Starts `command` (a re-executed cvm whose subcommand calls [`serve`]) with `listener`
    /// as fd 3 and `share`'s arguments appended.
    pub fn spawn(mut command: Command, listener: UnixListener, share: &ShareConfig) -> io::Result<FsBackend> {
        share.validate()?;
        command.args(share.to_args());
        crate::process::pass_fd(&mut command, listener.as_raw_fd(), LISTENER_FD, true);
        let child = command.spawn()?;
        drop(listener);
        Ok(FsBackend { child })
    }
}

impl FsBackend {
    /// The process's exit status, if it has ended.
    pub fn try_wait(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }
}

impl Drop for FsBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Dies with the parent: set after each fork, since a fork clears it.
fn die_with_parent() {
    // SAFETY: prctl with these arguments only sets this process's parent-death signal.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
}

/// Enters the strongest sandbox the host allows and says which.
fn enter_sandbox(dir: &str, listener: Listener) -> io::Result<(Listener, Sandbox)> {
    // A failed attempt consumes the listener: keep a copy of the socket for the next one.
    let spare = |l: &Listener| -> io::Result<Listener> {
        // SAFETY: the fd is open for the duration of this call; dup makes a new one we own.
        let fd = unsafe { libc::dup(l.as_raw_fd()) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created by dup and nothing else owns it.
        Ok(Listener::from(UnixListener::from(unsafe { OwnedFd::from_raw_fd(fd) })))
    };
    let mut last = listener;
    let root = rustix::process::geteuid().is_root();
    for mode in [SandboxMode::Namespace, SandboxMode::Chroot, SandboxMode::None] {
        if mode == SandboxMode::Chroot && !root {
            continue;
        }
        let next = spare(&last)?;
        let mut sandbox = Sandbox::new(dir.to_string(), mode, Vec::new(), Vec::new());
        match sandbox.enter(last) {
            Ok(listener) => {
                die_with_parent();
                tracing::info!("fs backend for {dir}: sandbox {mode:?}");
                return Ok((listener, sandbox));
            }
            // Inside the new namespaces already (a failure after the fork): no way back.
            Err(e) if rustix::process::getpid().is_init() => return Err(io::Error::other(format!("sandbox: {e}"))),
            Err(e) => tracing::info!("fs backend for {dir}: sandbox {mode:?} unavailable: {e}"),
        }
        last = next;
    }
    Err(io::Error::other("no sandbox could be entered"))
}

/// Serves `share` to the one frontend that connects to `listener`, until it disconnects.
/// Forks for the sandbox: call it from a process that has no other threads yet.
pub fn serve(listener: UnixListener, share: &ShareConfig) -> io::Result<()> {
    share.validate()?;
    let dir = share.dir.to_str().expect("validated as UTF-8");
    // Before the sandbox, which hides /proc/sys.
    let fd_limit = virtiofsd::limits::setup_rlimit_nofile(None).map_err(io::Error::other)?;
    let (listener, mut sandbox) = enter_sandbox(dir, Listener::from(listener))?;
    let config = passthrough::Config {
        root_dir: sandbox.get_root_dir(),
        mountinfo_prefix: sandbox.get_mountinfo_prefix()?,
        proc_sfd_rawfd: sandbox.get_proc_self_fd(),
        proc_mountinfo_rawfd: sandbox.get_mountinfo_fd(),
        guest_fd_limit: fd_limit.saturating_sub(64),
        ..passthrough_config(share)
    };
    serve_with(listener, share, config)
}

/// [`serve`] without the sandbox, on the calling thread: for tests and benchmarks, which
/// drive the backend from the same process.
pub fn serve_in_process(listener: UnixListener, share: &ShareConfig) -> io::Result<()> {
    share.validate()?;
    let root_dir = share.dir.to_str().expect("validated as UTF-8").to_string();
    serve_with(Listener::from(listener), share, passthrough::Config { root_dir, ..passthrough_config(share) })
}

/// The passthrough settings every share gets.
fn passthrough_config(share: &ShareConfig) -> passthrough::Config {
    // The guest user's files are the backend's own user's, as the sandbox sees it (root in a
    // user namespace, the host user without one).
    let (host_uid, host_gid) = (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw());
    let map = |guest: u32, host: u32| (guest != host).then(|| vec![IdMap::Bidirectional { guest, host, count: 1 }]);
    passthrough::Config {
        // The host may change the project under the guest (an editor, git): the guest must not
        // trust its cache for long. Auto revalidates on open and keeps names and attributes
        // for a second, as virtiofsd's defaults.
        cache_policy: CachePolicy::Auto,
        entry_timeout: Duration::from_secs(1),
        attr_timeout: Duration::from_secs(1),
        // A host mount inside a share gets its own st_dev in the guest, so inode numbers from
        // two file systems never collide (virtiofsd's default too).
        announce_submounts: true,
        // A hidden name must never be looked up behind the guest's back: no READDIRPLUS where
        // names are hidden.
        readdirplus: share.policy.visible.is_none(),
        uid_map: map(share.guest_uid, host_uid),
        gid_map: map(share.guest_gid, host_gid),
        ..Default::default()
    }
}

fn serve_with(mut listener: Listener, share: &ShareConfig, config: passthrough::Config) -> io::Result<()> {
    let fs = PolicyFs::new(PassthroughFs::new(config)?, share.policy.clone());
    // No tag: the frontend (cvm's or QEMU's) gives the guest the config space.
    let backend = VhostUserFsBackendBuilder::default().build(fs).map_err(|e| io::Error::other(format!("fs backend: {e}")))?;
    let mut daemon = VhostUserDaemon::new(format!("cvm-fs-{}", share.tag), Arc::new(backend), GuestMemoryAtomic::new(GuestMemoryMmap::new()))
        .map_err(|e| io::Error::other(format!("fs backend: {e:?}")))?;
    daemon.start(&mut listener).map_err(|e| io::Error::other(format!("fs backend: {e:?}")))?;
    match daemon.wait() {
        Ok(()) => Ok(()),
        // The frontend going away is how every session ends.
        Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::Disconnected)) => Ok(()),
        Err(e) => Err(io::Error::other(format!("fs backend: {e:?}"))),
    }
}

/// The listener a backend process was given by [`FsBackend::spawn`].
pub fn inherited_listener() -> io::Result<UnixListener> {
    // SAFETY: fstat only checks that fd 3 is open before it is taken over.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(LISTENER_FD, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::other("fd 3 is not the backend's socket: this command is started by cvm itself"));
    }
    // SAFETY: fd 3 is an open socket that this process was handed and nothing else owns.
    Ok(UnixListener::from(unsafe { OwnedFd::from_raw_fd(LISTENER_FD) }))
}
