//! `cvm bench boot`: the whole `cvm boot` process against reference VMMs on the same guest
//! (QEMU's microvm, and Firecracker when given one), in one run, each in turn every round so
//! that all see the same machine noise; with KVM's count of the exits cvm's boot caused.
//!
//! `cvm bench run`: `cvm run --image minimal -- true` per engine, whole process and phases,
//! against the same kernel and image booted to init by bare QEMU in the same run.
//!
//! `cvm bench fs` (in `fs.rs`): file-system throughput of cvm's fs backend against virtiofsd
//! and the host.
//!
//! `cvm bench proxy` (in `proxy.rs`): the egress proxy's added latency per HTTPS request,
//! tunneled and with a secret swapped in.

mod fs;
mod proxy;

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cvm_agent::protocol::{BOOT_TEST_LINE, CMDLINE_BOOT_TEST};

use crate::cli::boot::EXITS_PREFIX;

/// The printing micro-guest (tests/guests/hello.S), built by build.rs.
const HELLO_GUEST: &[u8] = include_bytes!(concat!(env!("CVM_MICRO_GUESTS"), "/hello.elf"));
const HELLO_LINE: &str = "cvm micro-guest: hello from the guest";

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Boot time: `cvm boot` against `qemu-system-x86_64 -M microvm` (or Firecracker) on the
    /// same kernel.
    Boot(BootBench),
    /// Session time: `cvm run --image minimal -- true` per engine, with its phases.
    Run(RunBench),
    /// File-system throughput: cvm's fs backend against virtiofsd and the host, driven by the
    /// virtual guest.
    Fs(fs::FsBench),
    /// Egress proxy latency: an HTTPS request straight to a loopback server, tunneled through
    /// the proxy, and intercepted to swap a secret in.
    Proxy(proxy::ProxyBench),
}

#[derive(clap::Args)]
pub struct RunBench {
    /// Runs per engine (after one warm-up run).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Engines to measure (repeat the flag); default: every engine this host can run Linux on.
    #[arg(long = "vmm", value_enum)]
    engines: Vec<cvm_vmm::Engine>,
    /// Guest kernel (default: scripts/build-kernel's).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Image (default: minimal).
    #[arg(long, default_value = "minimal")]
    image: String,
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Sessions of each kind held at once for the memory rows (0: no memory rows).
    #[arg(long, default_value_t = 10)]
    sessions: usize,
}

#[derive(clap::Args)]
pub struct BootBench {
    /// Rounds to measure, each VMM once per round in turn (after one warm-up run of each).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Boot this kernel instead of the built-in printing micro-guest (with --initrd, a Linux
    /// whose init resets at once).
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line for --kernel (`cvm.boot_test`: cvm-agent resets the VM as soon as
    /// it runs, so the run measures boot to init).
    #[arg(long, default_value_t = boot_test_cmdline())]
    append: String,
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Measure this Firecracker binary too, as a second reference (`--no-api --config-file`,
    /// the same kernel, initrd, command line, vCPUs and memory).
    #[arg(long, value_name = "PATH")]
    firecracker: Option<PathBuf>,
    /// Guest memory for each VMM.
    #[arg(long, default_value = "256M")]
    memory: String,
    /// vCPUs for each VMM.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
}

/// Where a bench ran, for its report's header: results from different hosts differ.
pub struct HostFacts {
    cpu: String,
    cores: usize,
    kernel: String,
    nested: bool,
}

impl HostFacts {
    pub fn read() -> HostFacts {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
            .unwrap_or_else(|| "unknown CPU".into());
        let kernel =
            std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|k| k.trim().to_string()).unwrap_or_else(|_| "unknown".into());
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        HostFacts { cpu, cores, kernel, nested: std::env::var_os(NESTED_VARIABLE).is_some() }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "cpu": self.cpu, "cores": self.cores, "kernel": self.kernel, "nested_l1": self.nested })
    }
}

impl std::fmt::Display for HostFacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} cores), Linux {}", self.cpu, self.cores, self.kernel)?;
        if self.nested {
            f.write_str(", inside a nested L1 under TCG")?;
        }
        Ok(())
    }
}

/// A Linux boot measured to init: the base command line, quiet, with the agent told to print
/// its line and reset at once.
fn boot_test_cmdline() -> String {
    format!("{} quiet {CMDLINE_BOOT_TEST}", cvm_vmm::DEFAULT_CMDLINE)
}

