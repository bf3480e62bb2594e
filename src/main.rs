//! `cvm`: the command line, a thin layer over the `cvm` and `cvm-vmm` libraries.

mod bench;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use cvm::run::{parse_duration, EXIT_CVM_FAILED};
use cvm::config::{Flags, Settings, Source};
use cvm::egress::{EgressPolicy, NetworkMode};
use cvm::environment::Environment;
use cvm::forward::ForwardRequest;
use cvm::session::{Engine, Scratch, SessionConfig};
use cvm::shares::{parse_mount_spec, MountSpec, ShareRequest, CLAUDE_DEFAULT_ITEMS};
use cvm_vmm::{parse_memory_size, Vm, VmConfig, DEFAULT_CMDLINE};

#[derive(Parser)]
#[command(name = "cvm", version, about = "A microVM sandbox for coding agents", after_help = "cvm \"PROMPT\" is `cvm run` with Claude Code given that prompt, in the current directory.")]
#[command(allow_external_subcommands = true)]
struct Cli {
    /// Log what cvm and the VMM do (repeat for more; CVM_LOG=debug does the same), and show
    /// the guest's console when a session ends, as --debug does.
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
        /// As JSON, for scripts (missing things are null).
        #[arg(long)]
        json: bool,
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
    /// Show a named VM's guest console, or with `--network` every egress decision of every
    /// session.
    Logs {
        /// The named VM.
        #[arg(required_unless_present = "network", conflicts_with = "network")]
        name: Option<String>,
        /// The egress audit log ($XDG_STATE_HOME/cvm/network.log).
        #[arg(long)]
        network: bool,
        /// Keep printing what the VM's console writes until the VM stops.
        #[arg(short, long, requires = "name")]
        follow: bool,
    },
    /// Boot a named VM in the background; `cvm exec NAME` runs commands in it.
    Start(StartArgs),
    /// Run a command in a named VM (a shell by default), as `cvm run` would.
    Exec {
        name: String,
        /// The command and its arguments (default: /bin/sh -l).
        #[arg(last = true)]
        command: Vec<OsString>,
    },
    /// List the named VMs.
    Ps {
        /// As JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Stop a named VM gracefully (the guest syncs its disks) and remove it.
    Stop {
        name: String,
    },
    /// Remove a named VM at once, running or not, with everything it owned.
    Rm {
        name: String,
    },
    /// Build, list and remove the cached root images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Git worktrees beside the main checkout, one per branch (`cvm run --worktree BRANCH`).
    #[command(subcommand)]
    Worktree(WorktreeCommand),
    /// Check this host: /dev/kvm, the kernel and images, the host tools; says how to fix each
    /// problem. Exits 1 if `cvm run` cannot work.
    Doctor,
    /// Print a shell completion script: `cvm completions bash > /etc/bash_completion.d/cvm`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `cvm man | man -l -`; `cvm man run` for a subcommand's.
    Man {
        /// A subcommand.
        command: Option<String>,
    },
    /// The layered configuration (.cvm.toml files, CVM_* variables).
    #[command(subcommand)]
    Config(ConfigCommand),
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
    /// Internal: a named VM's background process; its `cvm start` command line comes on its
    /// standard input, not in its argv, which every user of the host can read.
    #[command(name = "__vm-daemon", hide = true)]
    VmDaemon,
    /// Internal: removes a session directory once cvm is gone.
    #[command(name = "__janitor", hide = true)]
    Janitor { dir: PathBuf },
}

/// The VM a session runs in. Values left out come from the configuration layers (see
/// `cvm config show`): defaults, CI caps, ~/.cvm.toml, the main repository's and the project's
/// .cvm.toml, then CVM_* variables.
#[derive(clap::Args, Clone)]
pub struct VmArgs {
    /// Which monitor runs the VM: cvm's own (needs hardware KVM) or QEMU (TCG where there is
    /// no hardware KVM). [config: vm.vmm, CVM_VMM; default: cvm]
    #[arg(long = "vmm", value_enum)]
    engine: Option<Engine>,
    /// Root image: `debian` (Debian with Claude Code, from scripts/build-image), `minimal`
    /// (cvm-agent and busybox in an initramfs, from scripts/build-initramfs) or a path to an
    /// image of either kind. [config: vm.image, CVM_IMAGE; default: debian]
    #[arg(long)]
    image: Option<String>,
    /// Guest kernel (default: the one scripts/build-kernel built; also CVM_KERNEL).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Number of vCPUs. [config: vm.cpus, CVM_CPUS; default: 2]
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..))]
    cpus: Option<u8>,
    /// Guest memory: 512M, 2G, ... (a bare number is MiB). [config: vm.memory, CVM_MEMORY;
    /// default: 512M]
    #[arg(long, value_parser = parse_memory_size)]
    memory: Option<u64>,
    /// Stop everything and exit 124 after this long: 30s, 5m, 1h. [config: vm.timeout,
    /// CVM_TIMEOUT; default: none, 1h in CI]
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Put the session's writable layer on a sparse scratch disk of this size (8G, 500M; a
    /// bare number is MiB) instead of in memory; gone when the session ends. Disk images only.
    /// [config: vm.disk, CVM_DISK]
    #[arg(long, value_parser = parse_memory_size)]
    disk: Option<u64>,
    /// Show the guest's console (kernel and agent messages) when the session ends.
    #[arg(long)]
    debug: bool,
    /// Also share a host directory: /host[:/guest][:ro|rw] (the guest path defaults to the host
    /// path; `~` is your home). Read-only is enforced by cvm's file server. Repeatable.
    /// [config: [[mounts]]]
    #[arg(long = "mount", value_name = "SPEC", value_parser = parse_mount)]
    mounts: Vec<MountSpec>,
    /// Leave the project's conversation folder (~/.claude/projects/<project>) out of the guest.
    #[arg(long)]
    no_conversations: bool,
    /// How the guest reaches the outside: `proxy` (allow-listed HTTP and HTTPS through a
    /// proxy on the host), `none`, or `open` (raw TCP and UDP through passt: no allow-list).
    /// [config: network.mode, CVM_NETWORK; default: proxy]
    #[arg(long, value_enum)]
    network: Option<NetworkMode>,
    /// Also allow this host name through the proxy (`*.example.com` for its subdomains).
    /// Repeatable. [config: network.allow]
    #[arg(long = "allow", value_name = "NAME", value_parser = cvm::egress::parse_pattern)]
    allow: Vec<String>,
    /// Refuse this host name even if allowed. Repeatable. [config: network.deny]
    #[arg(long = "deny", value_name = "NAME", value_parser = cvm::egress::parse_pattern)]
    deny: Vec<String>,
    /// Resolve NAME to IP for the proxy (docker's --add-host); such a name may point at a
    /// private or loopback address. Repeatable. [config: network.hosts]
    #[arg(long = "add-host", value_name = "NAME:IP", value_parser = cvm::egress::parse_add_host)]
    add_hosts: Vec<(String, std::net::IpAddr)>,
    /// Set a variable for every command: NAME=VALUE. Repeatable.
    #[arg(short = 'e', long = "env", value_name = "NAME=VALUE", value_parser = cvm::environment::parse_pair)]
    env: Vec<(String, String)>,
    /// Read variables from a file of NAME=VALUE lines. Repeatable.
    #[arg(long = "env-file", value_name = "FILE")]
    env_files: Vec<PathBuf>,
    /// Pass this variable of yours on to every command (skipped if unset). Repeatable.
    #[arg(long = "inherit-env", value_name = "NAME", value_parser = cvm::environment::parse_name)]
    inherit_env: Vec<String>,
    /// A script sourced before the command, in the same shell, after the project's own
    /// .cvm.runtime.sh; a failure stops the run with its status. Repeatable.
    /// [config: runtime.scripts]
    #[arg(long = "runtime-script", value_name = "FILE")]
    runtime_scripts: Vec<PathBuf>,
}

