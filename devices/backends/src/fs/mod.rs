//! virtio-fs as a vhost-user backend embedded in cvm: virtiofsd's passthrough file system and
//! FUSE server (the `virtiofsd` crate as a library) behind cvm's [`PolicyFs`], fed by cvm's own
//! queue handling (`queues`), one backend per share, each in its own re-executed cvm process
//! inside virtiofsd's sandbox.
//!
//! [`FsBackend::spawn`] starts that process with the backend's listening socket as fd 3 and
//! the share's [`ShareConfig`] as arguments; the process calls [`serve`], which enters the
//! sandbox (a mount, PID and network namespace where the host allows it, a chroot as root
//! otherwise, and nothing as a last resort, said once in the log), serves one frontend and
//! returns when it disconnects. The process ends with cvm whatever the timing: it watches a
//! pipe whose other end only cvm holds (its "lifeline", fd 4), and has PR_SET_PDEATHSIG set
//! at each fork.

mod git_guard;
pub mod policy;
mod queues;
#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use virtiofsd::passthrough::{self, CachePolicy, PassthroughFs};
use virtiofsd::sandbox::{Sandbox, SandboxMode};
use virtiofsd::soft_idmap::cmdline::IdMap;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use policy::{Policy, PolicyFs, Quota};

/// The fd the backend process finds its listening socket on.
const LISTENER_FD: i32 = 3;
/// The fd the backend process finds its lifeline on: the read end of a pipe whose write end
/// only cvm holds and never writes, so it reads end-of-file exactly when cvm is gone or has
/// dropped the backend.
const LIFELINE_FD: i32 = 4;
/// The fd the backend writes what the user must be told on: cvm's own standard error, while
/// the backend's standard error may be a log.
const NOTICE_FD: i32 = 5;

/// Where [`notice`] writes: the fd cvm handed over as [`NOTICE_FD`], once [`serve`] took it.
static NOTICES: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// Tells the user `message` on cvm's standard error (this process's own in a backend that cvm
/// did not start, as in tests).
pub(crate) fn notice(message: &str) {
    use std::io::Write;
    let line = format!("cvm: {message}\n");
    match NOTICES.get() {
        Some(mut out) => {
            let _ = out.write_all(line.as_bytes());
        }
        None => {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }
}

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
    /// The user allowed serving without a sandbox where the host has none.
    pub allow_no_sandbox: bool,
}

impl ShareConfig {
    /// Checks what the guest and the sandbox need: a usable tag and an existing directory.
    pub fn validate(&self) -> io::Result<()> {
        if self.tag.is_empty() || self.tag.len() > cvm_devices::virtio::FS_TAG_LEN || self.tag.contains(['\0', ',', '=']) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad share tag {:?}", self.tag)));
        }
        if !self.dir.is_absolute() || !self.dir.is_dir() {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{} is not a directory", self.dir.display())));
        }
        // virtiofsd's sandbox takes the path as text.
        if self.dir.to_str().is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a UTF-8 path, which the file server needs", self.dir.display()),
            ));
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
        if self.allow_no_sandbox {
            args.push("--allow-no-sandbox".into());
        }
        if let Some(name) = &self.policy.writable_file {
            args.extend(["--writable-file".into(), name.into()]);
        }
        for path in &self.policy.protected_paths {
            args.extend(["--protect".into(), path.clone().into()]);
        }
        if let Some(quota) = self.policy.quota {
            args.extend(["--quota-bytes".into(), quota.bytes.to_string().into(), "--quota-inodes".into(), quota.inodes.to_string().into()]);
        }
        args
    }

    pub fn from_args(args: impl IntoIterator<Item = OsString>) -> Result<ShareConfig, String> {
        let mut args = args.into_iter();
        let (mut dir, mut tag, mut uid, mut gid, mut allow_no_sandbox) = (None, None, None, None, false);
        let mut policy = Policy::default();
        while let Some(flag) = args.next() {
            let flag = flag.to_str().ok_or("arguments must be UTF-8 flags")?.to_string();
            let switch = match flag.as_str() {
                "--read-only" => Some(&mut policy.read_only),
                "--git-dir" => Some(&mut policy.git_dir),
                "--allow-no-sandbox" => Some(&mut allow_no_sandbox),
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
                "--protect" => policy.protected_paths.push(PathBuf::from(&value)),
                "--quota-bytes" => {
                    policy.quota.get_or_insert(Quota { bytes: 0, inodes: 0 }).bytes =
                        text()?.parse().map_err(|_| "--quota-bytes needs a number")?
                }
                "--quota-inodes" => {
                    policy.quota.get_or_insert(Quota { bytes: 0, inodes: 0 }).inodes =
                        text()?.parse().map_err(|_| "--quota-inodes needs a number")?
                }
                other => return Err(format!("unknown argument {other}")),
            }
        }
        Ok(ShareConfig {
            dir: dir.ok_or("--dir is required")?,
            tag: tag.ok_or("--tag is required")?,
            policy,
            guest_uid: uid.ok_or("--uid is required")?,
            guest_gid: gid.ok_or("--gid is required")?,
            allow_no_sandbox,
        })
    }
}

