//! The one place where a [`VmConfig`] becomes a running VM, and the event loop that runs it.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cvm_devices::legacy::{BootTimer, I8042, SerialConsole};
use cvm_devices::virtio::{Block, EventLoopHandle, Interrupt, MmioTransport, Net, Rng, Subscriber, VhostUserDevice, VirtioDevice, MMIO_WINDOW_SIZE};
use cvm_devices::EventFdTrigger;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_memory::{GuestMemory as _, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::guest_panic::{GuestPanic, PanicWatch, Seen};
use crate::layout::*;
use crate::memory::{self, GuestMemory};
use crate::vcpu::{self, Shared, Vcpu};
use crate::x86_64::{self, cpu, mptable, BootInfo};
use crate::{host, kvm_call, lock, Error, Result, VmConfig};

/// How often the event loop checks whether every vCPU has halted for good. A halted vCPU
/// sleeps inside KVM, so only a kick shows its state.
const HALT_CHECK_PERIOD: Duration = Duration::from_millis(100);
/// How long a Linux kernel on a PVM host may stay silent before cvm calls it stuck. A stock
/// kernel there takes 15-40 s to reach its emulation failure; a PVM-enabled one prints at once.
pub const PVM_LINUX_GRACE: Duration = Duration::from_secs(3);
/// How long a guest that printed its panic line gets to finish the report and reset (as
/// `panic=-1` does at once) before cvm ends it: `panic=0` spins and `panic=N` waits N s.
const PANIC_GRACE: Duration = Duration::from_secs(1);
/// How long the VM's end waits for each vCPU thread to leave KVM_RUN, kicked all the while,
/// before it leaves that thread to end with the process: the VM's end must never hang on one.
pub const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
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
    TripleFault { rip: Option<u64>, cr2: Option<u64> },
    /// KVM gave up on the guest; `emulation` when it could not emulate an instruction.
    InternalError { emulation: bool, pvm: bool },
    /// On a PVM host, a Linux kernel showed no sign of life (no console output, no boot timer)
    /// within [`PVM_LINUX_GRACE`]: it is crawling towards an emulation failure.
    NoProgressOnPvm,
    /// KVM could not enter the guest (bad vCPU state).
    FailedEntry { reason: u64, cpu: u32 },
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
            ExitReason::NoProgressOnPvm => write!(
                f,
                "the kernel showed no sign of life after {} s: {}",
                PVM_LINUX_GRACE.as_secs(),
                host::PVM_CANNOT_RUN_LINUX
            ),
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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootTimings {
    /// The VMM's set-up before the first instruction, by step: when each step was done.
    pub setup: Vec<(&'static str, Duration)>,
    /// To the boot processor's first KVM_RUN: the guest's first instruction.
    pub first_instruction: Option<Duration>,
    /// To the guest's write to the boot timer.
    pub boot_timer: Option<Duration>,
    /// To the moment the VM ended.
    pub exit: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmExit {
    pub reason: ExitReason,
    pub timings: BootTimings,
    /// KVM's exit counters over every vCPU, when [`VmConfig::count_exits`] asked for them.
    pub exits: Option<crate::exit_stats::ExitCounts>,
    /// The vCPUs whose threads did not stop within [`VCPU_STOP_TIMEOUT`] of the VM's end:
    /// left to end with the process.
    pub stuck_vcpus: Vec<usize>,
}

impl VmExit {
    /// What to tell the user when vCPU threads were left running.
    pub fn stuck_warning(&self) -> Option<String> {
        (!self.stuck_vcpus.is_empty()).then(|| format!("vCPU {:?} did not stop within {VCPU_STOP_TIMEOUT:?} of the VM's end; left to end with cvm", self.stuck_vcpus))
    }
}

/// Ends a running VM from outside (its run returns [`ExitReason::Stopped`]).
#[derive(Clone)]
pub struct Stopper(Arc<Shared>);

impl Stopper {
    pub fn stop(&self) {
        self.0.request_exit(ExitReason::Stopped);
    }
}

/// A built VM, ready to run.
pub struct Vm {
    _kvm: Kvm,
    _vm_fd: VmFd,
    _ram: File,
    vcpus: Vec<Vcpu>,
    event_loop: EventManager<Subscriber>,
    shared: Arc<Shared>,
    serial: Arc<Mutex<SerialConsole>>,
    boot_timer: Arc<OnceLock<Instant>>,
    panic: Arc<Mutex<ConsolePanic>>,
    /// The running vCPU threads, for the event loop's kicks.
    vcpu_threads: Arc<Mutex<Vec<libc::pthread_t>>>,
    console_relay: Option<ConsoleRelay>,
    started: Instant,
    setup: Vec<(&'static str, Duration)>,
}

impl Vm {
    /// Builds the VM `config` describes. `started` is when the VMM started, the zero of the
    /// reported boot timings.
    pub fn create(config: &VmConfig, started: Instant) -> Result<Vm> {
        config.validate()?;
        let mut setup = Vec::new();
        let mut done = |step: &'static str| setup.push((step, started.elapsed()));
        let kvm = host::open_kvm()?;
        let vm_fd = kvm.create_vm().map_err(kvm_call("create a VM"))?;
        vm_fd.set_tss_address(KVM_TSS_ADDR).map_err(kvm_call("set the TSS address"))?;
        vm_fd.create_irq_chip().map_err(kvm_call("create the interrupt controller"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm_fd.create_pit2(pit).map_err(kvm_call("create the PIT"))?;
        done("vm");

        let (mem, ram) = memory::create_guest_memory(config.memory_bytes)?;
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the mapping behind `region` lives in `mem`, which the vCPUs and devices
            // keep alive for as long as the VM exists; KVM only accesses it on their behalf.
            unsafe { vm_fd.set_user_memory_region(region_desc) }
                .map_err(kvm_call("map guest memory"))?;
        }
        done("memory");

        let kernel = x86_64::load_kernel(&mem, &config.kernel)?;
        let initrd = config
            .initrd
            .as_deref()
            .map(|path| x86_64::load_initrd(&mem, path, &kernel))
            .transpose()?;
        done("kernel");

        let event_loop: EventManager<Subscriber> = EventManager::new().map_err(event_err)?;
        let exit_evt = EventFd::new(EFD_NONBLOCK)?;
        let shared = Arc::new(Shared::new(usize::from(config.vcpus), exit_evt, config.count_exits));
        let mut devices = DeviceManager::new(&vm_fd, mem.clone(), event_loop.remote_endpoint(), &config.cmdline)?;

        let serial_irq = EventFd::new(EFD_NONBLOCK)?;
        vm_fd.register_irqfd(&serial_irq, SERIAL_IRQ).map_err(kvm_call("wire the serial interrupt"))?;
        let console_bytes = Arc::new(AtomicU64::new(0));
        let panic = Arc::new(Mutex::new(ConsolePanic::default()));
        let (sink, console_relay) = console_sink(config)?;
        let console = ConsoleOut { written: console_bytes.clone(), panic: panic.clone(), shared: shared.clone(), sink };
        let serial = Arc::new(Mutex::new(SerialConsole::new(EventFdTrigger::new(serial_irq), Box::new(console))));
        devices.add_pio(SERIAL_PORT, 8, serial.clone())?;
        let reset_evt = EventFd::new(EFD_NONBLOCK)?;
        devices.add_pio(I8042_PORT, 5, Arc::new(Mutex::new(I8042::new(EventFdTrigger::new(reset_evt.try_clone()?)))))?;
        let boot_timer = BootTimer::new();
        let boot_stamp = boot_timer.stamp();
        devices.add_mmio(BOOT_TIMER_ADDR, 0x1000, Arc::new(Mutex::new(boot_timer)))?;
        if config.rng {
            devices.add_virtio(Box::new(Rng::new()))?;
        }
        for disk in &config.disks {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(!disk.read_only)
                .open(&disk.path)
                .map_err(|source| Error::File { path: disk.path.clone(), source })?;
            devices.add_virtio(Box::new(Block::new(file, disk.read_only).map_err(|source| Error::File { path: disk.path.clone(), source })?))?;
        }
        if let Some(net) = &config.network {
            let socket = UnixStream::connect(&net.socket).map_err(|source| Error::File { path: net.socket.clone(), source })?;
            devices.add_virtio(Box::new(Net::new(socket, net.mac)))?;
        }
        for vhost in &config.vhost_user {
            let socket = UnixStream::connect(&vhost.socket).map_err(|source| Error::File { path: vhost.socket.clone(), source })?;
            devices.add_virtio(Box::new(VhostUserDevice::connect(socket, vhost.kind.device_kind(), vhost.kind.device_config())?))?;
        }
        let (io, cmdline) = devices.finish();
        done("devices");

        x86_64::write_boot_info(&mem, &BootInfo { kernel: &kernel, cmdline: &cmdline, initrd, memory: config.memory_bytes })?;
        mptable::write(&mem, config.vcpus)?;

        vcpu::install_kick_handler()?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_call("report its CPUID"))?;
        let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        let io = Arc::new(io);
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for index in 0..config.vcpus {
            let fd = vm_fd.create_vcpu(u64::from(index)).map_err(kvm_call("create a vCPU"))?;
            cpu::setup_cpuid(&fd, &cpu::guest_cpuid(&supported, index, config.vcpus, tsc_deadline))?;
            cpu::setup_lapic(&fd)?;
            if index == 0 {
                cpu::setup_boot_cpu(&fd, &mem, kernel.entry)?;
            }
            vcpus.push(Vcpu { fd, index: usize::from(index), io: io.clone(), shared: shared.clone() });
        }
        done("vcpus");

        let mut vm = Vm {
            _kvm: kvm,
            _vm_fd: vm_fd,
            _ram: ram,
            vcpus,
            event_loop,
            shared,
            serial,
            boot_timer: boot_stamp,
            panic,
            vcpu_threads: Arc::new(Mutex::new(Vec::new())),
            console_relay,
            started,
            setup,
        };
        let pvm_watch = (kernel.is_linux && host::is_pvm()).then(|| PvmWatch {
            deadline: Instant::now() + PVM_LINUX_GRACE,
            console_bytes,
        });
        vm.watch_control_events(reset_evt, config.serial_input, pvm_watch)?;
        Ok(vm)
    }

    fn watch_control_events(&mut self, reset_evt: EventFd, serial_input: bool, pvm_watch: Option<PvmWatch>) -> Result<()> {
        let halt_check = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        let stdin = serial_input.then(std::io::stdin);
        let control = Control {
            exit_evt: self.shared.exit_evt().try_clone()?,
            reset_evt,
            halt_check,
            stdin,
            serial: self.serial.clone(),
            shared: self.shared.clone(),
            vcpu_threads: self.vcpu_threads.clone(),
            boot_timer: self.boot_timer.clone(),
            pvm_watch,
            panic: self.panic.clone(),
        };
        self.event_loop.add_subscriber(Box::new(control));
        Ok(())
    }

    /// Runs the guest until it ends, then stops every vCPU thread.
    /// A handle that ends the VM from another thread.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.shared.clone())
    }

    pub fn run(mut self) -> Result<VmExit> {
        // From here on this thread and the vCPUs it starts make only the VMM's system calls.
        cvm_devices::seccomp::confine_thread(cvm_devices::seccomp::Role::Vmm)?;
        let threads: Vec<JoinHandle<()>> = self
            .vcpus
            .drain(..)
            .map(|vcpu| {
                std::thread::Builder::new()
                    .name(format!("vcpu{}", vcpu.index))
                    .spawn(move || vcpu.run())
            })
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
                // SAFETY: the thread has not been joined, so its pthread_t is still valid.
                unsafe { libc::pthread_kill(pthread, vcpu::kick_signal()) };
                std::thread::sleep(Duration::from_micros(100));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                stuck_vcpus.push(index);
            }
        }
        lock(&self.serial).flush();
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
                setup: std::mem::take(&mut self.setup),
                first_instruction: self.shared.first_entry.get().map(since_start),
                boot_timer: self.boot_timer.get().map(since_start),
                exit,
            },
        })
    }
}

