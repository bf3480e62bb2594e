//! The VMM process's jail, as Firecracker's jailer builds one, entered in steps: [`unshare`]
//! (new user, mount, PID, IPC and network namespaces, before the process has threads),
//! [`write_id_maps`] (by cvm, from outside: which host ids the namespace's ids are),
//! [`prepare`] (no capability bounding set and, where cvm is root, an unprivileged uid and gid
//! of the VMM's own), and [`enter`], once the VM is built and every file it needs is open: an
//! empty, read-only root, no capabilities, no new privileges, no ptrace.

use std::io;
use std::path::Path;

/// Whether this host lets cvm jail its VMM: a child that makes the jail's namespaces, as the
/// VMM process does first.
pub fn available() -> io::Result<()> {
    use std::os::unix::process::CommandExt;
    let mut probe = std::process::Command::new(std::env::current_exe()?);
    probe.arg("--version").stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    // SAFETY: runs in the child between fork and exec; unshare is async-signal-safe and
    // changes only the (single-threaded) child.
    unsafe { probe.pre_exec(unshare) };
    probe.status().map(drop)
}

/// The host uid (and gid) a jailed VMM runs as where cvm runs as root: this base plus the low
/// 16 bits of the VMM process's pid, so that VMMs do not share a uid. No account uses these
/// ids (Debian gives people 1000-59999, systemd's dynamic users 61184-65519, containers'
/// subordinate ids start at 100000 and span a few millions).
pub const JAIL_ID_BASE: u32 = 1_000_000_000;

/// Moves this process into new user, mount, IPC and network namespaces; its children go into
/// a new PID namespace (the first one it forks is that namespace's init). Only a process
/// without threads can, which is why the VMM does this first.
pub fn unshare() -> io::Result<()> {
    let flags = libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWNET;
    // SAFETY: unshare takes only flags; it changes this (single-threaded) process's namespaces.
    match unsafe { libc::unshare(flags) } {
        0 => Ok(()),
        _ => {
            let e = io::Error::last_os_error();
            Err(io::Error::new(
                e.kind(),
                format!("cannot create the VMM's namespaces (unshare: {e}); cvm needs user namespaces: in a container, its seccomp profile must allow them (podman's does, docker's default does not); check that kernel.unprivileged_userns_clone or user.max_user_namespaces is not 0"),
            ))
        }
    }
}

/// The host uid and gid a jailed VMM whose process's pid is `pid` runs the guest as.
pub fn jail_ids(pid: u32, host_uid: u32, host_gid: u32) -> (u32, u32) {
    match host_uid {
        0 => (JAIL_ID_BASE + (pid & 0xffff), JAIL_ID_BASE + (pid & 0xffff)),
        _ => (host_uid, host_gid),
    }
}

/// The id maps of the user namespace the VMM `pid` made, as cvm (its parent, outside) writes
/// them. As root, every id is itself, as on the host: the VMM builds its VM with root's access
/// to files (what the host's root may read, a share mounted from elsewhere included), then
/// switches to its own unprivileged ids ([`jail_ids`]). A user may map only its own ids, as 0:
/// the VMM builds its VM with the user's access, as an unjailed one would.
fn id_maps(pid: u32, host_uid: u32, host_gid: u32) -> (String, String) {
    match host_uid {
        0 => ("0 0 4294967295\n".into(), "0 0 4294967295\n".into()),
        _ => {
            let (uid, gid) = jail_ids(pid, host_uid, host_gid);
            (format!("0 {uid} 1\n"), format!("0 {gid} 1\n"))
        }
    }
}

/// Writes the id maps of the VMM `pid`'s user namespace, from cvm's side; returns the ids the
/// VMM is to run the guest as.
pub fn write_id_maps(pid: u32) -> io::Result<(u32, u32)> {
    let (host_uid, host_gid) = (rustix::process::getuid().as_raw(), rustix::process::getgid().as_raw());
    let (uid_map, gid_map) = id_maps(pid, host_uid, host_gid);
    let proc = Path::new("/proc").join(pid.to_string());
    let write = |name: &str, contents: &str| {
        std::fs::write(proc.join(name), contents).map_err(|e| io::Error::new(e.kind(), format!("cannot write the VMM's {name}: {e}")))
    };
    if host_uid != 0 {
        // A user may map its own gid only with supplementary groups left as they are.
        write("setgroups", "deny")?;
    }
    write("uid_map", &uid_map)?;
    write("gid_map", &gid_map)?;
    Ok(jail_ids(pid, host_uid, host_gid))
}

