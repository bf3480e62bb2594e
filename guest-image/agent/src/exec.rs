//! One exec per connection: start the command (pipes or a pseudo-terminal), pump its output
//! to the host, feed it the host's input, resizes and signals, and send its exit status.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cvm_agent::protocol::{self, Exec, ExitStatus, Reply, Request, TtySize};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long output pumps keep reading after the command exited, while nothing comes: a
/// background process that inherited the pipe must not hold the exec open.
const DRAIN_GRACE: Duration = Duration::from_millis(50);

/// The connection's write half, shared by the output pumps and the status sender.
type Writer = Arc<Mutex<File>>;

fn send(writer: &Writer, reply: &Reply) -> io::Result<()> {
    protocol::write_frame(&mut *writer.lock().unwrap(), &reply.encode())
}

/// Serves one connection from the host.
pub fn serve(conn: File) {
    let result = (|| -> io::Result<()> {
        let mut reader = conn.try_clone()?;
        let writer: Writer = Arc::new(Mutex::new(conn));
        match protocol::read_request(&mut reader)? {
            Some(Request::Exec(exec)) => run(exec, reader, writer),
            Some(Request::Shutdown) => {
                // SAFETY: sync takes no arguments.
                unsafe { libc::sync() };
                let _ = send(&writer, &Reply::Synced);
                crate::shutdown()
            }
            Some(Request::Forward { port }) => match crate::relay::connect_local(port) {
                Ok(local) => {
                    send(&writer, &Reply::Done)?;
                    let conn = Arc::try_unwrap(writer)
                        .map_err(|_| io::Error::other("the connection is shared"))?
                        .into_inner()
                        .map_err(|_| io::Error::other("poisoned"))?;
                    crate::relay::splice(conn, local);
                    Ok(())
                }
                Err(e) => send(&writer, &Reply::Failed(format!("nothing listens on 127.0.0.1:{port} in the guest: {e}"))),
            },
            Some(Request::Setup(setup)) => match crate::setup::apply(&setup) {
                Ok(()) => send(&writer, &Reply::Done),
                Err(message) => send(&writer, &Reply::Failed(message)),
            },
            Some(other) => Err(io::Error::new(io::ErrorKind::InvalidData, format!("expected exec, got {other:?}"))),
            None => Ok(()),
        }
    })();
    if let Err(e) = result {
        crate::debug(&format!("connection ended: {e}"));
    }
}

/// A started command: its pid, the host-facing ends of its stdio, and its exit status.
struct Child {
    pid: libc::pid_t,
    /// Pipe mode: stdin's write end. Terminal mode: the master, which is stdin and stdout.
    input: Option<File>,
    stdout: File,
    stderr: Option<File>,
    tty_master: Option<RawFd>,
    status: std::sync::mpsc::Receiver<libc::c_int>,
}

/// A command that could not start: the message for the user and the shell-style code.
struct StartError(String, i32);

fn run(exec: Exec, mut reader: File, writer: Writer) -> io::Result<()> {
    let child = match start(&exec) {
        Ok(child) => child,
        Err(StartError(msg, code)) => {
            send(&writer, &Reply::Failed(msg))?;
            return send(&writer, &Reply::Exited(ExitStatus::Code(code)));
        }
    };
    send(&writer, &Reply::Started { pid: child.pid as u32 })?;

    let exited = Arc::new(AtomicBool::new(false));
    let mut pumps = vec![pump(child.stdout, writer.clone(), exited.clone(), Reply::Stdout)];
    if let Some(stderr) = child.stderr {
        pumps.push(pump(stderr, writer.clone(), exited.clone(), Reply::Stderr));
    }

    let pid = child.pid;
    let tty_master = child.tty_master;
    let mut input = child.input;
    let input_thread = std::thread::spawn(move || {
        loop {
            match protocol::read_request(&mut reader) {
                Ok(Some(Request::Stdin(data))) => {
                    if let Some(w) = input.as_mut() {
                        if w.write_all(&data).is_err() {
                            input = None;
                        }
                    }
                }
                Ok(Some(Request::StdinEof)) => match tty_master {
                    // A terminal has no end of input; ^D at the start of a line is how a
                    // user says it.
                    Some(_) => {
                        if let Some(w) = input.as_mut() {
                            let _ = w.write_all(&[4]);
                        }
                    }
                    None => input = None,
                },
                Ok(Some(Request::Resize(size))) => {
                    if let Some(fd) = tty_master {
                        set_winsize(fd, size);
                    }
                }
                Ok(Some(Request::Signal(sig))) => signal_group(pid, sig),
                Ok(Some(_)) => {}
                // The host went away or the exec ended (the socket is shut down after the
                // exit status is sent): nothing of this command must outlive it.
                Ok(None) | Err(_) => {
                    signal_group(pid, libc::SIGKILL);
                    return;
                }
            }
        }
    });

    let status = child.status.recv().map_err(io::Error::other)?;
    exited.store(true, Ordering::SeqCst);
    for p in pumps {
        let _ = p.join();
    }
    let status =
        if libc::WIFSIGNALED(status) { ExitStatus::Signal(libc::WTERMSIG(status)) } else { ExitStatus::Code(libc::WEXITSTATUS(status)) };
    send(&writer, &Reply::Exited(status))?;
    let _ = writer.lock().unwrap().flush();
    // SAFETY: shutdown on our own socket fd; it ends the input thread's blocking read.
    unsafe { libc::shutdown(writer.lock().unwrap().as_raw_fd(), libc::SHUT_RDWR) };
    let _ = input_thread.join();
    Ok(())
}

