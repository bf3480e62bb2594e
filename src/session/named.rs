//! Named, long-lived VMs: `cvm start --name N` boots a session in a background process (a
//! re-executed `cvm __vm-daemon`) that keeps it until `cvm stop N` (graceful) or `cvm rm N`
//! (forced). Each has a state directory, `<runtime dir>/vms/N/`, private to the user:
//!
//! - `info.json`: the name, the daemon's pid, the project, the engine, when it started, and
//!   where its console log is;
//! - `control.sock`: where `cvm exec N` connects. The daemon reads the exec request, gives it
//!   the session's user, directory and environment, sends it to the guest agent and then only
//!   relays bytes, so `cvm exec` speaks the agent's own protocol end to end and any number of
//!   execs run at once;
//! - `daemon.log`: what the daemon says.
//!
//! Two VMs never share anything: each session keeps its own private directory for its
//! sockets, and names are unique among running VMs.

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cvm_agent::protocol::{self, Request, CONTROL_PORT};
use serde::{Deserialize, Serialize};

use crate::network::forward::splice;
use crate::session::Session;

pub const INFO_FILE: &str = "info.json";
pub const CONTROL_SOCKET: &str = "control.sock";
pub const DAEMON_LOG: &str = "daemon.log";
/// How long a client has to send its exec request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What `info.json` records.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmInfo {
    pub name: String,
    pub pid: u32,
    pub project: Option<PathBuf>,
    pub engine: String,
    /// Seconds since the Unix epoch.
    pub started: u64,
    pub console_log: PathBuf,
}

/// A VM as `cvm ps` sees it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Listed {
    #[serde(flatten)]
    pub info: VmInfo,
    /// `running`, or `exited` when the daemon is gone (it was killed; `cvm rm` clears it).
    pub status: &'static str,
}

/// Names: a letter or digit, then letters, digits, `.`, `_`, `-`; at most 63.
pub fn validate_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first || name.len() > 63 || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(format!("bad VM name {name:?}: use letters, digits, '.', '_' and '-' (starting with a letter or digit, at most 63)"));
    }
    Ok(())
}

/// Where named VMs keep their state.
pub fn vms_dir() -> Result<PathBuf> {
    Ok(crate::session::rundir::runtime_base()?.join("vms"))
}

pub fn state_dir(name: &str) -> Result<PathBuf> {
    Ok(vms_dir()?.join(name))
}

/// Whether `pid` is a cvm VM daemon (not some process that reused the pid).
fn daemon_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| cmdline.split(|&b| b == 0).any(|arg| arg == b"__vm-daemon"))
}

fn read_info(dir: &Path) -> Option<VmInfo> {
    serde_json::from_slice(&std::fs::read(dir.join(INFO_FILE)).ok()?).ok()
}

/// Every named VM, by name.
pub fn list() -> Vec<Listed> {
    let Ok(entries) = vms_dir().and_then(|dir| Ok(std::fs::read_dir(dir)?)) else { return Vec::new() };
    let mut vms: Vec<Listed> = entries
        .flatten()
        .filter_map(|e| read_info(&e.path()))
        .map(|info| Listed { status: if daemon_alive(info.pid) { "running" } else { "exited" }, info })
        .collect();
    vms.sort_by(|a, b| a.info.name.cmp(&b.info.name));
    vms
}

/// The running VM called `name`.
pub fn find(name: &str) -> Result<VmInfo> {
    validate_name(name).map_err(anyhow::Error::msg)?;
    match read_info(&state_dir(name)?) {
        Some(info) if daemon_alive(info.pid) => Ok(info),
        Some(_) => bail!("the VM {name} is not running any more (cvm rm {name} clears it)"),
        None => bail!("no VM called {name} (cvm ps lists them)"),
    }
}

