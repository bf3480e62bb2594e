//! The one place where a [`VmConfig`] becomes a running VM ([`Vm::create`]), and its run:
//! vCPU threads started, the event loop driven until the VM ends, the vCPUs stopped.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cvm_devices::legacy::{BootTimer, I8042, SerialConsole};
use cvm_devices::virtio::{Block, Net, Rng, Subscriber, VhostUserDevice};
use cvm_devices::EventFdTrigger;
use event_manager::{EventManager, SubscriberOps};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemory as _, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::console::{console_sink, ConsoleOut, ConsolePanic, ConsoleRelay};
use crate::control::{Control, HaltWatch, PvmWatch};
use crate::exit_stats::HaltStats;
use crate::device_manager::{event_err, DeviceManager};
use crate::exit::{BootTimings, ExitReason, VmExit};
use crate::layout::*;
use crate::memory;
use crate::teardown::DeferredTeardown;
use crate::vcpu::{self, Shared, Vcpu};
use crate::x86_64::{self, cpu, mptable, BootInfo};
use crate::{host, kvm_call, lock, Error, Result, VmConfig};

/// How long a Linux kernel on a PVM host may stay silent before cvm calls it stuck. A stock
/// kernel there takes 15-40 s to reach its emulation failure; a PVM-enabled one prints at once.
pub const PVM_LINUX_GRACE: Duration = Duration::from_secs(3);

/// How long the VM's end waits for each vCPU thread to leave KVM_RUN, kicked all the while,
/// before it leaves that thread to end with the process: the VM's end must never hang on one.
pub const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// Last, so that it lets go of the helper only once every fd above is closed.
    _teardown: Option<DeferredTeardown>,
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
        let teardown = DeferredTeardown::start(&vm_fd, &ram)
            .inspect_err(|e| tracing::warn!("the VM's end will wait for the kernel's teardown: {e}"))
            .ok();
        done("teardown helper");

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
            _teardown: teardown,
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
            halt_watch: self.vcpus.iter().map(|vcpu| HaltWatch::new(HaltStats::open(&vcpu.fd))).collect(),
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