/// The engines asked for, or every engine that runs Linux on this host (saying so when cvm's
/// cannot).
pub fn engines_or_every_one_here(asked: &[cvm_vmm::Engine], bench: &str) -> Vec<cvm_vmm::Engine> {
    if !asked.is_empty() {
        return asked.to_vec();
    }
    let hardware = cvm_vmm::host::open_kvm().is_ok() && !cvm_vmm::host::is_pvm();
    if !hardware {
        eprintln!("{bench}: the cvm engine is skipped: this host has no hardware KVM (PVM or none)");
        return vec![cvm_vmm::Engine::Qemu];
    }
    vec![cvm_vmm::Engine::Cvm, cvm_vmm::Engine::Qemu]
}

/// What an engine's guest CPU is on this host, for a report: times under TCG or in a nested
/// L1 compare servers, not hosts.
pub fn engine_label(engine: cvm_vmm::Engine, host: &HostFacts) -> String {
    match engine {
        cvm_vmm::Engine::Qemu => match cvm_vmm::qemu::Accel::for_this_host() {
            cvm_vmm::qemu::Accel::Kvm => "QEMU on KVM".into(),
            cvm_vmm::qemu::Accel::Tcg { .. } => "QEMU under TCG (guest CPU emulated)".into(),
        },
        cvm_vmm::Engine::Cvm if host.nested => "cvm's VMM in a nested L1 (guest CPU emulated)".into(),
        cvm_vmm::Engine::Cvm => "cvm's VMM on KVM".into(),
    }
}

/// Set by scripts/nested inside L1: times measured there mean nothing on their own.
const NESTED_VARIABLE: &str = "CVM_NESTED";

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Boot(args) => boot(args),
        BenchCommand::Run(args) => run_bench(args),
        BenchCommand::Fs(args) => fs::run(args),
        BenchCommand::Proxy(args) => proxy::run(args),
    }
}

/// The counters of a `cvm exits` line.
fn parse_exits(stderr: &str) -> Option<Vec<(String, u64)>> {
    let line = stderr.lines().find_map(|l| l.strip_prefix(EXITS_PREFIX))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    words.chunks(2).map(|pair| Some((pair.first()?.to_string(), pair.get(1)?.parse().ok()?))).collect()
}

fn parse_timings(stderr: &str) -> Option<(Option<f64>, Option<f64>)> {
    let line = stderr.lines().find(|l| l.starts_with("cvm timings"))?;
    let field = |name: &str| {
        let mut words = line.split_whitespace();
        words.find(|w| *w == name)?;
        words.next()?.parse::<f64>().ok()
    };
    Some((field("first-instruction"), field("boot-timer")))
}

struct Sample {
    wall: Duration,
    cpu: Duration,
    stdout: String,
    stderr: String,
}

/// Runs a command to completion, measuring its wall time and the CPU time (user + system) of
/// it, its children and the processes it left behind, from the kernel's accounting.
fn measure(cmd: &mut Command) -> Result<Sample> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let err_reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our unwaited child; status and usage point to live locals.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    if waited != pid {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    let tv = |t: &libc::rusage| {
        Duration::new(t.ru_utime.tv_sec as u64, t.ru_utime.tv_usec as u32 * 1000)
            + Duration::new(t.ru_stime.tv_sec as u64, t.ru_stime.tv_usec as u32 * 1000)
    };
    let mut cpu = tv(&usage);
    // Processes it left to finish its work (cvm's teardown helper), reparented to this one (a
    // subreaper): their CPU is its CPU, and they must be done before the next run starts.
    // SAFETY: as above, for any child; it fails with ECHILD once none is left.
    while unsafe { libc::wait4(-1, &mut status, 0, &mut usage) } > 0 {
        cpu += tv(&usage);
    }
    let sample = Sample { wall, cpu, stdout: out_reader.join().unwrap_or_default(), stderr: err_reader.join().unwrap_or_default() };
    let status = std::process::ExitStatus::from_raw(status);
    // The reaped child must not be waited for again by Child's drop.
    std::mem::forget(child);
    if !status.success() && status.code() != Some(1) {
        bail!("{cmd:?} failed ({status}): {}", sample.stderr.trim());
    }
    Ok(sample)
}

