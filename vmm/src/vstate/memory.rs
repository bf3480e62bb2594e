//! Guest RAM: one memfd, mapped shared (so vhost-user backends can map the same pages), given
//! to KVM as one memory slot below the MMIO gap and, for guests larger than the gap's start, a
//! second slot above 4 GiB.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::{Error, Result};

/// The guest-physical address map.
pub mod layout {
    /// The page size: guest RAM is mapped, shared and snapshotted in whole pages.
    pub const PAGE_SIZE: u64 = 4096;
    /// The smallest guest cvm builds: room for the boot structures, a kernel and its stack.
    pub const MIN_MEMORY: u64 = 2 << 20;
    /// Guest RAM stops here and resumes at [`HIGH_RAM_START`]; devices live in between.
    pub const MMIO_GAP_START: u64 = 0xc000_0000;
    pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
    /// The boot timer register (see `cvm_devices::legacy::BootTimer`).
    pub const BOOT_TIMER_ADDR: u64 = MMIO_GAP_START;
    /// virtio-mmio windows follow the boot timer, one page each.
    pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START + 0x1000;
    /// Where the IOAPIC and the local APICs answer (fixed by the x86 platform).
    pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
    pub const LAPIC_ADDR: u32 = 0xfee0_0000;
    /// KVM's real-mode TSS needs three pages below 4 GiB that the guest does not use.
    pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

    // Low memory, all below 1 MiB.
    pub const GDT_ADDR: u64 = 0x500;
    pub const IDT_ADDR: u64 = 0x520;
    pub const PVH_START_INFO_ADDR: u64 = 0x6000;
    pub const PVH_MODLIST_ADDR: u64 = 0x6040;
    pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
    pub const ZERO_PAGE_ADDR: u64 = 0x7000;
    pub const BOOT_STACK_TOP: u64 = 0x8ff0;
    /// Identity page tables for the 64-bit entry: PML4, PDPT, then four page directories.
    pub const PML4_ADDR: u64 = 0x9000;
    pub const CMDLINE_ADDR: u64 = 0x20000;
    pub const CMDLINE_MAX: usize = 2048;
    /// The MP table sits in the last KiB of conventional memory, where Linux looks for it.
    pub const MPTABLE_ADDR: u64 = 0x9fc00;
    pub const LOW_RAM_END: u64 = 0xa0000;
    /// Kernels load at or above 1 MiB.
    pub const HIMEM_START: u64 = 0x10_0000;

    /// Serial console (COM1) and its interrupt line.
    pub const SERIAL_PORT: u16 = 0x3f8;
    pub const SERIAL_IRQ: u32 = 4;
    /// The i8042 controller's data and command ports (0x60 and 0x64).
    pub const I8042_PORT: u16 = 0x60;
    /// virtio-mmio devices take interrupt lines from here on.
    pub const VIRTIO_IRQ_START: u32 = 5;
    /// The IOAPIC's pins: 0-23.
    pub const IRQ_COUNT: u32 = 24;

    /// The RAM ranges of a guest of `memory` bytes, as (start, length).
    pub fn ram_ranges(memory: u64) -> Vec<(u64, u64)> {
        if memory <= MMIO_GAP_START {
            vec![(0, memory)]
        } else {
            vec![(0, MMIO_GAP_START), (HIGH_RAM_START, memory - MMIO_GAP_START)]
        }
    }
}

pub type GuestMemory = GuestMemoryMmap<()>;

/// Creates the guest's RAM: a memfd of `size` bytes, mapped once per RAM range. Pages are
/// allocated on first touch, so a large guest costs nothing until it uses its memory.
pub fn create_guest_memory(size: u64) -> Result<(GuestMemory, File)> {
    let file = memfd(size)?;
    Ok((map_ram(&file, size, libc::MAP_SHARED, None)?, file))
}

/// Guest RAM restored from a snapshot.
pub struct RestoredRam {
    pub mem: GuestMemory,
    pub file: File,
    /// The guest-physical ranges, as (address, length), that hold the snapshot's data.
    pub data: Vec<(u64, u64)>,
}

