//! The VM's own events on its event loop: an exit a vCPU asked for, the i8042 reset line, the
//! periodic check for a guest halted for good (or silent on PVM, or panicked), and host input
//! for the serial console.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cvm_devices::legacy::SerialConsole;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::console::ConsolePanic;
use crate::exit::ExitReason;
use crate::lock;
use crate::vcpu::{self, Shared};

/// How often the event loop checks whether every vCPU has halted for good. A halted vCPU
/// sleeps inside KVM, so only a kick shows its state.
pub(crate) const HALT_CHECK_PERIOD: Duration = Duration::from_millis(100);

/// How long a guest that printed its panic line gets to finish the report and reset (as
/// `panic=-1` does at once) before cvm ends it: `panic=0` spins and `panic=N` waits N s.
pub(crate) const PANIC_GRACE: Duration = Duration::from_secs(1);

/// Kicks every vCPU out of KVM_RUN.
pub(crate) fn kick_all(threads: &Mutex<Vec<libc::pthread_t>>) {
    for &thread in lock(threads).iter() {
        // SAFETY: the vCPU threads are joined only after the event loop has stopped, so every
        // pthread_t in the list is valid while the loop runs.
        unsafe { libc::pthread_kill(thread, vcpu::kick_signal()) };
    }
}

/// The VM's own events: an exit requested by a vCPU, the i8042 reset line, the periodic check
/// for a guest halted for good, and host input for the serial console.
pub(crate) struct Control {
    pub(crate) exit_evt: EventFd,
    pub(crate) reset_evt: EventFd,
    pub(crate) halt_check: TimerFd,
    pub(crate) stdin: Option<std::io::Stdin>,
    pub(crate) serial: Arc<Mutex<SerialConsole>>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) vcpu_threads: Arc<Mutex<Vec<libc::pthread_t>>>,
    pub(crate) boot_timer: Arc<OnceLock<Instant>>,
    pub(crate) pvm_watch: Option<PvmWatch>,
    pub(crate) panic: Arc<Mutex<ConsolePanic>>,
}

/// Watches a Linux kernel booting on a PVM host for its first sign of life.
pub(crate) struct PvmWatch {
    pub(crate) deadline: Instant,
    pub(crate) console_bytes: Arc<AtomicU64>,
}

impl Control {
    pub(crate) fn check_pvm_progress(&mut self) {
        let Some(watch) = &self.pvm_watch else { return };
        if watch.console_bytes.load(Ordering::Relaxed) > 0 || self.boot_timer.get().is_some() {
            self.pvm_watch = None; // alive: this kernel runs on PVM
        } else if Instant::now() >= watch.deadline {
            self.shared.request_exit(ExitReason::NoProgressOnPvm);
        }
    }

    /// Ends a guest that panicked and did not reset within [`PANIC_GRACE`].
    pub(crate) fn check_panic(&self) {
        let state = lock(&self.panic);
        if let (Some(panic), Some(since)) = (state.watch.panic(), state.since) {
            if since.elapsed() >= PANIC_GRACE {
                self.shared.request_exit(ExitReason::GuestPanic(panic.clone()));
            }
        }
    }
}

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: &dyn AsRawFd| {
            if let Err(e) = ops.add(Events::new_raw(fd.as_raw_fd(), EventSet::IN)) {
                tracing::error!("event loop: cannot watch fd {}: {e:?}", fd.as_raw_fd());
            }
        };
        add(&self.exit_evt);
        add(&self.reset_evt);
        add(&self.halt_check);
        if let Some(stdin) = &self.stdin {
            add(stdin);
        }
        if let Err(e) = self.halt_check.reset(HALT_CHECK_PERIOD, Some(HALT_CHECK_PERIOD)) {
            tracing::warn!("cannot start the halt check: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.exit_evt.as_raw_fd() {
            let _ = self.exit_evt.read();
        } else if fd == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            self.shared.request_exit(ExitReason::Reset);
        } else if fd == self.halt_check.as_raw_fd() {
            let _ = self.halt_check.wait();
            kick_all(&self.vcpu_threads);
            self.check_pvm_progress();
            self.check_panic();
        } else if let Some(stdin) = &self.stdin {
            let mut buf = [0u8; 64];
            match stdin.lock().read(&mut buf) {
                Ok(0) | Err(_) => {
                    // End of input (or an unreadable stdin): stop watching it.
                    let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
                    self.stdin = None;
                }
                Ok(n) => {
                    let taken = lock(&self.serial).enqueue_input(&buf[..n]);
                    if taken < n {
                        tracing::warn!("serial: the guest is not reading its console; {} input bytes dropped", n - taken);
                    }
                }
            }
        }
    }
}