/// What crosses between host and guest besides the shares: not for `cvm setup`, whose
/// `--gpg` is a tool to install.
#[derive(clap::Args, Clone, Default)]
pub struct ForwardArgs {
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
}

impl ForwardArgs {
    fn request(&self) -> anyhow::Result<ForwardRequest> {
        Ok(ForwardRequest {
            publish: self.publish.clone(),
            host_ports: self.host_ports.clone(),
            ssh_agent: match self.forward_ssh_agent {
                true => Some(std::env::var_os("SSH_AUTH_SOCK").map(PathBuf::from).ok_or_else(|| anyhow::anyhow!("-A: SSH_AUTH_SOCK is not set (is ssh-agent running?)"))?),
                false => None,
            },
            gpg_agent: if self.forward_gpg_agent { Some(cvm::forward::GpgAgent::from_host()?) } else { None },
        })
    }
}

impl VmArgs {
    /// What these flags set, as the top configuration layer.
    fn flags(&self) -> Flags {
        Flags {
            cpus: self.cpus,
            memory: self.memory,
            disk: self.disk,
            vmm: self.engine,
            image: self.image.clone(),
            timeout: self.timeout,
            network: self.network,
            runtime_scripts: self.runtime_scripts.clone(),
            allow: self.allow.clone(),
            deny: self.deny.clone(),
            hosts: self.add_hosts.clone(),
            mounts: self.mounts.clone(),
            ..Flags::default()
        }
    }
}

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// The project directory: shared read-write at its host path, where the command runs as
    /// you. Without it the command runs as root in `/` with nothing shared.
    path: Option<PathBuf>,
    #[command(flatten)]
    vm: VmArgs,
    #[command(flatten)]
    forwards: ForwardArgs,
    /// Print how long each phase took (VMM set-up, boot to agent ready, the command, teardown)
    /// on standard error.
    #[arg(long)]
    timings: bool,
    /// If the project has no template yet and its configuration asks for tools, packages or
    /// setup scripts, run `cvm setup` first.
    #[arg(long)]
    auto_setup: bool,
    /// Run in the git worktree of BRANCH (made beside the main checkout if missing, as
    /// `cvm worktree create`) instead of PATH.
    #[arg(long, value_name = "BRANCH", conflicts_with = "path")]
    worktree: Option<String>,
    /// The command and its arguments. Without one: Claude Code
    /// (`claude --dangerously-skip-permissions`) in the project, `.` unless PATH is given.
    #[arg(last = true)]
    command: Vec<OsString>,
}

