//! The guest's set-up before the first exec ([`Request::Setup`]): the host user, then the
//! shares, overlays and bind mounts in the order the host gave them.
//!
//! [`Request::Setup`]: cvm_agent::protocol::Request::Setup

use std::ffi::{CString, OsStr};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use cvm_agent::protocol::{Listen, Setup, Step, User, PROXY_CA_FILE};

/// The system's trust store, one file of PEM certificates (Debian's, read by OpenSSL, curl,
/// git and Python).
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Where overlays keep their in-memory upper and work directories (/run is a tmpfs).
const OVERLAY_DIR: &str = "/run/cvm/overlay";

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

/// mount(2) with Rust types.
pub fn mount(source: &str, target: &Path, fstype: Option<&str>, flags: libc::c_ulong, data: Option<&str>) -> io::Result<()> {
    let source = CString::new(source).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a mount source"))?;
    let target = cstr(target)?;
    let fstype = fstype.map(|f| CString::new(f).expect("file system names have no NUL"));
    let data =
        data.map(CString::new).transpose().map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in mount options"))?;
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            data.as_ref().map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Where the writable layer over a read-only root lives before the switch (then `/mnt`).
const ROOT_LAYERS: &str = "/run/cvm-root";

/// The kernel command line words that name the scratch disk for the writable layer, and a
/// template's disk (a read-only layer between the image and the writable one).
const UPPER_DISK_ARG: &str = "cvm.upper=";
const TEMPLATE_DISK_ARG: &str = "cvm.template=";

/// When the kernel mounted a read-only root (a disk image), lays a writable layer over it and
/// makes the overlay the root: the session writes anywhere, the image never changes, and
/// everything written is gone with the VM. The layer is in memory, or on the scratch disk the
/// command line names (`cvm.upper=/dev/vdX`, an empty ext4 file system). Nothing to do on an
/// initramfs.
pub fn make_root_writable() -> io::Result<()> {
    // SAFETY: statvfs writes into the zeroed struct we pass; the path is a NUL-terminated literal.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c"/".as_ptr(), &mut st) } != 0 || st.f_flag & libc::ST_RDONLY == 0 {
        return Ok(());
    }
    let layers = Path::new(ROOT_LAYERS);
    mount("tmpfs", Path::new("/run"), Some("tmpfs"), libc::MS_NOSUID | libc::MS_NODEV, Some("mode=755"))?;
    // /proc and /dev of the old root, for the command line and the disk's node; they go with it.
    mount("proc", Path::new("/proc"), Some("proc"), libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, None)?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let arg = |prefix: &str| cmdline.split_whitespace().find_map(|w| w.strip_prefix(prefix)).map(str::to_string);
    let (upper_disk, template_disk) = (arg(UPPER_DISK_ARG), arg(TEMPLATE_DISK_ARG));
    if upper_disk.is_some() || template_disk.is_some() {
        mount("devtmpfs", Path::new("/dev"), Some("devtmpfs"), libc::MS_NOSUID, None)?;
    }
    let mount_disk = |device: &str, name: &str, flags: libc::c_ulong| -> io::Result<PathBuf> {
        let dir = layers.join(name);
        std::fs::create_dir_all(&dir)?;
        mount(device, &dir, Some("ext4"), libc::MS_NOSUID | libc::MS_NODEV | flags, None)?;
        Ok(dir)
    };
    let base = match &upper_disk {
        Some(device) => mount_disk(device, "disk", 0)?,
        None => layers.to_path_buf(),
    };
    // A template is the writable layer of its set-up session, kept: it goes over the image.
    let lower = match &template_disk {
        Some(device) => format!("{}:/", mount_disk(device, "template", libc::MS_RDONLY)?.join("upper").display()),
        None => "/".to_string(),
    };
    let (upper, work, root) = (base.join("upper"), base.join("work"), layers.join("root"));
    for dir in [&upper, &work, &root] {
        std::fs::create_dir_all(dir)?;
    }
    let options = format!("lowerdir={lower},upperdir={},workdir={}", upper.display(), work.display());
    mount("overlay", &root, Some("overlay"), 0, Some(&options))?;
    // The old root goes under the new one's /mnt, then away: the overlay keeps what it needs.
    let (new_root, put_old) = (cstr(&root)?, cstr(&root.join("mnt"))?);
    // SAFETY: pivot_root takes two NUL-terminated paths that outlive the call.
    if unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir("/")?;
    // SAFETY: umount2 takes a NUL-terminated literal.
    if unsafe { libc::umount2(c"/mnt".as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whose directories the set-up creates: the user's under its home, root's elsewhere.
struct Owner<'a>(Option<&'a User>);

impl Owner<'_> {
    fn claim(&self, path: &Path) -> io::Result<()> {
        let Some(user) = self.0 else { return Ok(()) };
        if path.starts_with(OsStr::from_bytes(&user.home)) {
            std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))?;
        }
        Ok(())
    }

    /// `mkdir -p`, giving what it creates to the owner.
    fn create_dirs(&self, path: &Path) -> io::Result<()> {
        if path.is_dir() {
            return Ok(());
        }
        if let Some(parent) = path.parent() {
            self.create_dirs(parent)?;
        }
        match std::fs::DirBuilder::new().mode(0o755).create(path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
            Ok(()) => self.claim(path),
        }
    }
}

