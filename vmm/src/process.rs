//! cvm's VMM in a jailed process of its own ([`VmProcess`]): cvm keeps the orchestration and
//! never touches guest memory or a device's queue; the VMM process runs the guest, jailed
//! ([`crate::jail`]) before the guest's first instruction.
//!
//! cvm starts `cvm __vmm` ([`VMM_COMMAND`], which calls [`serve`]) with a control socket
//! (`SOCK_SEQPACKET`, one JSON message per packet, descriptors alongside) at fd 3 and the exit
//! pipe at fd 4. The start, in order:
//! 1. cvm sends the [`VmConfig`]; the process unshares its namespaces and says so;
//! 2. cvm writes its id maps and says so; the process forks the VMM (the init of its new PID
//!    namespace), sends cvm a pidfd of it and exits (so the VMM is nobody's child, and the
//!    kernel's teardown of its VM is nobody's wait);
//! 3. the VMM takes its unprivileged ids (where cvm is root), builds the VM, jails itself,
//!    starts the VM's thread and says so.
//!
//! Then cvm asks (stop, state, capture for a snapshot, resume) and the VMM answers. When the
//! VM's run ends the VMM writes the [`VmExit`] to the exit pipe, closes it and exits. A VMM
//! whose cvm is gone (the control socket's end of file) stops its VM.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use serde::{Deserialize, Serialize};

use crate::engine::{Finished, RunningVm, VmThread};
use crate::vm::{SNAPSHOT_PAUSE_TIMEOUT, VCPU_STOP_TIMEOUT};
use crate::{jail, lock, Error, Result, Vm, VmConfig, VmExit};

/// The hidden subcommand of the cvm executable that runs [`serve`].
pub const VMM_COMMAND: &str = "__vmm";

/// How long the VMM process may take to unshare, fork, build the VM and jail itself (seconds
/// at most, even restoring a snapshot in a nested VM under load: this is a hang's bound).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a state query may take to be answered.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the VM's end may take past its vCPUs' stop timeout before cvm kills the VMM (a
/// hang's bound: in a loaded nested VM the end takes a second or two).
const STOP_GRACE: Duration = Duration::from_secs(30);
/// The largest control message.
const MAX_MESSAGE: usize = 64 << 10;
/// The largest exit report (a panic's console lines, KVM's exit counts).
const MAX_EXIT_REPORT: u64 = 1 << 20;

/// cvm's messages to the VMM process.
#[derive(Debug, Serialize, Deserialize)]
enum ToVmm {
    /// The VM to run, and how long before the spawn the VMM's clock started (the zero of its
    /// boot timings).
    Start {
        config: Box<VmConfig>,
        since_start: Duration,
    },
    /// The id maps are written; where cvm is root, the unprivileged ids the VMM is to take.
    Mapped {
        ids: Option<(u32, u32)>,
    },
    Stop,
    /// Whether the guest has reached its init, and whether the VM has ended.
    Query,
    /// Pause and capture the VM for a snapshot, its state written into the memfd sent along.
    Capture,
    Resume,
}

/// The VMM process's messages to cvm.
#[derive(Debug, Serialize, Deserialize)]
enum FromVmm {
    /// The namespaces are made: write the id maps.
    Unshared,
    /// The VMM is forked; its pidfd comes along.
    Forked,
    /// The VM is built and runs, jailed.
    Started,
    State {
        init_reached: bool,
        ended: bool,
    },
    /// The VM is paused; the state's length (in the memfd cvm sent) and the RAM's memfd come along.
    Captured {
        state_len: u64,
    },
    Failed(String),
}

/// cvm's VMM in its jailed process: a [`RunningVm`] whose VM runs elsewhere.
pub struct VmProcess {
    control: Mutex<OwnedFd>,
    /// The VMM writes its [`VmExit`] here and closes it (or dies): readable once the VM ended.
    exit_pipe: File,
    pidfd: OwnedFd,
    memory_bytes: u64,
    writable_disks: Vec<PathBuf>,
    console_relay: Option<JoinHandle<()>>,
    finished: Option<Finished>,
}

