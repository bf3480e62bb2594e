//! cvm's virtual machine monitor: a plain-data [`VmConfig`] becomes a running KVM guest in one
//! place ([`Vm::create`]), and [`Vm::run`] drives it until the guest resets, powers off, halts
//! for good or fails, and says why ([`VmExit`]).
//!
//! Layout: `config` (plain data and its parsers), `vm` (the builder: KVM, memory, devices and
//! vCPUs in one place, then the run), `device_manager` (where a guest's MMIO or port access goes:
//! the buses, IRQs and command-line entries), `vcpu` (vCPU threads and their exits), `control`
//! (the VM's own events on the event loop), `exit` (why a VM ended), `console` and
//! `console_log` (the serial console's sink and its bounded log), `memory` (memfd-backed guest
//! RAM), `guest_panic` (a kernel panic read off the console), `exit_stats` (KVM's exit
//! counters), `x86_64` (boot protocols, MP table, CPU state), `host` (what the host's KVM can
//! do), `qemu` (the same `VmConfig` run by QEMU: the fallback and full-stack test engine),
//! `engine` (either engine behind one interface, torn down on drop), `teardown` (the kernel's
//! side of a VM's end, done by a helper process after the exit is reported).

mod config;
mod console;
mod control;
mod device_manager;
mod engine;
pub mod console_log;
mod exit;
pub mod exit_stats;
pub mod guest_panic;
pub mod host;
mod memory;
pub mod qemu;
mod teardown;
mod vcpu;
mod vm;
pub mod x86_64;

pub use config::{parse_memory_size, DiskConfig, NetConfig, VhostUserConfig, VhostUserKind, VmConfig, DEFAULT_CMDLINE};
pub use engine::{Engine, Finished, RunningVm, VmThread};
pub use memory::layout;
pub use exit::{BootTimings, ExitReason, VmExit};
pub use vm::{Stopper, Vm};

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
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::KvmCall { what, source }
}

/// Locks `mutex`, taking over a lock whose holder panicked: the VM's state stays usable and
/// the panic is reported where it happened.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