struct Stats {
    min: f64,
    median: f64,
    max: f64,
}

fn stats(mut values: Vec<f64>) -> Stats {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 };
    Stats { min: values[0], median, max: values[n - 1] }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn boot(args: BootBench) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let tmp = tempfile::tempdir()?;
    let (kernel, expect) = match &args.kernel {
        Some(k) => (k.clone(), None),
        None => {
            let path = tmp.path().join("hello.elf");
            std::fs::write(&path, HELLO_GUEST)?;
            (path, Some(HELLO_LINE))
        }
    };
    let cvm = cvm::cvm_exe()?;
    let mut cvm_cmd = Command::new(&cvm);
    cvm_cmd.arg("boot").arg("--kernel").arg(&kernel).args(["--memory", &args.memory, "--cpus", &args.cpus.to_string(), "--timings"]);
    if let Some(initrd) = &args.initrd {
        cvm_cmd.arg("--initrd").arg(initrd);
    }
    if args.kernel.is_some() {
        cvm_cmd.args(["--append", &args.append]);
    }
    let mut runners = vec![Runner::new("cvm boot", cvm_cmd), Runner::new("qemu microvm", qemu_command(&args, &kernel))];
    if let Some(firecracker) = &args.firecracker {
        runners.push(Runner::new("firecracker", firecracker_command(firecracker, &args, &kernel, tmp.path())?));
    }
    // A Linux whose init prints its line and resets: every VMM must have reached it.
    let expect = expect.or(args.append.split_whitespace().any(|w| w == CMDLINE_BOOT_TEST).then_some(BOOT_TEST_LINE));
    let check = |name: &str, s: &Sample| -> Result<()> {
        if let Some(line) = expect {
            if !s.stdout.contains(line) {
                bail!("{name} did not print the guest's line; stdout: {:?}, stderr: {:?}", s.stdout, s.stderr);
            }
        }
        Ok(())
    };
    // cvm's teardown helper outlives `cvm boot` by design: reparented here, its CPU is counted
    // and it is waited for between runs (see `measure`).
    // SAFETY: prctl with an integer argument changes only this process's own flag.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };

    // One warm-up of each (page cache, first exec), then the runs, each VMM in turn.
    for runner in &mut runners {
        let hint = match runner.name {
            "qemu microvm" => "the QEMU reference (install qemu-system-x86: scripts/bootstrap)",
            "firecracker" => "the Firecracker reference",
            _ => "cvm",
        };
        check(runner.name, &measure(&mut runner.command).context(hint)?)?;
    }
    let (mut first, mut timer) = (vec![], vec![]);
    let mut exits: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    let mut progress = std::io::stderr();
    for i in 0..args.runs {
        for runner in &mut runners {
            let s = measure(&mut runner.command)?;
            check(runner.name, &s)?;
            if runner.name == "cvm boot" {
                if let Some((f, t)) = parse_timings(&s.stderr) {
                    first.extend(f);
                    timer.extend(t);
                }
                for (name, n) in parse_exits(&s.stderr).unwrap_or_default() {
                    exits.entry(name).or_default().push(n as f64);
                }
            }
            runner.wall.push(ms(s.wall));
            runner.cpu.push(ms(s.cpu));
        }
        let _ = write!(progress, "\rbench boot: {}/{} rounds", i + 1, args.runs);
    }
    let _ = writeln!(progress);

    let guest = args.kernel.as_deref().map_or("the printing micro-guest".to_string(), |k| k.display().to_string());
    let names: Vec<&str> = runners.iter().map(|r| r.name).collect();
    println!(
        "boot benchmark: {} rounds of {guest}, {} vCPU(s), {} of memory: {} in turn",
        args.runs,
        args.cpus,
        args.memory,
        names.join(", ")
    );
    if std::env::var_os(NESTED_VARIABLE).is_some() {
        println!("measured nested, in L1 (QEMU's TCG emulating AMD SVM): absolute times mean nothing here, the ratios do");
    }
    println!("{:<40} {:>9} {:>9} {:>9}", "whole process (ms)", "min", "median", "max");
    let row = |name: &str, s: &Stats| println!("{name:<40} {:>9.2} {:>9.2} {:>9.2}", s.min, s.median, s.max);
    let measured: Vec<(&str, Stats, Stats)> = runners.into_iter().map(|r| (r.name, stats(r.wall), stats(r.cpu))).collect();
    for (name, wall, _) in &measured {
        row(&format!("{name}, wall"), wall);
    }
    for (name, _, cpu) in &measured {
        row(&format!("{name}, CPU (user+sys)"), cpu);
    }
    if !first.is_empty() {
        row("cvm: VMM start -> first instruction", &stats(first));
    }
    if !timer.is_empty() {
        row("cvm: VMM start -> boot timer", &stats(timer));
    }
    let (_, cvm_wall, cvm_cpu) = &measured[0];
    for (name, wall, cpu) in &measured[1..] {
        let short = name.split_whitespace().next().unwrap_or(name);
        println!("ratio cvm/{short}, median wall: {:.2}x", cvm_wall.median / wall.median);
        println!("ratio cvm/{short}, median CPU:  {:.2}x", cvm_cpu.median / cpu.median);
    }
    if !exits.is_empty() {
        println!("cvm: VM exits per boot, all vCPUs (KVM's counters; min / median / max)");
        for (name, values) in exits.into_iter().filter(|(_, v)| v.iter().any(|&n| n > 0.0)) {
            let s = stats(values);
            println!("  {name:<38} {:>9.0} {:>9.0} {:>9.0}", s.min, s.median, s.max);
        }
    }
    Ok(())
}