/// A running backend process; killed and reaped when dropped.
pub struct FsBackend {
    child: Child,
    /// The write end of the backend's lifeline (close-on-exec: no other helper inherits it).
    _lifeline: OwnedFd,
}

impl FsBackend {
    /// Starts `command` (a re-executed cvm whose subcommand calls [`serve`]) with `listener`
    /// as fd 3 and `share`'s arguments appended.
    pub fn spawn(mut command: Command, listener: UnixListener, share: &ShareConfig) -> io::Result<FsBackend> {
        share.validate()?;
        command.args(share.to_args());
        let (lifeline_read, lifeline) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        cvm_sandbox::process::pass_fd(&mut command, listener.as_raw_fd(), LISTENER_FD);
        cvm_sandbox::process::pass_fd(&mut command, lifeline_read.as_raw_fd(), LIFELINE_FD);
        // A copy made here: in the child, fd 2 is already what `command` says (a log).
        let notices = rustix::io::fcntl_dupfd_cloexec(rustix::stdio::stderr(), 10)?;
        cvm_sandbox::process::pass_fd(&mut command, notices.as_raw_fd(), NOTICE_FD);
        cvm_sandbox::process::die_with_parent(&mut command);
        let child = command.spawn()?;
        drop((listener, notices));
        Ok(FsBackend { child, _lifeline: lifeline })
    }
}

