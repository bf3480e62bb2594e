use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory as _};

use crate::layout::*;
use crate::vstate::memory::GuestMemory;
use crate::{Error, Result};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// The 64-bit entry of a bzImage's protected-mode kernel is 0x200 bytes past its start.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// How the vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, paging off, `ebx` = the start info.
    Pvh(GuestAddress),
    /// Linux 64-bit boot protocol: long mode, identity-mapped, `rsi` = the zero page.
    Linux64(GuestAddress),
}

impl EntryPoint {
    pub fn address(&self) -> GuestAddress {
        match self {
            EntryPoint::Pvh(a) | EntryPoint::Linux64(a) => *a,
        }
    }
}

#[derive(Clone, Debug)]
pub struct LoadedKernel {
    pub entry: EntryPoint,
    /// The end of the kernel image in guest memory.
    pub end: u64,
    /// A bzImage's setup header, which the zero page must carry.
    pub setup_header: Option<setup_header>,
    /// A Linux kernel (a bzImage, or an ELF carrying Linux's notes), not a micro-guest.
    pub is_linux: bool,
    /// Where an ELF kernel's code (its `.text`) lies in guest memory, as (start, end), page
    /// aligned inward: memory no device ever reads or writes.
    pub text: Option<(u64, u64)>,
}

/// Loads a vmlinux (ELF) or a bzImage into guest memory. An ELF with a PVH note boots through
/// it; one without boots through its 64-bit entry; a bzImage boots through its 64-bit entry.
/// The two kernel formats cvm boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// A 64-bit x86 ELF vmlinux (entered by PVH when it has the note, else in 64-bit mode).
    Elf,
    /// A bzImage with a 64-bit entry point.
    BzImage,
}

/// Which format the kernel at `path` has, from its headers alone: both engines check it before
/// they start, so that a file that is not a kernel fails at once and says why.
pub fn kernel_format(path: &Path) -> Result<KernelFormat> {
    const ELFCLASS64: u8 = 2;
    const ET_EXEC: u16 = 2;
    const EM_X86_64: u16 = 62;
    // The bzImage setup header's fields, by their offsets in the file.
    const BOOT_FLAG: usize = 0x1fe;
    const HEADER: usize = 0x202;
    const XLOADFLAGS: usize = 0x236;
    const XLF_KERNEL_64: u16 = 1;

    let not_a_kernel = |reason: &str| Error::NotAKernel { path: path.to_path_buf(), reason: reason.into() };
    let file = File::open(path).map_err(|source| Error::File { path: path.into(), source })?;
    let mut head = Vec::with_capacity(XLOADFLAGS + 2);
    file.take((XLOADFLAGS + 2) as u64).read_to_end(&mut head).map_err(|source| Error::File { path: path.into(), source })?;
    let u16_at = |offset: usize| head.get(offset..offset + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));

    if head.starts_with(b"\x7fELF") {
        if head.len() < 20 || head[4] != ELFCLASS64 || u16_at(18) != Some(EM_X86_64) {
            return Err(not_a_kernel("an ELF file, but not a 64-bit x86 one"));
        }
        if u16_at(16) != Some(ET_EXEC) {
            return Err(not_a_kernel("an ELF file, but not a statically placed executable (a program or library, not a vmlinux)"));
        }
        return Ok(KernelFormat::Elf);
    }
    if u16_at(BOOT_FLAG) == Some(KERNEL_BOOT_FLAG_MAGIC) && head.get(HEADER..HEADER + 4) == Some(&KERNEL_HDR_MAGIC.to_le_bytes()[..]) {
        if u16_at(XLOADFLAGS).unwrap_or(0) & XLF_KERNEL_64 == 0 {
            return Err(not_a_kernel("this bzImage has no 64-bit entry point"));
        }
        return Ok(KernelFormat::BzImage);
    }
    Err(not_a_kernel("neither an ELF vmlinux nor a bzImage"))
}

pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel> {
    let not_a_kernel = |reason: String| Error::NotAKernel { path: path.to_path_buf(), reason };
    let format = kernel_format(path)?;
    let mut file = File::open(path).map_err(|source| Error::File { path: path.into(), source })?;
    match format {
        KernelFormat::Elf => {
            let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(|e| not_a_kernel(format!("not a loadable x86_64 ELF kernel ({e})")))?;
            let entry = match loaded.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => EntryPoint::Pvh(addr),
                _ => EntryPoint::Linux64(loaded.kernel_load),
            };
            let is_linux = has_linux_note(&mut file).unwrap_or(false);
            let text = text_section(&mut file).inspect_err(|e| tracing::debug!("{}: no .text range: {e}", path.display())).unwrap_or(None);
            Ok(LoadedKernel { entry, end: loaded.kernel_end, setup_header: None, is_linux, text })
        }
        KernelFormat::BzImage => {
            let loaded = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(|e| not_a_kernel(format!("cannot load it as a bzImage ({e})")))?;
            let header = loaded.setup_header.ok_or_else(|| not_a_kernel("bzImage without a setup header".into()))?;
            Ok(LoadedKernel {
                entry: EntryPoint::Linux64(loaded.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET)),
                end: loaded.kernel_end,
                setup_header: Some(header),
                is_linux: true,
                text: None,
            })
        }
    }
}

/// The fields of a 64-bit ELF header that locate its program and section headers.
struct ElfHeader {
    phoff: u64,
    phnum: u16,
    shoff: u64,
    shnum: u16,
    shstrndx: u16,
}

/// At most this many program or section headers are read: a vmlinux has about 40 sections.
const MAX_ELF_HEADERS: u16 = 1024;
const ELF_PHDR_LEN: u64 = 56;
const ELF_SHDR_LEN: u64 = 64;

fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn elf_header(file: &mut File) -> std::io::Result<ElfHeader> {
    let mut h = [0u8; 64];
    read_at(file, 0, &mut h)?;
    Ok(ElfHeader { phoff: u64_at(&h, 32), phnum: u16_at(&h, 56), shoff: u64_at(&h, 40), shnum: u16_at(&h, 60), shstrndx: u16_at(&h, 62) })
}

/// The program headers, each [`ELF_PHDR_LEN`] bytes.
fn program_headers(file: &mut File, elf: &ElfHeader) -> std::io::Result<Vec<[u8; ELF_PHDR_LEN as usize]>> {
    (0..u64::from(elf.phnum.min(MAX_ELF_HEADERS)))
        .map(|i| {
            let mut phdr = [0u8; ELF_PHDR_LEN as usize];
            read_at(file, elf.phoff.saturating_add(i * ELF_PHDR_LEN), &mut phdr).map(|()| phdr)
        })
        .collect()
}

/// Whether an ELF image carries a note named "Linux", as every vmlinux does.
fn has_linux_note(file: &mut File) -> std::io::Result<bool> {
    const PT_NOTE: u32 = 4;
    let elf = elf_header(file)?;
    for phdr in program_headers(file, &elf)? {
        if u32_at(&phdr, 0) != PT_NOTE {
            continue;
        }
        let size = u64_at(&phdr, 32).min(1 << 16);
        let mut notes = vec![0u8; size as usize];
        read_at(file, u64_at(&phdr, 8), &mut notes)?;
        let mut at = 0usize;
        while at + 12 <= notes.len() {
            let word = |o: usize| u32_at(&notes, o) as usize;
            let (namesz, descsz) = (word(at), word(at + 4));
            let name = notes.get(at + 12..at + 12 + namesz).unwrap_or_default();
            if name == b"Linux\0" {
                return Ok(true);
            }
            at += 12 + namesz.div_ceil(4) * 4 + descsz.div_ceil(4) * 4;
        }
    }
    Ok(false)
}

