//! vCPU threads: each runs KVM_RUN in a loop, routes port and MMIO exits to the device bus,
//! and reports the exits that end the VM.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use kvm_bindings::{KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED};
use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::state::CpuState;
use crate::exit::ExitReason;
use crate::lock;
use crate::vstate::exit_stats::{self, ExitCounts};

const RFLAGS_IF: u64 = 1 << 9;
const CR0_PE: u64 = 1;
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

/// The signal that kicks a vCPU thread out of KVM_RUN. A signal alone can arrive just before
/// the thread enters KVM_RUN and be lost; so its handler also sets the thread's
/// `immediate_exit`, which makes that next KVM_RUN return EINTR at once.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    /// This vCPU thread's `kvm_run.immediate_exit`, for the kick handler; null on other threads.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: the pointer is set by this thread's Vcpu::run to its own vCPU's kvm_run
        // mapping, which lives until the run returns and clears it first; a volatile byte
        // store is async-signal-safe.
        unsafe { std::ptr::write_volatile(flag, 1) };
    }
}

/// Kicks a vCPU thread out of KVM_RUN (or keeps it from entering it next).
pub(crate) fn kick(thread: libc::pthread_t) {
    // SAFETY: callers pass the pthread_t of a vCPU thread that has not been joined: the VM's
    // run joins them only after its event loop, and every holder of the list, are done.
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}

/// Where a vCPU is in its life. Paused is outside KVM_RUN with its state at rest, as a
/// snapshot needs it; Exited is for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    Running,
    Paused,
    Exited,
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> std::io::Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()))
        .map_err(std::io::Error::from_raw_os_error)
}

/// State the vCPU threads and the event loop share.
pub struct Shared {
    exit: Mutex<Option<ExitReason>>,
    exit_evt: EventFd,
    stop: AtomicBool,
    /// Set while the VM is to be paused: each vCPU parks at its next exit (a kick makes one).
    pause: AtomicBool,
    states: Mutex<Vec<VcpuState>>,
    state_changed: Condvar,
    /// A snapshot's request to the parked vCPUs: each saves its own state here. Locked after
    /// `states` where both are.
    saves: Mutex<Option<SaveRound>>,
    /// Per vCPU: it cannot run again (halted with interrupts off, or never started).
    stuck: Vec<AtomicBool>,
    pub first_entry: OnceLock<Instant>,
    /// Every vCPU's exit counters, added up as each stops; None when not counted.
    pub exits: Option<Mutex<ExitCounts>>,
}

impl Shared {
    pub fn new(vcpus: usize, exit_evt: EventFd, count_exits: bool) -> Self {
        Self {
            exit: Mutex::new(None),
            exit_evt,
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            states: Mutex::new(vec![VcpuState::Running; vcpus]),
            state_changed: Condvar::new(),
            saves: Mutex::new(None),
            stuck: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            first_entry: OnceLock::new(),
            exits: count_exits.then(|| Mutex::new(ExitCounts::new())),
        }
    }

    /// Records why the VM ends (the first reason wins) and wakes the event loop.
    pub fn request_exit(&self, reason: ExitReason) {
        let mut exit = lock(&self.exit);
        if exit.is_none() {
            *exit = Some(reason);
            let _ = self.exit_evt.write(1);
        }
    }

    pub fn exit_reason(&self) -> Option<ExitReason> {
        lock(&self.exit).clone()
    }

    pub fn exit_evt(&self) -> &EventFd {
        &self.exit_evt
    }

    /// Records whether vCPU `index` can run again (see [`Vcpu::note_if_stuck`]).
    pub fn set_stuck(&self, index: usize, stuck: bool) {
        self.stuck[index].store(stuck, Ordering::SeqCst);
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _states = lock(&self.states);
        self.state_changed.notify_all();
    }

    pub fn vcpu_states(&self) -> Vec<VcpuState> {
        lock(&self.states).clone()
    }

    fn set_state(&self, index: usize, state: VcpuState) {
        lock(&self.states)[index] = state;
        self.state_changed.notify_all();
    }