impl FsBackend {
    /// The process cvm started (the sandbox's outermost).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

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

/// The sandboxes a backend tries, strongest first: namespaces where this host allows them; a
/// chroot as root; none only when the user allowed it.
fn sandbox_modes(root: bool, namespaces: bool, allow_none: bool) -> Vec<SandboxMode> {
    let mut modes = Vec::new();
    if namespaces {
        modes.push(SandboxMode::Namespace);
    }
    if root {
        modes.push(SandboxMode::Chroot);
    }
    if allow_none {
        modes.push(SandboxMode::None);
    }
    modes
}

/// The sandbox the fs backends get on this host, as [`enter_sandbox`] would choose it, with
/// why namespaces are out when they are: tried in a child process that unshares what the
/// backend's sandbox unshares.
pub fn sandbox_on_this_host() -> (&'static str, Option<String>) {
    let root = rustix::process::geteuid().is_root();
    let mut flags = libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWNET;
    if !root {
        flags |= libc::CLONE_NEWUSER;
    }
    let mut probe = Command::new("true");
    // SAFETY: runs in the child between fork and exec; unshare is a plain system call that
    // changes only the child's own namespaces.
    unsafe {
        probe.pre_exec(move || if libc::unshare(flags) == 0 { Ok(()) } else { Err(io::Error::last_os_error()) });
    }
    match probe.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status() {
        Ok(status) if status.success() => ("namespaces", None),
        Ok(status) => (if root { "chroot" } else { "none" }, Some(format!("a probe ended with {status}"))),
        Err(e) => (if root { "chroot" } else { "none" }, Some(format!("new namespaces are refused here: {e}"))),
    }
}

/// Enters the strongest sandbox the host allows and says which.
fn enter_sandbox(dir: &str, listener: Listener, allow_none: bool) -> io::Result<(Listener, Sandbox, SandboxMode)> {
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
    // Probed first: virtiofsd's namespace sandbox, refused (root without CAP_SYS_ADMIN, in a
    // container), leaves a helper that panics on its way out.
    let namespaces = sandbox_on_this_host().0 == "namespaces";
    for mode in sandbox_modes(rustix::process::geteuid().is_root(), namespaces, allow_none) {
        let next = spare(&last)?;
        let mut sandbox = Sandbox::new(dir.to_string(), mode, Vec::new(), Vec::new());
        match sandbox.enter(last) {
            Ok(listener) => {
                // The sandbox forked: dies with its parent again.
                cvm_sandbox::process::set_parent_death_signal()?;
                tracing::info!("fs backend for {dir}: sandbox {mode:?}");
                return Ok((listener, sandbox, mode));
            }
            // Inside the new namespaces already (a failure after the fork): no way back.
            Err(e) if rustix::process::getpid().is_init() => return Err(io::Error::other(format!("sandbox: {e}"))),
            Err(e) => tracing::info!("fs backend for {dir}: sandbox {mode:?} unavailable: {e}"),
        }
        last = next;
    }
    Err(io::Error::other(
        "the file server could not enter a sandbox on this host (no namespaces, and a chroot needs root); \
         --allow-unsandboxed-fs serves shares without one (cvm doctor says more)",
    ))
}

/// Serves `share` to the one frontend that connects to `listener`, until it disconnects.
/// The files a backend keeps open for itself, apart from the guest's.
const OWN_FILES: u64 = 64;
/// The limit on open files a backend raises its own to where the host lets it (virtiofsd's).
const WANTED_OPEN_FILES: u64 = 1_000_000;

/// How many files of a share the guest can hold at once through one backend on this host: the
/// backend keeps a file open for each one the guest's kernel has in its cache, and the guest
/// gets "Too many open files in system" past it. A backend raises its limit to a million
/// where it may (`CAP_SYS_RESOURCE`, within `fs.nr_open`), else to the hard limit.
pub fn guest_open_file_limit() -> u64 {
    let limits = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let (soft, hard) = (limits.current.unwrap_or(u64::MAX), limits.maximum.unwrap_or(u64::MAX));
    let may_raise = rustix::thread::capabilities(None).is_ok_and(|c| c.effective.contains(rustix::thread::CapabilitySet::SYS_RESOURCE));
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|n| n.trim().parse().ok()).unwrap_or(hard);
    let target = WANTED_OPEN_FILES.min(nr_open);
    let raised = if may_raise || hard >= target { target } else { hard };
    soft.max(raised).saturating_sub(OWN_FILES)
}

