//! A session: one disposable VM with cvm-agent inside, on either engine.
//!
//! [`Session::start`] turns a [`SessionConfig`] into a running VM: a private run directory,
//! the embedded vsock backend, one fs backend process per share, the VM itself (cvm's VMM or
//! QEMU), the agent's readiness message (awaited without polling), and the agent's set-up of
//! the user and the shares. Execs then go over vsock; [`Session::shutdown`] asks the agent to
//! power off and makes sure the VM is gone.

//!
//! Beside it: [`run`] (`cvm run` and `cvm shell` from options to an exit code), [`exec`] (the
//! host end of an exec), [`named`] (named VMs and their daemon), [`warm`] (warm starts from a
//! snapshot), [`rundir`] (a session's private directory and its janitor).

pub mod exec;
pub mod named;
pub mod run;
pub mod rundir;
pub mod warm;

use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cvm_agent::protocol::{self, Exec, Reply, Request, Setup, Step, CONTROL_PORT, PROXY_CA_FILE, READY_PORT};
use cvm_backends::fs::FsBackend;
use cvm_backends::vsock::VsockServer;
use cvm_vmm::guest_panic::GuestPanic;
use cvm_vmm::{Engine, RunningVm, VhostUserConfig, VhostUserKind, VmConfig};
use rustix::event::{PollFd, PollFlags};

use crate::guest::runtime::{Runtime, VmFacts};
use crate::guest::shares::{HostUser, SharePlan, ShareRequest};
use crate::host::environment::Environment;
use crate::host::host_files::{log_tail, read_tail};
use crate::network::egress::{self, EgressPolicy, NetworkMode};
use crate::network::forward::{ForwardRequest, Listening};
use crate::network::interception::SecretSwap;
use crate::network::open_network::OpenNetwork;
use crate::network::secrets::Secret;
use crate::network::vsock;
use crate::project::images::{Image, Layer};
use crate::session::exec::Outcome;
use crate::session::rundir::RunDir;

/// The guest's vsock CID. Each VM has its own vsock device and host socket, so all use the
/// first CID the spec leaves to guests.
pub const GUEST_CID: u64 = 3;
/// How long the agent gets to say it is ready: generous, because QEMU's TCG is slow.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// The session directory's logs: the guest's serial console, and what fs backends said.
const CONSOLE_LOG: &str = "console.log";
const FS_LOG: &str = "fs.log";
/// How long the guest gets to sync its disks at the end of a session.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// A session as plain data.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub engine: Engine,
    pub kernel: PathBuf,
    /// The root image.
    pub image: Image,
    pub cpus: u8,
    pub memory_bytes: u64,
    /// Kernel and agent messages on the console log, and the log kept.
    pub debug: bool,
    /// The project and other host directories the guest gets.
    pub shares: ShareRequest,
    /// Runtime scripts to source before each command, after the project's own.
    pub runtime_scripts: Vec<PathBuf>,
    /// What the guest may reach through the host's proxy.
    pub egress: EgressPolicy,
    /// Ports and agents relayed between host and guest.
    pub forwards: ForwardRequest,
    /// Variables every command gets (`--env`, the secrets file, proxied secrets'
    /// placeholders), after cvm's own.
    pub env: Environment,
    /// Secrets the proxy swaps in for their placeholders ([`crate::network::secrets`]).
    pub secrets: Vec<Secret>,
    /// Text added to what Claude is told about the VM (`[context]`).
    pub instructions: Option<String>,
    /// The writable layer on a scratch disk (else it is in memory).
    pub scratch: Option<Scratch>,
    /// A project template: a read-only layer under the writable one.
    pub template: Option<PathBuf>,
    /// Run the runtime scripts before each command (not while `cvm setup` installs).
    pub runtime: bool,
    /// Boot, never restore a warm-start snapshot nor make one (`--cold`).
    pub cold: bool,
}

impl SessionConfig {
    /// `image` booted on `engine` with nothing more: no share, the proxy's default egress, no
    /// forward, variable or secret, its writable layer in memory; callers set what they need.
    pub fn new(engine: Engine, kernel: PathBuf, image: Image, cpus: u8, memory_bytes: u64) -> SessionConfig {
        SessionConfig {
            engine,
            kernel,
            image,
            cpus,
            memory_bytes,
            debug: false,
            shares: ShareRequest::default(),
            runtime_scripts: Vec::new(),
            egress: EgressPolicy::default(),
            forwards: ForwardRequest::default(),
            env: Environment::default(),
            secrets: Vec::new(),
            instructions: None,
            scratch: None,
            template: None,
            runtime: false,
            cold: false,
        }
    }
}