impl VmProcess {
    /// Starts `config` in a jailed VMM process: `exe` (the cvm executable) run as
    /// [`VMM_COMMAND`]. `started` is the zero of the boot timings. The console log, where
    /// asked, is written by this process from the VMM's standard output.
    pub fn spawn(exe: &Path, config: &VmConfig, started: Instant) -> Result<VmProcess> {
        let (control, vmm_control) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )?;
        let (exit_pipe, vmm_exit_pipe) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let mut command = Command::new(exe);
        command.arg(VMM_COMMAND).stdin(if config.serial_input { Stdio::inherit() } else { Stdio::null() });
        // It logs at cvm's level (-v), on cvm's standard error; CVM_LOG, where set, it inherits.
        let level = tracing::level_filters::LevelFilter::current();
        if std::env::var_os("CVM_LOG").is_none() && level != tracing::level_filters::LevelFilter::OFF {
            command.env("CVM_LOG", level.to_string().to_lowercase());
        }
        cvm_sandbox::process::pass_fd(&mut command, std::os::fd::AsRawFd::as_raw_fd(&vmm_control), 3);
        cvm_sandbox::process::pass_fd(&mut command, std::os::fd::AsRawFd::as_raw_fd(&vmm_exit_pipe), 4);
        cvm_sandbox::process::die_with_parent(&mut command);
        let mut console_relay = None;
        if let Some(path) = &config.console_log {
            let (reader, writer) = std::io::pipe()?;
            console_relay = Some(crate::console_log::relay(reader, path).map_err(|source| Error::File { path: path.clone(), source })?);
            command.stdout(writer);
        }
        let mut child = command.spawn().map_err(|e| Error::Vmm(format!("cannot start the VMM process ({}): {e}", exe.display())))?;
        drop((vmm_control, vmm_exit_pipe));
        drop(command); // the console pipe's writer: the VMM's alone now
        let started_process = Self::start(&control, &child, config, started);
        let _ = child.kill(); // it has exited, unless the start failed half-way
        let _ = child.wait();
        let pidfd = started_process?;
        Ok(VmProcess {
            control: Mutex::new(control),
            exit_pipe: File::from(exit_pipe),
            pidfd,
            memory_bytes: config.memory_bytes,
            writable_disks: config.disks.iter().filter(|d| !d.read_only).map(|d| d.path.clone()).collect(),
            console_relay,
            finished: None,
        })
    }

    /// Takes the VMM process through its start; returns the VMM's pidfd once its VM runs.
    fn start(control: &OwnedFd, child: &std::process::Child, config: &VmConfig, started: Instant) -> Result<OwnedFd> {
        let deadline = Instant::now() + START_TIMEOUT;
        let config = Box::new(VmConfig { console_log: None, ..config.clone() });
        send(control, &ToVmm::Start { config, since_start: started.elapsed() }, &[])?;
        expect(control, deadline, "Unshared", |m| matches!(m, FromVmm::Unshared))?;
        let ids = jail::write_id_maps(child.id()).map_err(|e| Error::Vmm(e.to_string()))?;
        let ids = rustix::process::getuid().is_root().then_some(ids);
        send(control, &ToVmm::Mapped { ids }, &[])?;
        let mut fds = expect(control, deadline, "Forked", |m| matches!(m, FromVmm::Forked))?;
        let pidfd = fds.pop().ok_or_else(|| Error::Vmm("the VMM process sent no pidfd".into()))?;
        let killed = |e: Error| {
            let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
            e
        };
        expect(control, deadline, "Started", |m| matches!(m, FromVmm::Started)).map_err(killed)?;
        Ok(pidfd)
    }

    /// Waits until the VM ends by itself (or is stopped), and says how.
    pub fn wait(mut self) -> Result<VmExit> {
        let exit = self.read_exit(None);
        self.end();
        self.finished = Some(Finished::default()); // nothing left for the drop to stop
        exit
    }

    /// The VMM's exit report, or why there is none; by `deadline`, or the VMM is killed.
    fn read_exit(&mut self, deadline: Option<Instant>) -> Result<VmExit> {
        let mut report = Vec::new();
        loop {
            let mut fds = [PollFd::new(&self.exit_pipe, PollFlags::IN)];
            if crate::poll_until(&mut fds, deadline)? == 0 {
                let _ = rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::KILL);
                return Err(Error::Vmm(format!("the VMM did not stop within {:?}; killed", VCPU_STOP_TIMEOUT + STOP_GRACE)));
            }
            let mut buf = [0u8; 8192];
            match (&self.exit_pipe).read(&mut buf) {
                Ok(0) => break,
                Ok(n) if report.len() as u64 + n as u64 <= MAX_EXIT_REPORT => report.extend_from_slice(&buf[..n]),
                Ok(_) => return Err(Error::Vmm("the VMM's exit report is too long".into())),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if report.is_empty() {
            return Err(Error::Vmm("the VMM process died without a report (see cvm's standard error for its last words)".into()));
        }
        let report: std::result::Result<VmExit, String> =
            serde_json::from_slice(&report).map_err(|e| Error::Vmm(format!("the VMM's exit report is unreadable: {e}")))?;
        report.map_err(Error::Vmm)
    }

    /// After the VM's end: the console log has all the guest wrote.
    fn end(&mut self) {
        if let Some(relay) = self.console_relay.take() {
            let _ = relay.join();
        }
    }

    /// Sends `request` and waits for the answer (by `timeout`).
    fn ask(&self, request: &ToVmm, fds: &[BorrowedFd<'_>], timeout: Duration) -> Result<(FromVmm, Vec<OwnedFd>)> {
        let control = lock(&self.control);
        send(&control, request, fds)?;
        match receive(&control, Some(Instant::now() + timeout))? {
            (FromVmm::Failed(why), _) => Err(Error::Vmm(why)),
            answer => Ok(answer),
        }
    }

    fn tell(&self, request: &ToVmm) {
        let _ = send(&lock(&self.control), request, &[]);
    }

    fn state(&self) -> Option<(bool, bool)> {
        match self.ask(&ToVmm::Query, &[], QUERY_TIMEOUT) {
            Ok((FromVmm::State { init_reached, ended }, _)) => Some((init_reached, ended)),
            _ => None,
        }
    }

    /// Whether the guest has reached its init (written the boot timer).
    pub fn init_reached(&self) -> bool {
        self.state().is_some_and(|(init_reached, _)| init_reached)
    }

    /// Whether the VM's run has ended (or is ending), or the VMM does not answer.
    pub fn has_ended(&self) -> bool {
        self.state().is_none_or(|(_, ended)| ended)
    }

    pub fn resume(&self) {
        self.tell(&ToVmm::Resume);
    }

    /// Pauses the VM, writes a snapshot of it to `dir` (see [`crate::snapshot`]) and lets it
    /// run on. The VMM captures the state and hands over the RAM; this process writes the
    /// files, copying bytes without decoding them.
    pub fn snapshot(&self, dir: &Path) -> Result<()> {
        let written = self.write_snapshot(dir);
        self.resume();
        written
    }

    fn write_snapshot(&self, dir: &Path) -> Result<()> {
        let state_file = File::from(rustix::fs::memfd_create("cvm-snapshot-state", rustix::fs::MemfdFlags::CLOEXEC)?);
        let (answer, mut fds) = self.ask(&ToVmm::Capture, &[state_file.as_fd()], 2 * SNAPSHOT_PAUSE_TIMEOUT + QUERY_TIMEOUT)?;
        let (FromVmm::Captured { state_len }, Some(ram)) = (answer, fds.pop()) else {
            return Err(Error::Vmm("the VMM answered a capture with something else".into()));
        };
        if state_len > crate::snapshot::MAX_STATE_FILE_LEN {
            return Err(Error::Snapshot(format!("the VMM's state is {state_len} bytes, more than a snapshot holds")));
        }
        // The VMM wrote it through the same open file: from the start, not from its offset.
        let mut state = vec![0u8; state_len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&state_file, &mut state, 0)?;
        crate::snapshot::write(dir, &state, &File::from(ram), self.memory_bytes, &self.writable_disks)
    }
}

impl RunningVm for VmProcess {
    fn exit_fd(&self) -> BorrowedFd<'_> {
        self.exit_pipe.as_fd()
    }

    fn finish(&mut self) -> Finished {
        if let Some(finished) = &self.finished {
            return finished.clone();
        }
        self.tell(&ToVmm::Stop);
        let finished = Finished::of(self.read_exit(Some(Instant::now() + VCPU_STOP_TIMEOUT + STOP_GRACE)));
        self.end();
        self.finished = Some(finished.clone());
        finished
    }

    fn control(&self) -> Option<&VmProcess> {
        Some(self)
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The VMM process: `cvm __vmm`, started by [`VmProcess::spawn`]. Never returns.
pub fn serve() -> ! {
    // SAFETY: VmProcess::spawn passes the control socket at fd 3 and the exit pipe at fd 4;
    // nothing else in this process owns them.
    let (control, exit_pipe) = unsafe { (OwnedFd::from_raw_fd(3), File::from_raw_fd(4)) };
    let status = match run(&control, exit_pipe) {
        Ok(()) => 0,
        Err(e) => {
            let _ = send(&control, &FromVmm::Failed(e.to_string()), &[]);
            1
        }
    };
    // The kernel's side of the VM's end happens as this process ends (the init of its PID
    // namespace waits for its teardown helper, killed with it): whoever reads cvm's output to
    // its end must not wait for that.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    for stdio in 0..3 {
        // SAFETY: closes this process's standard streams; nothing uses them from here on.
        unsafe { libc::close(stdio) };
    }
    std::process::exit(status)
}

/// The VMM process's start (see the module's documentation), then its VM's life.
fn run(control: &OwnedFd, exit_pipe: File) -> Result<()> {
    let (ToVmm::Start { config, since_start }, _) = receive(control, None)? else {
        return Err(Error::Vmm("the VMM process expected its VM first".into()));
    };
    let started = Instant::now().checked_sub(since_start).unwrap_or_else(Instant::now);
    jail::unshare()?;
    send(control, &FromVmm::Unshared, &[])?;
    let (ToVmm::Mapped { ids }, _) = receive(control, None)? else {
        return Err(Error::Vmm("the VMM process expected its id maps".into()));
    };
    // SAFETY: this process has no other thread yet: the child may run anything.
    match unsafe { libc::fork() } {
        -1 => return Err(std::io::Error::last_os_error().into()),
        0 => {
            // The VMM: the init of its PID namespace.
            jail::prepare(ids)?;
        }
        pid => {
            let pidfd = rustix::process::pidfd_open(
                rustix::process::Pid::from_raw(pid).expect("fork returns a pid"),
                rustix::process::PidfdFlags::empty(),
            )?;
            send(control, &FromVmm::Forked, &[pidfd.as_fd()])?;
            std::process::exit(0);
        }
    }
    let vm = Vm::create(&config, started)?;
    jail::enter()?;
    let handle = vm.handle();
    let thread = VmThread::spawn(vm)?;
    send(control, &FromVmm::Started, &[])?;
    cvm_sandbox::seccomp::confine_thread(cvm_sandbox::seccomp::Role::Vmm)?;

    let mut cvm_there = true;
    loop {
        let exit_fd = thread.exit_fd();
        let mut fds = vec![PollFd::new(&exit_fd, PollFlags::IN)];
        if cvm_there {
            fds.push(PollFd::new(control, PollFlags::IN));
        }
        crate::poll_until(&mut fds, None)?;
        if !fds[0].revents().is_empty() {
            break;
        }
        // cvm gone (its socket's end), or a request this VMM cannot answer: nobody is left to
        // use this VM.
        if serve_request(control, &handle).is_err() {
            cvm_there = false;
            handle.stop();
        }
    }
    let exit = thread.wait().map_err(|e| e.to_string());
    let report = serde_json::to_vec(&exit).map_err(|e| Error::Vmm(format!("cannot encode the exit report: {e}")))?;
    let mut exit_pipe = exit_pipe;
    exit_pipe.write_all(&report)?;
    Ok(())
}

/// Answers cvm's next request about the running VM.
fn serve_request(control: &OwnedFd, handle: &crate::VmHandle) -> Result<()> {
    match receive(control, Some(Instant::now()))? {
        (ToVmm::Stop, _) => handle.stop(),
        (ToVmm::Query, _) => send(control, &FromVmm::State { init_reached: handle.init_reached(), ended: handle.has_ended() }, &[])?,
        (ToVmm::Capture, fds) => {
            let captured =
                fds.into_iter().next().ok_or_else(|| Error::Vmm("a capture needs its state file".into())).and_then(|state_file| {
                    let captured = handle.capture()?;
                    File::from(state_file).write_all(&captured.state)?;
                    Ok(captured)
                });
            match captured {
                Ok(captured) => send(control, &FromVmm::Captured { state_len: captured.state.len() as u64 }, &[captured.ram.as_fd()])?,
                Err(e) => send(control, &FromVmm::Failed(e.to_string()), &[])?,
            }
        }
        (ToVmm::Resume, _) => handle.resume(),
        (request, _) => return Err(Error::Vmm(format!("the VMM cannot take {request:?} while its VM runs"))),
    }
    Ok(())
}

fn send(socket: &OwnedFd, message: &impl Serialize, fds: &[BorrowedFd<'_>]) -> Result<()> {
    let bytes = serde_json::to_vec(message).map_err(|e| Error::Vmm(format!("cannot encode a control message: {e}")))?;
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !ancillary.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(Error::Vmm("too many descriptors for one control message".into()));
    }
    rustix::net::sendmsg(socket, &[IoSlice::new(&bytes)], &mut ancillary, SendFlags::NOSIGNAL)?;
    Ok(())
}

/// The next message on `socket` and the descriptors that came with it, by `deadline`.
fn receive<M: for<'de> Deserialize<'de>>(socket: &OwnedFd, deadline: Option<Instant>) -> Result<(M, Vec<OwnedFd>)> {
    let mut fds = [PollFd::new(socket, PollFlags::IN)];
    if crate::poll_until(&mut fds, deadline)? == 0 {
        return Err(Error::Vmm("no answer from the VMM process in time".into()));
    }
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(socket, &mut [IoSliceMut::new(&mut buf)], &mut ancillary, RecvFlags::CMSG_CLOEXEC)?;
    let mut passed = Vec::new();
    for message in ancillary.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            passed.extend(fds);
        }
    }
    if received.bytes == 0 {
        return Err(Error::Vmm("the other end of the VMM's control socket is gone".into()));
    }
    if received.flags.contains(rustix::net::ReturnFlags::TRUNC) {
        return Err(Error::Vmm("a control message too long".into()));
    }
    let message = serde_json::from_slice(&buf[..received.bytes]).map_err(|e| Error::Vmm(format!("an unreadable control message: {e}")))?;
    Ok((message, passed))
}