    /// Asks every vCPU to park, kicking them through `kick`, and waits until none is running,
    /// for at most `timeout`. On time out the pause is called off.
    pub fn pause(&self, kick: impl Fn(), timeout: std::time::Duration) -> Result<(), String> {
        self.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        let mut states = lock(&self.states);
        while states.contains(&VcpuState::Running) {
            let now = Instant::now();
            if now >= deadline {
                drop(states);
                self.resume();
                return Err(format!("the vCPUs did not pause within {timeout:?}"));
            }
            // Kicked again now and then: a vCPU whose thread was not yet known to `kick`.
            drop(states);
            kick();
            states = lock(&self.states);
            let wait = (deadline - now).min(std::time::Duration::from_millis(10));
            states = self.state_changed.wait_timeout(states, wait).unwrap_or_else(|e| e.into_inner()).0;
        }
        Ok(())
    }

    /// Parks every vCPU at its next exit, without waiting: a vCPU that calls this from a
    /// device pauses before its guest's next instruction.
    pub fn request_pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
    }

    /// Has every parked vCPU save its state (reading the MSRs in `msr_list`) and returns the
    /// states by index. The VM must be paused; waits at most `timeout`.
    pub fn save_vcpus(&self, msr_list: &[u32], timeout: std::time::Duration) -> Result<Vec<CpuState>, String> {
        let count = self.stuck.len();
        *lock(&self.saves) = Some(SaveRound { msr_list: msr_list.to_vec(), results: (0..count).map(|_| None).collect() });
        let deadline = Instant::now() + timeout;
        let mut states = lock(&self.states);
        self.state_changed.notify_all();
        let results = loop {
            if let Some(index) = states.iter().position(|s| *s != VcpuState::Paused) {
                break Err(format!("vCPU {index} is not paused"));
            }
            let mut saves = lock(&self.saves);
            if let Some(round) = saves.as_mut().filter(|r| r.results.iter().all(Option::is_some)) {
                break std::mem::take(&mut round.results).into_iter().flatten().collect();
            }
            drop(saves);
            let now = Instant::now();
            if now >= deadline {
                break Err(format!("the vCPUs did not save their state within {timeout:?}"));
            }
            states = self
                .state_changed
                .wait_timeout(states, (deadline - now).min(std::time::Duration::from_millis(10)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        *lock(&self.saves) = None;
        results
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
        let _states = lock(&self.states);
        self.state_changed.notify_all();
    }
}

/// One snapshot's request to the parked vCPUs, and what each has saved.
struct SaveRound {
    msr_list: Vec<u32>,
    results: Vec<Option<Result<CpuState, String>>>,
}

pub struct Vcpu {
    pub fd: VcpuFd,
    pub index: usize,
    pub io: Arc<IoManager>,
    pub shared: Arc<Shared>,
}

impl Vcpu {
    /// Runs the guest until the VM ends or the VMM stops this vCPU.
    pub fn run(mut self) {
        let immediate_exit: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|flag| flag.set(immediate_exit));
        self.run_until_stopped();
        IMMEDIATE_EXIT.with(|flag| flag.set(std::ptr::null_mut()));
        if let Some(total) = &self.shared.exits {
            let counts = exit_stats::read(&self.fd);
            exit_stats::add(&mut lock(total), counts);
        }
        self.shared.set_state(self.index, VcpuState::Exited);
    }

    /// Waits outside KVM_RUN while the VM is paused (and not stopped).
    fn park(&self) {
        let shared = &self.shared;
        let mut states = lock(&shared.states);
        states[self.index] = VcpuState::Paused;
        shared.state_changed.notify_all();
        while shared.pause.load(Ordering::SeqCst) && !shared.stop.load(Ordering::SeqCst) {
            let mut saves = lock(&shared.saves);
            if let Some(round) = saves.as_mut().filter(|r| r.results[self.index].is_none()) {
                let saved = CpuState::save(&self.fd, &round.msr_list).map_err(|e| e.to_string());
                round.results[self.index] = Some(saved);
                shared.state_changed.notify_all();
            }
            drop(saves);
            states = shared.state_changed.wait(states).unwrap_or_else(|e| e.into_inner());
        }
        states[self.index] = VcpuState::Running;
        shared.state_changed.notify_all();
    }

    fn run_until_stopped(&mut self) {
        while !self.shared.stop.load(Ordering::SeqCst) {
            if self.shared.pause.load(Ordering::SeqCst) {
                self.park();
                continue;
            }
            if self.index == 0 && self.shared.first_entry.get().is_none() {
                let _ = self.shared.first_entry.set(Instant::now());
            }
            let ended = match self.fd.run() {
                Ok(exit) => handle_exit(exit, &self.io),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    self.note_if_stuck();
                    None
                }
                Err(e) => Some(ExitReason::Unexpected(format!("KVM_RUN failed: {e}"))),
            };
            if let Some(reason) = ended {
                self.shared.request_exit(refine(&mut self.fd, reason));
                break;
            }
        }
    }

    /// Kicked (by the halt check, or a stop): is this vCPU parked for good? When every vCPU is,
    /// the guest has halted (Linux's halt and poweroff without ACPI end in `cli; hlt`).
    fn note_if_stuck(&mut self) {
        let Ok(mp) = self.fd.get_mp_state() else { return };
        let stuck = match mp.mp_state {
            KVM_MP_STATE_HALTED => self.fd.get_regs().is_ok_and(|r| r.rflags & RFLAGS_IF == 0),
            KVM_MP_STATE_INIT_RECEIVED | KVM_MP_STATE_UNINITIALIZED => self.index != 0,
            _ => false,
        };
        self.shared.set_stuck(self.index, stuck);
        if stuck && self.shared.stuck.iter().all(|s| s.load(Ordering::SeqCst)) {
            self.shared.request_exit(ExitReason::Halted);
        }
    }
}

