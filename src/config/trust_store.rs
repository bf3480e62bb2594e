//! Trust in a project's own configuration, as `direnv allow` and `mise trust` do it.
//!
//! The guest can rewrite every file in the project, its `.cvm.toml` included, so settings there
//! that widen the next session's sandbox (mounts, an open network, allowed hosts, host files
//! read into the guest) take effect only once the user ran `cvm trust` on the file as it is.
//! A record holds the file's path, the SHA-256 of its contents and the contents themselves (to
//! say which settings changed since). Records live under `$XDG_STATE_HOME/cvm/trusted/`,
//! outside every share.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the records are.
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new() -> Store {
        Store::at(crate::xdg_dir("XDG_STATE_HOME", ".local/state").join("cvm/trusted"))
    }

    pub fn at(dir: PathBuf) -> Store {
        Store { dir }
    }

    fn record(&self, file: &Path) -> PathBuf {
        self.dir.join(sha256(file.as_os_str().as_bytes()))
    }

    /// The contents trusted for `file`, when its record is there and intact.
    pub fn trusted(&self, file: &Path) -> Option<String> {
        let record = std::fs::read_to_string(self.record(file)).ok()?;
        let (hash, rest) = record.split_once('\n')?;
        let (path, text) = rest.split_once('\n')?;
        (path.as_bytes() == file.as_os_str().as_bytes() && hash == sha256(text.as_bytes())).then(|| text.to_string())
    }

    /// Records `text` as the trusted contents of `file`.
    pub fn trust(&self, file: &Path, text: &str) -> Result<()> {
        let path = file.to_str().with_context(|| format!("{} is not a UTF-8 path", file.display()))?;
        std::fs::create_dir_all(&self.dir).with_context(|| format!("cannot create {}", self.dir.display()))?;
        let record = self.record(file);
        let partial = record.with_extension("partial");
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .with_context(|| format!("cannot write {}", partial.display()))?;
        out.write_all(format!("{}\n{path}\n{text}", sha256(text.as_bytes())).as_bytes())?;
        out.sync_all()?;
        std::fs::rename(&partial, &record).with_context(|| format!("cannot write {}", record.display()))
    }

    /// Forgets `file`; says whether it was trusted.
    pub fn revoke(&self, file: &Path) -> Result<bool> {
        match std::fs::remove_file(self.record(file)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot forget {}", file.display())),
        }
    }

    /// Lets `file` (whose contents are `text`, whose widening settings are `widening`) be
    /// used: it is trusted as it is, or its widening settings are those trusted. Otherwise
    /// says which settings need trust and how to give it. `widening_of` finds the widening
    /// settings of the trusted contents.
    pub fn check(
        &self,
        file: &Path,
        text: &str,
        widening: &[(&'static str, String)],
        widening_of: impl Fn(&str) -> Vec<(&'static str, String)>,
    ) -> Result<()> {
        let dir = file.parent().unwrap_or(Path::new("/")).display();
        let how = format!("the guest can write this file, so review it, then run: cvm trust {dir}");
        let Some(trusted) = self.trusted(file) else {
            let keys: Vec<&str> = widening.iter().map(|(k, _)| *k).collect();
            bail!("{} sets {}, which widen the sandbox, and is not trusted: {how}", file.display(), keys.join(", "));
        };
        if trusted == text {
            return Ok(());
        }
        let before = widening_of(&trusted);
        let changed: Vec<&str> = widening.iter().filter(|now| !before.contains(now)).map(|(k, _)| *k).collect();
        if changed.is_empty() {
            return Ok(());
        }
        bail!("{} changed since you trusted it: {} now widen the sandbox differently; {how}", file.display(), changed.join(", "));
    }
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn widening(text: &str) -> Vec<(&'static str, String)> {
        text.lines().filter_map(|l| l.strip_prefix("allow=")).map(|v| ("network.allow", v.to_string())).collect()
    }

    #[test]
    fn only_the_trusted_widening_settings_pass() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::at(dir.path().join("trusted"));
        let file = dir.path().join("p/.cvm.toml");
        let text = "allow=a.com\n";
        let e = store.check(&file, text, &widening(text), widening).unwrap_err().to_string();
        assert!(e.contains("network.allow") && e.contains("not trusted") && e.contains("cvm trust"), "{e}");
        store.trust(&file, text).unwrap();
        store.check(&file, text, &widening(text), widening).unwrap();
        let narrowed = "cpus=1\nallow=a.com\n";
        store.check(&file, narrowed, &widening(narrowed), widening).expect("the same widening settings, trusted before");
        let widened = "allow=a.com\nallow=evil.com\n";
        let e = store.check(&file, widened, &widening(widened), widening).unwrap_err().to_string();
        assert!(e.contains("changed since you trusted it") && e.contains("network.allow"), "{e}");
        // Another file with the same contents is not trusted; a tampered record is no record.
        let other = dir.path().join("q/.cvm.toml");
        assert!(store.check(&other, text, &widening(text), widening).is_err());
        let record = store.record(&file);
        let tampered = std::fs::read_to_string(&record).unwrap().replace("a.com", "evil.com");
        std::fs::write(&record, tampered).unwrap();
        assert_eq!(store.trusted(&file), None);
        assert!(store.revoke(&file).unwrap());
        assert!(!store.revoke(&file).unwrap());
    }
}