/// Kicks every vCPU out of KVM_RUN.
fn kick_all(threads: &Mutex<Vec<libc::pthread_t>>) {
    for &thread in lock(threads).iter() {
        // SAFETY: the vCPU threads are joined only after the event loop has stopped, so every
        // pthread_t in the list is valid while the loop runs.
        unsafe { libc::pthread_kill(thread, vcpu::kick_signal()) };
    }
}

/// The VM's own events: an exit requested by a vCPU, the i8042 reset line, the periodic check
/// for a guest halted for good, and host input for the serial console.
struct Control {
    exit_evt: EventFd,
    reset_evt: EventFd,
    halt_check: TimerFd,
    stdin: Option<std::io::Stdin>,
    serial: Arc<Mutex<SerialConsole>>,
    shared: Arc<Shared>,
    vcpu_threads: Arc<Mutex<Vec<libc::pthread_t>>>,
    boot_timer: Arc<OnceLock<Instant>>,
    pvm_watch: Option<PvmWatch>,
    panic: Arc<Mutex<ConsolePanic>>,
}

/// Watches a Linux kernel booting on a PVM host for its first sign of life.
struct PvmWatch {
    deadline: Instant,
    console_bytes: Arc<AtomicU64>,
}

impl Control {
    fn check_pvm_progress(&mut self) {
        let Some(watch) = &self.pvm_watch else { return };
        if watch.console_bytes.load(Ordering::Relaxed) > 0 || self.boot_timer.get().is_some() {
            self.pvm_watch = None; // alive: this kernel runs on PVM
        } else if Instant::now() >= watch.deadline {
            self.shared.request_exit(ExitReason::NoProgressOnPvm);
        }
    }

