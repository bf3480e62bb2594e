//! `cvm bench fs`: file-system throughput, in two settings.
//!
//! - At the server level (the default): the virtual guest (the FUSE driver the fs tests use,
//!   through cvm's vhost-user frontend and vrings in shared memory) drives cvm's own fs backend
//!   process and then `virtiofsd` (the reference, installed from crates.io) on the same files,
//!   and the host does the same work natively (the limit), all in one run. The driver and the
//!   servers share one CPU unless `--no-pin`: each request is a wake-up of the other side, and
//!   where the scheduler puts the two sides (on this PVM host a cross-CPU wake-up costs more
//!   than the request) otherwise decides the result, and changes with the targets' order.
//! - Inside a guest (`--in-vm`), on each engine: the same workloads, run by the agent
//!   (`cvm-agent bench-fs`), on the project share served by cvm's backend, on the same
//!   directory served by virtiofsd to the same guest, and on the guest's own tmpfs; plus a
//!   `git checkout` and a `git status` of a generated project and a compile-like job on it.
//!
//! Each workload runs `--rounds` times per target, the targets in turn; the tables show medians.

mod in_vm;

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cvm_agent::fs_workloads::{self, Sizes, Workload, BIG_FILE, TREE};
use cvm_backends::fs::{FsBackend, Policy, ShareConfig};
use cvm_virtual_guest::fuse::{FuseGuest, MAX_PAYLOAD, ROOT};
use cvm_vmm::Engine;

#[derive(clap::Args)]
pub struct FsBench {
    /// Size of the file read and written sequentially: 1G, 256M, ...
    #[arg(long, default_value = "1G", value_parser = cvm_vmm::parse_memory_size)]
    size: u64,
    /// Random 4 KiB reads of that file.
    #[arg(long, default_value_t = 20_000)]
    random_reads: usize,
    /// Files created, stat'ed and removed.
    #[arg(long, default_value_t = 10_000)]
    files: usize,
    /// Files in the tree that is walked (in directories of 500).
    #[arg(long, default_value_t = 50_000)]
    tree: usize,
    /// Times each workload runs per target.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// The reference server; left out, with a note, when it cannot be run.
    #[arg(long, default_value = "virtiofsd")]
    virtiofsd: String,
    /// Where the files go (default: a new directory under the system's temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print the results as JSON (host, sizes, every median and ratio) instead of a table.
    #[arg(long)]
    json: bool,
    /// Let the scheduler spread the virtual guest and the servers over every CPU (the
    /// server-level bench shares one CPU by default).
    #[arg(long, conflicts_with = "in_vm")]
    no_pin: bool,
    /// Run the workloads inside a guest (the Debian image) on each engine: on the project
    /// share, on virtiofsd serving the same directory, and on the guest's tmpfs.
    #[arg(long)]
    in_vm: bool,
    /// Engines for --in-vm (repeat the flag); default: every engine that runs Linux here.
    #[arg(long = "vmm", value_enum, requires = "in_vm")]
    engines: Vec<Engine>,
    /// Files in --in-vm's generated git project (checked out, stat'ed by git status, and
    /// read by the compile-like job).
    #[arg(long, default_value_t = 50_000, requires = "in_vm")]
    git_files: usize,
    /// Guest kernel for --in-vm (default: scripts/build-kernel's).
    #[arg(long, requires = "in_vm")]
    kernel: Option<PathBuf>,
}

impl FsBench {
    fn sizes(&self) -> Sizes {
        Sizes { file: self.size, random_reads: self.random_reads, files: self.files }
    }
}

/// A target of the server-level bench.
trait Target {
    /// Runs `workload` once and returns its rate.
    fn measure(&mut self, workload: Workload, sizes: Sizes, round: usize) -> Result<f64>;
}

/// The host's own file system, through the plain file API.
struct Host(PathBuf);

impl Target for Host {
    fn measure(&mut self, workload: Workload, sizes: Sizes, round: usize) -> Result<f64> {
        Ok(fs_workloads::measure(workload, &self.0, sizes, round)?)
    }
}

/// The virtual guest on a vhost-user fs server.
struct Fuse(FuseGuest);

impl Fuse {
    fn open(&mut self, name: &str, flags: i32) -> Result<(u64, u64)> {
        let e = self.0.lookup(ROOT, name.as_bytes())?;
        Ok((e.nodeid, self.0.open(e.nodeid, flags)?))
    }

