//! The state a vCPU starts in: CPUID, local APIC wiring, and for the boot processor the
//! registers of the entry protocol (PVH 32-bit protected mode, or 64-bit long mode with
//! identity page tables).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, CpuId};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::EntryPoint;
use crate::layout::*;
use crate::vstate::memory::GuestMemory;
use crate::{kvm_call, Error, Result};

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

/// One GDT descriptor, from its parts.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (u64::from(base & 0xff00_0000) << 32)
        | (u64::from(flags & 0xf0ff) << 40)
        | (u64::from(limit & 0x000f_0000) << 32)
        | (u64::from(base & 0x00ff_ffff) << 16)
        | u64::from(limit & 0x0000_ffff)
}

/// The KVM view of a GDT descriptor, which must agree with the bytes in guest memory.
fn segment(selector: u16, entry: u64) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// The three descriptors after the null one: code, data, TSS. 0xc09b: 32-bit code, 0xa09b:
/// 64-bit code, 0xc093: data, 0x808b: busy TSS.
fn gdt(entry: EntryPoint) -> [u64; 4] {
    let code_flags = match entry {
        EntryPoint::Pvh(_) => 0xc09b,
        EntryPoint::Linux64(_) => 0xa09b,
    };
    [0, gdt_entry(code_flags, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)]
}

/// Writes the GDT (and, for the 64-bit entry, identity page tables for the first 4 GiB) and
/// sets the boot processor's registers for `entry`.
pub fn setup_boot_cpu(vcpu: &VcpuFd, mem: &GuestMemory, entry: EntryPoint) -> Result<()> {
    let boot_err = |e: vm_memory::GuestMemoryError| Error::Boot(format!("boot tables: {e}"));
    let table = gdt(entry);
    for (i, e) in table.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64)).map_err(boot_err)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR)).map_err(boot_err)?;

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_call("read the vCPU's special registers"))?;
    let code = segment(CODE_SELECTOR, table[1]);
    let data = segment(DATA_SELECTOR, table[2]);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_SELECTOR, table[3]);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;

    let mut regs = kvm_regs { rflags: 0x2, rip: entry.address().0, ..Default::default() };
    match entry {
        EntryPoint::Pvh(_) => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rbx = PVH_START_INFO_ADDR;
        }
        EntryPoint::Linux64(_) => {
            write_identity_page_tables(mem).map_err(boot_err)?;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = CR4_PAE;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rsp = BOOT_STACK_TOP;
            regs.rbp = BOOT_STACK_TOP;
            regs.rsi = ZERO_PAGE_ADDR;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm_call("set the vCPU's special registers"))?;
    vcpu.set_regs(&regs).map_err(kvm_call("set the vCPU's registers"))?;
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm_call("set the vCPU's FPU state"))?;
    Ok(())
}

/// PML4 -> one PDPT -> four page directories of 2 MiB pages: the first 4 GiB mapped 1:1.
fn write_identity_page_tables(mem: &GuestMemory) -> std::result::Result<(), vm_memory::GuestMemoryError> {
    const PRESENT_WRITABLE: u64 = 0x3;
    const LARGE_PAGE: u64 = 0x80;
    let pdpt = PML4_ADDR + 0x1000;
    let first_pd = pdpt + 0x1000;
    mem.write_obj(pdpt | PRESENT_WRITABLE, GuestAddress(PML4_ADDR))?;
    for gib in 0..4u64 {
        let pd = first_pd + gib * 0x1000;
        mem.write_obj(pd | PRESENT_WRITABLE, GuestAddress(pdpt + gib * 8))?;
        for i in 0..512u64 {
            let frame = (gib << 30) | (i << 21);
            mem.write_obj(frame | PRESENT_WRITABLE | LARGE_PAGE, GuestAddress(pd + i * 8))?;
        }
    }
    Ok(())
}

/// CPUID.1:ECX bit 24: the local APIC's timer takes a TSC deadline.
const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:ECX bit 31: running under a hypervisor.
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28 (HTT): the package's processor count in EBX is valid.
const CPUID_1_EDX_HTT: u32 = 1 << 28;