/// One VMM in the boot race: how to run it, and its samples.
struct Runner {
    name: &'static str,
    command: Command,
    wall: Vec<f64>,
    cpu: Vec<f64>,
}

impl Runner {
    fn new(name: &'static str, command: Command) -> Runner {
        Runner { name, command, wall: Vec::new(), cpu: Vec::new() }
    }
}

/// QEMU's microvm on hardware KVM, the guest's end through its debug-exit port or a reset.
fn qemu_command(args: &BootBench, kernel: &Path) -> Command {
    let mut qemu = Command::new(&args.qemu);
    qemu.args(["-M", "microvm", "-enable-kvm", "-m", &args.memory, "-smp", &args.cpus.to_string()])
        .args(["-no-user-config", "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .arg("-kernel")
        .arg(kernel);
    if let Some(initrd) = &args.initrd {
        qemu.arg("-initrd").arg(initrd);
    }
    if args.kernel.is_some() {
        qemu.args(["-append", &args.append]);
    }
    qemu
}

/// Firecracker without its API, from a configuration file in `dir` describing the same VM.
fn firecracker_command(binary: &Path, args: &BootBench, kernel: &Path, dir: &Path) -> Result<Command> {
    let mib = cvm_vmm::parse_memory_size(&args.memory).map_err(anyhow::Error::msg)? >> 20;
    let mut boot = serde_json::json!({ "kernel_image_path": kernel, "boot_args": args.append });
    if let Some(initrd) = &args.initrd {
        boot["initrd_path"] = serde_json::json!(initrd);
    }
    let config = serde_json::json!({
        "boot-source": boot,
        "drives": [],
        "machine-config": { "vcpu_count": args.cpus, "mem_size_mib": mib },
    });
    let path = dir.join("firecracker.json");
    std::fs::write(&path, config.to_string())?;
    let mut firecracker = Command::new(binary);
    firecracker.arg("--no-api").arg("--config-file").arg(path).args(["--level", "Error"]);
    Ok(firecracker)
}

fn p90(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() * 9).div_ceil(10)).saturating_sub(1).min(v.len() - 1)]
}

/// Whether the `--timings` line says the guest was restored (`start warm`) or booted.
fn parse_run_start(stderr: &str) -> Option<bool> {
    let line = stderr.lines().find(|l| l.starts_with(cvm::session::run::TIMINGS_PREFIX))?;
    match line.split_whitespace().skip_while(|w| *w != "start").nth(1)? {
        "warm" => Some(true),
        "cold" => Some(false),
        _ => None,
    }
}

/// Refuses a row whose session did not start as its name says: a "warm" one that booted
/// (no snapshot could be written, say) would measure a cold start under the wrong name.
fn check_start(name: &str, warm: bool, restored: Option<bool>) -> Result<()> {
    match restored {
        Some(restored) if restored == warm => Ok(()),
        Some(restored) => bail!(
            "{name}: the session was {} (is {} writable?)",
            if restored { "restored" } else { "booted" },
            cvm::session::warm::snapshots_dir().display()
        ),
        None => bail!("{name}: cvm did not say how the session started"),
    }
}