    /// Ends a guest that panicked and did not reset within [`PANIC_GRACE`].
    fn check_panic(&self) {
        let state = lock(&self.panic);
        if let (Some(panic), Some(since)) = (state.watch.panic(), state.since) {
            if since.elapsed() >= PANIC_GRACE {
                self.shared.request_exit(ExitReason::GuestPanic(panic.clone()));
            }
        }
    }
}

/// The console's panic watch, and when it saw the panic.
#[derive(Default)]
struct ConsolePanic {
    watch: PanicWatch,
    since: Option<Instant>,
}


/// The serial console's sink (standard output or the console log), counting what the guest
/// wrote and watching it for a kernel panic.
struct ConsoleOut {
    written: Arc<AtomicU64>,
    panic: Arc<Mutex<ConsolePanic>>,
    shared: Arc<Shared>,
    sink: Box<dyn std::io::Write + Send>,
}

fn console_sink(config: &VmConfig) -> Result<(Box<dyn std::io::Write + Send>, Option<ConsoleRelay>)> {
    let Some(path) = &config.console_log else { return Ok((Box::new(std::io::stdout()), None)) };
    let (reader, writer) = std::io::pipe()?;
    let thread = crate::console_log::relay(reader, path).map_err(|source| Error::File { path: path.clone(), source })?;
    let pipe = Arc::new(Mutex::new(Some(writer)));
    Ok((Box::new(ConsolePipe(pipe.clone())), Some(ConsoleRelay { pipe, thread })))
}