/// The next message, which must be `what`; a failure the VMM reports is the error.
fn expect(control: &OwnedFd, deadline: Instant, what: &str, is: impl Fn(&FromVmm) -> bool) -> Result<Vec<OwnedFd>> {
    match receive(control, Some(deadline)) {
        Ok((message, fds)) if is(&message) => Ok(fds),
        Ok((FromVmm::Failed(why), _)) => Err(Error::Vmm(why)),
        Ok((message, _)) => Err(Error::Vmm(format!("the VMM process said {message:?}, not {what}"))),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap()
    }

    #[test]
    fn a_message_arrives_whole_with_its_descriptors() {
        let (a, b) = pair();
        let file = tempfile::tempfile().unwrap();
        send(&a, &FromVmm::Captured { state_len: 7 }, &[file.as_fd()]).unwrap();
        let (message, fds) = receive::<FromVmm>(&b, Some(Instant::now() + Duration::from_secs(5))).unwrap();
        assert!(matches!(message, FromVmm::Captured { state_len: 7 }), "{message:?}");
        assert_eq!(fds.len(), 1);
    }

    #[test]
    fn nonsense_silence_and_a_closed_peer_are_errors_not_hangs() {
        let (a, b) = pair();
        rustix::net::send(&a, b"{\"Captured\":", rustix::net::SendFlags::empty()).unwrap();
        assert!(receive::<FromVmm>(&b, Some(Instant::now())).is_err(), "a message cut short");
        rustix::net::send(&a, &vec![b' '; MAX_MESSAGE + 1], rustix::net::SendFlags::empty()).unwrap();
        assert!(receive::<FromVmm>(&b, Some(Instant::now())).is_err(), "a message too long");
        let started = Instant::now();
        assert!(receive::<FromVmm>(&b, Some(Instant::now() + Duration::from_millis(50))).is_err(), "no answer");
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(a);
        assert!(receive::<FromVmm>(&b, None).is_err(), "the peer is gone");
    }

    #[test]
    fn an_unexpected_answer_or_a_failure_is_the_error() {
        let (a, b) = pair();
        let deadline = Instant::now() + Duration::from_secs(5);
        send(&a, &FromVmm::Failed("KVM refused to create the VM".into()), &[]).unwrap();
        let e = expect(&b, deadline, "Started", |m| matches!(m, FromVmm::Started)).unwrap_err();
        assert_eq!(e.to_string(), "KVM refused to create the VM");
        send(&a, &FromVmm::Unshared, &[]).unwrap();
        let e = expect(&b, deadline, "Started", |m| matches!(m, FromVmm::Started)).unwrap_err();
        assert!(e.to_string().contains("not Started"), "{e}");
    }
}