fn parse_run_timings(stderr: &str) -> Option<Vec<f64>> {
    let line = stderr.lines().find(|l| l.starts_with(cvm::session::run::TIMINGS_PREFIX))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    cvm::session::run::TIMING_PHASES
        .iter()
        .map(|name| words.iter().position(|w| w == name).and_then(|i| words.get(i + 1)?.parse().ok()))
        .collect()
}

/// Starts `cmd` and returns how long it took to print `line`; then kills it.
fn time_to_line(cmd: &mut Command, line: &str) -> Result<Duration> {
    use std::io::BufRead;
    let start = Instant::now();
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    let mut reader = std::io::BufReader::new(child.stdout.take().expect("piped"));
    let mut text = String::new();
    let found = loop {
        text.clear();
        if reader.read_line(&mut text)? == 0 {
            break None;
        }
        if text.contains(line) {
            break Some(start.elapsed());
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    found.with_context(|| format!("{cmd:?} never printed {line:?}"))
}

fn run_bench(args: RunBench) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let kernel = cvm::project::images::kernel(args.kernel.clone())?;
    let image = cvm::project::images::image(&args.image)?;
    let engines = engines_or_every_one_here(&args.engines, "bench run");
    let cvm = cvm::cvm_exe()?;
    // The reference: the same kernel and image booted to init by bare QEMU, no cvm around it,
    // timed to the init's line on the console (then QEMU is killed: its power-off under TCG
    // is slower than the boot and not part of what is compared).
    let mut vm = cvm_vmm::VmConfig { cmdline: boot_test_cmdline(), vcpus: 2, serial_input: false, ..cvm_vmm::VmConfig::new(&kernel) };
    image.configure(&mut vm);
    // Without QEMU (as inside L1), the same kernel and initramfs booted by a bare `cvm boot`.
    let qemu_here =
        Command::new(&args.qemu).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    // A disk image without QEMU has none: cvm's rows are still measured against each other.
    let mut reference = match (&image, qemu_here) {
        (_, true) => {
            let mut qemu = Command::new(&args.qemu);
            qemu.args(cvm_vmm::qemu::arguments(&vm, cvm_vmm::qemu::Accel::for_this_host()));
            Some(("bare QEMU", qemu))
        }
        (cvm::project::images::Image::Initramfs(initrd), false) => {
            let mut boot = Command::new(&cvm);
            boot.arg("boot").arg("--kernel").arg(&kernel).arg("--initrd").arg(initrd);
            boot.args(["--cpus", &vm.vcpus.to_string(), "--memory", "512M", "--append", &vm.cmdline]);
            Some(("bare cvm boot (no QEMU here)", boot))
        }
        (cvm::project::images::Image::Disk(_), false) => {
            eprintln!("bench run: no reference: {} is missing, and a disk image cannot be booted bare", args.qemu);
            None
        }
    };
    // Each engine's starts (see `starts`).
    let mut commands: Vec<(String, Start, Command)> = engines
        .iter()
        .flat_map(|engine| {
            let name = format!("{engine:?}").to_lowercase();
            starts(*engine)
                .iter()
                .map(|&start| {
                    let mut c = Command::new(&cvm);
                    c.args(["run", "--vmm", &name, "--timings", "--kernel"]).arg(&kernel).arg("--image").arg(&args.image);
                    if start == Start::Cold {
                        c.arg("--cold");
                    }
                    c.args(["--", "true"]);
                    (format!("--vmm {name}, {}", start.label()), start, c)
                })
                .collect::<Vec<_>>()
        })
        .collect();
    // Named VMs, one per engine, started once: an exec into a running VM is what `cvm exec`
    // costs against a whole `cvm run`.
    let named: Vec<NamedVm> = engines
        .iter()
        .map(|engine| NamedVm::start(&cvm, &format!("{engine:?}").to_lowercase(), false, &kernel, &args.image))
        .collect::<Result<_>>()?;
    let mut execs: Vec<(String, Command)> = named.iter().map(|vm| (vm.engine.clone(), vm.exec_true())).collect();
    let mut exec_walls: Vec<Vec<f64>> = vec![Vec::new(); execs.len()];
    let mut walls: Vec<Vec<f64>> = vec![Vec::new(); commands.len()];
    let mut cpus: Vec<Vec<f64>> = vec![Vec::new(); commands.len()];
    let mut reference_walls = Vec::new();
    let mut phases: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); cvm::session::run::TIMING_PHASES.len()]; commands.len()];
    let check = |name: &str, s: &Sample, want: &str| -> Result<()> {
        if !s.stdout.contains(want) && !s.stderr.contains(want) {
            bail!("{name} did not finish as expected; stdout: {:?}, stderr: {:?}", s.stdout, s.stderr);
        }
        Ok(())
    };
    // Warm-up: page cache, first exec.
    for (name, _, c) in commands.iter_mut() {
        check(name, &measure(c)?, cvm::session::run::TIMINGS_PREFIX)?;
    }
    for (name, c) in execs.iter_mut() {
        let s = measure(c)?;
        if !s.stderr.is_empty() {
            bail!("cvm exec on {name} failed: {:?}", s.stderr);
        }
    }
    if let Some((_, reference)) = &mut reference {
        time_to_line(reference, BOOT_TEST_LINE)?;
    }
    let mut progress = std::io::stderr();
    for i in 0..args.runs {
        for (index, (name, start, c)) in commands.iter_mut().enumerate() {
            let s = measure(c)?;
            let Some(t) = parse_run_timings(&s.stderr) else { bail!("{name}: no timings in {:?}", s.stderr) };
            check_start(name, *start == Start::Warm, parse_run_start(&s.stderr))?;
            for (phase, value) in t.into_iter().enumerate() {
                phases[index][phase].push(value);
            }
            walls[index].push(ms(s.wall));
            cpus[index].push(ms(s.cpu));
        }
        for (index, (_, c)) in execs.iter_mut().enumerate() {
            exec_walls[index].push(ms(measure(c)?.wall));
        }
        if let Some((_, reference)) = &mut reference {
            reference_walls.push(ms(time_to_line(reference, BOOT_TEST_LINE)?));
        }
        let _ = write!(progress, "\rbench run: {}/{} rounds", i + 1, args.runs);
    }
    let _ = writeln!(progress);

    println!("run benchmark: `cvm run --image {} -- true`, {} runs per engine, 512M, 2 vCPUs", args.image, args.runs);
    if std::env::var_os(NESTED_VARIABLE).is_some() {
        println!("measured nested, in L1 (QEMU's TCG emulating AMD SVM): absolute times mean nothing here, the ratios do");
    }
    println!("{:<44} {:>9} {:>9} {:>9}", "(ms)", "min", "median", "p90");
    let row = |name: &str, v: &[f64]| {
        let s = stats(v.to_vec());
        println!("{name:<44} {:>9.1} {:>9.1} {:>9.1}", s.min, s.median, p90(v));
    };
    for (index, (name, _, _)) in commands.iter().enumerate() {
        row(&format!("cvm run {name}: wall"), &walls[index]);
        row(&format!("cvm run {name}: CPU (user+sys)"), &cpus[index]);
        for (phase, values) in cvm::session::run::TIMING_PHASES.iter().zip(&phases[index]) {
            row(&format!("  phase: {phase}"), values);
        }
    }
    for (index, (name, _)) in execs.iter().enumerate() {
        row(&format!("cvm exec into a running VM ({name}), wall"), &exec_walls[index]);
    }
    if let Some((reference_name, _)) = &reference {
        row(&format!("reference: {reference_name} to the init's line, wall"), &reference_walls);
        let reference_median = stats(reference_walls).median;
        for (index, (name, _, _)) in commands.iter().enumerate() {
            let run_median = stats(walls[index].clone()).median;
            println!("ratio cvm run {name} / reference, median wall: {:.2}x", run_median / reference_median);
        }
    }
    let median_of = |name: &str| commands.iter().position(|(n, _, _)| n == name).map(|i| stats(walls[i].clone()).median);
    for (index, (engine, _)) in execs.iter().enumerate() {
        if let Some(cold) = median_of(&format!("--vmm {engine}, cold")) {
            println!(
                "ratio cvm exec ({engine}) / cvm run --vmm {engine} cold, median wall: {:.3}x",
                stats(exec_walls[index].clone()).median / cold
            );
        }
    }
    if let (Some(warm), Some(cold)) = (median_of("--vmm cvm, warm"), median_of("--vmm cvm, cold")) {
        println!("ratio cvm run warm / cold (cvm's VMM), median wall: {:.3}x", warm / cold);
    }
    // The warm start's own figure: from the VM starting to a guest ready for commands.
    let boot_median = |name: &str| {
        let (index, phase) =
            (commands.iter().position(|(n, _, _)| n == name)?, cvm::session::run::TIMING_PHASES.iter().position(|p| *p == "boot")?);
        Some(stats(phases[index][phase].clone()).median)
    };
    if let (Some(warm), Some(cold)) = (boot_median("--vmm cvm, warm"), boot_median("--vmm cvm, cold")) {
        println!("ratio cvm run warm / cold (cvm's VMM), median boot phase (VM start to agent set up): {:.3}x", warm / cold);
    }
    drop(named);
    if args.sessions > 0 {
        sessions_memory(&args, &cvm, &kernel, &engines)?;
    }
    Ok(())
}