    /// Closes what [`Fuse::open`] opened, and lets the server forget the node.
    fn close(&mut self, node: u64, fh: u64) -> Result<()> {
        self.0.release(node, fh, false)?;
        Ok(self.0.forget(node, 1)?)
    }
}

impl Fuse {
    fn seq_read(&mut self, name: &str, size: u64) -> Result<u64> {
        let (node, fh) = self.open(name, libc::O_RDONLY)?;
        let mut total = 0;
        while total < size {
            let got = u64::from(self.0.read_in_place(node, fh, total, MAX_PAYLOAD)?);
            if got == 0 {
                break;
            }
            total += got;
        }
        self.close(node, fh)?;
        Ok(total)
    }

    fn seq_write(&mut self, name: &str, size: u64) -> Result<u64> {
        let (e, fh) = self.0.create(ROOT, name.as_bytes(), 0o644)?;
        self.0.fill_data(&vec![0x5au8; MAX_PAYLOAD as usize])?;
        let mut total = 0;
        while total < size {
            total += u64::from(self.0.write_in_place(e.nodeid, fh, total, MAX_PAYLOAD)?);
        }
        self.0.release(e.nodeid, fh, false)?;
        self.0.unlink(ROOT, name.as_bytes())?;
        self.0.forget(e.nodeid, 1)?;
        Ok(total)
    }

    fn random_reads(&mut self, name: &str, size: u64, count: usize) -> Result<u64> {
        let (node, fh) = self.open(name, libc::O_RDONLY)?;
        for offset in fs_workloads::random_offsets(size, count) {
            self.0.read_in_place(node, fh, offset, 4096)?;
        }
        self.close(node, fh)?;
        Ok(count as u64)
    }

    fn create_stat_unlink(&mut self, dir: &str, count: usize) -> Result<u64> {
        let d = self.0.mkdir(ROOT, dir.as_bytes(), 0o755)?.nodeid;
        let mut nodes = Vec::with_capacity(count);
        for i in 0..count {
            let (e, fh) = self.0.create(d, format!("f{i}").as_bytes(), 0o644)?;
            self.0.release(e.nodeid, fh, false)?;
            nodes.push(e.nodeid);
        }
        for i in 0..count {
            self.0.lookup(d, format!("f{i}").as_bytes())?;
        }
        for (i, node) in nodes.into_iter().enumerate() {
            self.0.unlink(d, format!("f{i}").as_bytes())?;
            // Created and looked up once each, as the kernel would count them.
            self.0.forget(node, 2)?;
        }
        self.0.rmdir(ROOT, dir.as_bytes())?;
        self.0.forget(d, 1)?;
        Ok(count as u64)
    }

    fn walk(&mut self, dir: &str) -> Result<u64> {
        // As the kernel walks a tree: READDIRPLUS brings each entry's attributes (so lstat
        // needs no request of its own), and what it looked up is forgotten in batches.
        fn walk(g: &mut FuseGuest, node: u64) -> Result<u64> {
            let entries = g.list_plus(node)?;
            let mut n = entries.len() as u64;
            for (_, e) in &entries {
                if e.mode & libc::S_IFMT == libc::S_IFDIR {
                    n += walk(g, e.nodeid)?;
                }
            }
            let nodes: Vec<u64> = entries.iter().map(|(_, e)| e.nodeid).collect();
            for batch in nodes.chunks(256) {
                g.batch_forget(batch)?;
            }
            Ok(n)
        }
        let top = self.0.lookup(ROOT, dir.as_bytes())?.nodeid;
        let n = walk(&mut self.0, top)?;
        self.0.forget(top, 1)?;
        Ok(n)
    }
}

impl Target for Fuse {
    fn measure(&mut self, workload: Workload, sizes: Sizes, round: usize) -> Result<f64> {
        let started = Instant::now();
        let units = match workload {
            Workload::SeqRead => self.seq_read(BIG_FILE, sizes.file)?,
            Workload::SeqWrite => self.seq_write(&format!("written{round}"), sizes.file)?,
            Workload::RandomRead => self.random_reads(BIG_FILE, sizes.file, sizes.random_reads)?,
            Workload::CreateStatUnlink => self.create_stat_unlink(&format!("files{round}"), sizes.files)?,
            Workload::Walk => self.walk(TREE)?,
        };
        Ok(fs_workloads::rate(workload, units, started.elapsed()))
    }
}

