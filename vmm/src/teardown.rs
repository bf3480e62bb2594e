//! The kernel's side of a VM's end, off the critical path. Destroying a KVM VM waits for
//! SRCU grace periods (0.7 ms or 13-18 ms, at random, on the hosts measured), and freeing its
//! RAM takes time in proportion to what the guest touched. A VMM that closes those fds itself
//! makes its user wait for both before learning how the guest ended. So a helper process holds
//! duplicates of the VM's and the RAM's fds: when the VMM lets go of its own, the last
//! references are the helper's, and the kernel does that work in the helper, after the VMM has
//! reported the exit (or exited).

use std::os::fd::{AsRawFd, OwnedFd};

/// Holds the helper's release pipe: dropping it (or this process ending) lets the helper close
/// the VM's last references and exit.
pub(crate) struct DeferredTeardown {
    _release: OwnedFd,
}

impl DeferredTeardown {
    /// Starts a helper that keeps `vm` and `ram` open until the returned value is dropped.
    /// The helper is a grandchild, so that no one has to reap it: it is nobody's child for
    /// long, and it exits within milliseconds of the release.
    pub(crate) fn start(vm: &impl AsRawFd, ram: &impl AsRawFd) -> std::io::Result<DeferredTeardown> {
        let (release_read, release_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let keep = [release_read.as_raw_fd(), vm.as_raw_fd(), ram.as_raw_fd()];
        // SAFETY: the child runs only async-signal-safe system calls (fork, dup2, close_range, capset,
        // read, _exit) on values computed before the fork, so it never touches a lock another
        // thread of this process held at the fork.
        let child = unsafe { libc::fork() };
        match child {
            -1 => return Err(std::io::Error::last_os_error()),
            0 => unsafe { helper(keep) },
            _ => {}
        }
        drop(release_read);
        let mut status = 0;
        // SAFETY: waiting for the child just forked, which exits at once after its own fork.
        while unsafe { libc::waitpid(child, &mut status, 0) } == -1 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            return Err(std::io::Error::other("the teardown helper did not start"));
        }
        Ok(DeferredTeardown { _release: release_write })
    }
}

/// The forked child: forks the helper and exits, so that the helper is reparented at once.
/// The helper moves the fds it keeps to 0, 1 and 2 (dup2 clears their close-on-exec flag, which
/// does not matter here), closes every other one (the terminal, pipes a caller waits on), drops
/// its capabilities, and waits for the release pipe's end of file.
///
/// # Safety
/// Only to be called in a child right after `fork`.
unsafe fn helper([release, vm, ram]: [i32; 3]) -> ! {
    match libc::fork() {
        0 => {}
        -1 => libc::_exit(1),
        _ => libc::_exit(0),
    }
    // All out of the way of 0-2 first (a source may be one of them), then into place.
    let moved = [release, vm, ram].map(|source| libc::fcntl(source, libc::F_DUPFD, 3));
    for (target, source) in moved.into_iter().enumerate() {
        if source == -1 || libc::dup2(source, target as i32) == -1 {
            libc::_exit(1);
        }
    }
    libc::close_range(3, u32::MAX, 0);
    // In a jailed VMM it was forked before the jail: it gives up the capabilities it had.
    if cvm_sandbox::process::drop_capabilities().is_err() {
        libc::_exit(1);
    }
    let mut byte = 0u8;
    while libc::read(0, (&mut byte as *mut u8).cast(), 1) == -1 && *libc::__errno_location() == libc::EINTR {}
    libc::_exit(0)
}
