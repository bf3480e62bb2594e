//! seccomp filters for cvm's threads and helper processes, one per role: each lists the
//! system calls that role makes, and any other call ends the process with a message that
//! names it (on its standard error: for an fs backend, the session's backend log).
//!
//! Roles: the fs backend (virtiofsd's passthrough file system and vhost-user server, after its
//! sandbox; its list follows what virtiofsd's own filter allows, less syslog, plus cvm's
//! lifeline thread and log), the janitor, and in cvm the vsock backend's threads, the VMM's
//! threads (the event loop and the vCPUs), the listeners (the egress proxy, forwards, relays)
//! and a command's relay (the agent protocol's frames).

use std::collections::BTreeMap;
use std::io;

use seccompiler::{BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule};

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
];

/// A role, and the filter that confines it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// A process: virtiofsd's passthrough file system and vhost-user server.
    FsBackend = 1,
    /// Threads of cvm: the vsock device's vhost-user server and its vring worker, with the
    /// muxer that connects the guest to host Unix sockets.
    VsockBackend,
    /// Threads of cvm's jailed VMM process: its control thread, the event loop (the devices'
    /// queues, disk I/O, the network device's socket, timers) and the vCPUs (KVM_RUN, port and
    /// MMIO exits, a device's vhost-user set-up when the guest's driver starts it). Every file
    /// they use is open before they start.
    Vmm,
    /// Threads of cvm: each listener for the guest or the host and the connections it serves
    /// (the egress proxy, published and host ports, the SSH and GPG agents' relays). They
    /// connect, resolve names and copy bytes; their files (the audit log) are open before.
    Listener,
    /// Threads of cvm: a command's relay (the agent's frames from the guest to this process's
    /// output, standard input and signals to the guest) and its standard input's reader; in a
    /// named VM's daemon, the splice between a `cvm exec` client and the agent.
    ExecRelay,
    /// A process: cvm's janitor, which waits for cvm to end and then removes its session's
    /// directory.
    Janitor,
}

impl Role {
    /// Its own calls, those of cvm's threads that carry bytes (where it is one), then those of
    /// any Rust program's threads.
    fn calls(self) -> impl Iterator<Item = i64> {
        let (own, streams): (&[i64], &[i64]) = match self {
            Role::FsBackend => (FS_BACKEND, &[]),
            Role::VsockBackend => (VSOCK_BACKEND, STREAMS),
            Role::Vmm => (VMM, STREAMS),
            Role::Listener => (LISTENER, STREAMS),
            Role::ExecRelay => (EXEC_RELAY, STREAMS),
            Role::Janitor => (JANITOR, &[]),
        };
        own.iter().chain(streams).chain(RUNTIME).copied()
    }
}

/// The status a process ends with when it made a call its role does not.
pub const VIOLATION_EXIT: i32 = 159;

/// What cvm's threads that carry bytes do with their sockets, pipes and streams.
const STREAMS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_fcntl,
    libc::SYS_close,
];

/// What every role's threads do as Rust programs: start threads, allocate, handle signals, tell
/// the time, end.
const RUNTIME: &[i64] = &[
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
    // Ending: a frontend's disconnect, the lifeline, or cvm's own end.
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The vsock backend's system calls (its thread, and the vring worker it starts).
const VSOCK_BACKEND: &[i64] = &[
    // The vhost-user connection from the VMM (cvm's or QEMU), its messages, the guest memory
    // they map and the vrings' eventfds.
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_eventfd2,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    // The event loops: the vrings, the muxer's epoll of host sockets.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    // Host sockets: accepting `CONNECT <port>` clients, connecting to `<socket>_<port>`, and
    // the bytes both ways.
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
    libc::SYS_ioctl,
    libc::SYS_unlink,
];

/// cvm's VMM threads' system calls.
const VMM: &[i64] = &[
    // KVM (KVM_RUN, vCPU state, interrupt lines, ioeventfds and irqfds, exit statistics) and
    // little else: see `ioctl_requests`.
    libc::SYS_ioctl,
    // The event loop, the devices' eventfds and the halt-check timer.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    // Disks: reads and writes at a sector, flushes (the console's pipe, the standard streams
    // and the network device's socket take the calls every byte carrier makes).
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_lseek,
    // vhost-user devices: their frontend's messages, with the guest memory's fd and the
    // vrings' eventfds.
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    // The end: the session's done signal, the vCPU threads' kicks, the guest memory unmapped.
    libc::SYS_nanosleep,
    // The VMM process's control thread: cvm's requests and the VM's end, on one poll.
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// cvm's listeners' system calls.
const LISTENER: &[i64] = &[
    // Accepting, and connecting on: Unix sockets (the guest's vsock ports, the agents), TCP
    // to loopback or the allowed hosts, with a deadline (a non-blocking connect and a poll).
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_shutdown,
    // The bytes both ways, as messages too.
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    // Names resolved by glibc: its files (read-only), the DNS servers (UDP), the addresses
    // configured here (a netlink socket).
    libc::SYS_bind,
    libc::SYS_sendmmsg,
    libc::SYS_uname,
    libc::SYS_pread64,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_ioctl,
];

/// A command relay's system calls.
const EXEC_RELAY: &[i64] = &[
    // The agent's connection, this process's standard streams, the signals' wake-up socket,
    // and the deadlines of each.
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
    libc::SYS_ioctl,
    libc::SYS_fstat,
    libc::SYS_statx,
];

/// The janitor's system calls: the end of its standard input, then a directory tree removed.
const JANITOR: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_openat,
    libc::SYS_getdents64,
    libc::SYS_unlinkat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_close,
];

/// The ioctls a role makes, where it makes any: for [`Role::Vmm`] KVM's (type 0xAE); for a
/// command's relay, a terminal's modes set back (raw mode's end); for all, a stream's terminal
/// query, non-blocking switch and bytes waiting. Never a terminal's input injection
/// (`TIOCSTI`).
fn ioctl_requests(role: Role, bad: impl Fn(seccompiler::BackendError) -> io::Error + Copy) -> io::Result<Vec<SeccompRule>> {
    let request = |op, value: u64| SeccompCondition::new(1, SeccompCmpArgLen::Dword, op, value).map_err(bad);
    let mut rules = Vec::new();
    if role == Role::Vmm {
        rules.push(SeccompRule::new(vec![request(SeccompCmpOp::MaskedEq(0xff00), 0xae00)?]).map_err(bad)?);
    }
    let mut plain = vec![libc::TCGETS, libc::TCGETS2, libc::TIOCGWINSZ, libc::FIONBIO, libc::FIOCLEX, libc::FIONREAD];
    if role == Role::ExecRelay {
        plain.extend([libc::TCSETS, libc::TCSETS2]);
    }
    for plain in plain {
        rules.push(SeccompRule::new(vec![request(SeccompCmpOp::Eq, plain)?]).map_err(bad)?);
    }
    Ok(rules)
}

/// `role`'s filter, built: its calls allowed, any other trapped.
fn program(role: Role) -> io::Result<BpfProgram> {
    let bad = |e: seccompiler::BackendError| io::Error::other(format!("seccomp: {e}"));
    let mut rules = role.calls().map(|call| (call, Vec::new())).collect::<BTreeMap<_, _>>();
    if let std::collections::btree_map::Entry::Vacant(open) = rules.entry(libc::SYS_openat) {
        // glibc's allocator reads /proc/sys/vm/overcommit_memory when a thread's arena
        // shrinks: a role that opens no file of its own may open files for reading only.
        let read_only =
            SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, (libc::O_RDONLY | libc::O_CLOEXEC) as u64).map_err(bad)?;
        open.insert(vec![SeccompRule::new(vec![read_only]).map_err(bad)?]);
    }
    if matches!(role, Role::Vmm | Role::Listener | Role::ExecRelay) {
        rules.insert(libc::SYS_ioctl, ioctl_requests(role, bad)?);
    }
    let arch = std::env::consts::ARCH.try_into().map_err(|e| io::Error::other(format!("seccomp: {e:?}")))?;
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch).map_err(bad)?;
    filter.try_into().map_err(bad)
}