/// Where a session's scratch disk comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scratch {
    /// A new one of this size in the session directory, gone with the session.
    Fresh(u64),
    /// This one, made by the caller, which keeps it (`cvm setup`).
    Kept(PathBuf),
}

/// Starts the VM on `engine`, offering QEMU where cvm's VMM cannot run here.
fn start_vm(engine: Engine, config: &VmConfig) -> Result<Box<dyn RunningVm>> {
    let exe = crate::cvm_exe().context("cannot find the cvm executable for the VMM")?;
    engine.start(config, &exe).map_err(|e| match e {
        cvm_vmm::Error::Kvm(_) => anyhow!("{e}; or use --vmm qemu"),
        e => e.into(),
    })
}

/// Stops the VM and says why it ended when that was not cvm's doing nor the guest's choice.
fn finish(machine: &mut dyn RunningVm) -> Option<String> {
    let finished = machine.finish();
    if let Some(warning) = finished.warning {
        eprintln!("cvm: warning: {warning}");
    }
    finished.unclean
}

/// How the guest reaches the outside: the host's egress proxy (which in `--network none`
/// refuses everything), or an open interface.
enum Network {
    /// Kept for its accept loop; `swaps` when it swaps secrets in, with the guest trusting
    /// its CA.
    Proxy {
        _server: Listening,
        swaps: bool,
    },
    Open(OpenNetwork),
}

pub struct Session {
    // Field order is drop order: the VM goes first, the run directory last.
    machine: Box<dyn RunningVm>,
    _vsock: VsockServer,
    _fs: Vec<FsBackend>,
    network: Network,
    _forwards: Vec<Listening>,
    forward_env: Vec<(Vec<u8>, Vec<u8>)>,
    env: Environment,
    plan: SharePlan,
    /// What runs before each command of a project session.
    runtime: Option<Runtime>,
    host_socket: PathBuf,
    console_log: PathBuf,
    debug: bool,
    _rundir: RunDir,
    /// How long each phase of the start took.
    pub timings: StartTimings,
    /// Restored from a warm-start snapshot, not booted.
    pub warm: bool,
}

/// How long each phase of a session's start took, in order.
#[derive(Clone, Copy, Debug, Default)]
pub struct StartTimings {
    /// The host's side before the VM: run directory, backends, proxy, disks.
    pub host: Duration,
    /// Creating the VM: cvm's VMM building it (restoring it, for a warm start), or QEMU started.
    pub vm: Duration,
    /// From the VM starting to the agent's readiness message: a boot, or a restored agent
    /// reconnecting.
    pub agent: Duration,
    /// The agent's set-up step: clock and entropy, shares mounted, the user and its files.
    pub guest_setup: Duration,
}

impl StartTimings {
    /// From the VM starting to a guest ready for commands.
    pub fn boot(&self) -> Duration {
        self.agent + self.guest_setup
    }
}

