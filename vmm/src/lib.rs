//! cvm's virtual machine monitor: a plain-data [`VmConfig`] becomes a running KVM guest in one
//! place ([`Vm::create`]), and [`Vm::run`] drives it until the guest resets, powers off, halts
//! for good or fails, and says why ([`VmExit`]).
//!
//! Layout, as Firecracker's:
//! - `builder` turns a `VmConfig` (`config`: plain data and its parsers) into a [`Vm`]; `vm` runs
//!   it; `engine` puts either engine (this VMM or `qemu`) behind one interface, torn down on drop;
//!   `process` runs this VMM in a process of its own, which `jail` confines.
//! - `device_manager`: where a guest's MMIO or port access goes (the buses, IRQs, command-line
//!   entries).
//! - `vstate/`: KVM's side: the VM and its memory slots (`vm`), memfd guest RAM and the address
//!   map (`memory`), the vCPU threads and their exits (`vcpu`), KVM's statistics (`exit_stats`).
//! - `arch/x86_64/`: boot protocols, the MP table, the vCPUs' initial state.
//! - `control` (the VM's own events on the event loop), `exit` (why a VM ended), `console` and
//!   `console_log` (the serial console's sink and its bounded log), `guest_panic` (a kernel panic
//!   read off the console), `host` (what the host's KVM can do), `teardown` (the kernel's side of
//!   a VM's end, left to a helper process so the exit is reported first).

pub mod arch;
mod builder;
mod config;
mod console;
pub mod console_log;
mod control;
mod device_manager;
mod engine;
mod exit;
pub mod guest_panic;
pub mod host;
pub mod jail;
pub mod process;
pub mod qemu;
pub mod snapshot;
mod teardown;
mod vm;
pub mod vstate;

pub use config::{parse_memory_size, DiskConfig, NetConfig, VhostUserConfig, VhostUserKind, VmConfig, DEFAULT_CMDLINE};
pub use engine::{Engine, Finished, RunningVm};
pub use exit::{BootTimings, ExitReason, VmExit};
pub use process::VmProcess;
pub use vm::{Captured, Vm, VmHandle};
pub use vstate::memory::layout;
pub use vstate::vcpu::VcpuState;

/// Everything that can stop a VM from being built or run. Each message says what went wrong
/// and, where the user can do something about it, what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Kvm(#[from] host::KvmUnavailable),
    #[error("KVM refused to {what}: {source}")]
    KvmCall { what: &'static str, source: kvm_ioctls::Error },
    #[error("{0}")]
    Config(String),
    #[error("{}: {source}", path.display())]
    File { path: std::path::PathBuf, source: std::io::Error },
    #[error("{} is not a kernel: {reason}", path.display())]
    NotAKernel { path: std::path::PathBuf, reason: String },
    #[error("cannot set up guest memory: {0}")]
    Memory(String),
    #[error("cannot boot: {0}")]
    Boot(String),
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// What the VMM process reported (its own error's message), or what went wrong with it.
    #[error("{0}")]
    Vmm(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<rustix::io::Errno> for Error {
    fn from(e: rustix::io::Errno) -> Error {
        Error::Io(e.into())
    }
}

pub(crate) fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::KvmCall { what, source }
}

/// Polls `fds` until one is ready or `deadline` (none: no limit) passes; 0 when it passed.
/// A signal's interruption is not an answer: the poll goes on with the time left.
pub fn poll_until(fds: &mut [rustix::event::PollFd<'_>], deadline: Option<std::time::Instant>) -> std::io::Result<usize> {
    loop {
        let timeout = deadline.map(|d| {
            let left = d.saturating_duration_since(std::time::Instant::now());
            rustix::event::Timespec { tv_sec: left.as_secs() as i64, tv_nsec: left.subsec_nanos() as i64 }
        });
        match rustix::event::poll(fds, timeout.as_ref()) {
            Err(rustix::io::Errno::INTR) => continue,
            result => return Ok(result?),
        }
    }
}

/// Locks `mutex`, taking over a lock whose holder panicked: the VM's state stays usable and
/// the panic is reported where it happened.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