/// How a measured session starts: booted (`--cold`), or restored from the warm-start snapshot
/// that an earlier session left.
#[derive(Clone, Copy, PartialEq)]
enum Start {
    Cold,
    Warm,
}

impl Start {
    fn label(self) -> &'static str {
        match self {
            Start::Cold => "cold",
            Start::Warm => "warm",
        }
    }
}

/// The starts `cvm bench run` measures on `engine`: cvm's VMM both ways; QEMU never restores.
fn starts(engine: cvm_vmm::Engine) -> &'static [Start] {
    match engine {
        cvm_vmm::Engine::Cvm => &[Start::Cold, Start::Warm],
        cvm_vmm::Engine::Qemu => &[Start::Cold],
    }
}

/// The memory rows: for each kind of start, `--sessions` named VMs held at once, each having
/// run one command, and what they hold between them.
fn sessions_memory(args: &RunBench, cvm: &Path, kernel: &Path, engines: &[cvm_vmm::Engine]) -> Result<()> {
    let sessions = args.sessions;
    println!("memory: {sessions} sessions of each kind at once, what each holds alone: its processes' anonymous memory, and its memory files (the guest's RAM) counted once; shared code and page cache left out");
    println!("{:<44} {:>9} {:>12} {:>16} {:>16}", "(MiB)", "total", "per session", "guest RAM each", "anonymous each");
    let mut totals = Vec::new();
    for engine in engines {
        let name = format!("{engine:?}").to_lowercase();
        for &start in starts(*engine) {
            let (cold, start) = (start == Start::Cold, start.label());
            if !cold {
                // One started and removed first leaves the snapshot the others restore.
                drop(NamedVm::start(cvm, &name, cold, kernel, &args.image)?);
            }
            let mut vms = Vec::new();
            for i in 0..sessions {
                let vm =
                    NamedVm::start(cvm, &name, cold, kernel, &args.image).with_context(|| format!("session {} of {sessions}", i + 1))?;
                if *engine == cvm_vmm::Engine::Cvm {
                    check_start(&format!("--vmm {name}, {start}, {}", vm.name), !cold, Some(vm.restored()))?;
                }
                vms.push(vm);
                let _ = write!(std::io::stderr(), "\rbench run: memory, --vmm {name}, {start}: {}/{sessions} sessions", i + 1);
            }
            let _ = writeln!(std::io::stderr());
            let (mut files, mut anonymous) = (0, 0);
            for vm in &vms {
                let s = measure(&mut vm.exec_true())?;
                if !s.stderr.is_empty() {
                    bail!("cvm exec on {}: {:?}", vm.name, s.stderr);
                }
                let held = session_memory(cvm::session::named::find(&vm.name)?.pid)?;
                files += held.memory_files_kib;
                anonymous += held.anonymous_kib;
            }
            let each = |kib: u64| kib as f64 / 1024.0 / sessions as f64;
            let total = (files + anonymous) as f64 / 1024.0;
            println!(
                "{:<44} {total:>9.1} {:>12.1} {:>16.1} {:>16.1}",
                format!("--vmm {name}, {start}"),
                total / sessions as f64,
                each(files),
                each(anonymous)
            );
            totals.push((format!("--vmm {name}, {start}"), total));
        }
    }
    let total_of = |name: &str| totals.iter().find(|(n, _)| n == name).map(|(_, t)| *t);
    if let (Some(warm), Some(cold)) = (total_of("--vmm cvm, warm"), total_of("--vmm cvm, cold")) {
        println!("ratio memory of {sessions} warm / {sessions} cold sessions (cvm's VMM): {:.3}x", warm / cold);
    }
    Ok(())
}

