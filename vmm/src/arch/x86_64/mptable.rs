//! The Intel MultiProcessor table (MP spec 1.4): how a guest without ACPI learns its CPUs,
//! its IOAPIC and how ISA interrupts are wired. Linux finds it by scanning the last KiB of
//! conventional memory for the floating pointer.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{IOAPIC_ADDR, IRQ_COUNT, LAPIC_ADDR, MPTABLE_ADDR};
use crate::vstate::memory::GuestMemory;
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
    // ISA IRQ n is IOAPIC pin n, every pin a plain vectored interrupt. Pin 0 must not be
    // typed ExtINT as on a PC: KVM's IOAPIC does not pass the 8259 through it, and Linux,
    // told otherwise ("ExtINT not setup in hardware but reported by MP table"), dereferences
    // NULL in its timer set-up and panics (seen on a stock 6.12 kernel in L1).
    for irq in 0..IRQ_COUNT as u8 {
        entries.extend([ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, ISA_BUS_ID, irq, ioapic_id, irq]);
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
    mem.write_slice(&bytes, GuestAddress(MPTABLE_ADDR)).map_err(|e| Error::Boot(format!("MP table: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the table says, as Linux's mpparse reads it.
    #[derive(Default)]
    struct Parsed {
        /// Each processor's APIC ID and whether it is the bootstrap processor.
        cpus: Vec<(u8, bool)>,
        /// Each IO interrupt entry: (type, source bus IRQ, IOAPIC ID, IOAPIC pin).
        io_interrupts: Vec<(u8, u8, u8, u8)>,
        /// Each local interrupt entry: (type, local APIC ID, LINT pin).
        local_interrupts: Vec<(u8, u8, u8)>,
        ioapic_id: Option<u8>,
    }

    /// Reads the table the way Linux's mpparse does.
    fn parse(bytes: &[u8], base: u64) -> Parsed {
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
        let mut parsed = Parsed::default();
        for _ in 0..count {
            let e = &table[at..];
            let size = match e[0] {
                ENTRY_PROCESSOR => {
                    parsed.cpus.push((e[1], e[3] & CPU_BOOTSTRAP != 0));
                    20
                }
                ENTRY_IOAPIC => {
                    parsed.ioapic_id = Some(e[1]);
                    8
                }
                ENTRY_IO_INTERRUPT => {
                    parsed.io_interrupts.push((e[1], e[5], e[6], e[7]));
                    8
                }
                ENTRY_LOCAL_INTERRUPT => {
                    parsed.local_interrupts.push((e[1], e[6], e[7]));
                    8
                }
                ENTRY_BUS => 8,
                other => panic!("unknown entry type {other}"),
            };
            at += size;
        }
        assert_eq!(at, len, "entries fill the table exactly");
        parsed
    }

    #[test]
    fn lists_every_cpu_with_one_bootstrap() {
        for n in [1u8, 2, 7, MAX as u8] {
            let cpus = parse(&build(MPTABLE_ADDR, n), MPTABLE_ADDR).cpus;
            assert_eq!(cpus.len(), n as usize);
            assert_eq!(cpus.iter().filter(|c| c.1).count(), 1);
            assert!(cpus[0].1);
            assert!(cpus.iter().enumerate().all(|(i, c)| c.0 as usize == i));
        }
    }

    const MAX: usize = crate::arch::x86_64::MAX_VCPUS;

    #[test]
    fn every_ioapic_pin_is_a_plain_interrupt_and_the_8259_reaches_lint0() {
        for n in [1u8, 2, 4] {
            let table = parse(&build(MPTABLE_ADDR, n), MPTABLE_ADDR);
            let ioapic = table.ioapic_id.expect("an IOAPIC entry");
            assert_eq!(ioapic, n, "the IOAPIC's ID follows the processors'");
            assert_eq!(table.io_interrupts.len(), IRQ_COUNT as usize);
            for (pin, &(kind, irq, dest, dest_pin)) in table.io_interrupts.iter().enumerate() {
                // An ExtINT on pin 0 makes a stock kernel panic at IO-APIC set-up.
                assert_eq!(kind, INT_TYPE_INT, "pin {pin} is typed {kind}");
                assert_eq!((irq, dest, dest_pin), (pin as u8, ioapic, pin as u8));
            }
            assert_eq!(table.local_interrupts, vec![(INT_TYPE_EXTINT, 0xff, 0), (INT_TYPE_NMI, 0xff, 1)]);
        }
    }

    #[test]
    fn fits_below_the_legacy_hole() {
        let len = build(MPTABLE_ADDR, MAX as u8).len() as u64;
        assert!(MPTABLE_ADDR + len <= crate::layout::LOW_RAM_END, "{len} bytes overflow 640 KiB");
    }
}