/// Confines every thread of this process (and those it starts) to `role`'s calls.
pub fn confine_process(role: Role) -> io::Result<()> {
    let program = program(role)?;
    PROCESS_ROLE.store(role as u8, std::sync::atomic::Ordering::SeqCst);
    report_violations()?;
    seccompiler::apply_filter_all_threads(&program).map_err(|e| io::Error::other(format!("seccomp: {e}")))
}

/// Confines the calling thread (and the threads it starts) to `role`'s calls. A VMM thread
/// also gives up every capability it holds: it runs what the guest asks.
pub fn confine_thread(role: Role) -> io::Result<()> {
    let program = program(role)?;
    if role == Role::Vmm {
        crate::process::drop_capabilities()?;
    }
    report_violations()?;
    seccompiler::apply_filter(&program).map_err(|e| io::Error::other(format!("seccomp: {e}")))
}

/// The role of a process whose every thread holds one (an fs backend, the janitor), for its
/// violation message; 0 in cvm, whose threads hold several, told apart by the thread's name.
static PROCESS_ROLE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Turns the SIGSYS of a refused call into a message naming the role or thread and the call,
/// and an exit of the whole process.
fn report_violations() -> io::Result<()> {
    extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo for SIGSYS, whose `_sigsys` member holds
        // the call's number at byte 24 (after signo, errno, code, padding and the call address).
        let call = unsafe { (info as *const u8).add(24).cast::<i32>().read_unaligned() };
        let role = match PROCESS_ROLE.load(std::sync::atomic::Ordering::SeqCst) {
            r if r == Role::FsBackend as u8 => " fs backend",
            r if r == Role::Janitor as u8 => " janitor",
            _ => "",
        };
        let mut number = *b"         ";
        let mut at = number.len();
        let mut n = call.unsigned_abs();
        while at > 0 {
            at -= 1;
            number[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let mut thread = [0u8; 16];
        // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL-terminated, into the buffer.
        unsafe { libc::prctl(libc::PR_GET_NAME, thread.as_mut_ptr()) };
        let thread = &thread[..thread.iter().position(|&b| b == 0).unwrap_or(thread.len())];
        let parts: [&[u8]; 7] = [
            b"cvm",
            role.as_bytes(),
            b": seccomp: system call ",
            &number[at..],
            b" by thread '",
            thread,
            b"' is not allowed for its role\n",
        ];
        for part in parts {
            // SAFETY: write is async-signal-safe; the bytes live on this stack or are static.
            unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
        }
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(VIOLATION_EXIT) };
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
        let program = program(Role::FsBackend).unwrap();
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

    #[test]
    fn every_role_has_a_filter_and_a_list_without_repeats() {
        for role in [Role::FsBackend, Role::VsockBackend, Role::Vmm, Role::Listener, Role::ExecRelay, Role::Janitor] {
            program(role).unwrap();
            let calls: Vec<i64> = role.calls().collect();
            let distinct: std::collections::BTreeSet<i64> = calls.iter().copied().collect();
            assert_eq!(calls.len(), distinct.len(), "{role:?} lists a call twice");
            println!("{role:?}: {} system calls", calls.len());
        }
    }
}
