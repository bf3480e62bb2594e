//! `cvm bench boot`: the whole `cvm boot` process against QEMU's microvm on the same guest, in
//! one run, with paired runs so that both see the same machine noise.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cvm_vmm::BootTimings;

/// The printing micro-guest (tests/guests/hello.S), built by build.rs.
const HELLO_GUEST: &[u8] = include_bytes!(concat!(env!("CVM_MICRO_GUESTS"), "/hello.elf"));
const HELLO_LINE: &str = "cvm micro-guest: hello from the guest";

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Boot time: `cvm boot` against `qemu-system-x86_64 -M microvm` on the same kernel.
    Boot(BootBench),
}

#[derive(clap::Args)]
pub struct BootBench {
    /// Paired runs to measure (after one warm-up run of each).
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
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1 quiet cvm.boot_test")]
    append: String,
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Guest memory for both.
    #[arg(long, default_value = "256M")]
    memory: String,
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Boot(args) => boot(args),
    }
}

/// One-line boot timings, as `cvm boot --timings` prints them (and this bench parses them).
pub fn format_timings(t: &BootTimings) -> String {
    let ms = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.3}", d.as_secs_f64() * 1e3));
    format!(
        "cvm timings (ms from VMM start): first-instruction {} boot-timer {} exit {}",
        ms(t.first_instruction),
        ms(t.boot_timer),
        ms(Some(t.exit))
    )
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
/// it and its children, from the kernel's accounting.
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
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    let sample = Sample {
        wall,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    };
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
    let tmp = tempdir()?;
    let (kernel, expect) = match &args.kernel {
        Some(k) => (k.clone(), None),
        None => {
            let path = tmp.0.join("hello.elf");
            std::fs::write(&path, HELLO_GUEST)?;
            (path, Some(HELLO_LINE))
        }
    };
    let cvm = std::env::current_exe()?;
    let mut cvm_cmd = Command::new(&cvm);
    cvm_cmd.arg("boot").arg("--kernel").arg(&kernel).args(["--memory", &args.memory, "--timings"]);
    let mut qemu_cmd = Command::new(&args.qemu);
    qemu_cmd
        .args(["-M", "microvm", "-enable-kvm", "-m", &args.memory])
        .args(["-no-user-config", "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .arg("-kernel")
        .arg(&kernel);
    if let Some(initrd) = &args.initrd {
        cvm_cmd.arg("--initrd").arg(initrd);
        qemu_cmd.arg("-initrd").arg(initrd);
    }
    if args.kernel.is_some() {
        cvm_cmd.args(["--append", &args.append]);
        qemu_cmd.args(["-append", &args.append]);
    }

    let check = |name: &str, s: &Sample| -> Result<()> {
        if let Some(line) = expect {
            if !s.stdout.contains(line) {
                bail!("{name} did not print the guest's line; stdout: {:?}, stderr: {:?}", s.stdout, s.stderr);
            }
        }
        Ok(())
    };
    // One warm-up of each: page cache, first exec.
    check("cvm", &measure(&mut cvm_cmd)?)?;
    check("qemu", &measure(&mut qemu_cmd).context("QEMU reference (install qemu-system-x86: scripts/bootstrap)")?)?;

    let (mut cvm_wall, mut cvm_cpu, mut qemu_wall, mut qemu_cpu) = (vec![], vec![], vec![], vec![]);
    let (mut first, mut timer) = (vec![], vec![]);
    let mut progress = std::io::stderr();
    for i in 0..args.runs {
        let s = measure(&mut cvm_cmd)?;
        check("cvm", &s)?;
        if let Some((f, t)) = parse_timings(&s.stderr) {
            first.extend(f);
            timer.extend(t);
        }
        cvm_wall.push(ms(s.wall));
        cvm_cpu.push(ms(s.cpu));
        let q = measure(&mut qemu_cmd)?;
        check("qemu", &q)?;
        qemu_wall.push(ms(q.wall));
        qemu_cpu.push(ms(q.cpu));
        let _ = write!(progress, "\rbench boot: {}/{} paired runs", i + 1, args.runs);
    }
    let _ = writeln!(progress);

    let guest = args.kernel.as_deref().map_or("the printing micro-guest".to_string(), |k| k.display().to_string());
    println!("boot benchmark: {} paired runs of {guest}, {} of memory", args.runs, args.memory);
    println!("{:<34} {:>9} {:>9} {:>9}", "whole process (ms)", "min", "median", "max");
    let row = |name: &str, s: &Stats| println!("{name:<34} {:>9.2} {:>9.2} {:>9.2}", s.min, s.median, s.max);
    let (cw, cc, qw, qc) = (stats(cvm_wall), stats(cvm_cpu), stats(qemu_wall), stats(qemu_cpu));
    row("cvm boot, wall", &cw);
    row("qemu microvm, wall", &qw);
    row("cvm boot, CPU (user+sys)", &cc);
    row("qemu microvm, CPU (user+sys)", &qc);
    if !first.is_empty() {
        row("cvm: VMM start -> first instruction", &stats(first));
    }
    if !timer.is_empty() {
        row("cvm: VMM start -> boot timer", &stats(timer));
    }
    println!("ratio cvm/qemu, median wall: {:.2}x", cw.median / qw.median);
    println!("ratio cvm/qemu, median CPU:  {:.2}x", cc.median / qc.median);
    Ok(())
}

/// A private temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> Result<TempDir> {
    let base = std::env::temp_dir();
    for attempt in 0..100u32 {
        let path = base.join(format!("cvm-bench-{}-{attempt}", std::process::id()));
        match std::fs::create_dir(&path) {
            Ok(()) => return Ok(TempDir(path)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).context(format!("cannot create {}", Path::new(&path).display())),
        }
    }
    bail!("cannot create a temporary directory in {}", base.display())
}
