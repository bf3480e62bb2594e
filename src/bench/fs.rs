//! `cvm bench fs`: file-system throughput at the server level. The virtual guest (the FUSE
//! driver the fs tests use, through cvm's vhost-user frontend and vrings in shared memory)
//! drives cvm's own fs backend process and then `virtiofsd` (the reference, installed from
//! crates.io) on the same files, and the host does the same work natively (the limit), all in
//! one run. Each workload runs `--rounds` times per target; the table shows medians.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cvm_devices::fs::{FsBackend, Policy, ShareConfig};
use cvm_devices::virtual_guest::fuse::{FuseGuest, MAX_PAYLOAD, ROOT};

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
    #[arg(long, default_value_t = 3)]
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
}

/// What each workload measures, per second.
#[derive(Clone, Copy)]
enum Workload {
    SeqRead,
    SeqWrite,
    RandomRead,
    CreateStatUnlink,
    Walk,
}

impl Workload {
    const ALL: [Workload; 5] = [Workload::SeqRead, Workload::SeqWrite, Workload::RandomRead, Workload::CreateStatUnlink, Workload::Walk];

    fn name(self) -> &'static str {
        match self {
            Workload::SeqRead => "sequential read, cached",
            Workload::SeqWrite => "sequential write",
            Workload::RandomRead => "random 4 KiB reads",
            Workload::CreateStatUnlink => "create+stat+unlink",
            Workload::Walk => "tree walk, readdirplus",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Workload::SeqRead | Workload::SeqWrite => "MiB/s",
            Workload::RandomRead => "reads/s",
            Workload::CreateStatUnlink => "files/s",
            Workload::Walk => "entries/s",
        }
    }
}

/// The operations each target performs; each returns how many units (bytes or operations) it
/// did.
trait Target {
    fn seq_read(&mut self, name: &str, size: u64) -> Result<u64>;
    fn seq_write(&mut self, name: &str, size: u64) -> Result<u64>;
    fn random_reads(&mut self, name: &str, size: u64, count: usize) -> Result<u64>;
    fn create_stat_unlink(&mut self, dir: &str, count: usize) -> Result<u64>;
    fn walk(&mut self, dir: &str) -> Result<u64>;
}

/// The offsets of the random reads: the same for every target.
fn random_offsets(size: u64, count: usize) -> impl Iterator<Item = u64> {
    let blocks = (size / 4096).max(1);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..count).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % blocks) * 4096
    })
}

struct Host(PathBuf);

impl Target for Host {
    fn seq_read(&mut self, name: &str, _size: u64) -> Result<u64> {
        let mut f = std::fs::File::open(self.0.join(name))?;
        let mut buf = vec![0u8; MAX_PAYLOAD as usize];
        let mut total = 0;
        loop {
            match f.read(&mut buf)? {
                0 => return Ok(total),
                n => total += n as u64,
            }
        }
    }

    fn seq_write(&mut self, name: &str, size: u64) -> Result<u64> {
        let mut f = std::fs::File::create(self.0.join(name))?;
        let buf = vec![0x5au8; MAX_PAYLOAD as usize];
        let mut total = 0;
        while total < size {
            f.write_all(&buf)?;
            total += buf.len() as u64;
        }
        drop(f);
        std::fs::remove_file(self.0.join(name))?;
        Ok(total)
    }

