//! `cvm`: the command line, a thin layer over the `cvm` and `cvm-vmm` libraries.

mod bench;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use cvm::run::{parse_duration, EXIT_CVM_FAILED};
use cvm::egress::{EgressPolicy, NetworkMode, DEFAULT_ALLOW};
use cvm::forward::ForwardRequest;
use cvm::session::{Engine, Scratch, SessionConfig};
use cvm::shares::{parse_mount_spec, MountSpec, ShareRequest, CLAUDE_DEFAULT_ITEMS};
use cvm_vmm::{parse_memory_size, Vm, VmConfig, DEFAULT_CMDLINE};

#[derive(Parser)]
#[command(name = "cvm", version, about = "A microVM sandbox for coding agents", after_help = "cvm \"PROMPT\" is `cvm run` with Claude Code given that prompt, in the current directory.")]
#[command(allow_external_subcommands = true)]
struct Cli {
    /// Log what the VMM does (repeat for more); CVM_LOG=debug does the same.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel on cvm's VMM with the serial console on this terminal. Exits 0 when the
    /// guest resets, powers off or halts.
    Boot(BootArgs),
    /// Run a command in a fresh VM: its output, its exit status (128+N if killed by signal
    /// N), then the VM is gone. With a terminal the command gets one too.
    Run(RunArgs),
    /// Build this project's template once: install tools into a layer that later sessions
    /// start from (`cvm run` finds it by the project's path).
    Setup(SetupArgs),
    /// List the projects' templates: project, size on disk, and whether it is unused.
    List {
        /// Also show how much disk each template takes (sparse files: what they really use).
        #[arg(long)]
        disk_usage: bool,
        /// Only templates whose project is gone or whose image is not the current one.
        #[arg(long)]
        unused: bool,
    },
    /// Show what `cvm run` would use for a project: image, kernel, template.
    Info {
        /// The project (default: the current directory).
        path: Option<PathBuf>,
    },
    /// Remove a project's template (the current directory's by default).
    Clean {
        path: Option<PathBuf>,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
    /// Remove every template.
    CleanAll {
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
    /// Open an interactive shell in a fresh VM.
    Shell(ShellArgs),
    /// Show what cvm logged: `--network`, every egress decision of every session.
    Logs {
        /// The egress audit log ($XDG_STATE_HOME/cvm/network.log).
        #[arg(long, required = true)]
        network: bool,
    },
    /// Build, list and remove the cached root images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Measure cvm against references.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// `cvm "PROMPT"`: Claude Code on the current directory, given the prompt.
    #[command(external_subcommand)]
    Prompt(Vec<OsString>),
    /// Internal: serves one share to one VM (started by cvm itself, its socket on fd 3).
    #[command(name = "__fs-backend", hide = true)]
    FsBackend {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Internal: removes a session directory once cvm is gone.
    #[command(name = "__janitor", hide = true)]
    Janitor { dir: PathBuf },
}

/// The VM a session runs in.
#[derive(clap::Args, Clone)]
pub struct VmArgs {
    /// Which monitor runs the VM: cvm's own (needs hardware KVM) or QEMU (TCG where there is
    /// no hardware KVM). Also CVM_VMM.
    #[arg(long = "vmm", env = "CVM_VMM", value_enum, default_value = "cvm")]
    engine: Engine,
    /// Root image: `debian` (Debian with Claude Code, from scripts/build-image), `minimal`
    /// (cvm-agent and busybox in an initramfs, from scripts/build-initramfs) or a path to an
    /// image of either kind.
    #[arg(long, default_value = "debian")]
    image: String,
    /// Guest kernel (default: the one scripts/build-kernel built; also CVM_KERNEL).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u8,
    /// Guest memory: 512M, 2G, ... (a bare number is MiB).
    #[arg(long, default_value = "512M", value_parser = parse_memory_size)]
    memory: u64,
    /// Stop everything and exit 124 after this long: 30s, 5m, 1h.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Put the session's writable layer on a sparse scratch disk of this size (8G, 500M; a
    /// bare number is MiB) instead of in memory; gone when the session ends. Disk images only.
    #[arg(long, value_parser = parse_memory_size)]
    disk: Option<u64>,
    /// Show the guest's console (kernel and agent messages) when the session ends.
    #[arg(long)]
    debug: bool,
    /// Also share a host directory: /host[:/guest][:ro|rw] (the guest path defaults to the host
    /// path; `~` is your home). Read-only is enforced by cvm's file server. Repeatable.
    #[arg(long = "mount", value_name = "SPEC", value_parser = parse_mount)]
    mounts: Vec<MountSpec>,
    /// Leave the project's conversation folder (~/.claude/projects/<project>) out of the guest.
    #[arg(long)]
    no_conversations: bool,
    /// How the guest reaches the outside: `proxy` (allow-listed HTTP and HTTPS through a
    /// proxy on the host) or `none`. Also CVM_NETWORK.
    #[arg(long, env = "CVM_NETWORK", value_enum, default_value = "proxy")]
    network: NetworkMode,
    /// Also allow this host name through the proxy (`*.example.com` for its subdomains).
    /// Repeatable.
    #[arg(long = "allow", value_name = "NAME", value_parser = cvm::egress::parse_pattern)]
    allow: Vec<String>,
    /// Refuse this host name even if allowed. Repeatable.
    #[arg(long = "deny", value_name = "NAME", value_parser = cvm::egress::parse_pattern)]
    deny: Vec<String>,
    /// Resolve NAME to IP for the proxy (docker's --add-host); such a name may point at a
    /// private or loopback address. Repeatable.
    #[arg(long = "add-host", value_name = "NAME:IP", value_parser = cvm::egress::parse_add_host)]
    add_hosts: Vec<(String, std::net::IpAddr)>,
    /// Publish a guest TCP port on the host's 127.0.0.1: HOSTPORT:GUESTPORT. Repeatable.
    #[arg(short = 'p', long = "publish", value_name = "HOSTPORT:GUESTPORT", value_parser = cvm::forward::parse_publish)]
    publish: Vec<cvm::forward::Publish>,
    /// Let the guest reach 127.0.0.1:PORT on the host at its own 127.0.0.1:PORT (a local
    /// database, an MCP server). Repeatable.
    #[arg(long = "host-port", value_name = "PORT", value_parser = cvm::forward::parse_host_port)]
    host_ports: Vec<u16>,
    /// Give the guest an SSH_AUTH_SOCK that reaches your SSH agent ($SSH_AUTH_SOCK).
    #[arg(short = 'A', long = "forward-ssh-agent")]
    forward_ssh_agent: bool,
    /// Give the guest your GPG agent (its extra socket: sign and decrypt, no key export) and
    /// your public keyring, in GNUPGHOME=/run/cvm/gnupg.
    #[arg(long = "gpg")]
    forward_gpg_agent: bool,
    /// A script sourced before the command, in the same shell, after the project's own
    /// .cvm.runtime.sh; a failure stops the run with its status. Repeatable.
    #[arg(long = "runtime-script", value_name = "FILE")]
    runtime_scripts: Vec<PathBuf>,
}

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// The project directory: shared read-write at its host path, where the command runs as
    /// you. Without it the command runs as root in `/` with nothing shared.
    path: Option<PathBuf>,
    #[command(flatten)]
    vm: VmArgs,
    /// Print how long each phase took (VMM set-up, boot to agent ready, the command, teardown)
    /// on standard error.
    #[arg(long)]
    timings: bool,
    /// The command and its arguments. Without one: Claude Code
    /// (`claude --dangerously-skip-permissions`) in the project, `.` unless PATH is given.
    #[arg(last = true)]
    command: Vec<OsString>,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build an image (or reuse the cached build of the same recipe), with progress.
    Build {
        /// `debian` (Debian with Claude Code) or `minimal` (cvm-agent and busybox).
        #[arg(default_value = "debian")]
        name: String,
    },
    /// List the cached builds: name, recipe hash, size, and which one `--image NAME` uses.
    Ls,
    /// Remove cached builds that are not in use (`--all`: those in use too).
    Rm {
        /// Also the builds `--image NAME` uses now.
        #[arg(long)]
        all: bool,
    },
}

#[derive(clap::Args, Clone)]
pub struct SetupArgs {
    /// The project (default: the current directory).
    path: Option<PathBuf>,
    /// Node.js and npm.
    #[arg(long)]
    node: bool,
    /// Python 3 with pip and venv.
    #[arg(long)]
    python: bool,
    /// Rust (Debian's cargo and rustc).
    #[arg(long)]
    rust: bool,
    /// Docker (docker.io).
    #[arg(long)]
    docker: bool,
    /// Chromium.
    #[arg(long)]
    chromium: bool,
    /// GitHub's CLI (gh).
    #[arg(long)]
    gh: bool,
    /// Git (already in the image).
    #[arg(long)]
    git: bool,
    /// GnuPG.
    #[arg(long)]
    gpg: bool,
    /// Every capability above.
    #[arg(long)]
    all: bool,
    /// Another Debian package to install. Repeatable.
    #[arg(long = "package", value_name = "NAME")]
    packages: Vec<String>,
    /// A script to run after the packages (and after ~/.cvm.setup.sh), before
    /// ./.cvm.setup.sh. Repeatable.
    #[arg(long = "setup-script", value_name = "FILE")]
    setup_scripts: Vec<PathBuf>,
    #[command(flatten)]
    vm: VmArgs,
}

#[derive(clap::Args, Clone)]
pub struct ShellArgs {
    /// The project directory, shared as with `cvm run`.
    path: Option<PathBuf>,
    #[command(flatten)]
    vm: VmArgs,
}

#[derive(clap::Args, Clone)]
pub struct BootArgs {
    /// Kernel: a vmlinux (PVH entry preferred) or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// An initramfs (cpio).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line; the VMM adds its devices' arguments.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    append: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Guest memory: 512M, 2G, ... (a bare number is MiB).
    #[arg(long, default_value = "512M", value_parser = parse_memory_size)]
    memory: u64,
    /// Print how long the boot took to reach the guest's first instruction, the boot timer
    /// and the end, on standard error.
    #[arg(long)]
    timings: bool,
    /// Give the guest a vsock device (CID 3) whose host side is this Unix socket, with
    /// Firecracker's protocol: connect and write `CONNECT <port>`; guest connections to port P
    /// reach PATH_P.
    #[arg(long, value_name = "PATH")]
    vsock: Option<PathBuf>,
}

fn main() -> ExitCode {
    let started = Instant::now();
    let mut cli = Cli::parse();
    if let Command::Prompt(prompt) = cli.command {
        // Exactly `cvm run . -- claude --dangerously-skip-permissions PROMPT`.
        let mut argv: Vec<OsString> = vec!["cvm".into(), "run".into(), ".".into(), "--".into()];
        argv.extend(cvm::run::AGENT_COMMAND.iter().map(OsString::from));
        argv.extend(prompt);
        cli = Cli { command: Cli::parse_from(argv).command, ..cli };
    }
    init_logging(cli.verbose);
    match cli.command {
        Command::Boot(args) => boot(&args, started),
        Command::Run(args) => {
            let (project, command) = cvm::run::agent_defaults(args.path, args.command);
            run(&args.vm, project, command, args.timings)
        }
        Command::List { disk_usage, unused } => report(list_templates(disk_usage, unused)),
        Command::Info { path } => report(info(path)),
        Command::Clean { path, yes } => report(clean(path, yes)),
        Command::CleanAll { yes } => report(clean_all(yes)),
        Command::Setup(args) => match setup(args) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                cvm::terminal::restore();
                eprintln!("cvm: {e:#}");
                ExitCode::from(EXIT_CVM_FAILED)
            }
        },
        Command::Shell(args) => run(&args.vm, args.path, vec!["/bin/sh".into(), "-l".into()], false),
        Command::Logs { network: _ } => {
            let path = cvm::egress::audit_log_path();
            match std::fs::read(&path) {
                Ok(log) => {
                    let _ = std::io::Write::write_all(&mut std::io::stdout(), &log);
                    ExitCode::SUCCESS
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cvm: {}: {e}", path.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Image(command) => match image_command(command) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("cvm: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Bench(command) => match bench::run(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cvm: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Prompt(_) => unreachable!("a prompt became `cvm run` above"),
        Command::FsBackend { args } => match fs_backend(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cvm fs backend: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Janitor { dir } => match cvm::rundir::janitor_main(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cvm: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn session_config(args: &VmArgs, project: Option<PathBuf>) -> anyhow::Result<SessionConfig> {
    Ok(SessionConfig {
        shares: ShareRequest {
            project,
            mounts: args.mounts.clone(),
            conversations: !args.no_conversations,
            claude_items: CLAUDE_DEFAULT_ITEMS.iter().map(|s| s.to_string()).collect(),
        },
        engine: args.engine,
        kernel: cvm::images::kernel(args.kernel.clone())?,
        image: cvm::images::image(&args.image)?,
        cpus: args.cpus,
        memory_bytes: args.memory,
        debug: args.debug,
        runtime_scripts: args.runtime_scripts.clone(),
        scratch: args.disk.map(Scratch::Fresh),
        template: None,
        runtime: true,
        egress: EgressPolicy {
            mode: args.network,
            allow: DEFAULT_ALLOW.iter().map(|s| s.to_string()).chain(args.allow.iter().cloned()).collect(),
            deny: args.deny.clone(),
            hosts: args.add_hosts.clone(),
        },
        forwards: ForwardRequest {
            publish: args.publish.clone(),
            host_ports: args.host_ports.clone(),
            ssh_agent: match args.forward_ssh_agent {
                true => Some(std::env::var_os("SSH_AUTH_SOCK").map(PathBuf::from).ok_or_else(|| anyhow::anyhow!("-A: SSH_AUTH_SOCK is not set (is ssh-agent running?)"))?),
                false => None,
            },
            gpg_agent: if args.forward_gpg_agent { Some(cvm::forward::GpgAgent::from_host()?) } else { None },
        },
    })
}

fn run(args: &VmArgs, project: Option<PathBuf>, command: Vec<OsString>, timings: bool) -> ExitCode {
    let config = session_config(args, project).map(|mut config| {
        // A project's template, made by `cvm setup` on this image, is where it starts from.
        if let (Some(project), cvm::images::Image::Disk(image)) = (&config.shares.project, &config.image) {
            config.template = project.canonicalize().ok().and_then(|p| cvm::template::find(&p, image));
        }
        config
    });
    match config.and_then(|config| cvm::run::run(&config, command, args.timeout, timings)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            cvm::terminal::restore();
            eprintln!("cvm: {e:#}");
            ExitCode::from(EXIT_CVM_FAILED)
        }
    }
}

fn parse_mount(text: &str) -> Result<MountSpec, String> {
    parse_mount_spec(text, &std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default())
}

fn image_command(command: ImageCommand) -> anyhow::Result<ExitCode> {
    match command {
        ImageCommand::Build { name } => {
            // The recipe prints its progress on stderr and the image's path last on stdout.
            let status = std::process::Command::new(cvm::images::recipe(&name)?).status()?;
            Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        ImageCommand::Ls => {
            println!("{:<8} {:<17} {:>9}  PATH", "IMAGE", "RECIPE", "SIZE");
            for image in cvm::images::cached() {
                let mark = if image.current { " (current)" } else { "" };
                println!("{:<8} {:<17} {:>8}M  {}{mark}", image.name, image.key, image.bytes >> 20, image.path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Rm { all } => {
            for image in cvm::images::cached().into_iter().filter(|i| all || !i.current) {
                let dir = image.path.parent().expect("a build directory");
                std::fs::remove_dir_all(dir)?;
                println!("removed {} {}", image.name, image.key);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Exit status of a command that only prints: 0, or 1 with the error.
fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cvm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The image `--image debian` uses now, if built.
fn current_debian() -> Option<PathBuf> {
    match cvm::images::image("debian") {
        Ok(cvm::images::Image::Disk(path)) => Some(path),
        _ => None,
    }
}

fn list_templates(disk_usage: bool, unused_only: bool) -> anyhow::Result<()> {
    let current = current_debian();
    for t in cvm::template::list() {
        let unused = t.unused(current.as_deref());
        if unused_only && !unused {
            continue;
        }
        let size = if disk_usage { format!("{:>8}M  ", t.bytes >> 20) } else { String::new() };
        println!("{size}{}{}", t.project.display(), if unused { "  (unused)" } else { "" });
    }
    Ok(())
}

fn project_or_cwd(path: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = path.unwrap_or_else(|| PathBuf::from("."));
    path.canonicalize().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn info(path: Option<PathBuf>) -> anyhow::Result<()> {
    let project = project_or_cwd(path)?;
    println!("project:  {}", project.display());
    let image = current_debian();
    println!("image:    {}", image.as_ref().map_or("debian: not built (cvm image build)".into(), |p| p.display().to_string()));
    println!("kernel:   {}", cvm::images::kernel(None).map_or_else(|e| e.to_string(), |p| p.display().to_string()));
    let template = image.as_deref().and_then(|i| cvm::template::find(&project, i));
    println!("template: {}", template.map_or("none (cvm setup makes one)".into(), |p| p.display().to_string()));
    Ok(())
}

/// Asks on the terminal; without one, only `--yes` agrees.
fn confirm(question: &str, yes: bool) -> anyhow::Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        anyhow::bail!("{question} Pass --yes to agree without a terminal.");
    }
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if !matches!(answer.trim(), "y" | "Y" | "yes") {
        anyhow::bail!("nothing removed");
    }
    Ok(())
}

fn clean(path: Option<PathBuf>, yes: bool) -> anyhow::Result<()> {
    let project = project_or_cwd(path)?;
    let Some(template) = cvm::template::list().into_iter().find(|t| t.project == project) else {
        println!("{} has no template", project.display());
        return Ok(());
    };
    confirm(&format!("Remove the template of {}?", project.display()), yes)?;
    cvm::template::remove(&template)?;
    println!("removed the template of {}", project.display());
    Ok(())
}

fn clean_all(yes: bool) -> anyhow::Result<()> {
    let all = cvm::template::list();
    if all.is_empty() {
        return Ok(());
    }
    confirm(&format!("Remove all {} templates?", all.len()), yes)?;
    for t in &all {
        cvm::template::remove(t)?;
        println!("removed the template of {}", t.project.display());
    }
    Ok(())
}

/// `cvm setup`: one session on a scratch disk that becomes the project's template.
fn setup(args: SetupArgs) -> anyhow::Result<u8> {
    use cvm::template;
    let project = args.path.clone().unwrap_or_else(|| PathBuf::from(".")).canonicalize()?;
    let flags = [("node", args.node), ("python", args.python), ("rust", args.rust), ("docker", args.docker), ("chromium", args.chromium), ("gh", args.gh), ("git", args.git), ("gpg", args.gpg)];
    let capabilities: Vec<&str> = flags.iter().filter(|(_, on)| *on || args.all).map(|(name, _)| *name).collect();
    let packages = template::packages(&capabilities, &args.packages);
    // The user's scripts, read here: ~/.cvm.setup.sh, then --setup-script, then the project's.
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    let own = [home.join(template::HOME_SCRIPT)].into_iter().filter(|p| p.is_file());
    let project_script = [project.join(template::HOME_SCRIPT)].into_iter().filter(|p| p.is_file());
    let scripts = own
        .chain(args.setup_scripts.iter().cloned())
        .chain(project_script)
        .map(|p| std::fs::read(&p).map_err(|e| anyhow::anyhow!("cannot read the setup script {}: {e}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut config = session_config(&args.vm, Some(project.clone()))?;
    let dir = template::dir_for(&project);
    std::fs::create_dir_all(&dir)?;
    let layer = dir.join("layer.ext4.new");
    cvm::images::make_scratch_disk(&layer, template::LAYER_BYTES)?;
    config.scratch = Some(Scratch::Kept(layer.clone()));
    config.runtime = false;
    let argv = template::command(&packages, &scripts).into_iter().map(<OsString as std::os::unix::ffi::OsStringExt>::from_vec).collect();
    let code = cvm::run::run(&config, argv, args.vm.timeout, false);
    match code {
        Ok(0) => {
            let kept = template::keep(&project, &layer, config.image.path())?;
            eprintln!("cvm setup: the template for {} is ready ({})", project.display(), kept.display());
            Ok(0)
        }
        other => {
            let _ = std::fs::remove_file(&layer);
            other
        }
    }
}

/// `cvm __fs-backend ARGS`: one share's server, in its own process and sandbox.
fn fs_backend(args: Vec<OsString>) -> anyhow::Result<()> {
    let share = cvm_devices::fs::ShareConfig::from_args(args).map_err(anyhow::Error::msg)?;
    cvm_devices::fs::serve(cvm_devices::fs::inherited_listener()?, &share)?;
    Ok(())
}

fn init_logging(verbose: u8) {
    let from_env = std::env::var("CVM_LOG").ok();
    if verbose == 0 && from_env.is_none() {
        return; // nothing to log: skip the subscriber's set-up on the boot path
    }
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_new(from_env.unwrap_or_else(|| level.into()))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// Starts the embedded vsock backend for `cvm boot --vsock PATH` and wires its device.
fn start_vsock(path: &std::path::Path, config: &mut VmConfig) -> anyhow::Result<cvm_devices::vsock::VsockServer> {
    use anyhow::Context;
    let vhost_socket = PathBuf::from(format!("{}.vhost", path.display()));
    let listener = std::os::unix::net::UnixListener::bind(&vhost_socket).with_context(|| format!("cannot create {}", vhost_socket.display()))?;
    let server = cvm_devices::vsock::VsockServer::start(cvm::session::GUEST_CID, path, listener)
        .with_context(|| format!("cannot serve vsock on {}", path.display()))?;
    config.vhost_user.push(cvm_vmm::VhostUserConfig { socket: vhost_socket, kind: cvm_vmm::VhostUserKind::Vsock });
    Ok(server)
}

fn boot(args: &BootArgs, started: Instant) -> ExitCode {
    let mut config = VmConfig {
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        cmdline: args.append.clone(),
        vcpus: args.cpus,
        memory_bytes: args.memory,
        ..VmConfig::new(&args.kernel)
    };
    // Lives until the VM is gone; the backend stops when its frontend disconnects.
    let _vsock = match &args.vsock {
        Some(path) => match start_vsock(path, &mut config) {
            Ok(server) => Some(server),
            Err(e) => {
                eprintln!("cvm: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let result = Vm::create(&config, started).and_then(|vm| {
        if let Some(vhost) = config.vhost_user.first() {
            let _ = std::fs::remove_file(&vhost.socket); // connected: not needed any more
        }
        vm.run()
    });
    match result {
        Ok(exit) => {
            if args.timings {
                eprintln!("{}", bench::format_timings(&exit.timings));
            }
            if exit.reason.is_clean() {
                tracing::info!("{}", exit.reason);
                ExitCode::SUCCESS
            } else {
                eprintln!("cvm: {}", exit.reason);
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("cvm: {e}");
            ExitCode::FAILURE
        }
    }
}