#[derive(clap::Args, Clone)]
pub struct StartArgs {
    /// The VM's name: letters, digits, '.', '_', '-'.
    #[arg(long, value_parser = |s: &str| cvm::named::validate_name(s).map(|()| s.to_string()))]
    name: String,
    /// The project, shared as with `cvm run`.
    path: Option<PathBuf>,
    #[command(flatten)]
    vm: VmArgs,
    #[command(flatten)]
    forwards: ForwardArgs,
}

#[derive(Subcommand)]
enum WorktreeCommand {
    /// Make the worktree of BRANCH (a new branch from BASE, default HEAD, if it does not
    /// exist) at <repo>-<branch> beside the main checkout; prints its path.
    Create { branch: String, base: Option<String> },
    /// List the repository's worktrees: path and branch.
    List,
    /// Remove the worktree of BRANCH (the branch stays).
    Remove {
        branch: String,
        /// Even with uncommitted changes.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration for a project and where each value came from.
    Show {
        /// The project (default: the current directory).
        path: Option<PathBuf>,
    },
    /// Check configuration files: unknown keys and bad values, with file, line and column.
    /// Without FILE: every file the current directory's sessions read.
    Validate { file: Option<PathBuf> },
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
    #[command(flatten)]
    forwards: ForwardArgs,
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
    /// and the end, and KVM's count of VM exits by kind, on standard error.
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
    let mut prompt = Vec::new();
    if let Command::Prompt(words) = cli.command {
        // `cvm run .` with the prompt after the agent command.
        prompt = words;
        cli = Cli { command: Cli::parse_from(["cvm", "run", "."]).command, ..cli };
    }
    let mut daemon = false;
    if let Command::VmDaemon = cli.command {
        match daemon_command_line() {
            Ok(start) => (cli, daemon) = (start, true),
            Err(e) => {
                eprintln!("cvm: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    init_logging(cli.verbose);
    match cli.command {
        Command::Boot(args) => boot(&args, started),
        Command::Run(args) => run(&args, prompt),
        Command::List { disk_usage, unused } => report(list_templates(disk_usage, unused)),
        Command::Info { path, json } => report(info(path, json)),
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
        Command::Shell(args) => run(&RunArgs { path: args.path, vm: args.vm, forwards: args.forwards, timings: false, auto_setup: false, worktree: None, command: vec!["/bin/sh".into(), "-l".into()] }, Vec::new()),
        Command::Logs { name, network: _, follow } => match name {
            Some(name) => report(cvm::named::copy_console(&name, follow, &mut std::io::stdout())),
            None => {
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
        },
        Command::Start(args) if daemon => report(vm_daemon(&args)),
        Command::Start(args) => report(start(&args)),
        Command::VmDaemon => report(Err(anyhow::anyhow!("__vm-daemon takes a `cvm start` command line on its standard input"))),
        Command::Exec { name, command } => match vm_exec(&name, command) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                cvm::terminal::restore();
                eprintln!("cvm: {e:#}");
                ExitCode::from(EXIT_CVM_FAILED)
            }
        },
        Command::Ps { json } => report(ps(json)),
        Command::Stop { name } => report(cvm::named::stop(&name, false)),
        Command::Rm { name } => report(cvm::named::stop(&name, true)),
        Command::Config(command) => config_command(command),
        Command::Doctor => {
            let checks = cvm::doctor::checks();
            print!("{}", cvm::doctor::report(&checks));
            match checks.iter().any(|c| c.status == cvm::doctor::Status::Fail) {
                true => ExitCode::FAILURE,
                false => ExitCode::SUCCESS,
            }
        }
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "cvm", &mut script);
            print_quietly(&script)
        }
        Command::Man { command } => {
            let mut cli = <Cli as clap::CommandFactory>::command();
            cli.build();
            let page = match &command {
                None => Some(cli),
                Some(name) => cli.find_subcommand(name).map(|sub| sub.clone().display_name(format!("cvm-{name}"))),
            };
            let mut roff = Vec::new();
            match page.map(|page| clap_mangen::Man::new(page).render(&mut roff)) {
                Some(Ok(())) => print_quietly(&roff),
                Some(Err(e)) => report(Err(e.into())),
                None => report(Err(anyhow::anyhow!("no subcommand {:?} (cvm --help lists them)", command.unwrap_or_default()))),
            }
        }
        Command::Worktree(command) => report(worktree_command(command)),
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

/// The configuration layers for a session on `project`, with `flags` on top.
fn settings(flags: Flags, project: Option<&Path>) -> anyhow::Result<Settings> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let mut settings = cvm::config::load(&home_dir(), project, ci, |name| std::env::var(name).ok())?;
    settings.apply_flags(flags);
    Ok(settings)
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default()
}

/// The session `settings` and the per-run flags describe. Secrets only where asked: a
/// template's set-up never sees them.
fn session_config(settings: &Settings, args: &VmArgs, forwards: ForwardRequest, project: Option<PathBuf>, with_secrets: bool) -> anyhow::Result<SessionConfig> {
    if settings.network.value == NetworkMode::Open && !(settings.allow.sources == [Source::Default] && settings.deny.value.is_empty() && settings.hosts.value.is_empty()) {
        anyhow::bail!("--allow, --deny and --add-host (network.allow, deny, hosts) are rules of the proxy: --network open has no allow-list");
    }
    let mut env = Environment::default();
    if let (true, Some(path)) = (with_secrets, &settings.secrets_file.value) {
        env.extend(cvm::environment::read_secrets(path)?);
    }
    for file in &args.env_files {
        env.extend(cvm::environment::read_file(file)?);
    }
    for name in &args.inherit_env {
        if let Ok(value) = std::env::var(name) {
            env.set(name.clone(), value);
        }
    }
    for (name, value) in &args.env {
        env.set(name.clone(), value.clone());
    }
    Ok(SessionConfig {
        shares: ShareRequest {
            project,
            mounts: settings.mounts.value.clone(),
            conversations: !args.no_conversations,
            claude_items: CLAUDE_DEFAULT_ITEMS.iter().map(|s| s.to_string()).collect(),
        },
        engine: settings.vmm.value,
        kernel: cvm::images::kernel(args.kernel.clone())?,
        image: cvm::images::image(&settings.image.value)?,
        cpus: settings.cpus.value,
        memory_bytes: settings.memory.value,
        // -v shows the guest's side too: its console, kernel and agent messages included.
        debug: args.debug || tracing::enabled!(tracing::Level::INFO),
        runtime_scripts: settings.runtime_scripts.value.clone(),
        scratch: settings.disk.value.map(Scratch::Fresh),
        template: None,
        runtime: true,
        egress: EgressPolicy {
            mode: settings.network.value,
            allow: settings.allow.value.clone(),
            deny: settings.deny.value.clone(),
            hosts: settings.hosts.value.clone(),
            upstream: cvm::egress::upstream_from_env().map_err(anyhow::Error::msg)?,
        },
        forwards,
        env,
        instructions: settings.instructions()?,
    })
}

/// `cvm run`, and `cvm "PROMPT"` (the prompt after the agent command).
fn run(args: &RunArgs, prompt: Vec<OsString>) -> ExitCode {
    match run_session(args, prompt) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            cvm::terminal::restore();
            eprintln!("cvm: {e:#}");
            ExitCode::from(EXIT_CVM_FAILED)
        }
    }
}

fn run_session(args: &RunArgs, prompt: Vec<OsString>) -> anyhow::Result<u8> {
    let path = match &args.worktree {
        Some(branch) => Some(cvm::worktree::create(&std::env::current_dir()?, branch, None)?),
        None => args.path.clone(),
    };
    let project = cvm::run::default_project(path, !args.command.is_empty());
    let canonical = project.as_ref().and_then(|p| p.canonicalize().ok());
    let settings = settings(args.vm.flags(), canonical.as_deref())?;
    let command = match args.command.is_empty() {
        true => settings.agent_command().into_iter().map(OsString::from).chain(prompt).collect(),
        false => args.command.clone(),
    };
    let mut config = session_config(&settings, &args.vm, args.forwards.request()?, project, true)?;
    // A project's template, made by `cvm setup` on this image, is where it starts from.
    if let (Some(project), cvm::images::Image::Disk(image)) = (&canonical, &config.image) {
        config.template = cvm::template::find(project, image);
        if config.template.is_none() && args.auto_setup && wants_setup(&settings, project) {
            eprintln!("cvm: --auto-setup: {} has no template yet; running cvm setup first", project.display());
            let code = run_setup(&settings, &args.vm, project)?;
            if code != 0 {
                return Ok(code);
            }
            config.template = cvm::template::find(project, image);
        }
    }
    cvm::run::run(&config, command, settings.timeout.value, args.timings)
}

/// Whether the configuration asks for anything `cvm setup` would install or run.
fn wants_setup(settings: &Settings, project: &Path) -> bool {
    !settings.tools_on().is_empty()
        || !settings.packages.value.is_empty()
        || !settings.setup_scripts.value.is_empty()
        || project.join(cvm::template::HOME_SCRIPT).is_file()
}

fn parse_mount(text: &str) -> Result<MountSpec, String> {
    parse_mount_spec(text, &std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default())
}

fn worktree_command(command: WorktreeCommand) -> anyhow::Result<()> {
    let here = std::env::current_dir()?;
    match command {
        WorktreeCommand::Create { branch, base } => println!("{}", cvm::worktree::create(&here, &branch, base.as_deref())?.display()),
        WorktreeCommand::List => {
            for w in cvm::worktree::list(&here)? {
                println!("{}  {}", w.path.display(), w.branch.as_deref().unwrap_or("(detached)"));
            }
        }
        WorktreeCommand::Remove { branch, force } => println!("removed {}", cvm::worktree::remove(&here, &branch, force)?.display()),
    }
    Ok(())
}

fn config_command(command: ConfigCommand) -> ExitCode {
    match command {
        ConfigCommand::Show { path } => report(project_or_cwd(path).and_then(|project| {
            print!("{}", settings(Flags::default(), Some(&project))?.show());
            Ok(())
        })),
        ConfigCommand::Validate { file } => {
            let files = match file {
                Some(file) => vec![file],
                None => cvm::config::layer_files(&home_dir(), std::env::current_dir().ok().as_deref()),
            };
            if files.is_empty() {
                println!("no configuration files here (~/.cvm.toml, .cvm.toml)");
            }
            let mut failed = false;
            for file in files {
                match cvm::config::validate(&file, &home_dir()) {
                    Ok(()) => println!("{}: ok", file.display()),
                    Err(e) => {
                        eprintln!("{e:#}");
                        failed = true;
                    }
                }
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
    }
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

/// Writes `bytes` to stdout; a closed pipe (`| head`) is not an error.
fn print_quietly(bytes: &[u8]) -> ExitCode {
    let _ = std::io::Write::write_all(&mut std::io::stdout(), bytes);
    ExitCode::SUCCESS
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

fn info(path: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let project = project_or_cwd(path)?;
    let image = current_debian();
    let kernel = cvm::images::kernel(None);
    let template = image.as_deref().and_then(|i| cvm::template::find(&project, i));
    if json {
        let value = serde_json::json!({
            "project": project,
            "image": image,
            "kernel": kernel.as_ref().ok(),
            "template": template,
            "worktree_of": cvm::shares::main_repository(&project),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("project:  {}", project.display());
    println!("image:    {}", image.as_ref().map_or("debian: not built (cvm image build)".into(), |p| p.display().to_string()));
    println!("kernel:   {}", kernel.map_or_else(|e| e.to_string(), |p| p.display().to_string()));
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

/// `cvm start`: this command line again, as `cvm __vm-daemon`, in the background.
fn start(args: &StartArgs) -> anyhow::Result<()> {
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    cvm::named::spawn(&args.name, &argv)?;
    println!("{}", args.name);
    Ok(())
}

/// The daemon's `cvm start` command line, NUL-separated on its standard input.
fn daemon_command_line() -> anyhow::Result<Cli> {
    use std::io::Read;
    use std::os::unix::ffi::OsStringExt;
    const MAX: u64 = 1 << 20;
    let mut bytes = Vec::new();
    std::io::stdin().take(MAX + 1).read_to_end(&mut bytes)?;
    anyhow::ensure!(bytes.len() as u64 <= MAX, "the command line on standard input is over {MAX} bytes");
    let words = bytes.split(|b| *b == 0).filter(|w| !w.is_empty()).map(|w| OsString::from_vec(w.to_vec()));
    let cli = Cli::try_parse_from(std::iter::once(OsString::from("cvm")).chain(words))?;
    anyhow::ensure!(matches!(cli.command, Command::Start(_)), "__vm-daemon was given a command line that is not `cvm start`");
    Ok(cli)
}

/// `cvm __vm-daemon`: the session of a named VM, kept until stopped.
fn vm_daemon(args: &StartArgs) -> anyhow::Result<()> {
    let dir = cvm::named::state_dir(&args.name);
    let project = args.path.clone();
    let canonical = project.as_ref().and_then(|p| p.canonicalize().ok());
    let settings = settings(args.vm.flags(), canonical.as_deref())?;
    let mut config = session_config(&settings, &args.vm, args.forwards.request()?, project, true)?;
    // Its console is what `cvm logs NAME` shows: kernel and agent messages included.
    config.debug = true;
    if let (Some(project), cvm::images::Image::Disk(image)) = (&canonical, &config.image) {
        config.template = cvm::template::find(project, image);
    }
    let session = cvm::session::Session::start(&config, None)?;
    let info = cvm::named::VmInfo {
        name: args.name.clone(),
        pid: std::process::id(),
        project: canonical,
        engine: format!("{:?}", config.engine).to_lowercase(),
        started: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        console_log: session.console_log().to_path_buf(),
    };
    let result = cvm::named::serve(session, info, &dir);
    cvm::named::clear(&args.name);
    result
}

/// `cvm exec NAME [-- CMD]`: a shell by default.
fn vm_exec(name: &str, command: Vec<OsString>) -> anyhow::Result<u8> {
    let argv = if command.is_empty() { vec!["/bin/sh".into(), "-l".into()] } else { command };
    cvm::named::exec(name, cvm::run::exec_request(argv))
}

fn ps(json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let vms = cvm::named::list();
    // A closed pipe (`cvm ps | head`) ends the listing quietly.
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&vms)?);
        return Ok(());
    }
    let _ = writeln!(out, "{:<20} {:<8} {:<8} {:>8}  PROJECT", "NAME", "STATUS", "ENGINE", "PID");
    for vm in vms {
        let project = vm.info.project.as_ref().map_or("-".into(), |p| p.display().to_string());
        let _ = writeln!(out, "{:<20} {:<8} {:<8} {:>8}  {project}", vm.info.name, vm.status, vm.info.engine, vm.info.pid);
    }
    Ok(())
}

/// `cvm setup`: the flags' tools, packages and scripts on top of the configuration's.
fn setup(args: SetupArgs) -> anyhow::Result<u8> {
    let project = args.path.clone().unwrap_or_else(|| PathBuf::from(".")).canonicalize()?;
    let on = [("node", args.node), ("python", args.python), ("rust", args.rust), ("docker", args.docker), ("chromium", args.chromium), ("gh", args.gh), ("git", args.git), ("gpg", args.gpg)];
    let mut flags = args.vm.flags();
    flags.tools = on.iter().filter(|(_, on)| *on || args.all).map(|(name, _)| (name.to_string(), true)).collect();
    flags.packages = args.packages.clone();
    flags.setup_scripts = args.setup_scripts.clone();
    let settings = settings(flags, Some(&project))?;
    run_setup(&settings, &args.vm, &project)
}

/// One session on a scratch disk that becomes the project's template.
fn run_setup(settings: &Settings, vm: &VmArgs, project: &Path) -> anyhow::Result<u8> {
    use cvm::template;
    let packages = template::packages(&settings.tools_on(), &settings.packages.value);
    // The user's scripts, read here: ~/.cvm.setup.sh, then [setup] scripts and --setup-script,
    // then the project's.
    let own = [home_dir().join(template::HOME_SCRIPT)].into_iter().filter(|p| p.is_file());
    let project_script = [project.join(template::HOME_SCRIPT)].into_iter().filter(|p| p.is_file());
    let scripts = own
        .chain(settings.setup_scripts.value.iter().cloned())
        .chain(project_script)
        .map(|p| std::fs::read(&p).map_err(|e| anyhow::anyhow!("cannot read the setup script {}: {e}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut config = session_config(settings, vm, ForwardRequest::default(), Some(project.to_path_buf()), false)?;
    config.shares.mounts.extend(settings.setup_mounts.value.iter().cloned());
    let dir = template::dir_for(project);
    std::fs::create_dir_all(&dir)?;
    let layer = dir.join("layer.ext4.new");
    cvm::images::make_scratch_disk(&layer, template::LAYER_BYTES)?;
    config.scratch = Some(Scratch::Kept(layer.clone()));
    config.runtime = false;
    let argv = template::command(&packages, &scripts).into_iter().map(<OsString as std::os::unix::ffi::OsStringExt>::from_vec).collect();
    let code = cvm::run::run(&config, argv, settings.timeout.value, false);
    match code {
        Ok(0) => {
            let kept = template::keep(project, &layer, config.image.path())?;
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
        count_exits: args.timings,
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
                if let Some(exits) = &exit.exits {
                    eprintln!("{}", bench::format_exits(exits));
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        // clap checks this lazily, on the first use of each subcommand: check them all here.
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}