    fn random_reads(&mut self, name: &str, size: u64, count: usize) -> Result<u64> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(self.0.join(name))?;
        let mut buf = [0u8; 4096];
        for offset in random_offsets(size, count) {
            f.read_at(&mut buf, offset)?;
        }
        Ok(count as u64)
    }

    fn create_stat_unlink(&mut self, dir: &str, count: usize) -> Result<u64> {
        let dir = self.0.join(dir);
        std::fs::create_dir(&dir)?;
        for i in 0..count {
            std::fs::File::create(dir.join(format!("f{i}")))?;
        }
        for i in 0..count {
            std::fs::symlink_metadata(dir.join(format!("f{i}")))?;
        }
        for i in 0..count {
            std::fs::remove_file(dir.join(format!("f{i}")))?;
        }
        std::fs::remove_dir(&dir)?;
        Ok(count as u64)
    }

    fn walk(&mut self, dir: &str) -> Result<u64> {
        fn walk(path: &Path) -> Result<u64> {
            let mut n = 0;
            for entry in std::fs::read_dir(path)? {
                let entry = entry?;
                let meta = std::fs::symlink_metadata(entry.path())?;
                n += 1;
                if meta.is_dir() {
                    n += walk(&entry.path())?;
                }
            }
            Ok(n)
        }
        walk(&self.0.join(dir))
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

impl Target for Fuse {
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
        for offset in random_offsets(size, count) {
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

/// Runs one workload and returns units per second.
fn measure(target: &mut dyn Target, workload: Workload, args: &FsBench, round: usize) -> Result<f64> {
    let started = Instant::now();
    let units = match workload {
        Workload::SeqRead => target.seq_read("big", args.size)? as f64 / (1 << 20) as f64,
        Workload::SeqWrite => target.seq_write(&format!("written{round}"), args.size)? as f64 / (1 << 20) as f64,
        Workload::RandomRead => target.random_reads("big", args.size, args.random_reads)? as f64,
        Workload::CreateStatUnlink => target.create_stat_unlink(&format!("files{round}"), args.files)? as f64,
        Workload::Walk => target.walk("tree")? as f64,
    };
    Ok(units / started.elapsed().as_secs_f64().max(1e-9))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Makes the big file and the tree the workloads read.
fn prepare(share: &Path, args: &FsBench) -> Result<()> {
    eprintln!("bench fs: writing a {} MiB file and a {}-file tree in {}", args.size >> 20, args.tree, share.display());
    let mut f = std::fs::File::create(share.join("big"))?;
    let block: Vec<u8> = (0..MAX_PAYLOAD).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut written = 0;
    while written < args.size {
        let n = block.len().min((args.size - written) as usize);
        f.write_all(&block[..n])?;
        written += n as u64;
    }
    for i in 0..args.tree {
        let dir = share.join(format!("tree/d{}", i / 500));
        if i % 500 == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        std::fs::File::create(dir.join(format!("f{i}")))?;
    }
    Ok(())
}

/// The results as a Markdown table a user can paste, under a line saying where and how they
/// were measured.
fn print_table(args: &FsBench, host: &super::HostFacts, names: &[String], results: &[Vec<f64>]) {
    println!("cvm bench fs on {host}: {} MiB file, {} random reads, {} files, {}-file tree, median of {} rounds", args.size >> 20, args.random_reads, args.files, args.tree, args.rounds);
    println!();
    print!("| {:<38} |", "workload");
    for name in names {
        print!(" {name:>12} |");
    }
    println!(" {:>10} | {:>15} |", "cvm/host", "cvm/virtiofsd");
    println!("|{}", "---|".repeat(names.len() + 3));
    for (w, workload) in Workload::ALL.iter().enumerate() {
        print!("| {:<38} |", format!("{} ({})", workload.name(), workload.unit()));
        for value in &results[w] {
            print!(" {value:>12.0} |");
        }
        let vs_reference = ratios(&results[w]).1.map_or("-".into(), |r| format!("{r:.2}"));
        println!(" {:>10.2} | {:>15} |", ratios(&results[w]).0, vs_reference);
    }
}

/// cvm's backend against the host, and against virtiofsd when it ran.
fn ratios(row: &[f64]) -> (f64, Option<f64>) {
    (row[1] / row[0], row.get(2).map(|reference| row[1] / reference))
}

fn json_report(args: &FsBench, host: &super::HostFacts, names: &[String], results: &[Vec<f64>]) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = Workload::ALL
        .iter()
        .zip(results)
        .map(|(workload, row)| {
            let values: serde_json::Map<String, serde_json::Value> = names.iter().cloned().zip(row.iter().map(|v| serde_json::json!(v))).collect();
            let (vs_host, vs_reference) = ratios(row);
            serde_json::json!({ "workload": workload.name(), "unit": workload.unit(), "medians": values, "cvm_over_host": vs_host, "cvm_over_virtiofsd": vs_reference })
        })
        .collect();
    serde_json::json!({
        "bench": "fs",
        "host": host.to_json(),
        "sizes": { "file_bytes": args.size, "random_reads": args.random_reads, "files": args.files, "tree_files": args.tree, "rounds": args.rounds },
        "targets": names,
        "rows": rows,
    })
}

/// Waits for a server to create its socket.
fn wait_for_socket(path: &Path, server: &mut std::process::Child) -> Result<()> {
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

pub fn run(args: FsBench) -> Result<()> {
    let work = match &args.dir {
        Some(dir) => tempfile::Builder::new().prefix("cvm-bench-fs-").tempdir_in(dir)?,
        None => tempfile::Builder::new().prefix("cvm-bench-fs-").tempdir()?,
    };
    let share = work.path().join("share");
    std::fs::create_dir(&share)?;
    prepare(&share, &args)?;
    let uid = rustix::process::getuid().as_raw();
    let gid = rustix::process::getgid().as_raw();

    let mut columns: Vec<(String, Box<dyn Target>)> = vec![("host-native".into(), Box::new(Host(share.clone())))];
    // cvm's backend, as a session runs it: a sandboxed `cvm __fs-backend` process.
    let socket = work.path().join("cvm.vhost");
    let listener = UnixListener::bind(&socket)?;
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("__fs-backend");
    let config = ShareConfig { dir: share.clone(), tag: "bench".into(), policy: Policy::default(), guest_uid: uid, guest_gid: gid, allow_no_sandbox: false };
    let _cvm_backend = FsBackend::spawn(command, listener, &config)?;
    columns.push(("cvm backend".into(), Box::new(Fuse(FuseGuest::connect(&socket).context("cannot reach cvm's fs backend")?))));
    // The reference: virtiofsd with its defaults, on the same files.
    let reference_socket = work.path().join("virtiofsd.sock");
    let reference = Command::new(&args.virtiofsd)
        .arg("--socket-path")
        .arg(&reference_socket)
        .arg("--shared-dir")
        .arg(&share)
        .args(["--cache", "auto", "--log-level", "error"])
        .stdin(Stdio::null())
        .spawn();
    let mut reference = match reference {
        Ok(child) => Some(child),
        Err(e) => {
            eprintln!("bench fs: no virtiofsd reference ({}: {e}); `cargo install virtiofsd` provides one", args.virtiofsd);
            None
        }
    };
    if let Some(child) = reference.as_mut() {
        wait_for_socket(&reference_socket, child)?;
        columns.push(("virtiofsd".into(), Box::new(Fuse(FuseGuest::connect(&reference_socket).context("cannot reach virtiofsd")?))));
    }

    // Warm the page cache: the sequential read is the cached case.
    Host(share.clone()).seq_read("big", args.size)?;
    let mut results = vec![vec![0.0; columns.len()]; Workload::ALL.len()];
    for (w, workload) in Workload::ALL.iter().enumerate() {
        // Rounds interleave the targets, so each sees the same machine noise.
        let mut samples = vec![Vec::new(); columns.len()];
        for round in 0..args.rounds.max(1) {
            for (c, (name, target)) in columns.iter_mut().enumerate() {
                samples[c].push(measure(target.as_mut(), *workload, &args, round).with_context(|| format!("{} on {name}", workload.name()))?);
            }
        }
        for (c, s) in samples.into_iter().enumerate() {
            results[w][c] = median(s);
        }
        eprintln!("bench fs: {} done", workload.name());
    }

    let names: Vec<String> = columns.iter().map(|(name, _)| name.clone()).collect();
    drop(columns);
    let host = super::HostFacts::read();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json_report(&args, &host, &names, &results))?);
    } else {
        print_table(&args, &host, &names, &results);
    }
    if let Some(mut child) = reference {
        let _ = child.kill();
        let _ = child.wait();
    }
    Ok(())
}
