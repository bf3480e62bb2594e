//! The guest console's log on the host, bounded: a guest that floods its console fills at most
//! the log and the one before it, [`MAX_BYTES`] each, never the host's disk.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// How much one console log file holds before it is rotated.
pub const MAX_BYTES: u64 = 8 << 20;

pub struct ConsoleLog {
    path: PathBuf,
    file: File,
    size: u64,
    max: u64,
}

impl ConsoleLog {
    pub fn create(path: &Path) -> io::Result<ConsoleLog> {
        Self::with_max(path, MAX_BYTES)
    }

    fn with_max(path: &Path, max: u64) -> io::Result<ConsoleLog> {
        Ok(ConsoleLog { path: path.to_path_buf(), file: File::create(path)?, size: 0, max })
    }

    /// Where the log before the current one goes: `<log>.1`.
    pub fn previous(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".1");
        PathBuf::from(name)
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.size >= self.max {
            std::fs::rename(&self.path, Self::previous(&self.path))?;
            self.file = File::create(&self.path)?;
            self.size = 0;
        }
        let room = (self.max - self.size) as usize;
        let written = self.file.write(&buf[..buf.len().min(room)])?;
        self.size += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Copies what `source` gives (QEMU's serial console on its standard output, cvm's through a
/// pipe) into a bounded log at `path`, on its own thread, until the source ends.
pub fn relay(mut source: impl io::Read + Send + 'static, path: &Path) -> io::Result<std::thread::JoinHandle<()>> {
    let mut log = ConsoleLog::create(path)?;
    std::thread::Builder::new().name("console-log".into()).spawn(move || {
        let _ = io::copy(&mut source, &mut log);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_fills_two_files_at_most_and_the_end_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = ConsoleLog::with_max(&path, 1000).unwrap();
        for i in 0..10_000 {
            log.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        log.write_all(b"Kernel panic - not syncing: the end\n").unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(std::fs::metadata(&path).unwrap().len() <= 1000);
        assert!(std::fs::metadata(ConsoleLog::previous(&path)).unwrap().len() <= 1000);
        let current = std::fs::read_to_string(&path).unwrap();
        assert!(current.ends_with("Kernel panic - not syncing: the end\n"), "{current}");
    }
}