/// Claims the state directory for a new VM: refused if one of that name runs; a stale one
/// (its daemon killed) is cleared.
pub fn claim(name: &str) -> Result<PathBuf> {
    validate_name(name).map_err(anyhow::Error::msg)?;
    let dir = state_dir(name)?;
    if let Some(info) = read_info(&dir) {
        if daemon_alive(info.pid) {
            bail!("a VM called {name} is already running (pid {})", info.pid);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    crate::session::rundir::create_private_dir(&vms_dir()?)?;
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// Removes a VM's state, and the VMs directory once it is empty.
pub fn clear(name: &str) {
    let Ok(vms) = vms_dir() else { return };
    let _ = std::fs::remove_dir_all(vms.join(name));
    let _ = std::fs::remove_dir(vms);
}

/// The daemon's life: records `info`, serves execs on the control socket until SIGTERM or
/// SIGINT (then a graceful shutdown) or the VM stopping by itself, then clears the state.
pub fn serve(session: Session, info: VmInfo, dir: &Path) -> Result<()> {
    let socket = dir.join(CONTROL_SOCKET);
    let listener = UnixListener::bind(&socket).with_context(|| format!("cannot listen on {}", socket.display()))?;
    std::fs::write(dir.join(INFO_FILE), serde_json::to_vec_pretty(&info)?)?;
    let stopping = Arc::new(AtomicBool::new(false));
    // A stop request, or the VM ending, wakes the accept loop by shutting the listener down:
    // that needs no path, so it works even when the state directory is gone.
    let waker = {
        let (stopping, listening) = (stopping.clone(), Arc::new(listener.try_clone()?));
        move || {
            stopping.store(true, Ordering::SeqCst);
            let _ = rustix::net::shutdown(&*listening, rustix::net::Shutdown::Both);
        }
    };
    // A closed terminal (SIGHUP) is not a reason to stop: the VM outlives the shell that
    // started it.
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::new(AtomicBool::new(false)))?;
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])?;
    let wake = waker.clone();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            wake();
        }
    });
    let exit_fd = session.exit_fd().try_clone_to_owned()?;
    std::thread::spawn(move || {
        let _ = rustix::event::poll(&mut [rustix::event::PollFd::new(&exit_fd, rustix::event::PollFlags::IN)], None);
        waker();
    });
    for conn in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            break;
        }
        let Ok(conn) = conn else { continue };
        if let Err(e) = start_exec(&session, conn) {
            tracing::warn!("an exec failed to start: {e:#}");
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&socket);
    if let Some(why) = session.shutdown() {
        tracing::warn!("the VM ended: {why}");
    }
    Ok(())
}

/// Reads one exec request from `client`, prepares it as the session's own, hands it to the
/// agent and relays the rest on a thread of its own.
fn start_exec(session: &Session, mut client: UnixStream) -> Result<()> {
    client.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut exec = match protocol::read_request(&mut client)? {
        Some(Request::Exec(exec)) => exec,
        Some(other) => bail!("expected an exec request, got {other:?}"),
        None => return Ok(()), // a wake-up, or a client that went away
    };
    client.set_read_timeout(None)?;
    session.prepare(&mut exec);
    let mut agent = crate::network::vsock::connect_port(session.vsock_socket(), CONTROL_PORT).context("cannot reach the guest agent")?;
    protocol::write_frame(&mut agent, &Request::Exec(exec).encode())?;
    std::thread::spawn(move || match cvm_sandbox::seccomp::confine_thread(cvm_sandbox::seccomp::Role::ExecRelay) {
        Ok(()) => splice(Box::new(client), Box::new(agent), None),
        // The client sees its connection end.
        Err(e) => tracing::warn!("an exec was not relayed: {e}"),
    });
    Ok(())
}

