//! `cvm`: the command line, a thin layer over the `cvm-vmm` library.

mod bench;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use cvm_vmm::{parse_memory_size, Vm, VmConfig, DEFAULT_CMDLINE};

#[derive(Parser)]
#[command(name = "cvm", version, about = "A microVM sandbox for coding agents")]
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
    /// Measure cvm against references.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
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
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match cli.command {
        Command::Boot(args) => boot(&args, started),
        Command::Bench(command) => match bench::run(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cvm: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
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

fn boot(args: &BootArgs, started: Instant) -> ExitCode {
    let config = VmConfig {
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        cmdline: args.append.clone(),
        vcpus: args.cpus,
        memory_bytes: args.memory,
        ..VmConfig::new(&args.kernel)
    };
    let result = Vm::create(&config, started).and_then(Vm::run);
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
