//! cvm as a library; the `cvm` binary is a thin command line over it. Each folder is one
//! concern and builds only on those listed before it (a unit test holds the sources to this):
//!
//! - [`host`]: what cvm reads of the host it runs on: its environment, files the guest may have
//!   written (read without being led out), the terminal.
//! - [`network`]: the guest's only ways out: the egress proxy and its policy, TLS interception,
//!   proxied secrets, forwarded ports and agents, passt for `--network open`, vsock connections.
//! - [`guest`]: what the guest gets, planned as data: shares, the files host programs take code
//!   from (which no share lets the guest write), runtime scripts and the CLAUDE.md context.
//! - [`project`]: the project's kernel, images, templates and git worktrees.
//! - [`config`]: the layered configuration as plain data, and which widening settings of a
//!   project's own file the user trusted.
//! - [`session`]: one disposable VM with the agent inside, on cvm's VMM or QEMU; `cvm run`,
//!   execs, named VMs, warm starts and a session's private directory.
//! - [`doctor`]: what this host has of what cvm needs.

pub mod config;
pub mod doctor;
pub mod guest;
pub mod host;
pub mod network;
pub mod project;
pub mod session;

static CVM_EXE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// The cvm executable that cvm re-executes for its helper processes (`__janitor`,
/// `__fs-backend`, `__vm-daemon`, `__vmm`) and benches: this process's own, unless a program using
/// cvm as a library (its tests) named it with [`set_cvm_exe`].
pub fn cvm_exe() -> std::io::Result<std::path::PathBuf> {
    match CVM_EXE.get() {
        Some(path) => Ok(path.clone()),
        None => std::env::current_exe(),
    }
}

/// Names the cvm executable for a program that is not `cvm` itself; the first call wins.
pub fn set_cvm_exe(path: impl Into<std::path::PathBuf>) {
    let _ = CVM_EXE.set(path.into());
}

pub use cvm_vmm::poll_until;

/// An XDG base directory: `$variable`, else `$HOME/<under_home>`, else `/tmp`.
pub fn xdg_dir(variable: &str, under_home: &str) -> std::path::PathBuf {
    std::env::var_os(variable)
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(under_home)))
        .unwrap_or_else(|| std::path::PathBuf::from("/tmp"))
}

#[cfg(test)]
mod tests {
    /// The folders (and top-level modules) in the order they build on each other.
    const LAYERS: &[&str] = &["host", "network", "guest", "project", "config", "session", "doctor"];

    /// Every `crate::NAME` in the files under `dir`.
    fn uses(dir: &std::path::Path, found: &mut Vec<(std::path::PathBuf, String)>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                uses(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for (at, _) in text.match_indices("crate::") {
                    let name: String = text[at + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    found.push((path.clone(), name));
                }
            }
        }
    }

    #[test]
    fn each_folder_builds_only_on_the_ones_before_it() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        for (layer_index, layer) in LAYERS.iter().enumerate() {
            let mut found = Vec::new();
            let folder = src.join(layer);
            if folder.is_dir() {
                uses(&folder, &mut found);
            } else {
                let file = src.join(format!("{layer}.rs"));
                let text = std::fs::read_to_string(&file).unwrap();
                found.extend(text.match_indices("crate::").map(|(at, _)| {
                    (file.clone(), text[at + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect())
                }));
            }
            for (file, name) in found {
                if let Some(used) = LAYERS.iter().position(|l| *l == name) {
                    assert!(used <= layer_index, "{} uses crate::{name}, which builds on {layer}", file.display());
                }
            }
        }
    }
}