/// Starts the daemon (`cvm __vm-daemon`, given the `cvm start` arguments `start_args`, which
/// make it call [`serve`] for `name`) in a process group of its own, its output in the VM's
/// `daemon.log`, and waits until it serves or fails; a failure says why, from that log, and
/// leaves nothing.
pub fn spawn(name: &str, start_args: &[std::ffi::OsString]) -> Result<()> {
    let dir = claim(name)?;
    let log = dir.join(DAEMON_LOG);
    let output = std::fs::File::create(&log)?;
    let mut command = std::process::Command::new(crate::cvm_exe()?);
    command.arg("__vm-daemon").stdin(std::process::Stdio::piped()).stdout(output.try_clone()?).stderr(output);
    // The terminal's Ctrl-C is not for it (and it ignores SIGHUP): the VM outlives the shell.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut daemon = command.spawn()?;
    // Its settings (`-e NAME=VALUE` among them) go through a pipe: an argv is world-readable.
    let mut words = Vec::new();
    for arg in start_args {
        words.extend_from_slice(std::os::unix::ffi::OsStrExt::as_bytes(arg.as_os_str()));
        words.push(0);
    }
    if let Some(mut stdin) = daemon.stdin.take() {
        std::io::Write::write_all(&mut stdin, &words)?;
    }
    loop {
        if dir.join(CONTROL_SOCKET).exists() && dir.join(INFO_FILE).exists() {
            return Ok(());
        }
        if let Some(status) = daemon.try_wait()? {
            let said = crate::host::host_files::log_tail(&log, 20);
            clear(name);
            bail!("the VM {name} did not start ({status}):\n{said}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `exec` in the VM `name` with this process's stdio (raw terminal mode when it has a
/// terminal); returns the exit status cvm should exit with.
pub fn exec(name: &str, exec: cvm_agent::protocol::Exec) -> Result<u8> {
    let info = find(name)?;
    let conn = UnixStream::connect(state_dir(name)?.join(CONTROL_SOCKET)).with_context(|| format!("cannot reach the VM {name}"))?;
    // The daemon's end (its pidfd readable) is the VM's end, as the relay sees it.
    let daemon = pidfd(info.pid)?;
    let raw = if exec.tty.is_some() { Some(crate::host::terminal::RawMode::enter()?) } else { None };
    let outcome = crate::session::exec::relay(conn, exec, None, std::os::fd::AsFd::as_fd(&daemon));
    drop(raw);
    Ok(crate::session::run::exit_status(outcome?, None, None))
}

/// `cvm stop` (SIGTERM: the daemon shuts the guest down, which syncs) or, with `force`,
/// `cvm rm` (SIGKILL: QEMU and the backends die with the daemon, and its janitor removes the
/// session directory; a VM whose daemon is already gone is only cleared).
pub fn stop(name: &str, force: bool) -> Result<()> {
    validate_name(name).map_err(anyhow::Error::msg)?;
    let info = match find(name) {
        Ok(info) => info,
        Err(e) if force && state_dir(name).is_ok_and(|dir| dir.exists()) => {
            tracing::info!("{e:#}");
            clear(name);
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let daemon = pidfd(info.pid)?;
    rustix::process::pidfd_send_signal(&daemon, if force { rustix::process::Signal::KILL } else { rustix::process::Signal::TERM })?;
    let by = std::time::Instant::now() + std::time::Duration::from_secs(30);
    if crate::poll_until(&mut [rustix::event::PollFd::new(&daemon, rustix::event::PollFlags::IN)], Some(by))? == 0 {
        bail!("the VM {name} did not stop within 30 s (cvm rm {name} forces it)");
    }
    clear(name);
    Ok(())
}

/// Copies the console log of the VM `name` to `out`, then, with `follow`, what it writes
/// until it stops. `filter` is what stands between the guest's bytes and a terminal.
pub fn copy_console<W: std::io::Write>(
    name: &str,
    follow: bool,
    out: &mut W,
    mut filter: Option<crate::host::terminal::escapes::EscapeFilter>,
) -> Result<()> {
    validate_name(name).map_err(anyhow::Error::msg)?;
    let vm = list().into_iter().find(|v| v.info.name == name).ok_or_else(|| anyhow::anyhow!("no VM called {name} (cvm ps lists them)"))?;
    let mut file = std::fs::File::open(&vm.info.console_log).with_context(|| format!("the console log of {name} is gone"))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut shown = Vec::new();
    let mut write = |out: &mut W, bytes: &[u8]| -> std::io::Result<()> {
        match filter.as_mut() {
            Some(filter) => {
                shown.clear();
                filter.filter(bytes, &mut shown);
                out.write_all(&shown)
            }
            None => out.write_all(bytes),
        }
    };
    loop {
        let n = file.read(&mut buf)?;
        if n > 0 {
            write(out, &buf[..n])?;
            continue;
        }
        out.flush()?;
        if !follow {
            return Ok(());
        }
        if find(name).is_err() {
            // Once more after the VM is gone: what it wrote last is not lost.
            let n = file.read(&mut buf)?;
            write(out, &buf[..n])?;
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn pidfd(pid: u32) -> Result<std::os::fd::OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid as i32).context("bad pid")?;
    Ok(rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "web-1", "api.v2", "x_y", &"n".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good:?}");
        }
        for bad in ["", "-a", ".a", "a/b", "..", "a b", "ä", &"n".repeat(64), "a\0"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn info_round_trips_through_json() {
        let info = VmInfo {
            name: "web".into(),
            pid: 42,
            project: Some("/p".into()),
            engine: "qemu".into(),
            started: 1,
            console_log: "/run/x/console.log".into(),
        };
        let json = serde_json::to_string(&Listed { info: info.clone(), status: "running" }).unwrap();
        assert!(json.contains("\"status\":\"running\"") && json.contains("\"name\":\"web\""), "{json}");
        assert_eq!(serde_json::from_str::<VmInfo>(&serde_json::to_string(&info).unwrap()).unwrap(), info);
    }
}