/// Guest RAM from a snapshot's memory file. Where no backend in another process maps guest RAM
/// (`shared` false), the file is mapped private: the guest reads the file's pages from the
/// page cache, shared with every other VM restored from it, and its writes go to copies of its
/// own. Where backends do, they need the pages in a file they can map too: the snapshot's data
/// is copied into a new memfd (not its holes), except memory no device reads or writes
/// (`kernel_private`, guest-physical (start, end) ranges: the kernel's code, its kept initrd,
/// its struct pages),
/// which stays mapped private from the snapshot, left out of what vhost-user backends map, and
/// shared by every VM restored from it.
pub fn restore_guest_memory(snapshot: File, size: u64, shared: bool, kernel_private: &[(u64, u64)]) -> Result<RestoredRam> {
    let load_err = |e: std::io::Error| Error::Memory(format!("cannot load the snapshot's memory: {e}"));
    let runs = crate::snapshot::data_runs(&snapshot, size).map_err(load_err)?;
    let data = runs.iter().flat_map(|&(start, end)| guest_ranges(size, start, end)).collect();
    if !shared {
        return Ok(RestoredRam { mem: map_ram(&snapshot, size, libc::MAP_PRIVATE, None)?, file: snapshot, data });
    }
    let private = private_ranges(size, kernel_private);
    let file = memfd(size)?;
    let copied = without(&runs, &private.iter().map(|r| (r.file_offset, r.file_offset + r.end - r.start)).collect::<Vec<_>>());
    crate::snapshot::copy_runs(&snapshot, &file, &copied, false).map_err(load_err)?;
    Ok(RestoredRam { mem: map_ram(&file, size, libc::MAP_SHARED, Some((&private, &snapshot)))?, file, data })
}

/// A range of guest RAM mapped private, and where it lies in the RAM file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PrivateRange {
    start: u64,
    end: u64,
    file_offset: u64,
}

/// Of the guest-physical (start, end) `ranges`, the page-aligned ones that lie inside one RAM
/// range of a `size`-byte guest, sorted, without overlaps (a later one overlapping is dropped).
fn private_ranges(size: u64, ranges: &[(u64, u64)]) -> Vec<PrivateRange> {
    let page = |a: u64| a.is_multiple_of(layout::PAGE_SIZE);
    let mut private: Vec<PrivateRange> = ranges
        .iter()
        .filter(|&&(start, end)| start < end && page(start) && page(end))
        .filter_map(|&(start, end)| {
            let mut file_offset = 0;
            for (ram, len) in layout::ram_ranges(size) {
                if start >= ram && end <= ram + len {
                    return Some(PrivateRange { start, end, file_offset: file_offset + start - ram });
                }
                file_offset += len;
            }
            None
        })
        .collect();
    private.sort_by_key(|r| r.start);
    private.dedup_by(|later, kept| later.start < kept.end);
    private
}

/// `runs` (sorted (start, end) ranges) with `holes` (sorted, not overlapping) cut out.
fn without(runs: &[(u64, u64)], holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(run_start, end) in runs {
        let mut start = run_start;
        for &(hole_start, hole_end) in holes.iter().filter(|&&(s, e)| s < end && e > run_start) {
            if hole_start > start {
                out.push((start, hole_start));
            }
            start = start.max(hole_end);
        }
        if start < end {
            out.push((start, end));
        }
    }
    out
}

/// The guest-physical ranges, as (address, length), that bytes `start..end` of the RAM file of
/// a `size`-byte guest back (the file is the RAM ranges end to end).
fn guest_ranges(size: u64, start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut file_offset = 0;
    let mut ranges = Vec::new();
    for (address, len) in layout::ram_ranges(size) {
        let (from, to) = (start.max(file_offset), end.min(file_offset + len));
        if from < to {
            ranges.push((address + from - file_offset, to - from));
        }
        file_offset += len;
    }
    ranges
}

vmm_sys_util::ioctl_iowr_nr!(KVM_PRE_FAULT_MEMORY, kvm_bindings::KVMIO, 0xd5, kvm_bindings::kvm_pre_fault_memory);

