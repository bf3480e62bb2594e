//! KVM's side of a VM: the VM itself with its in-kernel interrupt controllers and PIT, and
//! guest RAM given to it as memory slots.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemory as _, GuestMemoryRegion};

use crate::layout::KVM_TSS_ADDR;
use crate::vstate::memory::GuestMemory;
use crate::{host, kvm_call, Result};

/// A new KVM VM with the x86 platform's interrupt controllers (PIC, IO-APIC) and PIT in the
/// kernel.
pub(crate) fn create() -> Result<(Kvm, VmFd)> {
    let kvm = host::open_kvm()?;
    let vm_fd = kvm.create_vm().map_err(kvm_call("create a VM"))?;
    vm_fd.set_tss_address(KVM_TSS_ADDR).map_err(kvm_call("set the TSS address"))?;
    vm_fd.create_irq_chip().map_err(kvm_call("create the interrupt controller"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm_fd.create_pit2(pit).map_err(kvm_call("create the PIT"))?;
    Ok((kvm, vm_fd))
}

/// Gives each of `mem`'s regions to the VM as a memory slot.
pub(crate) fn map_memory(vm_fd: &VmFd, mem: &GuestMemory) -> Result<()> {
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
        unsafe { vm_fd.set_user_memory_region(region_desc) }.map_err(kvm_call("map guest memory"))?;
    }
    Ok(())
}
