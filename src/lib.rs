//! cvm as a library; the `cvm` binary is a thin command line over it. Each folder is one
//! concern, and none reaches into a folder that builds on it:
//!
//! - [`config`]: the layered configuration as plain data, and which widening settings of a
//!   project's own file the user trusted.
//! - [`host`]: what cvm reads of the host it runs on: its environment, files the guest may have
//!   written (read without being led out), the terminal.
//! - [`project`]: the project's kernel, images, templates and git worktrees.
//! - [`guest`]: what the guest gets, planned as data: shares, the files host programs take code
//!   from (which no share lets the guest write), runtime scripts and the CLAUDE.md context.
//! - [`network`]: the guest's only ways out: the egress proxy and its policy, TLS interception,
//!   proxied secrets, forwarded ports and agents, passt for `--network open`.
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