/// The console log's writer: a thread of its own, started before the VM's threads confine
/// themselves (it creates and renames files as the log rotates; they never open a file), fed
/// through a pipe that the VM closes when it ends.
struct ConsoleRelay {
    pipe: Arc<Mutex<Option<std::io::PipeWriter>>>,
    thread: JoinHandle<()>,
}

impl ConsoleRelay {
    /// Closes the pipe and waits until all the guest wrote is in the log.
    fn finish(self) {
        lock(&self.pipe).take();
        let _ = self.thread.join();
    }
}

/// The serial console's end of the pipe to the [`ConsoleRelay`]; once closed, it drops what
/// a stopping guest still writes.
struct ConsolePipe(Arc<Mutex<Option<std::io::PipeWriter>>>);

impl std::io::Write for ConsolePipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match lock(&self.0).as_mut() {
            Some(pipe) => pipe.write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::io::Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written.fetch_add(buf.len() as u64, Ordering::Relaxed);
        let written = self.sink.write(buf)?;
        let mut state = lock(&self.panic);
        match state.watch.feed(&buf[..written]) {
            Seen::Nothing => {}
            Seen::Panic => state.since = Some(Instant::now()),
            // `panic=0`: the kernel spins from here on.
            Seen::End => {
                if let Some(panic) = state.watch.panic() {
                    self.shared.request_exit(ExitReason::GuestPanic(panic.clone()));
                }
            }
        }
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.sink.flush()
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

/// Places devices on the buses: each gets its address range, its interrupt line and, for
/// virtio-mmio, its `virtio_mmio.device=` kernel argument.
struct DeviceManager<'a> {
    vm_fd: &'a VmFd,
    mem: GuestMemory,
    event_loop: EventLoopHandle,
    io: IoManager,
    cmdline: Cmdline,
    next_virtio_addr: u64,
    next_virtio_irq: u32,
}