/// Where the ELF's `.text` section is loaded, as guest-physical (start, end) page-aligned
/// inward, through the loadable segment that holds it; None where it has none.
fn text_section(file: &mut File) -> std::io::Result<Option<(u64, u64)>> {
    const PT_LOAD: u32 = 1;
    let elf = elf_header(file)?;
    if elf.shnum > MAX_ELF_HEADERS || elf.shstrndx >= elf.shnum {
        return Ok(None);
    }
    let mut sections = vec![0u8; usize::from(elf.shnum) * ELF_SHDR_LEN as usize];
    read_at(file, elf.shoff, &mut sections)?;
    let section = |i: usize| &sections[i * ELF_SHDR_LEN as usize..(i + 1) * ELF_SHDR_LEN as usize];
    let strtab = section(usize::from(elf.shstrndx));
    let mut names = vec![0u8; u64_at(strtab, 32).min(1 << 20) as usize];
    read_at(file, u64_at(strtab, 24), &mut names)?;
    let Some(text) = (0..usize::from(elf.shnum))
        .map(section)
        .find(|s| names.get(u32_at(s, 0) as usize..).is_some_and(|name| name.starts_with(b".text\0")))
    else {
        return Ok(None);
    };
    let (vaddr, size) = (u64_at(text, 16), u64_at(text, 32));
    let loaded = program_headers(file, &elf)?.into_iter().find(|p| {
        let (p_vaddr, p_memsz) = (u64_at(p, 16), u64_at(p, 40));
        u32_at(p, 0) == PT_LOAD && vaddr >= p_vaddr && vaddr.checked_add(size).is_some_and(|end| end <= p_vaddr.saturating_add(p_memsz))
    });
    Ok(loaded.and_then(|p| {
        let start = u64_at(&p, 24).checked_add(vaddr - u64_at(&p, 16))?;
        let (first, last) = (start.checked_next_multiple_of(PAGE_SIZE)?, start.checked_add(size)? / PAGE_SIZE * PAGE_SIZE);
        (first < last).then_some((first, last))
    }))
}

/// One range of the guest's physical memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map the guest is told about: RAM minus the MP table's corner of low memory and
/// minus the legacy hole between 640 KiB and 1 MiB.
pub fn e820_map(memory: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry { addr: 0, size: MPTABLE_ADDR, kind: E820_RAM },
        E820Entry { addr: MPTABLE_ADDR, size: LOW_RAM_END - MPTABLE_ADDR, kind: E820_RESERVED },
    ];
    for (start, len) in ram_ranges(memory) {
        let end = start + len;
        let start = start.max(HIMEM_START);
        if end > start {
            map.push(E820Entry { addr: start, size: end - start, kind: E820_RAM });
        }
    }
    map
}

/// What the boot structures describe: the kernel's entry, its command line and initrd.
pub struct BootInfo<'a> {
    pub kernel: &'a LoadedKernel,
    pub cmdline: &'a Cmdline,
    /// (address, size) of the initrd in guest memory.
    pub initrd: Option<(u64, u64)>,
    pub memory: u64,
}

/// Writes the command line and the entry protocol's structure (PVH start info or zero page).
pub fn write_boot_info(mem: &GuestMemory, info: &BootInfo) -> Result<()> {
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), info.cmdline).map_err(|e| Error::Boot(format!("command line: {e}")))?;
    let cmdline_len = info.cmdline.as_cstring().map(|c| c.as_bytes().len()).unwrap_or(0);
    let map = e820_map(info.memory);
    match info.kernel.entry {
        EntryPoint::Pvh(_) => write_pvh_start_info(mem, info, &map),
        EntryPoint::Linux64(_) => write_zero_page(mem, info, &map, cmdline_len),
    }
}

fn write_pvh_start_info(mem: &GuestMemory, info: &BootInfo, map: &[E820Entry]) -> Result<()> {
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let memmap: Vec<hvm_memmap_table_entry> =
        map.iter().map(|e| hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind, reserved: 0 }).collect();
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_START_INFO_ADDR));
    if let Some((addr, size)) = info.initrd {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_ADDR;
        params = BootParams::new(&start_info, GuestAddress(PVH_START_INFO_ADDR));
        let module = hvm_modlist_entry { paddr: addr, size, ..Default::default() };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_ADDR));
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem).map_err(|e| Error::Boot(format!("PVH start info: {e}")))
}