/// What a session holds that no other session shares. Program text and the page cache are
/// shared by every session and left out.
struct SessionMemory {
    /// The memory files its processes hold open (the guest's RAM, a memfd that the VMM or
    /// QEMU and the backends all map), each counted once.
    memory_files_kib: u64,
    /// The anonymous memory of its processes (a private copy-on-write mapping's copies too).
    anonymous_kib: u64,
}

/// [`SessionMemory`] of the session whose daemon is `daemon`: it and every process under it.
fn session_memory(daemon: u32) -> Result<SessionMemory> {
    let mut memory_files = std::collections::HashSet::new();
    let mut held = SessionMemory { memory_files_kib: 0, anonymous_kib: 0 };
    for pid in process_tree(daemon) {
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("process {pid} of the session ended"))?;
        held.anonymous_kib += status_kib(&status, "RssAnon:").with_context(|| format!("no RssAnon in /proc/{pid}/status"))?;
        // A sandboxed backend's descriptors may be closed to this process: the VMM or QEMU
        // holds the guest's RAM too.
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in fds.flatten() {
            if !std::fs::read_link(fd.path()).is_ok_and(|target| target.to_string_lossy().starts_with("/memfd:")) {
                continue;
            }
            if let Ok(meta) = std::fs::metadata(fd.path()) {
                if memory_files.insert((std::os::unix::fs::MetadataExt::dev(&meta), std::os::unix::fs::MetadataExt::ino(&meta))) {
                    // A memory file's allocated blocks are the pages it holds.
                    held.memory_files_kib += std::os::unix::fs::MetadataExt::blocks(&meta) / 2;
                }
            }
        }
    }
    Ok(held)
}

