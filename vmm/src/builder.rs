//! The one place where a [`VmConfig`] becomes a VM ([`Vm::create`]): KVM's VM and guest RAM,
//! the kernel loaded, every device made and wired, the boot structures written, the vCPUs
//! created, and the VM's own events put on its event loop.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cvm_devices::legacy::{BootTimer, SerialConsole, I8042};
use cvm_devices::virtio::{Block, Net, Rng, Subscriber, VhostUserDevice};
use cvm_devices::EventFdTrigger;
use event_manager::{EventManager, SubscriberOps};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::arch::x86_64::{self, cpu, mptable, BootInfo};
use crate::console::{console_sink, ConsoleOut, ConsolePanic};
use crate::control::{Control, HaltWatch, PvmWatch};
use crate::device_manager::{event_err, DeviceManager};
use crate::layout::*;
use crate::snapshot::Snapshot;
use crate::teardown::DeferredTeardown;
use crate::vm::Machine;
use crate::vm::PVM_LINUX_GRACE;
use crate::vstate::exit_stats::HaltStats;
use crate::vstate::memory::{self, RestoredRam};
use crate::vstate::vcpu::{self, Shared, Vcpu};
use crate::{host, kvm_call, lock, vstate, Error, Result, Vm, VmConfig};

/// Where a VM's guest starts: its kernel's entry, or where a snapshot left it.
enum Start {
    Boot { kernel: x86_64::LoadedKernel, initrd: Option<(u64, u64)> },
    Restore(Box<Snapshot>),
}

impl Vm {
    /// Builds the VM `config` describes. `started` is when the VMM started, the zero of the
    /// reported boot timings.
    pub fn create(config: &VmConfig, started: Instant) -> Result<Vm> {
        config.validate()?;
        let mut setup = Vec::new();
        let mut done = |step: &'static str| setup.push((step, started.elapsed()));
        let snapshot =
            config.restore.as_deref().map(|dir| Snapshot::read(dir).map(|(snapshot, memory)| (dir, snapshot, memory))).transpose()?;
        let (kvm, vm_fd) = vstate::vm::create()?;
        done("vm");

        let writable_disks: Vec<PathBuf> = config.disks.iter().filter(|d| !d.read_only).map(|d| d.path.clone()).collect();
        // A restored guest's RAM comes with the ranges that hold the snapshot's pages.
        let (snapshot, mem, ram, snapshot_pages) = match snapshot {
            Some((dir, snapshot, memory)) => {
                snapshot.check_fits(config)?;
                snapshot.restore_disks(dir, &writable_disks)?;
                // A vhost-user backend maps guest RAM itself, so it must be shared.
                let shared = !config.vhost_user.is_empty();
                let RestoredRam { mem, file, data } =
                    memory::restore_guest_memory(memory, config.memory_bytes, shared, &snapshot.kernel_private)?;
                (Some(snapshot), mem, file, data)
            }
            None => {
                let (mem, file) = memory::create_guest_memory(config.memory_bytes)?;
                (None, mem, file, Vec::new())
            }
        };
        vstate::vm::map_memory(&vm_fd, &mem)?;
        done(if snapshot.is_some() { "snapshot-memory" } else { "memory" });

        let start = match snapshot {
            Some(snapshot) => Start::Restore(Box::new(snapshot)),
            None => {
                let kernel = x86_64::load_kernel(&mem, &config.kernel)?;
                let initrd = config.initrd.as_deref().map(|path| x86_64::load_initrd(&mem, path, &kernel)).transpose()?;
                done("kernel");
                Start::Boot { kernel, initrd }
            }
        };

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
        let serial = match &start {
            Start::Restore(snapshot) => SerialConsole::from_state(&snapshot.serial, EventFdTrigger::new(serial_irq), Box::new(console))?,
            Start::Boot { .. } => SerialConsole::new(EventFdTrigger::new(serial_irq), Box::new(console)),
        };
        let serial = Arc::new(Mutex::new(serial));
        devices.add_pio(SERIAL_PORT, 8, serial.clone())?;
        let reset_evt = EventFd::new(EFD_NONBLOCK)?;
        devices.add_pio(I8042_PORT, 5, Arc::new(Mutex::new(I8042::new(EventFdTrigger::new(reset_evt.try_clone()?)))))?;
        let mut boot_timer = BootTimer::new();
        if config.pause_at_init {
            let shared = shared.clone();
            boot_timer = boot_timer.on_reached(move || shared.request_pause());
        }
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
            devices.add_virtio(Box::new(
                Block::new(file, disk.read_only).map_err(|source| Error::File { path: disk.path.clone(), source })?,
            ))?;
        }
        if let Some(net) = &config.network {
            let socket = UnixStream::connect(&net.socket).map_err(|source| Error::File { path: net.socket.clone(), source })?;
            devices.add_virtio(Box::new(Net::new(socket, net.mac)))?;
        }
        for vhost in &config.vhost_user {
            let socket = UnixStream::connect(&vhost.socket).map_err(|source| Error::File { path: vhost.socket.clone(), source })?;
            devices.add_virtio(Box::new(VhostUserDevice::connect(socket, vhost.kind.device_kind(), vhost.kind.device_config())?))?;
        }
        let (io, cmdline, transports) = devices.finish();
        if let Start::Restore(snapshot) = &start {
            if snapshot.transports.len() != transports.len() {
                return Err(Error::Snapshot(format!(
                    "the snapshot has {} virtio devices, this VM {}",
                    snapshot.transports.len(),
                    transports.len()
                )));
            }
            for (index, (transport, saved)) in transports.iter().zip(&snapshot.transports).enumerate() {
                lock(transport).restore_state(saved).map_err(|e| Error::Snapshot(format!("virtio device {index}: {e}")))?;
            }
        }
        done("devices");

