//! Helper processes that cvm starts (fs backends, passt) receive one descriptor at a fixed
//! number: the one place where that fork-time work is done.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Gives `command`'s child `fd` as descriptor `target`, open across exec; with
/// `die_with_parent`, the child also gets SIGKILL when the thread that spawns it ends (spawn
/// it from a thread that lives as long as cvm).
pub fn pass_fd(command: &mut Command, fd: RawFd, target: RawFd, die_with_parent: bool) {
    // SAFETY: runs in the child between fork and exec; dup2, fcntl and prctl are
    // async-signal-safe and touch only the child's own descriptors and attributes. dup2
    // clears CLOEXEC on the copy; when `fd` already is `target` the flag is cleared by hand.
    unsafe {
        command.pre_exec(move || {
            let moved = if fd == target { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, target) };
            if moved < 0 || (die_with_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0) {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
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
            pass_fd(&mut command, file.as_raw_fd(), target, false);
            let out = command.output().unwrap();
            assert!(String::from_utf8_lossy(&out.stdout).ends_with("open\n"), "fd {target}: {:?}", out);
        }
    }
}