fn signal_group(pid: libc::pid_t, sig: i32) {
    // SAFETY: kill takes no pointers. The command leads its own session and process group.
    unsafe { libc::kill(-pid, sig) };
}

fn set_winsize(fd: RawFd, size: TtySize) {
    let ws = libc::winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads a winsize that lives across the call.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

/// Copies a command's output to the host until it ends, or until it goes quiet after the
/// command exited.
fn pump(mut from: File, writer: Writer, exited: Arc<AtomicBool>, wrap: fn(Vec<u8>) -> Reply) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; protocol::MAX_DATA];
        loop {
            let mut pfd = libc::pollfd { fd: from.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let timeout = if exited.load(Ordering::SeqCst) { DRAIN_GRACE.as_millis() as i32 } else { 100 };
            // SAFETY: one pollfd that lives across the call.
            let ready = unsafe { libc::poll(&mut pfd, 1, timeout) };
            if ready == 0 {
                if exited.load(Ordering::SeqCst) {
                    return;
                }
                continue;
            }
            match from.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if send(&writer, &wrap(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted || e.kind() == io::ErrorKind::WouldBlock => {}
                // EIO: the terminal's last user closed it.
                Err(_) => return,
            }
        }
    })
}

fn cstring(bytes: &[u8], what: &str) -> Result<CString, StartError> {
    CString::new(bytes).map_err(|_| StartError(format!("{what} contains a NUL byte"), 126))
}

