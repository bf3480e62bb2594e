//! A built VM ([`Vm`], made by `builder.rs`) and its run: vCPU threads started, the event
//! loop driven until the VM ends, the vCPUs stopped.

use std::fs::File;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cvm_devices::legacy::SerialConsole;
use cvm_devices::virtio::{MmioTransport, Subscriber};
use event_manager::EventManager;
use kvm_ioctls::{Kvm, VmFd};

use crate::arch::x86_64::state::VmState;
use crate::snapshot::Snapshot;
use crate::vstate::memory::GuestMemory;

use crate::console::{ConsolePanic, ConsoleRelay};
use crate::exit::{BootTimings, ExitReason, VmExit};
use crate::teardown::DeferredTeardown;
use crate::vstate::vcpu::{self, Shared, Vcpu, VcpuState};
use crate::{lock, Error, Result};

/// How long a Linux kernel on a PVM host may stay silent before cvm calls it stuck. A stock
/// kernel there takes 15-40 s to reach its emulation failure; a PVM-enabled one prints at once.
pub const PVM_LINUX_GRACE: Duration = Duration::from_secs(3);

/// How long the VM's end waits for each vCPU thread to leave KVM_RUN, kicked all the while,
/// before it leaves that thread to end with the process: the VM's end must never hang on one.
pub const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a snapshot waits for the vCPUs to pause, and then for them to save their state.
pub const SNAPSHOT_PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Controls a VM from outside its run: stops it (its run returns [`ExitReason::Stopped`]),
/// pauses and resumes its vCPUs, snapshots it.
#[derive(Clone)]
pub struct VmHandle {
    shared: Arc<Shared>,
    vcpu_threads: Arc<Mutex<Vec<libc::pthread_t>>>,
    /// Gone with the VM: a handle never keeps a VM's KVM objects or RAM alive.
    machine: Weak<Machine>,
    boot_timer: Arc<OnceLock<Instant>>,
}

impl VmHandle {
    pub fn stop(&self) {
        self.shared.request_exit(ExitReason::Stopped);
    }

    /// Parks every vCPU outside KVM_RUN and waits until none runs (at most `timeout`; a VM not
    /// yet running pauses as it starts). Devices and the event loop go on.
    pub fn pause(&self, timeout: Duration) -> Result<()> {
        let kick_all = || lock(&self.vcpu_threads).iter().for_each(|&thread| vcpu::kick(thread));
        self.shared.pause(kick_all, timeout).map_err(crate::Error::Boot)
    }

    pub fn resume(&self) {
        self.shared.resume();
    }

    /// Each vCPU's state, by index.
    pub fn vcpu_states(&self) -> Vec<VcpuState> {
        self.shared.vcpu_states()
    }

    /// Whether the guest has reached its init (written the boot timer).
    pub fn init_reached(&self) -> bool {
        self.boot_timer.get().is_some()
    }

    /// Pauses the VM and captures it: the snapshot's state file ([`Snapshot::encode`]) and its
    /// RAM, to be written with [`crate::snapshot::write`] while the VM stays paused. The devices
    /// must be at rest: each has returned every buffer it took. The caller resumes the VM;
    /// where the capture fails it is resumed here.
    pub fn capture(&self) -> Result<Captured> {
        let captured = self.capture_paused();
        if captured.is_err() {
            self.resume();
        }
        captured
    }