impl<'a> DeviceManager<'a> {
    fn new(vm_fd: &'a VmFd, mem: GuestMemory, event_loop: EventLoopHandle, cmdline: &str) -> Result<Self> {
        let mut line = Cmdline::new(CMDLINE_MAX).map_err(|e| Error::Config(format!("command line: {e}")))?;
        if !cmdline.trim().is_empty() {
            line.insert_str(cmdline.trim())
                .map_err(|e| Error::Config(format!("kernel command line {cmdline:?}: {e}")))?;
        }
        Ok(Self {
            vm_fd,
            mem,
            event_loop,
            io: IoManager::new(),
            cmdline: line,
            next_virtio_addr: VIRTIO_MMIO_START,
            next_virtio_irq: VIRTIO_IRQ_START,
        })
    }

    fn add_pio(&mut self, port: u16, len: u16, device: Arc<dyn vm_device::DevicePio + Send + Sync>) -> Result<()> {
        let range = PioRange::new(PioAddress(port), len).map_err(bus_err)?;
        self.io.register_pio(range, device).map_err(bus_err)
    }

    fn add_mmio(&mut self, addr: u64, len: u64, device: Arc<dyn vm_device::DeviceMmio + Send + Sync>) -> Result<()> {
        let range = MmioRange::new(MmioAddress(addr), len).map_err(bus_err)?;
        self.io.register_mmio(range, device).map_err(bus_err)
    }

    fn add_virtio(&mut self, device: Box<dyn VirtioDevice>) -> Result<()> {
        if self.next_virtio_irq >= IRQ_COUNT {
            return Err(Error::Config("too many virtio devices".into()));
        }
        let (addr, irq) = (self.next_virtio_addr, self.next_virtio_irq);
        let irqfd = EventFd::new(EFD_NONBLOCK)?;
        self.vm_fd.register_irqfd(&irqfd, irq).map_err(kvm_call("wire a virtio interrupt"))?;
        let transport = MmioTransport::new(device, self.mem.clone(), Arc::new(Interrupt::new(irqfd)), self.event_loop.clone())?;
        for (queue, kick) in transport.kick_events().iter().enumerate() {
            let notify = IoEventAddress::Mmio(addr + u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY));
            self.vm_fd
                .register_ioevent(kick, &notify, queue as u32)
                .map_err(kvm_call("wire a virtio queue notification"))?;
        }
        self.add_mmio(addr, MMIO_WINDOW_SIZE, Arc::new(Mutex::new(transport)))?;
        self.cmdline
            .add_virtio_mmio_device(MMIO_WINDOW_SIZE, vm_memory::GuestAddress(addr), irq, None)
            .map_err(|e| Error::Config(format!("command line too long for the devices: {e}")))?;
        self.next_virtio_addr += MMIO_WINDOW_SIZE;
        self.next_virtio_irq += 1;
        Ok(())
    }

    fn finish(self) -> (IoManager, Cmdline) {
        (self.io, self.cmdline)
    }
}

fn bus_err(e: vm_device::bus::Error) -> Error {
    Error::Config(format!("device layout: {e}"))
}

fn event_err(e: event_manager::Error) -> Error {
    Error::Io(std::io::Error::other(format!("event loop: {e:?}")))
}
