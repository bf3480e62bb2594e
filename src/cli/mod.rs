//! The command line: clap's definition of every command, and each command family's handler
//! in its own file. The launch step, where flags and configuration become a session, is
//! `launch`; everything else is a thin call into the `cvm` library.

pub(crate) mod boot;
mod config;
mod image;
mod launch;
mod named;
mod run;
mod snapshot;
mod templates;
mod worktree;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use cvm::config::keys::parse_duration;
use cvm::config::{Flags, Settings, Source, VmmChoice};
use cvm::guest::shares::{parse_mount_spec, MountSpec, ShareRequest, CLAUDE_DEFAULT_ITEMS};
use cvm::host::environment::Environment;
use cvm::network::egress::{EgressPolicy, NetworkMode};
use cvm::network::forward::ForwardRequest;
use cvm::session::run::EXIT_CVM_FAILED;
use cvm::session::{Scratch, SessionConfig};
use cvm_vmm::{parse_memory_size, VmConfig, DEFAULT_CMDLINE};

#[cfg(feature = "bench")]
use crate::bench;
use boot::*;
use config::*;
use image::*;
use launch::*;
use named::*;
use run::*;
use templates::*;
use worktree::*;

#[derive(Parser)]
#[command(
    name = "cvm",
    version,
    about = "A microVM sandbox for coding agents",
    after_help = "cvm \"PROMPT\" is `cvm run` with Claude Code given that prompt, in the current directory."
)]
#[command(allow_external_subcommands = true)]
pub(crate) struct Cli {
    /// Log what cvm and the VMM do (repeat for more; CVM_LOG=debug does the same), and show
    /// the guest's console when a session ends, as --debug does.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Pass the guest's output to this terminal as it is: without it, escape sequences that
    /// act outside the terminal (OSC 52 clipboard writes, title and state reports, DCS
    /// strings) are dropped from what reaches a terminal.
    #[arg(long, global = true)]
    pub raw_terminal: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
    /// Remove every template and every warm-start snapshot.
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
    Stop { name: String },
    /// Remove a named VM at once, running or not, with everything it owned.
    Rm { name: String },
    /// Build, list and remove the cached root images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// List and remove the warm-start snapshots (cvm's VMM restores sessions from them).
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Git worktrees beside the main checkout, one per branch (`cvm run --worktree BRANCH`).
    #[command(subcommand)]
    Worktree(WorktreeCommand),
    /// Check this host: /dev/kvm, the kernel and images, the host tools; says how to fix each
    /// problem. Exits 1 if `cvm run` cannot work.
    Doctor,
    /// Trust a project's own .cvm.toml as it is now. The guest can rewrite that file, so the
    /// settings in it that widen the sandbox (mounts, an open network, allowed hosts, host
    /// files read into the guest) apply only once trusted, and again after each change.
    Trust {
        /// The project, or its .cvm.toml (default: the current directory).
        path: Option<PathBuf>,
        /// Forget the trust instead.
        #[arg(long)]
        revoke: bool,
    },
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
    #[cfg(feature = "bench")]
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

pub(crate) fn main() -> ExitCode {
    let started = Instant::now();
    if std::env::args_os().nth(1).is_some_and(|arg| arg == cvm_vmm::process::VMM_COMMAND) {
        // Internal: cvm's VMM in its jailed process, started by cvm itself (its control socket
        // on fd 3).
        init_logging(0);
        cvm_vmm::process::serve();
    }
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
    cvm::host::terminal::escapes::set_raw_output(cli.raw_terminal);
    match cli.command {
        Command::Boot(args) => boot(&args, started),
        Command::Run(args) => run(&args, prompt),
        Command::List { disk_usage, unused } => report(list_templates(disk_usage, unused)),
        Command::Info { path, json } => report(info(path, json)),
        Command::Clean { path, yes } => report(clean(path, yes)),
        Command::CleanAll { yes } => report(clean_all(yes)),
        Command::Setup(args) => session_exit(setup(args)),
        Command::Shell(args) => run(
            &RunArgs {
                path: args.path,
                vm: args.vm,
                forwards: args.forwards,
                timings: false,
                auto_setup: false,
                worktree: None,
                command: vec!["/bin/sh".into(), "-l".into()],
            },
            Vec::new(),
        ),
        Command::Logs { name, network: _, follow } => match name {
            Some(name) => report(cvm::session::named::copy_console(
                &name,
                follow,
                &mut std::io::stdout(),
                cvm::host::terminal::escapes::EscapeFilter::for_fd(rustix::stdio::stdout()),
            )),
            None => {
                let path = cvm::network::egress::audit_log_path();
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
        Command::Exec { name, command } => session_exit(vm_exec(&name, command)),
        Command::Ps { json } => report(ps(json)),
        Command::Stop { name } => report(cvm::session::named::stop(&name, false)),
        Command::Rm { name } => report(cvm::session::named::stop(&name, true)),
        Command::Config(command) => config_command(command),
        Command::Trust { path, revoke } => report(trust(path, revoke)),
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
        Command::Image(command) => exit_code(image_command(command)),
        Command::Snapshot(command) => exit_code(snapshot::snapshot_command(command)),
        #[cfg(feature = "bench")]
        Command::Bench(command) => report(bench::run(command)),
        Command::Prompt(_) => unreachable!("a prompt became `cvm run` above"),
        Command::FsBackend { args } => match fs_backend(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cvm fs backend: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Janitor { dir } => report(cvm::session::rundir::janitor_main(&dir)),
    }
}

/// Writes `bytes` to stdout; a closed pipe (`| head`) is not an error.
pub(crate) fn print_quietly(bytes: &[u8]) -> ExitCode {
    let _ = std::io::Write::write_all(&mut std::io::stdout(), bytes);
    ExitCode::SUCCESS
}

/// Exit status of a command that only prints: 0, or 1 with the error.
pub(crate) fn report(result: anyhow::Result<()>) -> ExitCode {
    exit_code(result.map(|()| ExitCode::SUCCESS))
}

/// A command's own exit code, or its error said and a failure.
pub(crate) fn exit_code(result: anyhow::Result<ExitCode>) -> ExitCode {
    result.unwrap_or_else(|e| {
        eprintln!("cvm: {e:#}");
        ExitCode::FAILURE
    })
}

/// A command that ran something in a guest: its exit status, or cvm's own failure status
/// ([`EXIT_CVM_FAILED`]) with the terminal given back.
pub(crate) fn session_exit(result: anyhow::Result<u8>) -> ExitCode {
    result.map(ExitCode::from).unwrap_or_else(|e| {
        cvm::host::terminal::restore();
        eprintln!("cvm: {e:#}");
        ExitCode::from(EXIT_CVM_FAILED)
    })
}

/// `cvm __fs-backend ARGS`: one share's server, in its own process and sandbox.
pub(crate) fn fs_backend(args: Vec<OsString>) -> anyhow::Result<()> {
    let share = cvm_backends::fs::ShareConfig::from_args(args).map_err(anyhow::Error::msg)?;
    cvm_backends::fs::serve(cvm_backends::fs::inherited_listener()?, &share)?;
    Ok(())
}

pub(crate) fn init_logging(verbose: u8) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        // clap checks this lazily, on the first use of each subcommand: check them all here.
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}
