//! The Intel MultiProcessor table (MP spec 1.4): how a guest without ACPI learns its CPUs,
//! its IOAPIC and how ISA interrupts are wired. Linux finds it by scanning the last KiB of
//! conventional memory for the floating pointer.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{IOAPIC_ADDR, IRQ_COUNT, LAPIC_ADDR, MPTABLE_ADDR};
use crate::memory::GuestMemory;
use crate::{Error, Result};

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
/// CPUID-style signature of the processors: family 6, and the FPU and APIC feature bits.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// The bytes of the MP floating pointer followed by the configuration table, for a table
/// placed at `base`.
pub fn build(base: u64, vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus; // APIC IDs 0..vcpus are the processors
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend([ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend(CPU_SIGNATURE.to_le_bytes());
        entries.extend(CPU_FEATURES.to_le_bytes());
        entries.extend([0u8; 8]);
        count += 1;
    }
    entries.extend([ENTRY_BUS, ISA_BUS_ID]);
    entries.extend(b"ISA   ");
    entries.extend([ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend(IOAPIC_ADDR.to_le_bytes());
    count += 2;
    // ISA IRQ n is IOAPIC pin n; pin 0 carries the 8259's ExtINT as on a PC.
    for irq in 0..IRQ_COUNT as u8 {
        let kind = if irq == 0 { INT_TYPE_EXTINT } else { INT_TYPE_INT };
        entries.extend([ENTRY_IO_INTERRUPT, kind, 0, 0, ISA_BUS_ID, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 takes the 8259's ExtINT, LINT1 the NMI, on every local APIC (0xff).
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1)] {
        entries.extend([ENTRY_LOCAL_INTERRUPT, kind, 0, 0, ISA_BUS_ID, 0, 0xff, lint]);
        count += 1;
    }

    let table_addr = base + FLOATING_POINTER_LEN as u64;
    let mut table = Vec::with_capacity(HEADER_LEN + entries.len());
    table.extend(b"PCMP");
    table.extend(((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    table.extend([4, 0]); // spec revision 1.4, checksum (below)
    table.extend(b"CVM     ");
    table.extend(b"MICROVM     ");
    table.extend(0u32.to_le_bytes()); // no OEM table
    table.extend(0u16.to_le_bytes());
    table.extend(count.to_le_bytes());
    table.extend(LAPIC_ADDR.to_le_bytes());
    table.extend([0u8; 4]); // extended table length, checksum, reserved
    table.extend(entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + table.len());
    out.extend(b"_MP_");
    out.extend((table_addr as u32).to_le_bytes());
    out.extend([1, 4, 0]); // length in 16-byte units, spec revision, checksum (below)
    out.extend([0u8; 5]); // feature bytes: 0 = a configuration table is present
    out[10] = checksum(&out);
    out.extend(table);
    out
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

/// Writes the MP table for `vcpus` processors into guest memory.
pub fn write(mem: &GuestMemory, vcpus: u8) -> Result<()> {
    let bytes = build(MPTABLE_ADDR, vcpus);
    mem.write_slice(&bytes, GuestAddress(MPTABLE_ADDR))
        .map_err(|e| Error::Boot(format!("MP table: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the table the way Linux's mpparse does, returning the processors' APIC IDs and
    /// whether each is the bootstrap processor.
    fn parse(bytes: &[u8], base: u64) -> Vec<(u8, bool)> {
        assert_eq!(&bytes[..4], b"_MP_");
        assert_eq!(bytes[..16].iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0, "floating pointer checksum");
        let table_at = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64 - base;
        let table = &bytes[table_at as usize..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(table.len(), len, "table length");
        assert_eq!(table.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0, "table checksum");
        let count = u16::from_le_bytes([table[34], table[35]]);
        let mut at = HEADER_LEN;
        let mut cpus = Vec::new();
        for _ in 0..count {
            let size = match table[at] {
                ENTRY_PROCESSOR => {
                    cpus.push((table[at + 1], table[at + 3] & CPU_BOOTSTRAP != 0));
                    20
                }
                ENTRY_BUS | ENTRY_IOAPIC | ENTRY_IO_INTERRUPT | ENTRY_LOCAL_INTERRUPT => 8,
                other => panic!("unknown entry type {other}"),
            };
            at += size;
        }
        assert_eq!(at, len, "entries fill the table exactly");
        cpus
    }

    #[test]
    fn lists_every_cpu_with_one_bootstrap() {
        for n in [1u8, 2, 7, MAX as u8] {
            let cpus = parse(&build(MPTABLE_ADDR, n), MPTABLE_ADDR);
            assert_eq!(cpus.len(), n as usize);
            assert_eq!(cpus.iter().filter(|c| c.1).count(), 1);
            assert!(cpus[0].1);
            assert!(cpus.iter().enumerate().all(|(i, c)| c.0 as usize == i));
        }
    }

    const MAX: usize = crate::x86_64::MAX_VCPUS;

    #[test]
    fn fits_below_the_legacy_hole() {
        let len = build(MPTABLE_ADDR, MAX as u8).len() as u64;
        assert!(MPTABLE_ADDR + len <= crate::layout::LOW_RAM_END, "{len} bytes overflow 640 KiB");
    }
}