/// A `NAME:   123 kB` line's value in /proc/PID/status.
fn status_kib(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix(name))?.trim().strip_suffix("kB")?.trim().parse().ok()
}

/// `root` and every process under it, from each process's parent in /proc/PID/stat.
fn process_tree(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // After the command's name in parentheses: the state, then the parent.
            let parent = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, parent))
        })
        .collect();
    let mut tree = vec![root];
    let mut next = 0;
    while let Some(&pid) = tree.get(next) {
        tree.extend(parents.iter().filter(|(_, parent)| *parent == pid).map(|(child, _)| *child));
        next += 1;
    }
    tree
}

/// A named VM the benchmark starts, and removes however it ends.
struct NamedVm {
    cvm: PathBuf,
    name: String,
    engine: String,
}

impl NamedVm {
    /// Starts a VM on `engine`, booted (`cold`) or as it would start (restored where it can).
    fn start(cvm: &Path, engine: &str, cold: bool, kernel: &Path, image: &str) -> Result<NamedVm> {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let name = format!("bench-{engine}-{}-{}", std::process::id(), STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let mut start = Command::new(cvm);
        start.args(["start", "--name", &name, "--vmm", engine, "--kernel"]).arg(kernel).args(["--image", image]);
        if cold {
            start.arg("--cold");
        }
        // Its daemon logs whether it restored the guest (see `NamedVm::restored`).
        let out = start.env("CVM_LOG", "cvm=info").output()?;
        if !out.status.success() {
            bail!("cvm start --vmm {engine}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(NamedVm { cvm: cvm.to_path_buf(), name, engine: engine.to_string() })
    }

    /// Whether its daemon restored the guest from a warm-start snapshot, from its log.
    fn restored(&self) -> bool {
        let Ok(dir) = cvm::session::named::state_dir(&self.name) else { return false };
        std::fs::read_to_string(dir.join(cvm::session::named::DAEMON_LOG)).is_ok_and(|log| log.contains(cvm::session::warm::RESTORED))
    }

    fn exec_true(&self) -> Command {
        let mut c = Command::new(&self.cvm);
        c.args(["exec", &self.name, "--", "true"]);
        c
    }
}

impl Drop for NamedVm {
    fn drop(&mut self) {
        let _ = Command::new(&self.cvm).args(["rm", &self.name]).output();
    }
}

#[cfg(test)]
mod tests;