impl Session {
    pub fn start(config: &SessionConfig, deadline: Option<Instant>) -> Result<Session> {
        let started = Instant::now();
        let rundir = RunDir::create()?;
        let dir = rundir.path().to_path_buf();
        let host_socket = dir.join("vsock");
        let vhost_socket = dir.join("vsock.vhost");
        let ready_socket = dir.join(format!("vsock_{READY_PORT}"));
        let console_log = dir.join(CONSOLE_LOG);

        let ready = UnixListener::bind(&ready_socket).context("cannot create the readiness socket")?;
        let vhost = UnixListener::bind(&vhost_socket).context("cannot create the vhost-user socket")?;
        let vsock = VsockServer::start(GUEST_CID, &host_socket, vhost).context("cannot start the vsock backend")?;
        let (mut plan, runtime) = plan_guest(config, &dir)?;
        let session = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let network = match config.egress.mode {
            NetworkMode::Open => Network::Open(OpenNetwork::start(&dir)?),
            NetworkMode::Proxy | NetworkMode::None => {
                let swap = match config.secrets.is_empty() || config.egress.mode == NetworkMode::None {
                    true => None,
                    false => {
                        Some(std::sync::Arc::new(SecretSwap::new(config.secrets.clone()).context("cannot set up the proxy's secret swap")?))
                    }
                };
                if let Some(swap) = &swap {
                    plan.setup.steps.push(Step::TrustCa { pem: swap.ca_pem().into_bytes() });
                }
                let audit = egress::audit_log_path();
                let swaps = swap.is_some();
                let proxy =
                    egress::start_proxy(&dir.join(format!("vsock_{}", egress::PROXY_PORT)), config.egress.clone(), swap, &audit, session)
                        .with_context(|| format!("cannot start the egress proxy (audit log {})", audit.display()))?;
                Network::Proxy { _server: proxy, swaps }
            }
        };
        let forwards = config.forwards.start(&dir, &host_socket)?;
        let mut vhost_user = vec![VhostUserConfig { socket: vhost_socket.clone(), kind: VhostUserKind::Vsock }];
        let fs = start_fs_backends(&plan, &dir, &mut vhost_user)?;

        let cmdline = format!("{} {}", cvm_vmm::DEFAULT_CMDLINE, if config.debug { protocol::CMDLINE_DEBUG } else { "quiet" });
        let mut vm_config = VmConfig {
            cmdline,
            vcpus: config.cpus,
            memory_bytes: config.memory_bytes,
            rng: true,
            serial_input: false,
            console_log: Some(console_log.clone()),
            vhost_user,
            network: match &network {
                Network::Open(open) => Some(open.device()),
                Network::Proxy { .. } => None,
            },
            ..VmConfig::new(&config.kernel)
        };
        config.image.configure(&mut vm_config);
        if let Some(template) = &config.template {
            config.image.add_layer(&mut vm_config, template, Layer::Template)?;
        }
        let scratch = match &config.scratch {
            Some(Scratch::Fresh(bytes)) => {
                let path = dir.join("scratch.ext4");
                crate::project::images::make_scratch_disk(&path, *bytes)?;
                Some(path)
            }
            Some(Scratch::Kept(path)) => Some(path.clone()),
            None => None,
        };
        if let Some(path) = scratch {
            config.image.add_layer(&mut vm_config, &path, Layer::Scratch)?;
        }
        // Warm starts on cvm's VMM, except over a scratch disk the caller keeps (`cvm setup`'s),
        // which a restore would overwrite with the snapshot's.
        let start = match config.engine == Engine::Cvm && !config.cold && !matches!(config.scratch, Some(Scratch::Kept(_))) {
            true => warm::plan(&mut vm_config),
            false => warm::Start::Cold,
        };
        let host = started.elapsed();
        let mut machine = start_vm(config.engine, &vm_config).map_err(|e| {
            if let warm::Start::Warm(snapshot) = &start {
                // Not used again: the next session boots cold and makes it anew.
                let _ = std::fs::remove_dir_all(snapshot);
            }
            explain(e, &dir)
        })?;
        let vm_started = Instant::now();
        let vm = vm_started - started - host;

        let boot_deadline = started + BOOT_TIMEOUT;
        let deadline = deadline.map_or(boot_deadline, |d| d.min(boot_deadline));
        if let (warm::Start::ColdThenSnapshot(snapshot), Some(handle)) = (&start, machine.control()) {
            let agent_spoke = || {
                let mut fds = [PollFd::new(&ready, PollFlags::IN)];
                rustix::event::poll(&mut fds, Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 })).is_ok_and(|n| n > 0)
            };
            warm::snapshot_at_init(handle, snapshot, deadline, agent_spoke);
        }
        if let warm::Start::Warm(snapshot) = &start {
            tracing::info!("{} {}", warm::RESTORED, snapshot.display());
        }
        let mut agent = Duration::ZERO;
        let ready_and_set_up = wait_for_agent(&ready, machine.exit_fd(), deadline).and_then(|()| {
            agent = vm_started.elapsed();
            set_up_guest(&host_socket, &fresh_guest(&plan.setup)?)
        });
        let timings = match ready_and_set_up {
            Ok(()) => StartTimings { host, vm, agent, guest_setup: vm_started.elapsed() - agent },
            Err(e) => {
                let e = match finish(machine.as_mut()) {
                    Some(why) => anyhow!("{e:#} ({why})"),
                    None => e,
                };
                return Err(explain(e, &dir));
            }
        };
        // Only needed to set up: the backends and the agent are connected now.
        for socket in &vm_config.vhost_user {
            let _ = std::fs::remove_file(&socket.socket);
        }
        drop(ready);
        let _ = std::fs::remove_file(&ready_socket);
        Ok(Session {
            machine,
            _vsock: vsock,
            _fs: fs,
            network,
            _forwards: forwards,
            forward_env: config.forwards.environment(),
            env: config.env.clone(),
            plan,
            runtime,
            host_socket,
            console_log,
            debug: config.debug,
            _rundir: rundir,
            timings,
            warm: matches!(start, warm::Start::Warm(_)),
        })
    }

    /// Gives `exec` the session's user, working directory and identity variables, and, in a
    /// project, the runtime prologue.
    pub fn prepare(&self, exec: &mut Exec) {
        let proxy = match self.network {
            Network::Proxy { swaps, .. } => {
                let mut env = egress::guest_environment();
                if swaps {
                    // Node (Claude Code) reads its own CA list, not the system's.
                    env.push((b"NODE_EXTRA_CA_CERTS".to_vec(), PROXY_CA_FILE.as_bytes().to_vec()));
                }
                env
            }
            Network::Open(_) => Vec::new(),
        };
        exec.env.splice(0..0, proxy.into_iter().chain(self.forward_env.iter().cloned()).chain(self.env.to_exec()));
        self.plan.prepare(exec);
        if let Some(runtime) = &self.runtime {
            runtime.wrap(exec);
        }
    }

    /// Readable once the VM has stopped.
    pub fn exit_fd(&self) -> BorrowedFd<'_> {
        self.machine.exit_fd()
    }

    /// The guest's serial console, as logged.
    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    /// The kernel panic the guest's console showed, if it panicked.
    pub fn guest_panic(&self) -> Option<GuestPanic> {
        console_panic(&self.console_log)
    }

    /// The host socket of the VM's vsock device (Firecracker's protocol).
    pub fn vsock_socket(&self) -> &Path {
        &self.host_socket
    }

    /// Runs one command with this process's stdio.
    pub fn exec(&self, exec: Exec, deadline: Option<Instant>) -> Result<Outcome> {
        let conn = vsock::connect_port(&self.host_socket, CONTROL_PORT).context("cannot reach the guest agent")?;
        Ok(exec::relay(conn, exec, deadline, self.machine.exit_fd())?)
    }

    /// Asks the agent to sync, then stops the VM: once the guest's data is on disk there is
    /// nothing to wait for in its power-off. Says why the VM ended if it ended by itself,
    /// other than by the guest's choice.
    pub fn shutdown(mut self) -> Option<String> {
        // The whole exchange within SYNC_TIMEOUT: a guest that stopped answering holds no one.
        let by = Instant::now() + SYNC_TIMEOUT;
        let synced = vsock::connect_port_within(&self.host_socket, CONTROL_PORT, SYNC_TIMEOUT).and_then(|mut conn| {
            conn.set_write_timeout(Some(SYNC_TIMEOUT))?;
            protocol::write_frame(&mut conn, &Request::Shutdown.encode())?;
            let socket = conn.try_clone()?;
            protocol::read_reply(&mut exec::ReadBy::new(&mut conn, &socket, by))
        });
        if !matches!(synced, Ok(Some(Reply::Synced))) {
            tracing::warn!("the guest did not confirm its sync: {synced:?}");
        }
        let ended = finish(self.machine.as_mut());
        if self.debug {
            eprintln!("cvm: guest console:\n{}", log_tail(&self.console_log, 50));
        }
        ended
    }
}