/// The VMM's first step once it is its namespace's init, before it builds its VM and while it
/// has no other thread: its capability bounding set cleared (every thread it starts inherits
/// that), and where cvm is root, its unprivileged `ids` ([`jail_ids`]; glibc would have each
/// thread switch, and a confined one may not), keeping its capabilities in its namespace for
/// the build (opening root's files, the empty root); [`enter`] clears them once that is done.
pub fn prepare(ids: Option<(u32, u32)>) -> io::Result<()> {
    drop_bounding_set()?;
    match ids {
        Some(ids) => take_ids(ids),
        None => Ok(()),
    }
}

fn take_ids((uid, gid): (u32, u32)) -> io::Result<()> {
    let failed = |what: &str| {
        let e = io::Error::last_os_error();
        io::Error::new(e.kind(), format!("cannot switch the VMM to its unprivileged ids ({what}: {e})"))
    };
    rustix::thread::set_keep_capabilities(true)?;
    // SAFETY: setgroups with an empty list, setresgid and setresuid change only this
    // process's credentials.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(failed("setgroups"));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(failed("setresgid"));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(failed("setresuid"));
        }
    }
    rustix::thread::set_keep_capabilities(false)?;
    // Leaving uid 0 emptied the effective set; the permitted one was kept.
    let mut sets = rustix::thread::capabilities(None)?;
    sets.effective = sets.permitted;
    rustix::thread::set_capabilities(None, sets)?;
    Ok(())
}

/// Jails this process, its VM built: an empty root (a read-only tmpfs; every file the VMM
/// uses is already open), then this thread's capabilities cleared, no new privileges and no
/// ptrace or core dumps. Threads made later inherit it all; each VMM thread clears its own
/// capabilities as it confines itself (those the build started too).
pub fn enter() -> io::Result<()> {
    empty_root().map_err(|e| io::Error::new(e.kind(), format!("cannot give the VMM an empty root: {e}")))?;
    cvm_sandbox::process::drop_capabilities()?;
    rustix::thread::set_no_new_privs(true)?;
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)?;
    Ok(())
}

/// Pivots into a new, empty tmpfs and detaches the old root, then makes the new one read-only.
fn empty_root() -> io::Result<()> {
    use rustix::mount::{mount, mount_change, mount_remount, unmount, MountFlags, MountPropagationFlags, UnmountFlags};
    // Nothing of what follows may reach the host's mounts.
    mount_change("/", MountPropagationFlags::REC | MountPropagationFlags::PRIVATE)?;
    // Any directory will do, and Linux hosts have this one.
    let mountpoint = Path::new("/tmp");
    let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    mount("cvm-vmm", mountpoint, "tmpfs", flags, Some(c"size=4k,nr_inodes=4,mode=0555"))?;
    rustix::process::chdir(mountpoint)?;
    // pivot_root(".", "."): the old root ends up on top of the new one, then goes.
    rustix::process::pivot_root(".", ".")?;
    unmount(".", UnmountFlags::DETACH)?;
    rustix::process::chdir("/")?;
    mount_remount("/", MountFlags::BIND | MountFlags::RDONLY | flags, "")?;
    Ok(())
}

/// Clears this thread's capability bounding set: no execve can give a capability back.
fn drop_bounding_set() -> io::Result<()> {
    for cap in 0..64 {
        // SAFETY: prctl with PR_CAPBSET_DROP only changes this thread's bounding set.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            match io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::EINVAL) => break, // past the kernel's last capability
                e => return Err(io::Error::new(e.kind(), format!("cannot clear the VMM's capability bounding set: {e}"))),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_root_the_namespace_maps_every_id_to_itself_and_each_vmm_gets_its_own() {
        assert_eq!(id_maps(70_001, 0, 0), ("0 0 4294967295\n".to_string(), "0 0 4294967295\n".to_string()));
        assert_eq!(jail_ids(70_001, 0, 0), (JAIL_ID_BASE + (70_001 & 0xffff), JAIL_ID_BASE + (70_001 & 0xffff)));
        assert_ne!(jail_ids(70_001, 0, 0), jail_ids(70_002, 0, 0), "two VMMs do not share a uid");
    }

    #[test]
    fn a_user_maps_only_itself() {
        assert_eq!(id_maps(5, 1000, 1001), ("0 1000 1\n".to_string(), "0 1001 1\n".to_string()));
        assert_eq!(jail_ids(5, 1000, 1001), (1000, 1001));
    }
}