fn describe(what: &str, path: &[u8], e: io::Error) -> String {
    format!("{what} {}: {e}", String::from_utf8_lossy(path))
}

/// Applies `setup`; the error says which step failed.
pub fn apply(setup: &Setup) -> Result<(), String> {
    if let Some(user) = &setup.user {
        add_user(user).map_err(|e| format!("cannot add user {}: {e}", user.name))?;
    }
    let owner = Owner(setup.user.as_ref());
    for (index, step) in setup.steps.iter().enumerate() {
        match step {
            Step::Share { tag, target, read_only } => {
                let path = Path::new(OsStr::from_bytes(target));
                owner.create_dirs(path).map_err(|e| describe("cannot create", target, e))?;
                let flags = libc::MS_NOSUID | libc::MS_NODEV | if *read_only { libc::MS_RDONLY } else { 0 };
                mount(tag, path, Some("virtiofs"), flags, None)
                    .map_err(|e| describe(&format!("cannot mount share {tag} on"), target, e))?;
            }
            Step::Overlay { lower, target } => {
                let path = Path::new(OsStr::from_bytes(target));
                let layers = PathBuf::from(format!("{OVERLAY_DIR}/{index}"));
                let (upper, work) = (layers.join("upper"), layers.join("work"));
                for dir in [&upper, &work] {
                    std::fs::create_dir_all(dir).map_err(|e| describe("cannot create", dir.as_os_str().as_bytes(), e))?;
                }
                // The overlay's root takes the upper directory's owner.
                if let Some(user) = &setup.user {
                    std::os::unix::fs::chown(&upper, Some(user.uid), Some(user.gid))
                        .map_err(|e| describe("cannot chown", upper.as_os_str().as_bytes(), e))?;
                }
                owner.create_dirs(path).map_err(|e| describe("cannot create", target, e))?;
                let options =
                    format!("lowerdir={},upperdir={},workdir={}", String::from_utf8_lossy(lower), upper.display(), work.display());
                mount("overlay", path, Some("overlay"), libc::MS_NOSUID | libc::MS_NODEV, Some(&options))
                    .map_err(|e| describe("cannot mount an overlay on", target, e))?;
            }
            Step::Bind { source, target } => {
                let source_path = Path::new(OsStr::from_bytes(source));
                let Ok(meta) = std::fs::metadata(source_path) else { continue };
                let path = Path::new(OsStr::from_bytes(target));
                if meta.is_dir() {
                    owner.create_dirs(path).map_err(|e| describe("cannot create", target, e))?;
                } else if !path.exists() {
                    if let Some(parent) = path.parent() {
                        owner.create_dirs(parent).map_err(|e| describe("cannot create", target, e))?;
                    }
                    std::fs::File::create(path).map_err(|e| describe("cannot create", target, e))?;
                    owner.claim(path).map_err(|e| describe("cannot chown", target, e))?;
                }
                let source_str = source_path.to_str().ok_or_else(|| describe("not UTF-8:", source, io::ErrorKind::InvalidInput.into()))?;
                mount(source_str, path, None, libc::MS_BIND, None)
                    .map_err(|e| describe(&format!("cannot bind {source_str} on"), target, e))?;
            }
            Step::Relay { listen, host_port } => {
                let owner = setup.user.as_ref().map(|u| (u.uid, u.gid));
                crate::relay::start(listen, *host_port, owner).map_err(|e| match listen {
                    Listen::Tcp(port) => format!("cannot listen on 127.0.0.1:{port}: {e}"),
                    Listen::Unix(path) => describe("cannot listen on", path, e),
                })?;
            }
            Step::Network { address, prefix_len, gateway, nameserver, mtu } => {
                crate::net::configure_ethernet(*address, *prefix_len, *gateway, *nameserver, *mtu)
                    .map_err(|e| format!("cannot configure the network: {e}"))?;
            }
            Step::TrustCa { pem } => {
                std::fs::create_dir_all("/run/cvm")
                    .and_then(|()| std::fs::write(PROXY_CA_FILE, pem))
                    .map_err(|e| describe("cannot write", PROXY_CA_FILE.as_bytes(), e))?;
                // An image without a store gets one holding just this certificate.
                std::fs::create_dir_all("/etc/ssl/certs")
                    .and_then(|()| std::fs::OpenOptions::new().create(true).append(true).open(SYSTEM_CA_BUNDLE))
                    .and_then(|mut bundle| bundle.write_all(&[b"\n".as_slice(), pem].concat()))
                    .map_err(|e| describe("cannot add the proxy's CA to", SYSTEM_CA_BUNDLE.as_bytes(), e))?;
            }
            // Only as the guest's init: an agent run as a host process (its tests) must never
            // set the host's clock.
            Step::Fresh { .. } if std::process::id() != 1 => {}
            Step::Fresh { unix_nanos, seed } => {
                set_clock(*unix_nanos).map_err(|e| format!("cannot set the clock: {e}"))?;
                reseed(seed).map_err(|e| format!("cannot re-seed the random number generator: {e}"))?;
            }
            Step::File { target, contents } => {
                let path = Path::new(OsStr::from_bytes(target));
                if let Some(parent) = path.parent() {
                    owner.create_dirs(parent).map_err(|e| describe("cannot create", target, e))?;
                }
                std::fs::write(path, contents).map_err(|e| describe("cannot write", target, e))?;
                owner.claim(path).map_err(|e| describe("cannot chown", target, e))?;
            }
        }
    }
    Ok(())
}