fn handle_exit(exit: VcpuExit, io: &IoManager) -> Option<ExitReason> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if io.pio_read(PioAddress(port), data).is_err() {
                data.fill(0xff); // nothing there: the bus floats high
            }
        }
        VcpuExit::IoOut(port, data) => {
            let _ = io.pio_write(PioAddress(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            if io.mmio_read(MmioAddress(addr), data).is_err() {
                tracing::debug!("guest read unmapped MMIO at {addr:#x}");
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if io.mmio_write(MmioAddress(addr), data).is_err() {
                tracing::debug!("guest wrote unmapped MMIO at {addr:#x}; ignored");
            }
        }
        VcpuExit::Hlt => return Some(ExitReason::Halted),
        VcpuExit::Shutdown => return Some(ExitReason::TripleFault { rip: None, cr2: None }),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => return Some(ExitReason::PowerOff),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => return Some(ExitReason::Reset),
        VcpuExit::SystemEvent(kind, _) => return Some(ExitReason::Unexpected(format!("system event {kind}"))),
        VcpuExit::InternalError => return Some(ExitReason::InternalError { emulation: false, pvm: crate::host::is_pvm() }),
        VcpuExit::FailEntry(reason, cpu) => return Some(ExitReason::FailedEntry { reason, cpu }),
        VcpuExit::Intr => {}
        other => return Some(ExitReason::Unexpected(format!("{other:?}"))),
    }
    None
}

/// Adds what the vCPU still knows to the exit that ended it: whether an InternalError was an
/// emulation failure (what PVM reports for a stock kernel; the kind is in the run structure),
/// and where a triple fault happened.
fn refine(fd: &mut VcpuFd, reason: ExitReason) -> ExitReason {
    match reason {
        // On AMD, KVM resets the vCPU on a shutdown (real mode at the reset vector): then
        // where it was is lost.
        ExitReason::TripleFault { .. } => match (fd.get_regs(), fd.get_sregs()) {
            (Ok(regs), Ok(sregs)) if sregs.cr0 & CR0_PE != 0 => ExitReason::TripleFault { rip: Some(regs.rip), cr2: Some(sregs.cr2) },
            _ => ExitReason::TripleFault { rip: None, cr2: None },
        },
        ExitReason::InternalError { pvm, .. } => {
            // SAFETY: reading a plain integer of the run structure's union, which KVM filled
            // for this InternalError exit.
            let suberror = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
            ExitReason::InternalError { emulation: suberror == KVM_INTERNAL_ERROR_EMULATION, pvm }
        }
        other => other,
    }
}