/// What the guest gets and runs: the shares, the user, the runtime prologue, the relays,
/// with the set-up steps the agent carries out.
fn plan_guest(config: &SessionConfig, dir: &Path) -> Result<(SharePlan, Option<Runtime>)> {
    let meta = dir.join("meta");
    let mut plan =
        if config.shares.is_empty() { SharePlan::default() } else { SharePlan::new(&config.shares, &HostUser::current()?, &meta)? };
    for warning in &plan.warnings {
        eprintln!("cvm: {warning}");
    }
    plan.write_meta(&meta)?;
    let runtime = match &plan.workdir {
        Some(project) if config.runtime => {
            let mounts = config.shares.mounts.iter().map(|m| (m.host.clone(), m.guest.clone(), m.read_only)).collect();
            let facts = VmFacts {
                cpus: config.cpus,
                memory_bytes: config.memory_bytes,
                project,
                mounts,
                network: config.egress.mode,
                instructions: config.instructions.as_deref(),
            };
            let runtime = Runtime::new(project, &config.runtime_scripts, &facts)?;
            plan.setup.steps.extend(runtime.files());
            Some(runtime)
        }
        None if !config.runtime_scripts.is_empty() => bail!("--runtime-script needs a project: cvm run PATH"),
        _ => None,
    };
    plan.setup.steps.extend(config.forwards.steps());
    if config.egress.mode == NetworkMode::Open {
        plan.setup.steps.push(OpenNetwork::step());
    }
    Ok((plan, runtime))
}

