//! How a VM ended: [`ExitReason`], with the boot's timings and KVM's exit counts ([`VmExit`]).

use std::time::Duration;

use crate::guest_panic::GuestPanic;
use crate::host;
use crate::vm::{PVM_LINUX_GRACE, VCPU_STOP_TIMEOUT};

/// Why the VM ended.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExitReason {
    /// The guest pulsed the reset line (i8042 command 0xfe, what `reboot=k` does) or asked
    /// KVM for a reset.
    Reset,
    /// The guest asked KVM to power off.
    PowerOff,
    /// Every vCPU halted with interrupts disabled: nothing can wake the guest again.
    Halted,
    /// A fault while delivering a double fault: the CPU shuts down. Where it was (the
    /// instruction pointer and the last page-fault address), when KVM still tells.
    TripleFault {
        rip: Option<u64>,
        cr2: Option<u64>,
    },
    /// KVM gave up on the guest; `emulation` when it could not emulate an instruction.
    InternalError {
        emulation: bool,
        pvm: bool,
    },
    /// On a PVM host, a Linux kernel showed no sign of life (no console output, no boot timer)
    /// within [`PVM_LINUX_GRACE`]: it is crawling towards an emulation failure.
    NoProgressOnPvm,
    /// KVM could not enter the guest (bad vCPU state).
    FailedEntry {
        reason: u64,
        cpu: u32,
    },
    /// The guest's kernel panicked (its console said so), however it went on from there.
    GuestPanic(GuestPanic),
    /// cvm stopped it (the session ended).
    Stopped,
    Unexpected(String),
}

impl ExitReason {
    /// A reset, power-off or final halt (the guest chose to stop), or cvm stopping it.
    pub fn is_clean(&self) -> bool {
        matches!(self, ExitReason::Reset | ExitReason::PowerOff | ExitReason::Halted | ExitReason::Stopped)
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Reset => write!(f, "the guest reset the machine"),
            ExitReason::PowerOff => write!(f, "the guest powered off"),
            ExitReason::Halted => write!(f, "the guest halted with interrupts disabled"),
            ExitReason::TripleFault { rip, cr2 } => {
                write!(f, "the guest crashed: triple fault")?;
                if let (Some(rip), Some(cr2)) = (rip, cr2) {
                    write!(f, " at rip {rip:#x} (cr2 {cr2:#x})")?;
                }
                Ok(())
            }
            ExitReason::InternalError { emulation: true, pvm: true } => {
                write!(f, "KVM emulation failure: {}", host::PVM_CANNOT_RUN_LINUX)
            }
            ExitReason::InternalError { emulation: true, pvm: false } => {
                write!(f, "KVM internal error: it could not emulate an instruction of the guest")
            }
            ExitReason::InternalError { emulation: false, .. } => write!(f, "KVM internal error"),
            ExitReason::NoProgressOnPvm => {
                write!(f, "the kernel showed no sign of life after {} s: {}", PVM_LINUX_GRACE.as_secs(), host::PVM_CANNOT_RUN_LINUX)
            }
            ExitReason::FailedEntry { reason, cpu } => {
                write!(f, "KVM could not enter the guest on vCPU {cpu} (hardware reason {reason:#x})")
            }
            ExitReason::GuestPanic(panic) => write!(f, "{panic}"),
            ExitReason::Stopped => write!(f, "stopped by cvm"),
            ExitReason::Unexpected(what) => write!(f, "unexpected VM exit: {what}"),
        }
    }
}

/// When the boot reached its milestones, counted from the VMM's start.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootTimings {
    /// The VMM's set-up before the first instruction, by step: when each step was done.
    pub setup: Vec<(String, Duration)>,
    /// To the boot processor's first KVM_RUN: the guest's first instruction.
    pub first_instruction: Option<Duration>,
    /// To the guest's write to the boot timer.
    pub boot_timer: Option<Duration>,
    /// To the moment the VM ended.
    pub exit: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmExit {
    pub reason: ExitReason,
    pub timings: BootTimings,
    /// KVM's exit counters over every vCPU, when [`VmConfig::count_exits`] asked for them.
    pub exits: Option<crate::vstate::exit_stats::ExitCounts>,
    /// The vCPUs whose threads did not stop within [`VCPU_STOP_TIMEOUT`] of the VM's end:
    /// left to end with the process.
    pub stuck_vcpus: Vec<usize>,
}

impl VmExit {
    /// What to tell the user when vCPU threads were left running.
    pub fn stuck_warning(&self) -> Option<String> {
        (!self.stuck_vcpus.is_empty())
            .then(|| format!("vCPU {:?} did not stop within {VCPU_STOP_TIMEOUT:?} of the VM's end; left to end with cvm", self.stuck_vcpus))
    }
}