/// What vCPU `index` of `count` says it is: the host's supported CPUID with its own APIC ID,
/// the hypervisor bit and, where KVM emulates it (`tsc_deadline`, a capability KVM does not
/// put in its supported CPUID), the TSC-deadline timer. Without that timer Linux calibrates
/// the APIC timer against the PIT at boot and runs it in one-shot mode: slower to boot, more
/// exits, and under nested virtualization an L2 guest that crashed now and then (seen in L1).
pub fn guest_cpuid(supported: &CpuId, index: u8, count: u8, tsc_deadline: bool) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // EBX: initial APIC ID (31:24), logical processors per package (23:16).
                entry.ebx = (u32::from(index) << 24) | (u32::from(count) << 16) | (entry.ebx & 0xffff);
                entry.ecx |= CPUID_1_ECX_HYPERVISOR;
                if tsc_deadline {
                    entry.ecx |= CPUID_1_ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    entry.edx |= CPUID_1_EDX_HTT;
                }
            }
            0xb | 0x1f => entry.edx = u32::from(index), // x2APIC ID
            _ => {}
        }
    }
    cpuid
}

pub fn setup_cpuid(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<()> {
    vcpu.set_cpuid2(cpuid).map_err(kvm_call("set the vCPU's CPUID"))
}

/// Wires the local APIC as on a PC: LINT0 takes the 8259's ExtINT, LINT1 the NMI.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<()> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_NMI: u32 = 0x4;
    const MODE_EXTINT: u32 = 0x7;
    let mut lapic = vcpu.get_lapic().map_err(kvm_call("read the local APIC"))?;
    for (offset, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let reg = &mut lapic.regs[offset..offset + 4];
        let bytes: [u8; 4] = std::array::from_fn(|i| reg[i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (dst, src) in reg.iter_mut().zip(value.to_le_bytes()) {
            *dst = src as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm_call("set the local APIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_round_trip_into_kvm_segments() {
        let code32 = segment(CODE_SELECTOR, gdt_entry(0xc09b, 0, 0xfffff));
        assert_eq!((code32.base, code32.limit, code32.type_, code32.db, code32.l, code32.g), (0, 0xffff_ffff, 0xb, 1, 0, 1));
        assert_eq!((code32.present, code32.s, code32.dpl), (1, 1, 0));
        let code64 = segment(CODE_SELECTOR, gdt_entry(0xa09b, 0, 0xfffff));
        assert_eq!((code64.l, code64.db), (1, 0));
        let data = segment(DATA_SELECTOR, gdt_entry(0xc093, 0, 0xfffff));
        assert_eq!((data.type_, data.s, data.db), (0x3, 1, 1));
        let tss = segment(TSS_SELECTOR, gdt_entry(0x808b, 0, 0xfffff));
        assert_eq!((tss.type_, tss.s, tss.g), (0xb, 0, 1));
        let odd = segment(0, gdt_entry(0x0093, 0x1234_5678, 0xabcde));
        assert_eq!((odd.base, odd.limit, odd.g), (0x1234_5678, 0xabcde, 0));
    }

    #[test]
    fn each_vcpu_gets_its_apic_id_and_the_tsc_deadline_timer_where_kvm_has_it() {
        use kvm_bindings::kvm_cpuid_entry2;
        let leaf = |function, ecx, edx| kvm_cpuid_entry2 { function, ecx, edx, ..Default::default() };
        let supported = CpuId::from_entries(&[leaf(1, 0x1, 0x1), leaf(0xb, 0, 0)]).unwrap();
        let cpuid = guest_cpuid(&supported, 3, 4, true);
        let entries = cpuid.as_slice();
        assert_eq!(entries[0].ebx >> 24, 3, "initial APIC ID");
        assert_eq!((entries[0].ebx >> 16) & 0xff, 4, "processors in the package");
        assert_eq!(entries[0].ecx, 0x1 | CPUID_1_ECX_TSC_DEADLINE | CPUID_1_ECX_HYPERVISOR);
        assert_eq!(entries[0].edx, 0x1 | CPUID_1_EDX_HTT);
        assert_eq!(entries[1].edx, 3, "x2APIC ID");
        let without = guest_cpuid(&supported, 0, 1, false);
        assert_eq!(without.as_slice()[0].ecx, 0x1 | CPUID_1_ECX_HYPERVISOR, "no deadline timer KVM does not emulate");
        assert_eq!(without.as_slice()[0].edx, 0x1, "no HTT for one vCPU");
    }

    #[test]
    fn identity_map_covers_four_gib() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_identity_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        let pdpt = pml4 & !0xfff;
        for gib in 0..4u64 {
            let pd: u64 = mem.read_obj(GuestAddress(pdpt + gib * 8)).unwrap();
            let last: u64 = mem.read_obj(GuestAddress((pd & !0xfff) + 511 * 8)).unwrap();
            assert_eq!(last & !0xfff, (gib << 30) | (511 << 21));
            assert_eq!(last & 0x83, 0x83);
        }
    }
}