    fn capture_paused(&self) -> Result<Captured> {
        let machine = self.machine.upgrade().ok_or_else(|| Error::Snapshot("the VM has ended".into()))?;
        if machine.restored {
            return Err(Error::Snapshot("a VM restored from a snapshot is not snapshotted again".into()));
        }
        self.pause(SNAPSHOT_PAUSE_TIMEOUT)?;
        let vcpus = self.shared.save_vcpus(&machine.msr_list, SNAPSHOT_PAUSE_TIMEOUT).map_err(Error::Snapshot)?;
        let kernel_private = vcpus.first().map(|vcpu| kernel_private_memory(&machine, vcpu)).unwrap_or_default();
        tracing::debug!("snapshot: memory no device touches, shared by restored VMs: {kernel_private:#x?}");
        let snapshot = Snapshot {
            memory_bytes: machine.memory_bytes,
            vm: VmState::save(&machine.vm_fd)?,
            vcpus,
            serial: lock(&machine.serial).save_state(),
            transports: machine.transports.iter().map(|t| lock(t).save_state()).collect(),
            disks: machine.writable_disks.iter().map(|disk| disk.metadata().map(|m| m.len())).collect::<std::io::Result<_>>()?,
            kernel_private,
        };
        Ok(Captured { state: snapshot.encode()?, ram: machine.ram.try_clone()? })
    }

    /// Whether the VM's run has ended (or is ending).
    pub fn has_ended(&self) -> bool {
        self.shared.exit_reason().is_some()
    }
}

/// A paused VM as a snapshot keeps it (see [`VmHandle::capture`]).
pub struct Captured {
    /// The state file's contents.
    pub state: Vec<u8>,
    /// The guest RAM's memfd.
    pub ram: File,
}

/// KVM's VM, guest RAM and the devices: what a snapshot reads besides the vCPUs.
pub(crate) struct Machine {
    pub(crate) vm_fd: VmFd,
    /// The RAM's memfd, or a snapshot's memory file mapped private.
    pub(crate) ram: File,
    pub(crate) memory_bytes: u64,
    pub(crate) serial: Arc<Mutex<SerialConsole>>,
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// The writable disks (open for reading), whose sizes a snapshot records.
    pub(crate) writable_disks: Vec<File>,
    /// The MSRs a vCPU's snapshot saves.
    pub(crate) msr_list: Vec<u32>,
    /// Restored from a snapshot: its RAM may be a private mapping the memory file does not see.
    pub(crate) restored: bool,
    /// Where the kernel the VMM loaded keeps its code, for a snapshot to record.
    pub(crate) kernel_text: Option<(u64, u64)>,
    /// The initrd the VMM loaded, where the command line has the kernel keep it.
    pub(crate) retained_initrd: Option<(u64, u64)>,
    /// Guest RAM, for reading the guest's page tables.
    pub(crate) mem: GuestMemory,
}

/// At most this many ranges of a guest's struct pages are shared (each is a memory slot).
const MAX_STRUCT_PAGE_RUNS: usize = 8;

/// The guest memory a snapshot marks as no device's (see [`Snapshot::kernel_private`]): the
/// kernel's code, the initrd it kept, and where the guest runs Linux's fixed 4-level memory
/// layout (its direct map holds the kernel's code where the VMM put it), the pages behind its
/// struct pages, found through vCPU 0's page tables. A guest that lies here only breaks its
/// own devices: a backend is refused what it was not given.
fn kernel_private_memory(machine: &Machine, vcpu: &crate::arch::x86_64::state::CpuState) -> Vec<(u64, u64)> {
    use crate::arch::x86_64::page_tables::{backing, physical, CR4_LA57, LINUX_DIRECT_MAP_START, LINUX_VMEMMAP_START};
    use vm_memory::{Bytes, GuestAddress};
    let Some(text) = machine.kernel_text else { return Vec::new() };
    let mut private = vec![text];
    private.extend(machine.retained_initrd.filter(|(start, end)| start < end));
    let (cr3, cr4) = vcpu.paging();
    let read = |at: u64| machine.mem.read_obj::<u64>(GuestAddress(at)).ok();
    if cr4 & CR4_LA57 == 0 && physical(read, cr3, LINUX_DIRECT_MAP_START + text.0) == Some(text.0) {
        let ram_end = crate::layout::ram_ranges(machine.memory_bytes).last().map_or(0, |&(start, len)| start + len);
        // A struct page is 64 bytes in the kernels cvm builds; walking twice as far stays
        // inside the region Linux keeps for them.
        let span = ram_end / crate::layout::PAGE_SIZE * 128;
        private.extend(backing(read, cr3, LINUX_VMEMMAP_START, LINUX_VMEMMAP_START + span, MAX_STRUCT_PAGE_RUNS));
    }
    private
}

