//! The file-system workloads `cvm bench fs` times through the plain file API: on the host's own
//! file system (the bench's host-native column) and, run by the agent as `cvm-agent bench-fs`,
//! inside a guest on a share or a tmpfs (`cvm bench fs --in-vm`). One definition, so every
//! column measures the same work.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// The size of each sequential read and write: the largest FUSE request cvm's guests send.
pub const CHUNK: usize = 1 << 20;

/// What each workload does, with the unit of its rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    SeqRead,
    SeqWrite,
    RandomRead,
    CreateStatUnlink,
    Walk,
}

impl Workload {
    pub const ALL: [Workload; 5] =
        [Workload::SeqRead, Workload::SeqWrite, Workload::RandomRead, Workload::CreateStatUnlink, Workload::Walk];

    pub fn name(self) -> &'static str {
        match self {
            Workload::SeqRead => "sequential read, cached",
            Workload::SeqWrite => "sequential write",
            Workload::RandomRead => "random 4 KiB reads",
            Workload::CreateStatUnlink => "create+stat+unlink",
            Workload::Walk => "tree walk, readdirplus",
        }
    }

    /// Its name on `cvm-agent bench-fs`'s command line.
    pub fn key(self) -> &'static str {
        match self {
            Workload::SeqRead => "seq-read",
            Workload::SeqWrite => "seq-write",
            Workload::RandomRead => "random-read",
            Workload::CreateStatUnlink => "create",
            Workload::Walk => "walk",
        }
    }

    pub fn from_key(key: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.key() == key)
    }

    pub fn unit(self) -> &'static str {
        match self {
            Workload::SeqRead | Workload::SeqWrite => "MiB/s",
            Workload::RandomRead => "reads/s",
            Workload::CreateStatUnlink => "files/s",
            Workload::Walk => "entries/s",
        }
    }
}

/// The sizes of one run's workloads.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// The big file's bytes: read, and written again.
    pub file: u64,
    pub random_reads: usize,
    /// Files created, stat'ed and removed.
    pub files: usize,
}

/// The names a workload uses under its directory: the big file that is read, the tree that is
/// walked; `round` keeps what one round writes apart from the next's.
pub const BIG_FILE: &str = "big";
pub const TREE: &str = "tree";

/// Runs `workload` in `dir` (which holds [`BIG_FILE`] and [`TREE`]) and returns its rate, in
/// the workload's unit per second.
pub fn measure(workload: Workload, dir: &Path, sizes: Sizes, round: usize) -> io::Result<f64> {
    let started = Instant::now();
    let units = match workload {
        Workload::SeqRead => seq_read(&dir.join(BIG_FILE))?,
        Workload::SeqWrite => seq_write(&dir.join(format!("written{round}")), sizes.file)?,
        Workload::RandomRead => random_reads(&dir.join(BIG_FILE), sizes.file, sizes.random_reads)?,
        Workload::CreateStatUnlink => create_stat_unlink(&dir.join(format!("files{round}")), sizes.files)?,
        Workload::Walk => walk(&dir.join(TREE))?,
    };
    Ok(rate(workload, units, started.elapsed()))
}

/// What `units` (bytes, or operations) done in `elapsed` come to in the workload's unit per
/// second.
pub fn rate(workload: Workload, units: u64, elapsed: Duration) -> f64 {
    let units = match workload {
        Workload::SeqRead | Workload::SeqWrite => units as f64 / (1 << 20) as f64,
        _ => units as f64,
    };
    units / elapsed.as_secs_f64().max(1e-9)
}

/// The offsets of the random reads: the same for every target.
pub fn random_offsets(size: u64, count: usize) -> impl Iterator<Item = u64> {
    let blocks = (size / 4096).max(1);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..count).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % blocks) * 4096
    })
}

/// Reads the whole file in [`CHUNK`]s; returns the bytes read.
pub fn seq_read(path: &Path) -> io::Result<u64> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        match f.read(&mut buf)? {
            0 => return Ok(total),
            n => total += n as u64,
        }
    }
}

