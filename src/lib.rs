//! cvm as a library; the `cvm` binary is a thin command line over it.
//!
//! - [`session`]: one disposable VM with the agent inside, on cvm's VMM or QEMU.
//! - [`shares`]: what the guest gets of the host's files, planned as plain data.
//! - [`egress`]: the host-side HTTP proxy that is the guest's only way out, and its policy.
//! - [`secrets`]: secrets the guest holds only as placeholders, and their sources.
//! - [`interception`]: the proxy's TLS interception that swaps placeholders for secrets.
//! - [`loopback_https`]: an HTTPS server on the loopback with its own CA, for benches and tests.
//! - [`forward`]: published ports, host ports and the SSH agent, relayed over vsock.
//! - [`exec`]: the host end of an exec (stdio, terminal, signals, exit status).
//! - [`run`]: `cvm run` and `cvm shell` from plain options to an exit code.
//! - [`runtime`]: runtime scripts and the CLAUDE.md context, run before each command.
//! - [`template`]: per-project templates that `cvm setup` makes.
//! - [`rundir`]: a session's private directory and the janitor that removes it.
//! - [`images`]: where the kernel and images are.
//! - [`terminal`]: raw mode and window size.
//! - [`trust`]: which widening settings of a project's own configuration the user trusted.
//! - [`host_files`]: reading files the guest may have written, without being led out.
//! - [`host_code`]: the files host programs take code from, which no share lets the guest write.

pub mod config;
pub mod doctor;
pub mod egress;
pub mod environment;
pub mod exec;
pub mod forward;
pub mod host_code;
pub mod host_files;
pub mod images;
pub mod interception;
pub mod loopback_https;
pub mod named;
pub mod open_network;
pub mod run;
pub mod rundir;
pub mod runtime;
pub mod secrets;
pub mod session;
pub mod shares;
pub mod template;
pub mod terminal;
pub mod trust;
pub mod warm;
pub mod worktree;

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