/// Forks for the sandbox: call it from a process that has no other threads yet.
pub fn serve(listener: UnixListener, share: &ShareConfig) -> io::Result<()> {
    share.validate()?;
    // SAFETY: fcntl(F_GETFD) only asks whether the fd is open: in a process cvm started, it
    // is the one FsBackend::spawn passed, which nothing else in this process owns; from here
    // on NOTICES owns it.
    if unsafe { libc::fcntl(NOTICE_FD, libc::F_GETFD) } >= 0 {
        let _ = NOTICES.set(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(NOTICE_FD) }));
    }
    let dir = share.dir.to_str().expect("validated as UTF-8");
    // Before the sandbox, which hides /proc/sys.
    let fd_limit = virtiofsd::limits::setup_rlimit_nofile(None).map_err(io::Error::other)?;
    // A chroot leaves /proc/self/mountinfo's host paths: the prefix to strip is the share's
    // real path, resolved before the chroot hides it.
    let real_dir = std::fs::canonicalize(dir)?.into_os_string().into_string().map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let (listener, mut sandbox, mode) = enter_sandbox(dir, Listener::from(listener), share.allow_no_sandbox)?;
    exit_with_cvm()?;
    keep_only_needed_capabilities()?;
    cvm_sandbox::seccomp::confine_process(cvm_sandbox::seccomp::Role::FsBackend)?;
    let config = passthrough::Config {
        root_dir: sandbox.get_root_dir(),
        mountinfo_prefix: (mode == SandboxMode::Chroot).then_some(real_dir),
        proc_sfd_rawfd: sandbox.get_proc_self_fd(),
        proc_mountinfo_rawfd: sandbox.get_mountinfo_fd(),
        guest_fd_limit: fd_limit.saturating_sub(OWN_FILES),
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
    let fs = PolicyFs::new(PassthroughFs::new(config)?, share.policy.clone(), share.dir.display().to_string());
    let mut daemon = VhostUserDaemon::new(
        format!("cvm-fs-{}", share.tag),
        Arc::new(queues::FsQueues::new(fs)),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| io::Error::other(format!("fs backend: {e:?}")))?;
    daemon.start(&mut listener).map_err(|e| io::Error::other(format!("fs backend: {e:?}")))?;
    match daemon.wait() {
        Ok(()) => Ok(()),
        // The frontend going away is how every session ends.
        Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::Disconnected)) => Ok(()),
        Err(e) => Err(io::Error::other(format!("fs backend: {e:?}"))),
    }
}

/// What the backend may do beyond an ordinary process (in its user namespace, or as root):
/// act as the guest's user and on its files. Never make device nodes, file capabilities or
/// set-id files that survive a write (MKNOD, SETFCAP, FSETID: virtiofsd keeps those).
const CAPABILITIES: &[&str] = &["CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID"];

fn keep_only_needed_capabilities() -> io::Result<()> {
    capng::clear(capng::Set::BOTH);
    capng::updatev(capng::Action::ADD, capng::Type::PERMITTED | capng::Type::EFFECTIVE, CAPABILITIES.to_vec())
        .and_then(|()| capng::apply(capng::Set::BOTH))
        .map_err(|e| io::Error::other(format!("cannot drop capabilities: {e}")))
}

/// Ends this process (the sandbox's innermost, which serves) when its lifeline reads
/// end-of-file: at once if cvm ended before this point.
fn exit_with_cvm() -> io::Result<()> {
    let lifeline = inherited(LIFELINE_FD, libc::S_IFIFO, "lifeline")?;
    std::thread::Builder::new().name("lifeline".into()).spawn(move || {
        let mut byte = [0u8; 1];
        // cvm never writes: this returns when its end closes.
        let _ = rustix::io::read(&lifeline, &mut byte);
        std::process::exit(0);
    })?;
    Ok(())
}

/// Descriptor `fd`, handed over by [`FsBackend::spawn`], when it is of type `kind`.
fn inherited(fd: i32, kind: libc::mode_t, what: &str) -> io::Result<OwnedFd> {
    // SAFETY: fstat only checks that fd is open, and of what type, before it is taken over.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != kind {
        return Err(io::Error::other(format!("fd {fd} is not the backend's {what}: this command is started by cvm itself")));
    }
    // SAFETY: fd is open, of the expected type, handed to this process, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The listener a backend process was given by [`FsBackend::spawn`].
pub fn inherited_listener() -> io::Result<UnixListener> {
    Ok(UnixListener::from(inherited(LISTENER_FD, libc::S_IFSOCK, "socket")?))
}