/// Writes `size` bytes in [`CHUNK`]s, then removes the file; returns the bytes written.
pub fn seq_write(path: &Path, size: u64) -> io::Result<u64> {
    let mut f = File::create(path)?;
    let buf = vec![0x5au8; CHUNK];
    let mut total = 0;
    while total < size {
        f.write_all(&buf)?;
        total += buf.len() as u64;
    }
    drop(f);
    std::fs::remove_file(path)?;
    Ok(total)
}

pub fn random_reads(path: &Path, size: u64, count: usize) -> io::Result<u64> {
    let f = File::open(path)?;
    let mut buf = [0u8; 4096];
    for offset in random_offsets(size, count) {
        f.read_at(&mut buf, offset)?;
    }
    Ok(count as u64)
}

/// Creates `count` empty files in a new directory, stats each, removes them and the directory.
pub fn create_stat_unlink(dir: &Path, count: usize) -> io::Result<u64> {
    std::fs::create_dir(dir)?;
    for i in 0..count {
        File::create(dir.join(format!("f{i}")))?;
    }
    for i in 0..count {
        std::fs::symlink_metadata(dir.join(format!("f{i}")))?;
    }
    for i in 0..count {
        std::fs::remove_file(dir.join(format!("f{i}")))?;
    }
    std::fs::remove_dir(dir)?;
    Ok(count as u64)
}

/// Lists and stats every entry under `dir`; returns how many there were.
pub fn walk(dir: &Path) -> io::Result<u64> {
    let mut n = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = std::fs::symlink_metadata(entry.path())?;
        n += 1;
        if meta.is_dir() {
            n += walk(&entry.path())?;
        }
    }
    Ok(n)
}

/// A compile-like job: reads every file under `src` and writes, for each directory, one output
/// file in `out` that is as large as the directory's files together (an object file per
/// package). Returns how many source files it read.
pub fn compile(src: &Path, out: &Path) -> io::Result<u64> {
    std::fs::create_dir_all(out)?;
    let mut read = 0;
    let mut directories = vec![src.to_path_buf()];
    let mut index = 0;
    let mut buf = Vec::new();
    while let Some(dir) = directories.pop() {
        let mut object = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                directories.push(entry.path());
                continue;
            }
            buf.clear();
            File::open(entry.path())?.read_to_end(&mut buf)?;
            object.extend_from_slice(&buf);
            read += 1;
        }
        if !object.is_empty() {
            std::fs::write(out.join(format!("o{index}")), &object)?;
            index += 1;
        }
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_workload_runs_and_leaves_only_what_it_reads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(BIG_FILE), vec![7u8; 3 * CHUNK + 100]).unwrap();
        std::fs::create_dir_all(dir.path().join(TREE).join("d")).unwrap();
        std::fs::write(dir.path().join(TREE).join("d/f"), b"x").unwrap();
        let sizes = Sizes { file: 3 * CHUNK as u64 + 100, random_reads: 10, files: 5 };
        for workload in Workload::ALL {
            assert!(measure(workload, dir.path(), sizes, 1).unwrap() > 0.0, "{workload:?}");
            assert_eq!(Workload::from_key(workload.key()), Some(workload));
        }
        let mut left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        assert_eq!(left, [BIG_FILE, TREE]);
        assert_eq!(walk(&dir.path().join(TREE)).unwrap(), 2);
        assert!(random_offsets(sizes.file, 1000).all(|o| o % 4096 == 0 && o + 4096 <= sizes.file));
    }

    #[test]
    fn compile_reads_every_file_and_writes_one_object_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        for (name, text) in [("a/x.c", "12"), ("a/y.c", "345"), ("b/z.c", "6"), ("top.c", "78")] {
            std::fs::create_dir_all(src.join(name).parent().unwrap()).unwrap();
            std::fs::write(src.join(name), text).unwrap();
        }
        let out = dir.path().join("out");
        assert_eq!(compile(&src, &out).unwrap(), 4);
        let mut objects: Vec<u64> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).collect();
        objects.sort();
        assert_eq!(objects, [1, 2, 5]);
    }
}