/// Maps `ranges` of guest RAM into KVM's page tables now (`KVM_PRE_FAULT_MEMORY`), so that a
/// restored guest does not take a nested page fault on its first touch of each page the
/// snapshot holds. KVM maps them as a read would: a private mapping's pages stay shared until
/// the guest writes them. Stops at the first range KVM refuses.
pub fn prefault(vcpu: &kvm_ioctls::VcpuFd, ranges: &[(u64, u64)]) -> std::io::Result<()> {
    for &(gpa, size) in ranges {
        let mut range = kvm_bindings::kvm_pre_fault_memory { gpa, size, ..Default::default() };
        while range.size > 0 {
            // SAFETY: the vCPU fd is open and `range` is a kvm_pre_fault_memory that KVM reads
            // and updates (the address and size still to do) and nothing else.
            let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(vcpu, KVM_PRE_FAULT_MEMORY(), &mut range) };
            if ret < 0 {
                let e = std::io::Error::last_os_error();
                if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

fn memfd(size: u64) -> Result<File> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"cvm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Memory(format!("memfd_create: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|e| Error::Memory(format!("cannot size guest RAM: {e}")))?;
    Ok(file)
}

/// Maps `file` as guest RAM of `size` bytes, one mapping per RAM range, `sharing` being
/// MAP_SHARED or MAP_PRIVATE; except the `private` ranges, which map their own file (at the
/// same offsets) private.
fn map_ram(file: &File, size: u64, sharing: libc::c_int, private: Option<(&[PrivateRange], &File)>) -> Result<GuestMemory> {
    let (private, private_file) = private.unwrap_or((&[], file));
    // (guest address, end, file, offset in it, sharing) per mapping.
    let mut pieces = Vec::new();
    let mut file_offset = 0;
    for (start, len) in layout::ram_ranges(size) {
        let at = |address: u64| file_offset + address - start;
        let mut next = start;
        for range in private.iter().filter(|r| r.start >= start && r.end <= start + len) {
            pieces.push((next, range.start, file, at(next), sharing));
            pieces.push((range.start, range.end, private_file, range.file_offset, libc::MAP_PRIVATE));
            next = range.end;
        }
        pieces.push((next, start + len, file, at(next), sharing));
        file_offset += len;
    }
    let mut regions = Vec::new();
    for (start, end, file, offset, sharing) in pieces.into_iter().filter(|piece| piece.0 < piece.1) {
        let len = end - start;
        let len_usize = usize::try_from(len).map_err(|_| Error::Memory("guest too large".into()))?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(file.try_clone()?, offset)),
            len_usize,
            libc::PROT_READ | libc::PROT_WRITE,
            sharing | libc::MAP_NORESERVE,
        )
        .map_err(|e| Error::Memory(format!("cannot map {} MiB of guest RAM: {e}", len >> 20)))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or_else(|| Error::Memory("guest RAM range overflows".into()))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Memory(e.to_string()))
}

