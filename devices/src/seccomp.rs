//! seccomp filters for cvm's helper processes, one per role: each lists the system calls that
//! role makes, and any other call ends the process with a message that names it (on its
//! standard error: for an fs backend, the session's backend log).
//!
//! Roles so far: the fs backend (virtiofsd's passthrough file system and vhost-user server,
//! after its sandbox). The list follows what virtiofsd's own filter allows, less what cvm's
//! backend never does (syslog), plus what cvm adds (its lifeline thread, its log).

use std::collections::BTreeMap;
use std::io;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

/// The fs backend's system calls.
const FS_BACKEND: &[i64] = &[
    // The vhost-user connection: the frontend's socket, its messages and fds, the vrings'
    // eventfds and the event loop.
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    // Files, as the guest's FUSE requests ask: opening beneath the shared directory, reading,
    // writing, attributes, directory entries, links and renames.
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_open,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    libc::SYS_close,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_copy_file_range,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_syncfs,
    libc::SYS_flock,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_getdents,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_fchdir,
    libc::SYS_umask,
    libc::SYS_getxattr,
    libc::SYS_fgetxattr,
    libc::SYS_setxattr,
    libc::SYS_fsetxattr,
    libc::SYS_listxattr,
    libc::SYS_flistxattr,
    libc::SYS_removexattr,
    libc::SYS_fremovexattr,
    // Acting as the guest's user for a request: credentials, capabilities, a thread's own
    // file-system attributes (umask, cwd).
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setgroups,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_unshare,
    libc::SYS_geteuid,
    libc::SYS_getegid,
    // Threads and memory: the vring workers, the lifeline, the allocator, guest memory maps.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_membarrier,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_prctl,
    libc::SYS_getrandom,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_time,
    // Ending: the frontend's disconnect, or the lifeline.
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The status a process ends with when it made a call its role does not.
pub const VIOLATION_EXIT: i32 = 159;

/// The fs backend's filter, built.
fn fs_backend_program() -> io::Result<BpfProgram> {
    let rules = FS_BACKEND.iter().map(|&call| (call, Vec::new())).collect::<BTreeMap<_, _>>();
    let arch = std::env::consts::ARCH.try_into().map_err(|e| io::Error::other(format!("seccomp: {e:?}")))?;
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch).map_err(|e| io::Error::other(format!("seccomp: {e}")))?;
    filter.try_into().map_err(|e| io::Error::other(format!("seccomp: {e}")))
}

/// Confines every thread of this process (and those it starts) to the fs backend's calls.
pub fn confine_fs_backend() -> io::Result<()> {
    let program = fs_backend_program()?;
    report_violations()?;
    seccompiler::apply_filter_all_threads(&program).map_err(|e| io::Error::other(format!("seccomp: {e}")))
}

/// Turns the SIGSYS of a refused call into a message naming it, and an exit.
fn report_violations() -> io::Result<()> {
    extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo for SIGSYS, whose `_sigsys` member holds
        // the call's number at byte 24 (after signo, errno, code, padding and the call address).
        let call = unsafe { (info as *const u8).add(24).cast::<i32>().read_unaligned() };
        let mut message = *b"cvm fs backend: seccomp: system call           is not allowed for this role\n";
        let mut at = 45;
        let mut n = call.unsigned_abs();
        loop {
            message[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 || at == 37 {
                break;
            }
            at -= 1;
        }
        // SAFETY: write and _exit are async-signal-safe; the buffer lives on this stack.
        unsafe {
            libc::write(2, message.as_ptr().cast(), message.len());
            libc::_exit(VIOLATION_EXIT);
        }
    }
    // SAFETY: a zeroed sigaction is a valid start; the handler only calls async-signal-safe
    // functions.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_outside_the_role_ends_the_process_with_its_number() {
        let program = fs_backend_program().unwrap();
        // SAFETY (test): the child only installs the prepared filter and makes system calls
        // before it exits; nothing it does allocates or takes a lock.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let _ = report_violations();
            if seccompiler::apply_filter(&program).is_err() {
                unsafe { libc::_exit(1) };
            }
            // Allowed: a file-system call. Refused: a socket of its own (number 41).
            unsafe {
                libc::getpid();
                libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0);
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY (test): waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == VIOLATION_EXIT, "status {status:#x}");
    }
}
