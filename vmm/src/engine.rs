//! One interface over both engines: [`Engine::start`] turns a [`VmConfig`] into a
//! [`RunningVm`], cvm's own VMM on a thread of this process or a QEMU process. Whatever the
//! engine, dropping the running VM tears it down: stopped, its threads joined or its process
//! reaped, so an error path that forgets a VM leaves nothing running.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::thread::JoinHandle;
use std::time::Instant;

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

    /// Starts `config` on this engine. cvm's VMM needs KVM that can run a stock kernel (not
    /// PVM): [`crate::Error::Kvm`] says why not, and the caller may offer QEMU instead.
    pub fn start(self, config: &VmConfig) -> Result<Box<dyn RunningVm>> {
        match self {
            Engine::Cvm => {
                crate::host::open_kvm()?;
                if crate::host::is_pvm() {
                    return Err(crate::host::KvmUnavailable::Pvm.into());
                }
                Ok(Box::new(VmThread::spawn(Vm::create(config, Instant::now())?)?))
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

    /// A handle that pauses and snapshots the VM, where its engine can (cvm's VMM).
    fn handle(&self) -> Option<&VmHandle> {
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

/// cvm's VMM running [`Vm::run`] on its own thread.
pub struct VmThread {
    thread: Option<JoinHandle<Result<VmExit>>>,
    /// Written when the thread's run ends.
    done: OwnedFd,
    handle: VmHandle,
}

impl VmThread {
    pub fn spawn(vm: Vm) -> Result<VmThread> {
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

    /// Waits until the VM ends by itself, and says how.
    pub fn wait(mut self) -> Result<VmExit> {
        let thread = self.thread.take().expect("a VM thread is joined once");
        thread.join().unwrap_or_else(|_| Err(crate::Error::Boot("the VM's thread panicked".into())))
    }
}

impl RunningVm for VmThread {
    fn exit_fd(&self) -> BorrowedFd<'_> {
        self.done.as_fd()
    }

    fn handle(&self) -> Option<&VmHandle> {
        Some(&self.handle)
    }

    fn finish(&mut self) -> Finished {
        self.handle.stop();
        let Some(thread) = self.thread.take() else { return Finished::default() };
        match thread.join() {
            Ok(Ok(exit)) => Finished { unclean: (!exit.reason.is_clean()).then(|| exit.reason.to_string()), warning: exit.stuck_warning() },
            Ok(Err(e)) => Finished { unclean: Some(format!("the VM failed: {e}")), warning: None },
            Err(_) => Finished { unclean: Some("the VM's thread panicked".into()), warning: None },
        }
    }
}

impl Drop for VmThread {
    fn drop(&mut self) {
        self.finish();
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