/// One workload's results on one target: the median of its rounds, and how far apart its
/// rounds were, (fastest - slowest) / median: the noise a ratio between targets must beat.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Summary {
    median: f64,
    range: f64,
}

impl Summary {
    fn of(mut rounds: Vec<f64>) -> Summary {
        rounds.sort_by(|a, b| a.total_cmp(b));
        let median = rounds[rounds.len() / 2];
        let spread = rounds[rounds.len() - 1] - rounds[0];
        Summary { median, range: if median > 0.0 { spread / median } else { 0.0 } }
    }
}

/// Makes the big file and the tree the workloads read.
fn prepare(share: &Path, args: &FsBench) -> Result<()> {
    eprintln!("bench fs: writing a {} MiB file and a {}-file tree in {}", args.size >> 20, args.tree, share.display());
    let mut f = std::fs::File::create(share.join(BIG_FILE))?;
    let block: Vec<u8> = (0..MAX_PAYLOAD).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut written = 0;
    while written < args.size {
        let n = block.len().min((args.size - written) as usize);
        f.write_all(&block[..n])?;
        written += n as u64;
    }
    for i in 0..args.tree {
        let dir = share.join(format!("{TREE}/d{}", i / 500));
        if i % 500 == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        std::fs::File::create(dir.join(format!("f{i}")))?;
    }
    Ok(())
}

/// One table of medians: a row per workload, a column per target. The first column is the
/// limit the others are measured against; the ratios are cvm's backend against it and
/// against virtiofsd.
struct Table {
    /// Where and how it was measured.
    title: String,
    columns: Vec<String>,
    rows: Vec<Row>,
}

/// A workload's results, a summary per column.
struct Row {
    workload: String,
    unit: String,
    results: Vec<Summary>,
}

impl Row {
    fn medians(&self) -> Vec<f64> {
        self.results.iter().map(|r| r.median).collect()
    }
}

const CVM: &str = "cvm backend";
const VIRTIOFSD: &str = "virtiofsd";

impl Table {
    fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }

    /// cvm's backend against the first column, and against virtiofsd when it ran.
    fn ratios(&self, row: &[f64]) -> (f64, Option<f64>) {
        let cvm = self.column(CVM).map_or(f64::NAN, |c| row[c]);
        (cvm / row[0], self.column(VIRTIOFSD).map(|v| cvm / row[v]))
    }

    /// The servers' columns: cvm's backend, and virtiofsd when it ran.
    fn servers(&self) -> Vec<usize> {
        [CVM, VIRTIOFSD].iter().filter_map(|name| self.column(name)).collect()
    }

    /// Markdown a user can paste, under a line saying where and how it was measured, and over
    /// one saying how to read the rounds' range.
    fn print(&self) {
        let servers = self.servers();
        let range_header = format!(
            "round range, {}",
            servers.iter().map(|&c| self.columns[c].split(' ').next().unwrap_or_default()).collect::<Vec<_>>().join(" / ")
        );
        println!("{}", self.title);
        println!();
        print!("| {:<44} |", "workload");
        for name in &self.columns {
            print!(" {name:>12} |");
        }
        println!(" {:>15} | {:>15} | {range_header} |", format!("cvm/{}", self.columns[0]), "cvm/virtiofsd");
        println!("|{}", "---|".repeat(self.columns.len() + 4));
        for row in &self.rows {
            print!("| {:<44} |", format!("{} ({})", row.workload, row.unit));
            for result in &row.results {
                print!(" {:>12.0} |", result.median);
            }
            let (vs_first, vs_reference) = self.ratios(&row.medians());
            let ranges: Vec<String> = servers.iter().map(|&c| format!("{:.0}%", row.results[c].range * 100.0)).collect();
            println!(
                " {vs_first:>15.2} | {:>15} | {:>w$} |",
                vs_reference.map_or("-".into(), |r| format!("{r:.2}")),
                ranges.join(" / "),
                w = range_header.len()
            );
        }
        println!();
        println!("Round range: (fastest - slowest round) / median, per server. A cvm/virtiofsd ratio nearer 1 than the ranges is within this host's noise.");
        println!();
    }

    fn to_json(&self) -> serde_json::Value {
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|row| {
                let per_target = |value: fn(&Summary) -> f64| -> serde_json::Map<String, serde_json::Value> {
                    self.columns.iter().cloned().zip(row.results.iter().map(|r| serde_json::json!(value(r)))).collect()
                };
                let (vs_first, vs_reference) = self.ratios(&row.medians());
                serde_json::json!({
                    "workload": row.workload,
                    "unit": row.unit,
                    "medians": per_target(|r| r.median),
                    "round_ranges": per_target(|r| r.range),
                    format!("cvm_over_{}", self.columns[0].replace([' ', '-'], "_")): vs_first,
                    "cvm_over_virtiofsd": vs_reference,
                })
            })
            .collect();
        serde_json::json!({ "title": self.title, "targets": self.columns, "rows": rows })
    }
}

