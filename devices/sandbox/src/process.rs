//! Helper processes that cvm starts (fs backends, passt, QEMU) receive descriptors at fixed
//! numbers and die with cvm: the one place where that fork-time work is done.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Gives `command`'s child `fd` as descriptor `target`, open across exec.
pub fn pass_fd(command: &mut Command, fd: RawFd, target: RawFd) {
    // SAFETY: runs in the child between fork and exec; dup2 and fcntl are async-signal-safe
    // and touch only the child's own descriptors. dup2 clears CLOEXEC on the copy; when `fd`
    // already is `target` the flag is cleared by hand.
    unsafe {
        command.pre_exec(move || {
            let moved = if fd == target { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, target) };
            if moved < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Has this process get SIGKILL when the thread that made it ends; a fork clears it, so each
/// forked process that must die with cvm sets it again. Async-signal-safe.
pub fn set_parent_death_signal() -> io::Result<()> {
    // SAFETY: prctl with these arguments only sets this process's parent-death signal.
    match unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Has `command`'s child get SIGKILL when the thread that spawns it ends (spawn it from a
/// thread that lives as long as cvm). A parent that died before the child asked for that is
/// seen at once: the child then has another parent, and ends.
pub fn die_with_parent(command: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: runs in the child between fork and exec; prctl and getppid are
    // async-signal-safe and touch only the child's own attributes.
    unsafe {
        command.pre_exec(move || {
            set_parent_death_signal()?;
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Clears the calling thread's effective, permitted and inheritable capabilities (capabilities
/// are per thread: threads it starts afterwards inherit the empty sets).
pub fn drop_capabilities() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522; // _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    let mut header = Header { version: VERSION_3, pid: 0 };
    let data = [Data::default(); 2];
    // SAFETY: capset reads the header and two data words, all valid for the call; pid 0 is
    // the calling thread.
    match unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn the_child_reads_the_descriptor_at_its_number() {
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, b"passed").unwrap();
        for target in [3, file.as_raw_fd()] {
            let mut command = Command::new("sh");
            command.args(["-c", &format!("cat /proc/self/fd/{target} 2>&1; readlink /proc/self/fd/{target} >/dev/null && echo open")]);
            pass_fd(&mut command, file.as_raw_fd(), target);
            let out = command.output().unwrap();
            assert!(String::from_utf8_lossy(&out.stdout).ends_with("open\n"), "fd {target}: {:?}", out);
        }
    }

    #[test]
    fn a_thread_that_drops_its_capabilities_holds_none_and_starts_threads_with_none() {
        let caps = |line: &str| {
            std::fs::read_to_string("/proc/thread-self/status").unwrap().lines().find(|l| l.starts_with(line)).unwrap().to_string()
        };
        std::thread::spawn(move || {
            drop_capabilities().unwrap();
            for set in ["CapEff:", "CapPrm:", "CapInh:"] {
                assert_eq!(caps(set), format!("{set}\t0000000000000000"));
            }
            std::thread::spawn(move || assert_eq!(caps("CapEff:"), "CapEff:\t0000000000000000")).join().unwrap();
        })
        .join()
        .unwrap();
    }
}
