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
use crate::vstate::exit_stats::{HaltState, HaltStats};
use crate::vstate::vcpu::{self, Shared};

/// How often the event loop looks at the vCPUs for one halted for good, the PVM watch and the
/// panic grace. A halted vCPU sleeps inside KVM, and only a kick shows whether its interrupts
/// are off; KVM's statistics show, without one, whether it has sat in the same halt since the
/// last look, so only such a vCPU is kicked, once per halt.
pub(crate) const HALT_CHECK_PERIOD: Duration = Duration::from_millis(100);

/// How long a guest that printed its panic line gets to finish the report and reset (as
/// `panic=-1` does at once) before cvm ends it: `panic=0` spins and `panic=N` waits N s.
pub(crate) const PANIC_GRACE: Duration = Duration::from_secs(1);

/// One vCPU as the halt check sees it.
pub(crate) struct HaltWatch {
    /// None where KVM keeps no statistics to tell: then the vCPU is kicked every period.
    stats: Option<HaltStats>,
    /// The halt (its HLT count) it sat in at the last look, and the one it was kicked in.
    seen: Option<u64>,
    judged: Option<u64>,
}

/// What the halt check does about one vCPU after a look.
#[derive(Debug, PartialEq, Eq)]
enum HaltCheck {
    /// Kick it, so that it says whether it is halted for good.
    Kick,
    /// It runs: whatever it said in an earlier halt no longer holds.
    Running,
    /// Nothing new: a new halt (look again), or one it has already been kicked in.
    Wait,
}

impl HaltWatch {
    pub(crate) fn new(stats: Option<HaltStats>) -> HaltWatch {
        HaltWatch { stats, seen: None, judged: None }
    }

    fn look(&mut self) -> HaltCheck {
        match &self.stats {
            None => HaltCheck::Kick,
            Some(stats) => self.after(stats.read()),
        }
    }

    /// Kick a vCPU once per halt, and only after it has sat in that halt since the last look:
    /// an idle guest's vCPUs halt and wake all the time, and a kick costs each a VM exit.
    fn after(&mut self, state: Option<HaltState>) -> HaltCheck {
        let halt = match state {
            None => return HaltCheck::Kick, // unreadable: as without statistics
            Some(HaltState { blocking: false, .. }) => {
                (self.seen, self.judged) = (None, None);
                return HaltCheck::Running;
            }
            Some(HaltState { halts, .. }) => halts,
        };
        if self.seen.replace(halt) == Some(halt) && self.judged != Some(halt) {
            self.judged = Some(halt);
            return HaltCheck::Kick;
        }
        HaltCheck::Wait
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
    pub(crate) halt_watch: Vec<HaltWatch>,
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
    /// Kicks the vCPUs whose halts need a look from inside (see [`HALT_CHECK_PERIOD`]).
    fn check_halts(&mut self) {
        let threads = lock(&self.vcpu_threads);
        for (index, watch) in self.halt_watch.iter_mut().enumerate() {
            if let Some(&thread) = threads.get(index) {
                match watch.look() {
                    HaltCheck::Kick => vcpu::kick(thread),
                    HaltCheck::Running => self.shared.set_stuck(index, false),
                    HaltCheck::Wait => {}
                }
            }
        }
    }

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
            self.check_halts();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn halted(halts: u64) -> Option<HaltState> {
        Some(HaltState { blocking: true, halts })
    }

    #[test]
    fn a_vcpu_is_kicked_once_per_halt_and_only_after_sitting_in_it() {
        let mut watch = HaltWatch::new(None);
        assert_eq!(watch.after(halted(1)), HaltCheck::Wait, "a halt first seen may end by itself");
        assert_eq!(watch.after(halted(1)), HaltCheck::Kick);
        assert_eq!(watch.after(halted(1)), HaltCheck::Wait, "kicked once in this halt");
        assert_eq!(watch.after(halted(1)), HaltCheck::Wait);
        // Woken and halted again between two looks: a new halt.
        assert_eq!(watch.after(halted(2)), HaltCheck::Wait);
        assert_eq!(watch.after(halted(2)), HaltCheck::Kick);
    }

    #[test]
    fn a_running_vcpu_forgets_its_verdict_and_is_judged_again() {
        let mut watch = HaltWatch::new(None);
        watch.after(halted(3));
        assert_eq!(watch.after(halted(3)), HaltCheck::Kick);
        // Seen out of KVM (say, still handling that kick when the next look came).
        assert_eq!(watch.after(Some(HaltState { blocking: false, halts: 3 })), HaltCheck::Running);
        assert_eq!(watch.after(halted(3)), HaltCheck::Wait);
        assert_eq!(watch.after(halted(3)), HaltCheck::Kick, "the same halt is judged again");
        assert_eq!(watch.after(None), HaltCheck::Kick, "an unreadable look kicks, as without statistics");
    }

    #[test]
    fn without_statistics_every_look_kicks() {
        let mut watch = HaltWatch::new(None);
        assert_eq!(watch.look(), HaltCheck::Kick);
        assert_eq!(watch.look(), HaltCheck::Kick);
    }
}