fn sizes_json(args: &FsBench) -> serde_json::Value {
    let mut sizes = serde_json::json!({ "file_bytes": args.size, "random_reads": args.random_reads, "files": args.files, "tree_files": args.tree, "rounds": args.rounds });
    if args.in_vm {
        sizes["git_files"] = serde_json::json!(args.git_files);
    }
    sizes
}

fn report(args: &FsBench, host: &super::HostFacts, tables: &[Table]) -> Result<()> {
    if args.json {
        let json = serde_json::json!({
            "bench": if args.in_vm { "fs --in-vm" } else { "fs" },
            "host": host.to_json(),
            "sizes": sizes_json(args),
            "tables": tables.iter().map(Table::to_json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        for table in tables {
            table.print();
        }
    }
    Ok(())
}

/// Waits for a server to create its socket.
fn wait_for_socket(path: &Path, server: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if let Some(status) = server.try_wait()? {
            bail!("the server exited ({status}) before listening");
        }
        if Instant::now() > deadline {
            bail!("the server did not create {}", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// virtiofsd serving `share` on `socket`, with the same settings as cvm's backend (cache
/// auto, submounts announced, the guest user's files the host user's), killed on drop; None,
/// with a note, when it cannot run.
struct Virtiofsd(Child);

impl Virtiofsd {
    fn start(binary: &str, socket: &Path, share: &Path, guest: Option<(u32, u32)>) -> Result<Option<Virtiofsd>> {
        let mut command = Command::new(binary);
        command.arg("--socket-path").arg(socket).arg("--shared-dir").arg(share);
        command.args(["--cache", "auto", "--announce-submounts", "--log-level", "error"]).stdin(Stdio::null());
        let (uid, gid) = (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw());
        if let Some((guest_uid, guest_gid)) = guest.filter(|&(u, g)| (u, g) != (uid, gid)) {
            command.arg("--translate-uid").arg(format!("map:{guest_uid}:{uid}:1"));
            command.arg("--translate-gid").arg(format!("map:{guest_gid}:{gid}:1"));
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                eprintln!(
                    "bench fs: no virtiofsd reference ({binary}: {e}); `cargo install virtiofsd` or scripts/install-virtiofsd provides one"
                );
                return Ok(None);
            }
        };
        wait_for_socket(socket, &mut child).context("virtiofsd")?;
        Ok(Some(Virtiofsd(child)))
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Confines this process, and the servers it starts, to the first CPU it may use.
fn pin_to_one_cpu() -> Result<usize> {
    let allowed = rustix::thread::sched_getaffinity(None).context("cannot read this process's CPUs")?;
    let cpu = (0..rustix::thread::CpuSet::MAX_CPU).find(|&c| allowed.is_set(c)).context("no CPU to run on")?;
    let mut one = rustix::thread::CpuSet::new();
    one.set(cpu);
    rustix::thread::sched_setaffinity(None, &one).context("cannot pin the bench to one CPU")?;
    Ok(cpu)
}

pub fn run(args: FsBench) -> Result<()> {
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let limit = cvm_backends::fs::guest_open_file_limit();
    let needed = in_vm::open_files(&args);
    if args.in_vm && needed > limit {
        bail!(
            "--in-vm with these sizes has the guest hold about {needed} files of the share at once, more than an fs server may keep open on this host ({limit}; see `cvm doctor`): pass smaller --tree, --files and --git-files, or raise the hard limit on open files"
        );
    }
    let work = match &args.dir {
        Some(dir) => tempfile::Builder::new().prefix("cvm-bench-fs-").tempdir_in(dir)?,
        None => tempfile::Builder::new().prefix("cvm-bench-fs-").tempdir()?,
    };
    let share = work.path().join("share");
    std::fs::create_dir(&share)?;
    prepare(&share, &args)?;
    let host = super::HostFacts::read();
    let tables = match args.in_vm {
        true => in_vm::run(&args, &host, work.path(), &share)?,
        false => vec![server_level(&args, &host, work.path(), &share)?],
    };
    report(&args, &host, &tables)
}

/// The virtual guest against each server, and the host's own file system.
fn server_level(args: &FsBench, host: &super::HostFacts, work: &Path, share: &Path) -> Result<Table> {
    let placement = match args.no_pin {
        true => "spread over the CPUs by the scheduler".to_string(),
        false => format!("guest driver and servers on CPU {}", pin_to_one_cpu()?),
    };
    let uid = rustix::process::getuid().as_raw();
    let gid = rustix::process::getgid().as_raw();
    let mut columns: Vec<(String, Box<dyn Target>)> = vec![("host-native".into(), Box::new(Host(share.to_path_buf())))];
    // cvm's backend, as a session runs it: a sandboxed `cvm __fs-backend` process.
    let socket = work.join("cvm.vhost");
    let listener = UnixListener::bind(&socket)?;
    let mut command = Command::new(cvm::cvm_exe()?);
    command.arg("__fs-backend");
    let config = ShareConfig {
        dir: share.to_path_buf(),
        tag: "bench".into(),
        policy: Policy::default(),
        guest_uid: uid,
        guest_gid: gid,
        allow_no_sandbox: false,
    };
    let _cvm_backend = FsBackend::spawn(command, listener, &config)?;
    columns.push((CVM.into(), Box::new(Fuse(FuseGuest::connect(&socket).context("cannot reach cvm's fs backend")?))));
    let reference_socket = work.join("virtiofsd.sock");
    let reference = Virtiofsd::start(&args.virtiofsd, &reference_socket, share, None)?;
    if reference.is_some() {
        columns.push((VIRTIOFSD.into(), Box::new(Fuse(FuseGuest::connect(&reference_socket).context("cannot reach virtiofsd")?))));
    }

    // Warm the page cache: the sequential read is the cached case.
    fs_workloads::seq_read(&share.join(BIG_FILE))?;
    let share_fs = std::fs::File::open(share)?;
    let mut rows = Vec::new();
    for workload in Workload::ALL {
        // Rounds interleave the targets, so each sees the same machine noise, and each round
        // starts one target further on, so none always runs in another's wake.
        let mut samples = vec![Vec::new(); columns.len()];
        for round in 0..args.rounds {
            let targets = columns.len();
            for c in (0..targets).map(|k| (round + k) % targets) {
                // Each starts with nothing of the last one's left to write back (a write
                // leaves a gigabyte of dirty pages, creation a journal to commit).
                rustix::fs::syncfs(&share_fs).context("cannot sync the share's file system")?;
                let (name, target) = &mut columns[c];
                samples[c].push(target.measure(workload, args.sizes(), round).with_context(|| format!("{} on {name}", workload.name()))?);
            }
        }
        rows.push(Row {
            workload: workload.name().to_string(),
            unit: workload.unit().to_string(),
            results: samples.into_iter().map(Summary::of).collect(),
        });
        eprintln!("bench fs: {} done", workload.name());
    }
    let title = format!(
        "cvm bench fs on {host}: {} MiB file, {} random reads, {} files, {}-file tree, median of {} rounds; {placement}",
        args.size >> 20,
        args.random_reads,
        args.files,
        args.tree,
        args.rounds
    );
    Ok(Table { title, columns: columns.into_iter().map(|(name, _)| name).collect(), rows })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    pub(super) struct Cli {
        #[command(flatten)]
        bench: FsBench,
    }

    pub(super) fn args(extra: &[&str]) -> FsBench {
        Cli::parse_from(["bench"].iter().chain(extra)).bench
    }

    #[test]
    fn in_vm_options_need_in_vm_and_pinning_is_the_default() {
        assert!(Cli::try_parse_from(["bench", "--vmm", "qemu"]).is_err());
        assert!(Cli::try_parse_from(["bench", "--git-files", "5"]).is_err());
        assert!(Cli::try_parse_from(["bench", "--in-vm", "--no-pin"]).is_err());
        let parsed = args(&[]);
        assert!(!parsed.no_pin && !parsed.in_vm && parsed.rounds == 5);
    }
}