fn write_zero_page(mem: &GuestMemory, info: &BootInfo, map: &[E820Entry], cmdline_len: usize) -> Result<()> {
    let hdr = info.kernel.setup_header.unwrap_or_else(|| setup_header {
        boot_flag: KERNEL_BOOT_FLAG_MAGIC,
        header: KERNEL_HDR_MAGIC,
        kernel_alignment: KERNEL_MIN_ALIGNMENT,
        ..Default::default()
    });
    let mut params = boot_params { hdr, ..Default::default() };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if map.len() > params.e820_table.len() {
        return Err(Error::Boot("too many e820 entries".into()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, type_: e.kind };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(&BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)), mem)
        .map_err(|e| Error::Boot(format!("zero page: {e}")))
}

/// Loads the initrd at the highest page-aligned address of low RAM that the kernel accepts.
/// Returns its (address, size).
pub fn load_initrd(mem: &GuestMemory, path: &Path, kernel: &LoadedKernel) -> Result<(u64, u64)> {
    let mut file = File::open(path).map_err(|source| Error::File { path: path.into(), source })?;
    let size = file.metadata()?.len();
    let low_end = mem.last_addr().raw_value().min(MMIO_GAP_START - 1) + 1;
    let max_end = kernel.setup_header.map(|h| u64::from(h.initrd_addr_max) + 1).unwrap_or(low_end).min(low_end);
    let addr = max_end.checked_sub(size).map(|a| a & !0xfff).filter(|&a| a >= kernel.end).ok_or_else(|| {
        Error::Config(format!(
            "the initrd ({} MiB) does not fit in guest memory next to the kernel: give the guest more --memory",
            size >> 20
        ))
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| Error::Boot(format!("cannot load the initrd: {e}")))?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn format_of(bytes: &[u8]) -> Result<KernelFormat> {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), bytes).unwrap();
        kernel_format(file.path())
    }

    fn bzimage_header(xloadflags: u16) -> Vec<u8> {
        let mut head = vec![0u8; 0x240];
        head[0x1fe..0x200].copy_from_slice(&KERNEL_BOOT_FLAG_MAGIC.to_le_bytes());
        head[0x202..0x206].copy_from_slice(&KERNEL_HDR_MAGIC.to_le_bytes());
        head[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        head
    }

    #[test]
    fn kernel_formats_are_told_from_their_headers() {
        let mut elf = vec![0u8; 64];
        elf[..5].copy_from_slice(b"\x7fELF\x02");
        elf[16..18].copy_from_slice(&2u16.to_le_bytes());
        elf[18..20].copy_from_slice(&62u16.to_le_bytes());
        assert_eq!(format_of(&elf).unwrap(), KernelFormat::Elf);
        assert_eq!(format_of(&bzimage_header(1)).unwrap(), KernelFormat::BzImage);

        let reason = |bytes: &[u8]| match format_of(bytes) {
            Err(Error::NotAKernel { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        assert!(reason(&bzimage_header(0)).contains("no 64-bit entry point"));
        assert!(reason(&elf[..12]).contains("not a 64-bit x86 one"), "a truncated header");
        let mut program = elf.clone();
        program[16] = 3; // ET_DYN
        assert!(reason(&program).contains("not a vmlinux"));
        let mut arm = elf.clone();
        arm[18] = 183; // EM_AARCH64
        assert!(reason(&arm).contains("not a 64-bit x86 one"));
        assert!(reason(&bzimage_header(1)[..0x237]).contains("no 64-bit entry point"), "cut short in its flags");
        for other in [&b""[..], b"root:x:0:0:root:/root:/bin/bash\n", &bzimage_header(1)[..0x205]] {
            assert!(reason(other).contains("neither an ELF vmlinux nor a bzImage"), "{other:?}");
        }
    }

    /// An ELF with one loadable segment (virtual 0xffffffff81000000, physical 16 MiB) and a
    /// `.text` section `text_offset..text_offset + text_size` into it.
    fn elf_with_text(text_offset: u64, text_size: u64) -> Vec<u8> {
        let names = b"\0.text\0.shstrtab\0";
        let (phoff, shoff, names_at) = (64u64, 64 + 56u64, 64 + 56 + 3 * 64u64);
        let mut elf = vec![0u8; names_at as usize];
        elf[..5].copy_from_slice(b"\x7fELF\x02");
        let mut put = |at: u64, bytes: &[u8]| elf[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        put(32, &phoff.to_le_bytes());
        put(40, &shoff.to_le_bytes());
        put(56, &1u16.to_le_bytes());
        put(60, &3u16.to_le_bytes());
        put(62, &2u16.to_le_bytes());
        let vbase = 0xffff_ffff_8100_0000u64;
        put(phoff, &1u32.to_le_bytes()); // PT_LOAD
        put(phoff + 16, &vbase.to_le_bytes());
        put(phoff + 24, &0x100_0000u64.to_le_bytes());
        put(phoff + 40, &0x80_0000u64.to_le_bytes());
        let text = shoff + 64;
        put(text, &1u32.to_le_bytes());
        put(text + 16, &(vbase + text_offset).to_le_bytes());
        put(text + 32, &text_size.to_le_bytes());
        let strtab = shoff + 128;
        put(strtab, &7u32.to_le_bytes());
        put(strtab + 24, &names_at.to_le_bytes());
        put(strtab + 32, &(names.len() as u64).to_le_bytes());
        elf.extend_from_slice(names);
        elf
    }

    fn text_of(bytes: &[u8]) -> std::io::Result<Option<(u64, u64)>> {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), bytes).unwrap();
        text_section(&mut File::open(file.path()).unwrap())
    }

    #[test]
    fn kernel_text_is_found_through_its_segment_and_aligned_inward() {
        assert_eq!(text_of(&elf_with_text(0, 0x40_0000)).unwrap(), Some((0x100_0000, 0x140_0000)));
        assert_eq!(text_of(&elf_with_text(0x100, 0x3000)).unwrap(), Some((0x100_1000, 0x100_3000)), "partial pages left out");
        assert_eq!(text_of(&elf_with_text(0x100, 0x800)).unwrap(), None, "no whole page");
        assert_eq!(text_of(&elf_with_text(0x70_0000, 0x20_0000)).unwrap(), None, "runs past its segment");
        let mut renamed = elf_with_text(0, 0x1000);
        let at = renamed.len() - 17;
        renamed[at..at + 5].copy_from_slice(b".data");
        assert_eq!(text_of(&renamed).unwrap(), None, "no .text section");
        assert!(text_of(&elf_with_text(0, 0x1000)[..200]).is_err(), "cut short");
    }

    // Cases: PROPTEST_CASES (scripts/test sets thousands; more by hand for a soak).
    proptest! {
        /// Whatever a file holds, the check answers (never panics) and only a well-formed header passes.
        #[test]
        fn any_bytes_get_an_answer(bytes in proptest::collection::vec(any::<u8>(), 0..0x300)) {
            if let Ok(format) = format_of(&bytes) {
                match format {
                    KernelFormat::Elf => prop_assert!(bytes.starts_with(b"\x7fELF\x02")),
                    KernelFormat::BzImage => prop_assert_eq!(&bytes[0x202..0x206], b"HdrS"),
                }
            }
        }

        /// A hostile ELF's `.text` range, if any, is whole pages inside its segment; never a panic.
        #[test]
        fn any_elf_gets_a_text_answer(bytes in proptest::collection::vec(any::<u8>(), 0..0x400), flips in proptest::collection::vec((0usize..0x200, any::<u8>()), 0..8)) {
            for mut elf in [bytes, elf_with_text(0x1000, 0x2000)] {
                for &(at, byte) in &flips {
                    if let Some(b) = elf.get_mut(at) {
                        *b = byte;
                    }
                }
                if let Ok(Some((start, end))) = text_of(&elf) {
                    prop_assert!(start < end && start % 4096 == 0 && end % 4096 == 0);
                }
            }
        }
    }
}