/// Refuses a guest larger than the host's RAM: the memfd would be created, but the guest would
/// be killed by the host's OOM killer half-way through its boot.
pub fn check_host_can_give(size: u64) -> Result<()> {
    // SAFETY: sysinfo writes into the zeroed struct we pass and nothing else.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return Ok(());
    }
    #[allow(clippy::unnecessary_cast)] // the field widths differ between libc targets
    let total = (info.totalram as u64).saturating_mul(info.mem_unit as u64);
    if size > total {
        return Err(Error::Config(format!("--memory {} MiB is more than this host's {} MiB of RAM", size >> 20, total >> 20)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemory as _, GuestMemoryRegion as _};

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(layout::ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(layout::ram_ranges(layout::MMIO_GAP_START), vec![(0, layout::MMIO_GAP_START)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let ranges = layout::ram_ranges(5 << 30);
        assert_eq!(ranges, vec![(0, 3 << 30), (4 << 30, 2 << 30)]);
        assert_eq!(ranges.iter().map(|r| r.1).sum::<u64>(), 5 << 30);
    }

    #[test]
    fn guest_memory_is_shared_memfd() {
        let (mem, file) = create_guest_memory(16 << 20).unwrap();
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef, "the memfd sees guest writes");
        assert!(mem.write_obj(0u8, GuestAddress(16 << 20)).is_err());
        assert_eq!(mem.num_regions(), 1);
    }

    #[test]
    fn file_runs_become_guest_ranges_across_the_mmio_gap() {
        let gap = layout::MMIO_GAP_START;
        assert_eq!(guest_ranges(512 << 20, 0x1000, 0x3000), vec![(0x1000, 0x2000)]);
        // A run across the gap's start continues above 4 GiB.
        assert_eq!(guest_ranges(5 << 30, gap - 0x1000, gap + 0x2000), vec![(gap - 0x1000, 0x1000), (layout::HIGH_RAM_START, 0x2000)]);
        assert_eq!(guest_ranges(5 << 30, gap + 0x1000, gap + 0x2000), vec![(layout::HIGH_RAM_START + 0x1000, 0x1000)]);
        // Past the guest's RAM: nothing.
        assert_eq!(guest_ranges(512 << 20, 512 << 20, 1 << 30), vec![]);
    }

    #[test]
    fn restored_kernel_memory_is_private_and_the_rest_shared() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        const SIZE: u64 = 16 << 20;
        let (text, page) = ((4u64 << 20, 6u64 << 20), 4096u64);
        let snapshot = tempfile::tempfile().unwrap();
        snapshot.set_len(SIZE).unwrap();
        for at in [0x1000, text.0, text.1 - page, text.1] {
            snapshot.write_all_at(&[0xa5; 4096], at).unwrap();
        }
        let restored = restore_guest_memory(snapshot.try_clone().unwrap(), SIZE, true, &[text]).unwrap();
        let mapped: Vec<_> = restored.mem.iter().map(|r| (r.start_addr().0, r.len(), r.flags() & libc::MAP_PRIVATE != 0)).collect();
        assert_eq!(mapped, [(0, text.0, false), (text.0, text.1 - text.0, true), (text.1, SIZE - text.1, false)]);
        for at in [0x1000, text.0, text.1 - page, text.1] {
            assert_eq!(restored.mem.read_obj::<u8>(GuestAddress(at + 7)).unwrap(), 0xa5, "the guest sees the snapshot at {at:#x}");
        }
        assert_eq!(restored.data.len(), 3, "every data run is prefaulted, the kernel's code too");
        assert_eq!(restored.file.metadata().unwrap().blocks() * 512, 2 * page, "the memfd holds all but the kernel's code");
        restored.mem.write_obj(0x5au8, GuestAddress(text.0)).unwrap();
        restored.mem.write_obj(0x5au8, GuestAddress(0x1000)).unwrap();
        let byte_at = |file: &File, at| {
            let mut b = [0u8];
            file.read_exact_at(&mut b, at).unwrap();
            b[0]
        };
        assert_eq!(byte_at(&snapshot, text.0), 0xa5, "a write to the kernel's code stays the guest's own");
        assert_eq!(byte_at(&restored.file, 0x1000), 0x5a, "a write elsewhere is in the memfd backends map");

        let outside = restore_guest_memory(snapshot, SIZE, true, &[(SIZE - page, SIZE + page)]).unwrap();
        assert_eq!(outside.mem.num_regions(), 1, "a range outside low RAM is ignored");
    }

    #[test]
    fn private_ranges_are_whole_pages_inside_one_ram_range() {
        let (gap, high) = (layout::MMIO_GAP_START, layout::HIGH_RAM_START);
        let size = gap + (1 << 30);
        let ranges = private_ranges(
            size,
            &[
                (high + 0x2000, high + 0x4000),
                (0x1000, 0x3000),
                (0x2000, 0x5000),
                (0x8000, 0x8800),
                (gap - 0x1000, high + 0x1000),
                (0x9000, 0x9000),
            ],
        );
        assert_eq!(
            ranges,
            [
                PrivateRange { start: 0x1000, end: 0x3000, file_offset: 0x1000 },
                PrivateRange { start: high + 0x2000, end: high + 0x4000, file_offset: gap + 0x2000 }
            ],
            "sorted; overlapping, partial-page, empty and gap-spanning ranges dropped"
        );
        let mem = map_ram(&memfd(size).unwrap(), size, libc::MAP_SHARED, Some((&ranges, &memfd(size).unwrap()))).unwrap();
        let regions: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(
            regions,
            [
                (0, 0x1000),
                (0x1000, 0x2000),
                (0x3000, gap - 0x3000),
                (high, 0x2000),
                (high + 0x2000, 0x2000),
                (high + 0x4000, (1 << 30) - 0x4000)
            ]
        );
    }

    #[test]
    fn holes_are_cut_out_of_runs() {
        let runs = [(0, 10), (20, 30), (40, 50)];
        assert_eq!(without(&runs, &[]), runs);
        assert_eq!(without(&runs, &[(5, 25), (27, 28), (45, 60)]), [(0, 5), (25, 27), (28, 30), (40, 45)]);
        assert_eq!(without(&runs, &[(0, 50)]), []);
    }

    #[test]
    fn refuses_more_than_the_host_has() {
        assert!(check_host_can_give(1 << 50).is_err());
        assert!(check_host_can_give(16 << 20).is_ok());
    }
}