        match &start {
            Start::Boot { kernel, initrd } => {
                x86_64::write_boot_info(&mem, &BootInfo { kernel, cmdline: &cmdline, initrd: *initrd, memory: config.memory_bytes })?;
                mptable::write(&mem, config.vcpus)?;
            }
            Start::Restore(snapshot) => snapshot.vm.restore(&vm_fd)?,
        }

        vcpu::install_kick_handler()?;
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_call("report its CPUID"))?;
        let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        let io = Arc::new(io);
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for index in 0..config.vcpus {
            let fd = vm_fd.create_vcpu(u64::from(index)).map_err(kvm_call("create a vCPU"))?;
            match &start {
                Start::Restore(snapshot) => snapshot.vcpus[usize::from(index)].restore(&fd)?,
                Start::Boot { kernel, .. } => {
                    cpu::setup_cpuid(&fd, &cpu::guest_cpuid(&supported, index, config.vcpus, tsc_deadline))?;
                    cpu::setup_lapic(&fd)?;
                    if index == 0 {
                        cpu::setup_boot_cpu(&fd, &mem, kernel.entry)?;
                    }
                }
            }
            vcpus.push(Vcpu { fd, index: usize::from(index), io: io.clone(), shared: shared.clone() });
        }
        done("vcpus");
        let can_prefault = kvm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_PRE_FAULT_MEMORY)) > 0;
        if !snapshot_pages.is_empty() && can_prefault {
            match memory::prefault(&vcpus[0].fd, &snapshot_pages) {
                Ok(()) => done("prefault"),
                Err(e) => tracing::debug!("KVM_PRE_FAULT_MEMORY: {e}; the restored guest faults its pages in itself"),
            }
        }
        let teardown = DeferredTeardown::start(&vm_fd, &ram)
            .inspect_err(|e| tracing::warn!("the VM's end will wait for the kernel's teardown: {e}"))
            .ok();
        done("teardown helper");
        let steps: String = setup.iter().map(|(step, at)| format!(" {step} {:.1}", at.as_secs_f64() * 1e3)).collect();
        tracing::debug!("VMM set-up (ms from VMM start, each step done):{steps}");

        let boots_linux = matches!(&start, Start::Boot { kernel, .. } if kernel.is_linux);
        let pvm_watch = (boots_linux && host::is_pvm()).then(|| PvmWatch { deadline: Instant::now() + PVM_LINUX_GRACE, console_bytes });
        let machine = Machine {
            vm_fd,
            ram,
            memory_bytes: config.memory_bytes,
            serial,
            transports,
            writable_disks: writable_disks
                .iter()
                .map(|path| std::fs::File::open(path).map_err(|source| Error::File { path: path.clone(), source }))
                .collect::<Result<_>>()?,
            msr_list: x86_64::state::msr_list(&kvm)?,
            restored: matches!(start, Start::Restore(_)),
            kernel_text: match &start {
                Start::Boot { kernel, .. } => kernel.text,
                Start::Restore(_) => None,
            },
            // Its whole pages; the kernel reserves the last, partial one itself.
            retained_initrd: match &start {
                Start::Boot { initrd: Some((address, size)), .. }
                    if config.cmdline.split_whitespace().any(|arg| arg == crate::config::RETAIN_INITRD) =>
                {
                    Some((*address, (address + size) / PAGE_SIZE * PAGE_SIZE))
                }
                _ => None,
            },
            mem: mem.clone(),
        };
        let mut vm = Vm {
            _kvm: kvm,
            machine: Arc::new(machine),
            vcpus,
            event_loop,
            shared,
            boot_timer: boot_stamp,
            panic,
            vcpu_threads: Arc::new(Mutex::new(Vec::new())),
            console_relay,
            started,
            setup,
            _teardown: teardown,
        };
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
            serial: self.machine.serial.clone(),
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
}