/// Starts one fs backend process per planned share, each listening on its own socket in the
/// session directory, and adds their devices to `vhost_user`.
fn start_fs_backends(plan: &SharePlan, dir: &Path, vhost_user: &mut Vec<VhostUserConfig>) -> Result<Vec<FsBackend>> {
    let mut backends = Vec::new();
    if plan.shares.is_empty() && plan.external.is_empty() {
        return Ok(backends);
    }
    let exe = crate::cvm_exe().context("cannot find the cvm executable for the fs backends")?;
    // With -v the backends log on this terminal (which sandbox each entered); otherwise what
    // they say goes to a log that a failed start shows.
    let verbose = tracing::enabled!(tracing::Level::INFO);
    let log = std::fs::File::options().create(true).append(true).open(dir.join(FS_LOG))?;
    for share in &plan.shares {
        let tag = &share.backend.tag;
        let socket = dir.join(format!("fs-{tag}.vhost"));
        let listener = UnixListener::bind(&socket).with_context(|| format!("cannot create {}", socket.display()))?;
        let mut command = Command::new(&exe);
        command.arg("__fs-backend").stdin(Stdio::null()).stdout(Stdio::null());
        if verbose {
            command.env("CVM_LOG", "info");
        } else {
            command.stderr(log.try_clone()?);
        }
        let backend =
            FsBackend::spawn(command, listener, &share.backend).with_context(|| format!("cannot share {}", share.backend.dir.display()))?;
        backends.push(backend);
        vhost_user.push(VhostUserConfig { socket, kind: VhostUserKind::Fs { tag: tag.clone() } });
    }
    for share in &plan.external {
        vhost_user.push(VhostUserConfig { socket: share.socket.clone(), kind: VhostUserKind::Fs { tag: share.tag.clone() } });
    }
    Ok(backends)
}

/// Has the agent create the user and mount the shares; nothing to do when nothing is shared.
fn set_up_guest(host_socket: &Path, setup: &Setup) -> Result<()> {
    if *setup == Setup::default() {
        return Ok(());
    }
    let mut conn = vsock::connect_port(host_socket, CONTROL_PORT).context("cannot reach the guest agent")?;
    protocol::write_frame(&mut conn, &Request::Setup(setup.clone()).encode())?;
    match protocol::read_reply(&mut conn)? {
        Some(Reply::Done) => Ok(()),
        Some(Reply::Failed(message)) => bail!("the guest could not set up its shares: {message}"),
        other => bail!("unexpected answer from the guest agent to its set-up: {other:?}"),
    }
}

/// `setup`, after the host's time and fresh entropy ([`Step::Fresh`]): first, so that the
/// rest runs with the right clock, and a restored guest never shares random numbers with
/// another.
fn fresh_guest(setup: &Setup) -> Result<Setup> {
    let mut seed = vec![0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut seed).context("cannot read the host's entropy")?;
    let unix_nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut fresh = setup.clone();
    fresh.steps.insert(0, Step::Fresh { unix_nanos, seed });
    Ok(fresh)
}

/// Waits for the agent's readiness message on the host end of vsock port READY_PORT.
fn wait_for_agent(ready: &UnixListener, machine_exit: BorrowedFd<'_>, deadline: Instant) -> Result<()> {
    let mut fds = [PollFd::new(ready, PollFlags::IN), PollFd::from_borrowed_fd(machine_exit, PollFlags::IN)];
    if crate::poll_until(&mut fds, Some(deadline))? == 0 {
        bail!("the guest agent was not ready after {} s", BOOT_TIMEOUT.as_secs());
    }
    if fds[0].revents().is_empty() {
        bail!("the VM stopped before its agent was ready");
    }
    let (mut conn, _) = ready.accept()?;
    match protocol::read_reply(&mut conn)? {
        Some(Reply::Ready(_)) => Ok(()),
        other => Err(anyhow!("unexpected message from the guest agent: {other:?}")),
    }
}

/// Adds what the guest's console and the fs backends said to an error from a session's start:
/// a kernel panic with its lines, else the console's last lines.
fn explain(mut e: anyhow::Error, dir: &Path) -> anyhow::Error {
    if let Some(panic) = console_panic(&dir.join(CONSOLE_LOG)) {
        return e.context(panic_report(&panic));
    }
    for (what, file, lines) in [("fs backends", FS_LOG, 10), ("guest console (last lines)", CONSOLE_LOG, 20)] {
        let tail = log_tail(&dir.join(file), lines);
        if !tail.is_empty() {
            e = e.context(format!("{what}:\n{tail}"));
        }
    }
    e
}

/// The kernel panic at the end of a console log, if any (either engine: both log the console).
fn console_panic(log: &Path) -> Option<GuestPanic> {
    cvm_vmm::guest_panic::find(&read_tail(log))
}

/// A panic as cvm reports it: what the kernel said, then the console lines that led to it.
pub fn panic_report(panic: &GuestPanic) -> String {
    format!("{panic}\nguest console (up to the panic):\n{}", panic.lines.join("\n"))
}
