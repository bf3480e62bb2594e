//! `cvm boot`: a kernel on cvm's VMM with the serial console on this terminal.

use super::*;

#[derive(clap::Args, Clone)]
pub(crate) struct BootArgs {
    /// Kernel: a vmlinux (PVH entry preferred) or a bzImage.
    #[arg(long, required_unless_present = "restore")]
    pub kernel: Option<PathBuf>,
    /// An initramfs (cpio).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; the VMM adds its devices' arguments.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    pub append: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    /// Guest memory: 512M, 2G, ... (a bare number is MiB).
    #[arg(long, default_value = "512M", value_parser = parse_memory_size)]
    pub memory: u64,
    /// Print how long the boot took to reach the guest's first instruction, the boot timer
    /// and the end, and KVM's count of VM exits by kind, on standard error.
    #[arg(long)]
    pub timings: bool,
    /// Give the guest a vsock device (CID 3) whose host side is this Unix socket, with
    /// Firecracker's protocol: connect and write `CONNECT <port>`; guest connections to port P
    /// reach PATH_P.
    #[arg(long, value_name = "PATH")]
    pub vsock: Option<PathBuf>,
    /// Write a snapshot of the VM to DIR when the guest reaches its init (writes the boot
    /// timer, as cvm-agent does), then let it run on.
    #[arg(long, value_name = "DIR", conflicts_with = "restore")]
    pub snapshot: Option<PathBuf>,
    /// Resume the snapshot in DIR instead of booting a kernel. --cpus, --memory and the devices
    /// (--vsock) must be those it was taken with.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd"])]
    pub restore: Option<PathBuf>,
}

/// Starts the embedded vsock backend for `cvm boot --vsock PATH` and wires its device.
pub(crate) fn start_vsock(path: &std::path::Path, config: &mut VmConfig) -> anyhow::Result<cvm_backends::vsock::VsockServer> {
    use anyhow::Context;
    let vhost_socket = PathBuf::from(format!("{}.vhost", path.display()));
    let listener =
        std::os::unix::net::UnixListener::bind(&vhost_socket).with_context(|| format!("cannot create {}", vhost_socket.display()))?;
    let server = cvm_backends::vsock::VsockServer::start(cvm::session::GUEST_CID, path, listener)
        .with_context(|| format!("cannot serve vsock on {}", path.display()))?;
    config.vhost_user.push(cvm_vmm::VhostUserConfig { socket: vhost_socket, kind: cvm_vmm::VhostUserKind::Vsock });
    Ok(server)
}

pub(crate) fn boot(args: &BootArgs, started: Instant) -> ExitCode {
    let mut config = VmConfig {
        initrd: args.initrd.clone(),
        cmdline: args.append.clone(),
        vcpus: args.cpus,
        memory_bytes: args.memory,
        count_exits: args.timings,
        pause_at_init: args.snapshot.is_some(),
        restore: args.restore.clone(),
        ..VmConfig::new(args.kernel.clone().unwrap_or_default())
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
    // In the VMM's jailed process, as in a session.
    let result =
        cvm::cvm_exe().map_err(cvm_vmm::Error::from).and_then(|exe| cvm_vmm::VmProcess::spawn(&exe, &config, started)).and_then(|vm| {
            if let Some(vhost) = config.vhost_user.first() {
                let _ = std::fs::remove_file(&vhost.socket); // connected: not needed any more
            }
            if let Some(dir) = &args.snapshot {
                snapshot_at_init(&vm, dir);
            }
            vm.wait()
        });
    match result {
        Ok(exit) => {
            if let Some(warning) = exit.stuck_warning() {
                eprintln!("cvm: warning: {warning}");
            }
            if args.timings {
                eprintln!("{}", format_timings(&exit.timings));
                if let Some(exits) = &exit.exits {
                    eprintln!("{}", format_exits(exits));
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

/// Waits for the guest to reach its init (the VM pauses there, see `VmConfig::pause_at_init`),
/// writes its snapshot to `dir` and lets it run on. A guest that ends first has no snapshot.
fn snapshot_at_init(handle: &cvm_vmm::VmProcess, dir: &std::path::Path) {
    while !handle.init_reached() {
        if handle.has_ended() {
            eprintln!("cvm: warning: the guest ended before it reached its init; no snapshot written");
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let started = Instant::now();
    match handle.snapshot(dir) {
        Ok(()) => eprintln!("cvm: snapshot written to {} in {:.1} ms", dir.display(), started.elapsed().as_secs_f64() * 1e3),
        Err(e) => eprintln!("cvm: warning: no snapshot: {e}"),
    }
}

/// Boot timings as `cvm boot --timings` prints them: the milestones on one line (which `cvm bench boot`
/// parses), then when each step of the VMM's set-up was done.
pub(crate) fn format_timings(t: &cvm_vmm::BootTimings) -> String {
    let ms = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1e3);
    let maybe_ms = |d: Option<Duration>| d.map_or("-".to_string(), ms);
    let setup: String = t.setup.iter().map(|(step, at)| format!(" {step} {}", ms(*at))).collect();
    format!(
        "cvm timings (ms from VMM start): first-instruction {} boot-timer {} exit {}\ncvm set-up (ms from VMM start, each step done):{setup}",
        maybe_ms(t.first_instruction),
        maybe_ms(t.boot_timer),
        ms(t.exit)
    )
}

/// Prefix of the line `cvm boot --timings` prints with KVM's exit counters.
pub(crate) const EXITS_PREFIX: &str = "cvm exits (all vCPUs):";

/// `cvm exits (all vCPUs): exits 1234 io_exits 56 ...`: every counter KVM has, by name.
pub(crate) fn format_exits(exits: &cvm_vmm::vstate::exit_stats::ExitCounts) -> String {
    let mut line = String::from(EXITS_PREFIX);
    for (name, n) in exits {
        line.push_str(&format!(" {name} {n}"));
    }
    line
}