/// A built VM, ready to run.
pub struct Vm {
    pub(crate) _kvm: Kvm,
    pub(crate) machine: Arc<Machine>,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) event_loop: EventManager<Subscriber>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) boot_timer: Arc<OnceLock<Instant>>,
    pub(crate) panic: Arc<Mutex<ConsolePanic>>,
    /// The running vCPU threads, for the event loop's kicks.
    pub(crate) vcpu_threads: Arc<Mutex<Vec<libc::pthread_t>>>,
    pub(crate) console_relay: Option<ConsoleRelay>,
    pub(crate) started: Instant,
    pub(crate) setup: Vec<(&'static str, Duration)>,
    /// Last, so that it lets go of the helper only once every fd above is closed.
    pub(crate) _teardown: Option<DeferredTeardown>,
}

impl Vm {
    /// A handle that stops, pauses and resumes the VM from another thread.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            shared: self.shared.clone(),
            vcpu_threads: self.vcpu_threads.clone(),
            machine: Arc::downgrade(&self.machine),
            boot_timer: self.boot_timer.clone(),
        }
    }

    /// Runs the guest until it ends, then stops every vCPU thread.
    pub fn run(mut self) -> Result<VmExit> {
        // From here on this thread and the vCPUs it starts make only the VMM's system calls.
        cvm_sandbox::seccomp::confine_thread(cvm_sandbox::seccomp::Role::Vmm)?;
        let threads: Vec<JoinHandle<()>> = self
            .vcpus
            .drain(..)
            .map(|vcpu| std::thread::Builder::new().name(format!("vcpu{}", vcpu.index)).spawn(move || vcpu.run()))
            .collect::<std::io::Result<_>>()?;
        let pthreads: Vec<libc::pthread_t> = threads.iter().map(|t| t.as_pthread_t()).collect();
        *lock(&self.vcpu_threads) = pthreads.clone();

        let reason = loop {
            if let Some(reason) = self.shared.exit_reason() {
                break reason;
            }
            if let Err(e) = self.event_loop.run() {
                break ExitReason::Unexpected(format!("event loop: {e:?}"));
            }
        };
        // A panic explains whatever followed it: `panic=-1`'s reset above all.
        let reason = match lock(&self.panic).watch.panic() {
            Some(panic) => ExitReason::GuestPanic(panic.clone()),
            None => reason,
        };
        let exit = self.started.elapsed();

        self.shared.stop();
        let give_up = Instant::now() + VCPU_STOP_TIMEOUT;
        let mut stuck_vcpus = Vec::new();
        for (index, (thread, pthread)) in threads.into_iter().zip(pthreads).enumerate() {
            while !thread.is_finished() && Instant::now() < give_up {
                vcpu::kick(pthread);
                std::thread::sleep(Duration::from_micros(100));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                stuck_vcpus.push(index);
            }
        }
        lock(&self.machine.serial).flush();
        if let Some(relay) = self.console_relay.take() {
            relay.finish();
        }

        let since_start = |t: &Instant| t.saturating_duration_since(self.started);
        let exits = self.shared.exits.as_ref().map(|e| lock(e).clone());
        Ok(VmExit {
            reason,
            exits,
            stuck_vcpus,
            timings: BootTimings {
                setup: self.setup.drain(..).map(|(step, at)| (step.to_string(), at)).collect(),
                first_instruction: self.shared.first_entry.get().map(since_start),
                boot_timer: self.boot_timer.get().map(since_start),
                exit,
            },
        })
    }
}
