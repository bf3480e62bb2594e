//! The host end of one exec: connect to the agent through the VM's vsock socket, send the
//! command, then relay stdin, terminal resizes and signals one way and output the other
//! until the exit status arrives.

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cvm_agent::protocol::{self, Exec, ExitStatus, Reply, Request};
use rustix::event::{PollFd, PollFlags};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGWINCH};

use crate::host::terminal::{self, escapes::EscapeFilter};

/// How long the rest of a frame may take once its first byte came: the agent writes each
/// frame at once, so only a hostile or broken guest is slower.
const FRAME_TIME: Duration = Duration::from_secs(10);
/// How long the command has to end after cvm got SIGTERM or SIGHUP (and passed it on) before
/// cvm stops the VM and exits with that signal's status, as `docker stop` does.
pub const TERMINATE_GRACE: Duration = Duration::from_secs(10);

/// Reads from a stream whose every read ends by `deadline`, however the guest trickles bytes.
pub struct ReadBy<'a, R> {
    reader: &'a mut R,
    socket: &'a UnixStream,
    deadline: Instant,
}

impl<'a, R: Read> ReadBy<'a, R> {
    /// `reader` reads from `socket` (itself, or a buffer over it).
    pub fn new(reader: &'a mut R, socket: &'a UnixStream, deadline: Instant) -> Self {
        ReadBy { reader, socket, deadline }
    }
}

impl<R: Read> Read for ReadBy<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.socket.set_read_timeout(Some(left))?;
        self.reader.read(buf)
    }
}

/// How an exec ended from the host's point of view.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Exited(ExitStatus),
    /// The deadline passed first.
    TimedOut,
    /// The VM stopped before the command finished.
    MachineStopped,
    /// cvm got this signal, passed it on, and the command had not ended [`TERMINATE_GRACE`]
    /// later.
    Terminated(i32),
}

/// Signals that the relay turns into requests; each sets its flag and wakes the poll.
struct SignalWatch {
    wake: UnixStream,
    flags: Vec<(i32, Arc<AtomicBool>)>,
    ids: Vec<signal_hook::SigId>,
}

impl SignalWatch {
    fn new(signals: &[i32]) -> io::Result<Self> {
        let (wake, wake_w) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        let mut flags = Vec::new();
        let mut ids = Vec::new();
        for &signal in signals {
            let flag = Arc::new(AtomicBool::new(false));
            ids.push(signal_hook::flag::register(signal, flag.clone())?);
            ids.push(signal_hook::low_level::pipe::register(signal, wake_w.try_clone()?)?);
            flags.push((signal, flag));
        }
        Ok(Self { wake, flags, ids })
    }

    /// The signals that arrived since the last call.
    fn take(&mut self) -> Vec<i32> {
        let mut sink = [0u8; 64];
        while matches!(self.wake.read(&mut sink), Ok(n) if n > 0) {}
        self.flags.iter().filter(|(_, f)| f.swap(false, Ordering::SeqCst)).map(|(s, _)| *s).collect()
    }
}