/// The environment the command gets: a base PATH and HOME, then the host's variables.
fn environment(exec: &Exec) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = vec![(b"PATH".to_vec(), DEFAULT_PATH.into()), (b"HOME".to_vec(), b"/root".to_vec())];
    for (k, v) in &exec.env {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

/// Finds the program like a shell does: a name with a slash is a path, others are looked up
/// in PATH.
fn resolve(program: &[u8], env: &[(Vec<u8>, Vec<u8>)]) -> Option<Vec<u8>> {
    if program.contains(&b'/') {
        return Some(program.to_vec());
    }
    let path = env.iter().find(|(k, _)| k == b"PATH").map_or(DEFAULT_PATH.as_bytes(), |(_, v)| &v[..]);
    path.split(|&b| b == b':').filter(|dir| !dir.is_empty()).find_map(|dir| {
        let mut candidate = dir.to_vec();
        candidate.push(b'/');
        candidate.extend_from_slice(program);
        let c = CString::new(candidate.clone()).ok()?;
        // SAFETY: access reads a NUL-terminated path.
        (unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0).then_some(candidate)
    })
}

fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and ours.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// Opens a new pseudo-terminal: (master, slave path).
fn open_pty(size: TtySize) -> io::Result<(File, CString)> {
    // SAFETY: posix_openpt returns a new fd or -1.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if master < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: master is fresh and ours.
    let master = unsafe { File::from_raw_fd(master) };
    let mut name = [0 as libc::c_char; 64];
    // SAFETY: grantpt/unlockpt act on our master; ptsname_r writes at most name.len() bytes.
    unsafe {
        if libc::grantpt(master.as_raw_fd()) != 0
            || libc::unlockpt(master.as_raw_fd()) != 0
            || libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    set_winsize(master.as_raw_fd(), size);
    // SAFETY: ptsname_r NUL-terminated the name.
    let slave = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_owned();
    Ok((master, slave))
}

/// Which step of the child's set-up failed, reported through the CLOEXEC pipe.
const STEP_CHDIR: u8 = 1;
const STEP_USER: u8 = 2;
const STEP_EXEC: u8 = 3;
const STEP_TTY: u8 = 4;

fn start(exec: &Exec) -> Result<Child, StartError> {
    let Some(program) = exec.argv.first() else {
        return Err(StartError("empty command".into(), 126));
    };
    let shown = String::from_utf8_lossy(program).into_owned();
    let env = environment(exec);
    let Some(path) = resolve(program, &env) else {
        return Err(StartError(format!("{shown}: command not found"), 127));
    };
    let path = cstring(&path, "the program path")?;
    let argv: Vec<CString> = exec.argv.iter().map(|a| cstring(a, "an argument")).collect::<Result<_, _>>()?;
    let envp: Vec<CString> =
        env.iter().map(|(k, v)| cstring(&[&k[..], b"=", &v[..]].concat(), "an environment variable")).collect::<Result<_, _>>()?;
    let cwd = exec.cwd.as_deref().map(|c| cstring(c, "the working directory")).transpose()?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());

    let io_err = |e: io::Error| StartError(format!("cannot start {shown}: {e}"), 126);
    // The child's stdio and the host-facing ends.
    let (stdin_child, stdout_child, stderr_child, input, stdout, stderr, tty_master, slave);
    match exec.tty {
        Some(size) => {
            let (master, name) = open_pty(size).map_err(io_err)?;
            tty_master = Some(master.as_raw_fd());
            stdout = master.try_clone().map_err(io_err)?;
            input = Some(master);
            stderr = None;
            (stdin_child, stdout_child, stderr_child) = (None, None, None);
            slave = Some(name);
        }
        None => {
            let (in_r, in_w) = pipe().map_err(io_err)?;
            let (out_r, out_w) = pipe().map_err(io_err)?;
            let (err_r, err_w) = pipe().map_err(io_err)?;
            (stdin_child, stdout_child, stderr_child) = (Some(in_r), Some(out_w), Some(err_w));
            input = Some(in_w);
            stdout = out_r;
            stderr = Some(err_r);
            tty_master = None;
            slave = None;
        }
    }
    let (report_r, report_w) = pipe().map_err(io_err)?;
    let child_fds = [&stdin_child, &stdout_child, &stderr_child].map(|f| f.as_ref().map_or(-1, |f| f.as_raw_fd()));

    let (pid, status) = crate::reaper::spawn(|| {
        // SAFETY: fork in a threaded process; the child only makes async-signal-safe calls
        // on memory prepared before the fork, then execs or exits.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: see above; never returns.
            unsafe { child_after_fork(&path, &argv_ptrs, &envp_ptrs, cwd.as_ref(), exec, slave.as_ref(), child_fds, report_w.as_raw_fd()) }
        }
        Ok(pid)
    })
    .map_err(io_err)?;
    drop((stdin_child, stdout_child, stderr_child, report_w));

    // The report pipe closes on exec (nothing read) or carries the failed step and errno.
    let mut report = Vec::new();
    let _ = (&report_r).read_to_end(&mut report);
    if report.len() == 5 {
        let _ = status.recv();
        let errno = i32::from_le_bytes(report[1..5].try_into().expect("4 bytes"));
        let err = io::Error::from_raw_os_error(errno);
        let (what, code) = match report[0] {
            STEP_CHDIR => (format!("cannot enter {}: {err}", String::from_utf8_lossy(exec.cwd.as_deref().unwrap_or_default())), 126),
            STEP_USER => (format!("cannot switch user: {err}"), 126),
            STEP_TTY => (format!("cannot open the terminal: {err}"), 126),
            _ if errno == libc::ENOENT => (format!("{shown}: {err}"), 127),
            _ => (format!("{shown}: {err}"), 126),
        };
        return Err(StartError(what, code));
    }
    Ok(Child { pid, input, stdout, stderr, tty_master, status })
}

/// The child between fork and exec.
///
/// # Safety
/// Must run only in a freshly forked child; every pointer refers to memory prepared before the
/// fork. Only async-signal-safe functions are called.
#[allow(clippy::too_many_arguments)]
unsafe fn child_after_fork(
    path: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    cwd: Option<&CString>,
    exec: &Exec,
    slave: Option<&CString>,
    pipes: [RawFd; 3],
    report: RawFd,
) -> ! {
    let fail = |step: u8| -> ! {
        let errno = *libc::__errno_location();
        let mut msg = [step, 0, 0, 0, 0];
        msg[1..].copy_from_slice(&errno.to_le_bytes());
        libc::write(report, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    };
    // Rust ignores SIGPIPE and the agent may block signals; commands expect the defaults.
    let mut all: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut all);
    libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    // Its own session and process group, so signals reach everything it starts.
    libc::setsid();
    match slave {
        Some(name) => {
            let fd = libc::open(name.as_ptr(), libc::O_RDWR);
            if fd < 0 || libc::ioctl(fd, libc::TIOCSCTTY, 0) != 0 {
                fail(STEP_TTY);
            }
            for target in 0..3 {
                libc::dup2(fd, target);
            }
            if fd > 2 {
                libc::close(fd);
            }
        }
        None => {
            for (target, fd) in pipes.iter().enumerate() {
                libc::dup2(*fd, target as i32);
            }
        }
    }
    if let Some(dir) = cwd {
        if libc::chdir(dir.as_ptr()) != 0 {
            fail(STEP_CHDIR);
        }
    }
    if let Some(uid) = exec.uid {
        let gid = exec.gid.unwrap_or(uid);
        if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
            fail(STEP_USER);
        }
    } else if let Some(gid) = exec.gid {
        if libc::setgid(gid) != 0 {
            fail(STEP_USER);
        }
    }
    libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
    fail(STEP_EXEC)
}