/// Adds `user` (and its group) to /etc/passwd and /etc/group, replacing entries with the same
/// name or id, and creates its home.
fn add_user(user: &User) -> io::Result<()> {
    if user.name.is_empty() || user.name.contains([':', '\n', '/']) || user.home.contains(&b':') || user.home.contains(&b'\n') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "a name or home that cannot go in /etc/passwd"));
    }
    std::fs::create_dir_all("/etc")?;
    let home = String::from_utf8_lossy(&user.home);
    // Lines of the same name, or (in passwd and group) the same id, make way for the user's.
    let replace = |file: &str, id: Option<u32>, line: String| -> io::Result<()> {
        let old = std::fs::read_to_string(file).unwrap_or_default();
        let id = id.map(|i| i.to_string());
        let mut out = String::new();
        for l in old.lines() {
            let mut fields = l.split(':');
            let (name, id_field) = (fields.next(), fields.nth(1));
            if name != Some(user.name.as_str()) && (id.is_none() || id_field != id.as_deref()) {
                out.push_str(l);
                out.push('\n');
            }
        }
        out.push_str(&line);
        out.push('\n');
        std::fs::File::create(file)?.write_all(out.as_bytes())
    };
    let shell = if Path::new("/bin/bash").exists() { "/bin/bash" } else { "/bin/sh" };
    replace("/etc/passwd", Some(user.uid), format!("{}:x:{}:{}::{home}:{shell}", user.name, user.uid, user.gid))?;
    replace("/etc/group", Some(user.gid), format!("{}:x:{}:", user.name, user.gid))?;
    // An account without a shadow entry fails PAM's account check (sudo refuses it); `*`
    // means no password can log in.
    if Path::new("/etc/shadow").exists() {
        replace("/etc/shadow", None, format!("{}:*:19000:0:99999:7:::", user.name))?;
    }
    // Root inside the VM is the user's (the VM is the boundary): sudo without a password,
    // where the image has sudo.
    if Path::new("/etc/sudoers.d").is_dir() {
        let rule = format!("{} ALL=(ALL:ALL) NOPASSWD: ALL\n", user.name);
        std::fs::write("/etc/sudoers.d/cvm-user", rule)?;
        std::fs::set_permissions("/etc/sudoers.d/cvm-user", std::os::unix::fs::PermissionsExt::from_mode(0o440))?;
    }
    // The home may already exist (an image's /root): in this guest it is the user's.
    let home = Path::new(OsStr::from_bytes(&user.home));
    Owner(Some(user)).create_dirs(home)?;
    std::os::unix::fs::chown(home, Some(user.uid), Some(user.gid))
}

fn set_clock(unix_nanos: u64) -> io::Result<()> {
    let now =
        libc::timespec { tv_sec: (unix_nanos / 1_000_000_000) as libc::time_t, tv_nsec: (unix_nanos % 1_000_000_000) as libc::c_long };
    // SAFETY: clock_settime reads the timespec we pass.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &now) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mixes `seed` into the kernel's entropy pool, credited, and has the generator re-seed from
/// it at once (RNDADDENTROPY, then RNDRESEEDCRNG).
fn reseed(seed: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    #[repr(C)]
    struct PoolInfo {
        entropy_count: libc::c_int,
        buf_size: libc::c_int,
        buf: [u8; 64],
    }
    let len = seed.len().min(64);
    let mut info = PoolInfo { entropy_count: (len * 8) as libc::c_int, buf_size: len as libc::c_int, buf: [0; 64] };
    info.buf[..len].copy_from_slice(&seed[..len]);
    let random = std::fs::OpenOptions::new().write(true).open("/dev/random")?;
    // SAFETY: both ioctls take the fd of /dev/random; the first reads a rand_pool_info whose
    // buffer holds buf_size bytes, the second takes no argument.
    unsafe {
        if libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, &info) != 0 || libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
