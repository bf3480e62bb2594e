//! One interface over both engines: [`Engine::start`] turns a [`VmConfig`] into a
//! [`RunningVm`], cvm's own VMM in a jailed process ([`VmProcess`]) or a QEMU process. Whatever
//! the engine, dropping the running VM tears it down: stopped, and its process gone or
//! reaped, so an error path that forgets a VM leaves nothing running.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::process::VmProcess;
use crate::qemu::{QemuOptions, QemuVm};
use crate::{Result, Vm, VmConfig, VmExit, VmHandle};

/// Which monitor runs a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Engine {
    /// cvm's own VMM on KVM.
    Cvm,
    /// QEMU's microvm machine (TCG without hardware KVM) with cvm's kernel, image and backends.
    Qemu,
}

impl Engine {
    /// The engine's name, as `--vmm` and the `vmm` key spell it.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Cvm => "cvm",
            Engine::Qemu => "qemu",
        }
    }

    /// Starts `config` on this engine; `exe` is the cvm executable, which runs cvm's VMM as
    /// [`crate::process::VMM_COMMAND`]. cvm's VMM needs KVM that can run a stock kernel (not
    /// PVM): [`crate::Error::Kvm`] says why not, and the caller may offer QEMU instead.
    pub fn start(self, config: &VmConfig, exe: &Path) -> Result<Box<dyn RunningVm>> {
        match self {
            Engine::Cvm => {
                crate::host::hardware_kvm()?;
                Ok(Box::new(VmProcess::spawn(exe, config, Instant::now())?))
            }
            Engine::Qemu => Ok(Box::new(QemuVm::spawn(config, &QemuOptions::default())?)),
        }
    }
}

/// A started VM, whichever engine runs it. Dropping it stops it and waits for it to be gone.
pub trait RunningVm: Send {
    /// Readable once the VM has stopped by itself.
    fn exit_fd(&self) -> BorrowedFd<'_>;

    /// Stops the VM if it still runs and waits until it is gone.
    fn finish(&mut self) -> Finished;

    /// cvm's VMM process, which pauses and snapshots its VM; None on QEMU.
    fn control(&self) -> Option<&VmProcess> {
        None
    }
}

/// How a VM ended, as far as its user cares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Finished {
    /// Why it ended, when that was neither cvm's doing nor the guest's choice (a triple
    /// fault, the engine failing).
    pub unclean: Option<String>,
    /// Something the user should know though the VM is gone (vCPU threads left running).
    pub warning: Option<String>,
}

impl Finished {
    /// How a run of cvm's VMM that ended so (or failed) finished.
    pub(crate) fn of(exit: Result<VmExit>) -> Finished {
        match exit {
            Ok(exit) => Finished { unclean: (!exit.reason.is_clean()).then(|| exit.reason.to_string()), warning: exit.stuck_warning() },
            Err(e) => Finished { unclean: Some(format!("the VM failed: {e}")), warning: None },
        }
    }
}

/// cvm's VMM running [`Vm::run`] on its own thread (of the VMM process). Dropping it stops the
/// VM and joins the thread.
pub(crate) struct VmThread {
    thread: Option<JoinHandle<Result<VmExit>>>,
    /// Written when the thread's run ends.
    done: OwnedFd,
    handle: VmHandle,
}

impl VmThread {
    pub(crate) fn spawn(vm: Vm) -> Result<VmThread> {
        let handle = vm.handle();
        let done = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).map_err(std::io::Error::from)?;
        let signal = done.try_clone()?;
        let thread = std::thread::Builder::new().name("vm".into()).spawn(move || {
            let result = vm.run();
            let _ = rustix::io::write(&signal, &1u64.to_ne_bytes());
            result
        })?;
        Ok(VmThread { thread: Some(thread), done, handle })
    }

    /// Readable once the VM has stopped by itself.
    pub(crate) fn exit_fd(&self) -> BorrowedFd<'_> {
        self.done.as_fd()
    }

    /// Waits until the VM ends, and says how.
    pub(crate) fn wait(mut self) -> Result<VmExit> {
        let thread = self.thread.take().expect("a VM thread is joined once");
        thread.join().unwrap_or_else(|_| Err(crate::Error::Boot("the VM's thread panicked".into())))
    }
}

impl Drop for VmThread {
    fn drop(&mut self) {
        self.handle.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl RunningVm for QemuVm {
    fn exit_fd(&self) -> BorrowedFd<'_> {
        QemuVm::exit_fd(self)
    }

    fn finish(&mut self) -> Finished {
        let exited = self.try_wait().ok().flatten();
        self.kill();
        let _ = self.wait();
        Finished { unclean: exited.filter(|status| !status.success()).map(|status| format!("QEMU exited: {status}")), warning: None }
    }
}
