//! What a snapshot keeps of KVM's x86 state: each vCPU's ([`CpuState`]) and the VM's own
//! ([`VmState`]: the PICs, the IO-APIC, the PIT, the clock), read from a paused VM and loaded
//! into a new one in the order KVM needs.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::{kvm_call, Error, Result};

/// How many MSRs one KVM_GET_MSRS asks for (KVM's own limit is 255).
const MSR_BATCH: usize = 64;

/// One vCPU's state, all of it that KVM lets a VMM read back.
#[derive(Default, Serialize, Deserialize)]
pub struct CpuState {
    cpuid: Vec<kvm_cpuid_entry2>,
    mp_state: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debug_regs: kvm_debugregs,
    lapic: kvm_lapic_state,
    /// Every MSR the host's KVM lists and this vCPU could read (kvmclock's and the TSC's among
    /// them).
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
    tsc_khz: Option<u32>,
}

/// The MSRs KVM saves and restores for a VMM: the index list it reports.
pub fn msr_list(kvm: &Kvm) -> Result<Vec<u32>> {
    Ok(kvm.get_msr_index_list().map_err(kvm_call("list its MSRs"))?.as_slice().to_vec())
}

impl CpuState {
    /// The vCPU's page-table root and paging mode: CR3 and CR4.
    pub fn paging(&self) -> (u64, u64) {
        (self.sregs.cr3, self.sregs.cr4)
    }

    /// Reads a vCPU's state. The vCPU must be outside KVM_RUN (paused).
    pub fn save(fd: &VcpuFd, msr_list: &[u32]) -> Result<CpuState> {
        let cpuid = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(kvm_call("read a vCPU's CPUID"))?;
        Ok(CpuState {
            cpuid: cpuid.as_slice().to_vec(),
            mp_state: fd.get_mp_state().map_err(kvm_call("read a vCPU's MP state"))?,
            regs: fd.get_regs().map_err(kvm_call("read a vCPU's registers"))?,
            sregs: fd.get_sregs().map_err(kvm_call("read a vCPU's special registers"))?,
            xsave: fd.get_xsave().map_err(kvm_call("read a vCPU's XSAVE area"))?,
            xcrs: fd.get_xcrs().map_err(kvm_call("read a vCPU's XCRs"))?,
            debug_regs: fd.get_debug_regs().map_err(kvm_call("read a vCPU's debug registers"))?,
            lapic: fd.get_lapic().map_err(kvm_call("read a vCPU's local APIC"))?,
            msrs: read_msrs(fd, msr_list)?,
            events: fd.get_vcpu_events().map_err(kvm_call("read a vCPU's pending events"))?,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Loads the state into a new vCPU, in the order KVM needs (CPUID first, MSRs after the
    /// local APIC, pending events last).
    pub fn restore(&self, fd: &VcpuFd) -> Result<()> {
        if let Some(khz) = self.tsc_khz {
            // A host whose TSC runs at another rate: the guest's clocks were calibrated to
            // the saved one. Where KVM cannot scale the TSC the restore goes on unscaled.
            if fd.get_tsc_khz().ok() != Some(khz) {
                if let Err(e) = fd.set_tsc_khz(khz) {
                    tracing::warn!("snapshot: cannot set the TSC to {khz} kHz: {e}");
                }
            }
        }
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| Error::Snapshot("too many CPUID entries".into()))?;
        fd.set_cpuid2(&cpuid).map_err(kvm_call("load a vCPU's CPUID"))?;
        fd.set_mp_state(self.mp_state).map_err(kvm_call("load a vCPU's MP state"))?;
        fd.set_regs(&self.regs).map_err(kvm_call("load a vCPU's registers"))?;
        fd.set_sregs(&self.sregs).map_err(kvm_call("load a vCPU's special registers"))?;
        // SAFETY: a 4 KiB kvm_xsave read back by KVM_GET_XSAVE; it has no variable part.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm_call("load a vCPU's XSAVE area"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm_call("load a vCPU's XCRs"))?;
        fd.set_debug_regs(&self.debug_regs).map_err(kvm_call("load a vCPU's debug registers"))?;
        fd.set_lapic(&self.lapic).map_err(kvm_call("load a vCPU's local APIC"))?;
        for batch in self.msrs.chunks(MSR_BATCH) {
            let msrs = Msrs::from_entries(batch).map_err(|_| Error::Snapshot("MSR batch too large".into()))?;
            let written = fd.set_msrs(&msrs).map_err(kvm_call("load a vCPU's MSRs"))?;
            if written != batch.len() {
                return Err(Error::Snapshot(format!("KVM refused MSR {:#x}", batch[written].index)));
            }
        }
        fd.set_vcpu_events(&self.events).map_err(kvm_call("load a vCPU's pending events"))?;
        Ok(())
    }
}

/// Reads every MSR in `list` that KVM will read for this vCPU: a batch read stops at the first
/// MSR it cannot read, which is left out.
fn read_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut saved = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let batch: Vec<kvm_msr_entry> = rest.iter().take(MSR_BATCH).map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&batch).map_err(|_| Error::Snapshot("MSR batch too large".into()))?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm_call("read a vCPU's MSRs"))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        // The one at `read` failed (when the batch was cut short): skip it.
        rest = &rest[(read + usize::from(read < batch.len())).min(rest.len())..];
    }
    Ok(saved)
}

/// The VM's own state: the in-kernel interrupt controllers, the PIT and the clock.
#[derive(Default, Serialize, Deserialize)]
pub struct VmState {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip { chip_id, ..Default::default() };
    vm.get_irqchip(&mut chip).map_err(kvm_call("read the interrupt controllers"))?;
    Ok(chip)
}

impl VmState {
    pub fn save(vm: &VmFd) -> Result<VmState> {
        Ok(VmState {
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(kvm_call("read the PIT"))?,
            clock: vm.get_clock().map_err(kvm_call("read the VM's clock"))?,
        })
    }

    /// Loads the state into a new VM, before its vCPUs are.
    pub fn restore(&self, vm: &VmFd) -> Result<()> {
        vm.set_pit2(&self.pit).map_err(kvm_call("load the PIT"))?;
        // The flags describe the clock that was read (stable TSC, realtime given): none of
        // them is an instruction for the new VM's.
        let clock = kvm_clock_data { flags: 0, ..self.clock };
        vm.set_clock(&clock).map_err(kvm_call("load the VM's clock"))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip).map_err(kvm_call("load the interrupt controllers"))?;
        }
        Ok(())
    }
}