impl Drop for SignalWatch {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

fn write_all_fd(fd: BorrowedFd<'_>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match rustix::io::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Writes whole frames; shared by the stdin thread and the signal handling.
type Writer = Arc<Mutex<UnixStream>>;

fn send(writer: &Writer, request: &Request) -> io::Result<()> {
    protocol::write_frame(&mut *writer.lock().unwrap_or_else(|e| e.into_inner()), &request.encode())
}

/// [`send`] unless the stdin thread holds the writer, stuck in a write the guest does not
/// take: then the request is dropped rather than wait on the guest.
fn try_send(writer: &Writer, request: &Request) -> io::Result<()> {
    match writer.try_lock() {
        Ok(mut stream) => protocol::write_frame(&mut *stream, &request.encode()),
        Err(std::sync::TryLockError::Poisoned(e)) => protocol::write_frame(&mut *e.into_inner(), &request.encode()),
        Err(std::sync::TryLockError::WouldBlock) => {
            tracing::debug!("the guest is not reading: {request:?} not sent");
            Ok(())
        }
    }
}

/// Copies stdin to the guest on its own thread: a write that waits for the guest to read
/// must never stop the output coming back (the command may be waiting for us to take it).
fn forward_stdin(writer: Writer) {
    let _ = std::thread::Builder::new().name("exec-stdin".into()).spawn(move || {
        let stdin = rustix::stdio::stdin();
        let mut buf = vec![0u8; protocol::MAX_DATA];
        loop {
            let request = match rustix::io::read(stdin, &mut buf) {
                Ok(0) | Err(_) => Request::StdinEof,
                Ok(n) => Request::Stdin(buf[..n].to_vec()),
            };
            let eof = request == Request::StdinEof;
            if send(&writer, &request).is_err() || eof {
                return;
            }
        }
    });
}

/// Runs `exec` over `conn` with this process's stdio. With `exec.tty` set, stdin is expected
/// in raw mode (the caller's job) and resizes follow SIGWINCH; without, termination signals
/// are forwarded to the command. What the guest sends is read on a thread of its own, under
/// its seccomp role, as is stdin.
pub fn relay(conn: UnixStream, exec: Exec, deadline: Option<Instant>, machine_exit: BorrowedFd<'_>) -> io::Result<Outcome> {
    let tty = exec.tty.is_some();
    let writer: Writer = Arc::new(Mutex::new(conn.try_clone()?));
    let reader = io::BufReader::new(conn.try_clone()?);
    let signals = SignalWatch::new(&[SIGWINCH, SIGINT, SIGTERM, SIGHUP, SIGQUIT])?;
    std::thread::scope(|scope| {
        let relay = std::thread::Builder::new().name("exec-relay".into()).spawn_scoped(scope, move || {
            cvm_sandbox::seccomp::confine_thread(cvm_sandbox::seccomp::Role::ExecRelay)?;
            send(&writer, &Request::Exec(exec))?;
            forward_stdin(writer.clone());
            relay_frames(conn, reader, writer, signals, tty, deadline, machine_exit)
        })?;
        relay.join().unwrap_or_else(|_| Err(io::Error::other("the command's relay panicked")))
    })
}

/// [`relay`]'s loop, from the command's start to its end.
fn relay_frames(
    conn: UnixStream,
    mut reader: io::BufReader<UnixStream>,
    writer: Writer,
    mut signals: SignalWatch,
    tty: bool,
    deadline: Option<Instant>,
    machine_exit: BorrowedFd<'_>,
) -> io::Result<Outcome> {
    let (stdout, stderr) = (rustix::stdio::stdout(), rustix::stdio::stderr());
    let mut output_open = (true, true);
    // What reaches a terminal of the user's is filtered ([`terminal::escapes`]).
    let mut filters = (EscapeFilter::for_fd(stdout), EscapeFilter::for_fd(stderr));
    let shown = |filter: &mut Option<EscapeFilter>, data: Vec<u8>| match filter {
        Some(filter) => {
            let mut out = Vec::with_capacity(data.len());
            filter.filter(&data, &mut out);
            out
        }
        None => data,
    };
    // Set when cvm is told to end: (the signal, when the command's grace ends).
    let mut terminating: Option<(i32, Instant)> = None;
    let ends = |terminating: Option<(i32, Instant)>| [deadline, terminating.map(|(_, at)| at)].into_iter().flatten().min();
    let past = |terminating: Option<(i32, Instant)>| match terminating {
        Some((signal, at)) if Instant::now() >= at => Some(Outcome::Terminated(signal)),
        _ => deadline.is_some_and(|d| Instant::now() >= d).then_some(Outcome::TimedOut),
    };

    loop {
        // Checked each time round: a guest that never stops sending still ends at its deadlines.
        if let Some(outcome) = past(terminating) {
            return Ok(outcome);
        }
        // Frames already buffered need no poll.
        if reader.buffer().is_empty() {
            let mut fds = [
                PollFd::new(&conn, PollFlags::IN),
                PollFd::from_borrowed_fd(signals.wake.as_fd(), PollFlags::IN),
                PollFd::from_borrowed_fd(machine_exit, PollFlags::IN),
            ];
            if crate::poll_until(&mut fds, ends(terminating))? == 0 {
                return Ok(past(terminating).unwrap_or(Outcome::TimedOut));
            }
            let ready = fds.map(|f| !f.revents().is_empty());
            if ready[1] {
                for signal in signals.take() {
                    if matches!(signal, SIGTERM | SIGHUP) && terminating.is_none() {
                        terminating = Some((signal, Instant::now() + TERMINATE_GRACE));
                    }
                    let request = match signal {
                        SIGWINCH => terminal::size().map(Request::Resize),
                        _ if tty => None,
                        other => Some(Request::Signal(other)),
                    };
                    if let Some(request) = request {
                        try_send(&writer, &request)?;
                    }
                }
            }
            if !ready[0] {
                if ready[2] {
                    return Ok(Outcome::MachineStopped);
                }
                continue;
            }
        }
        // A frame the guest started must arrive whole soon, and never past the deadlines.
        let frame_by = ends(terminating).map_or(Instant::now() + FRAME_TIME, |end| end.min(Instant::now() + FRAME_TIME));
        match protocol::read_reply(&mut ReadBy::new(&mut reader, &conn, frame_by)) {
            Ok(Some(Reply::Stdout(data))) if output_open.0 => output_open.0 = write_all_fd(stdout, &shown(&mut filters.0, data)).is_ok(),
            Ok(Some(Reply::Stderr(data))) if output_open.1 => output_open.1 = write_all_fd(stderr, &shown(&mut filters.1, data)).is_ok(),
            Ok(Some(Reply::Failed(message))) => {
                terminal::restore();
                eprintln!("cvm: {message}");
            }
            Ok(Some(Reply::Exited(status))) => return Ok(Outcome::Exited(status)),
            Ok(Some(_)) => {}
            Ok(None) => return Ok(Outcome::MachineStopped),
            Err(e) => {
                tracing::debug!("the agent connection failed: {e}");
                return Ok(past(terminating).unwrap_or(Outcome::MachineStopped));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_guest_that_trickles_or_floods_frames_still_ends_at_the_deadline() {
        for flood in [false, true] {
            let (host, mut guest) = UnixStream::pair().unwrap();
            let (exit_read, _exit_write) = rustix::pipe::pipe().unwrap();
            let hostile = std::thread::spawn(move || {
                let _ = protocol::read_request(&mut guest);
                if flood {
                    // Frames that ask nothing, as fast as the host takes them.
                    while protocol::write_frame(&mut guest, &Reply::Synced.encode()).is_ok() {}
                } else {
                    // The start of a 1000-byte frame, then nothing.
                    let _ = guest.write_all(&[0xe8, 3, 0, 0, 1]);
                    std::thread::sleep(Duration::from_secs(3));
                }
            });
            let started = Instant::now();
            let outcome = relay(host, Exec::default(), Some(started + Duration::from_millis(500)), exit_read.as_fd()).unwrap();
            assert_eq!(outcome, Outcome::TimedOut, "flood: {flood}");
            assert!(started.elapsed() < Duration::from_secs(2), "flood: {flood}: {:?}", started.elapsed());
            hostile.join().unwrap();
        }
    }
}
