//! Loads the project's real kernel (vmlinux and bzImage from scripts/build-kernel, exported by
//! scripts/test as CVM_TEST_KERNEL) into guest memory and reads back what the kernel will read:
//! entry point, PVH start info or zero page, e820 map, command line, initrd, MP table.

use std::path::PathBuf;
use std::process::Command;

use cvm_vmm::arch::x86_64::{self, mptable, BootInfo, EntryPoint};
use cvm_vmm::layout::*;
use linux_loader::bootparam::boot_params;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEMORY: u64 = 256 << 20;

fn kernel() -> Option<PathBuf> {
    let kernel = std::env::var_os("CVM_TEST_KERNEL").map(PathBuf::from);
    if kernel.is_none() {
        assert!(std::env::var("CVM_REQUIRE_KERNEL").as_deref() != Ok("1"), "CVM_TEST_KERNEL is not set");
        eprintln!("skipped: CVM_TEST_KERNEL is not set (run scripts/test)");
    }
    kernel
}

fn guest_memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY as usize)]).unwrap()
}

fn cmdline(text: &str) -> Cmdline {
    let mut c = Cmdline::new(CMDLINE_MAX).unwrap();
    c.insert_str(text).unwrap();
    c
}

/// A fake initrd file of a known size and content.
fn initrd_file() -> PathBuf {
    let path = std::env::temp_dir().join(format!("cvm-boot-protocol-{}.cpio", std::process::id()));
    std::fs::write(&path, vec![0x5a; 3 * 4096 + 100]).unwrap();
    path
}

fn read_cstr(mem: &GuestMemoryMmap<()>, addr: u64) -> String {
    let mut buf = vec![0u8; CMDLINE_MAX];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    let end = buf.iter().position(|&b| b == 0).unwrap();
    String::from_utf8(buf[..end].to_vec()).unwrap()
}

/// The physical address of a vmlinux symbol, from the ELF symbol table (virtual address minus
/// the kernel's __START_KERNEL_map).
fn symbol_phys(vmlinux: &PathBuf, name: &str) -> u64 {
    let out = Command::new("nm").arg(vmlinux).output().expect("nm (binutils)");
    let table = String::from_utf8_lossy(&out.stdout);
    let line = table.lines().find(|l| l.ends_with(&format!(" {name}"))).expect("symbol");
    u64::from_str_radix(line.split_whitespace().next().unwrap(), 16).unwrap() - 0xffff_ffff_8000_0000
}

#[test]
fn vmlinux_boots_through_pvh_with_start_info() {
    let Some(vmlinux) = kernel() else { return };
    let mem = guest_memory();
    let loaded = x86_64::load_kernel(&mem, &vmlinux).unwrap();
    assert_eq!(loaded.entry, EntryPoint::Pvh(GuestAddress(symbol_phys(&vmlinux, "pvh_start_xen"))));
    assert!(loaded.is_linux);
    assert!(loaded.end > HIMEM_START);
    // Linux's _text and _etext are page aligned: its code is exactly what a restore shares.
    assert_eq!(loaded.text, Some((symbol_phys(&vmlinux, "_text"), symbol_phys(&vmlinux, "_etext"))));

    let initrd = initrd_file();
    let (initrd_addr, initrd_size) = x86_64::load_initrd(&mem, &initrd, &loaded).unwrap();
    std::fs::remove_file(&initrd).unwrap();
    assert_eq!(initrd_size, 3 * 4096 + 100);
    assert_eq!(initrd_addr % 4096, 0);
    assert!(initrd_addr >= loaded.end && initrd_addr + initrd_size <= MEMORY);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(initrd_addr + initrd_size - 1)).unwrap(), 0x5a);

    let line = cmdline("console=ttyS0 reboot=k");
    x86_64::write_boot_info(&mem, &BootInfo { kernel: &loaded, cmdline: &line, initrd: Some((initrd_addr, initrd_size)), memory: MEMORY })
        .unwrap();

    let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_START_INFO_ADDR)).unwrap();
    assert_eq!(info.magic, 0x336e_c578);
    assert_eq!(info.version, 1);
    assert_eq!(read_cstr(&mem, info.cmdline_paddr), "console=ttyS0 reboot=k");
    assert_eq!(info.nr_modules, 1);
    let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
    assert_eq!((module.paddr, module.size), (initrd_addr, initrd_size));

    let map: Vec<(u64, u64, u32)> = (0..info.memmap_entries as u64)
        .map(|i| {
            let e: hvm_memmap_table_entry = mem.read_obj(GuestAddress(info.memmap_paddr + i * 24)).unwrap();
            (e.addr, e.size, e.type_)
        })
        .collect();
    assert_eq!(map, vec![(0, MPTABLE_ADDR, 1), (MPTABLE_ADDR, LOW_RAM_END - MPTABLE_ADDR, 2), (HIMEM_START, MEMORY - HIMEM_START, 1)]);
    // The start info and the memory map must not overlap each other or the kernel.
    assert!(PVH_START_INFO_ADDR + std::mem::size_of::<hvm_start_info>() as u64 <= info.modlist_paddr);
    assert!(info.memmap_paddr + 24 * map.len() as u64 <= ZERO_PAGE_ADDR);
}

#[test]
fn bzimage_boots_through_the_64bit_entry_with_a_zero_page() {
    let Some(vmlinux) = kernel() else { return };
    let bzimage = vmlinux.with_file_name("bzImage");
    let mem = guest_memory();
    let loaded = x86_64::load_kernel(&mem, &bzimage).unwrap();
    assert_eq!(loaded.text, None, "a bzImage's code is compressed: there is none to share");
    assert_eq!(loaded.entry, EntryPoint::Linux64(GuestAddress(HIMEM_START + 0x200)));
    let header = loaded.setup_header.expect("setup header");
    assert_eq!({ header.header }, 0x5372_6448);
    assert!({ header.version } >= 0x020c, "64-bit boot protocol needs 2.12+");

    let initrd = initrd_file();
    let (initrd_addr, initrd_size) = x86_64::load_initrd(&mem, &initrd, &loaded).unwrap();
    std::fs::remove_file(&initrd).unwrap();
    assert!(initrd_addr + initrd_size <= u64::from(header.initrd_addr_max) + 1);

    let line = cmdline("console=ttyS0 panic=-1");
    x86_64::write_boot_info(&mem, &BootInfo { kernel: &loaded, cmdline: &line, initrd: Some((initrd_addr, initrd_size)), memory: MEMORY })
        .unwrap();
    let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
    assert_eq!({ params.hdr.header }, 0x5372_6448);
    assert_eq!(params.hdr.type_of_loader, 0xff);
    assert_eq!(params.hdr.cmd_line_ptr as u64, CMDLINE_ADDR);
    assert_eq!(params.hdr.cmdline_size as usize, "console=ttyS0 panic=-1".len());
    assert_eq!(read_cstr(&mem, CMDLINE_ADDR), "console=ttyS0 panic=-1");
    assert_eq!((params.hdr.ramdisk_image as u64, params.hdr.ramdisk_size as u64), (initrd_addr, initrd_size));
    let n = params.e820_entries as usize;
    let e820: Vec<(u64, u64, u32)> = params.e820_table[..n].iter().map(|e| (e.addr, e.size, e.type_)).collect();
    assert_eq!(e820, vec![(0, MPTABLE_ADDR, 1), (MPTABLE_ADDR, LOW_RAM_END - MPTABLE_ADDR, 2), (HIMEM_START, MEMORY - HIMEM_START, 1)]);
}

#[test]
fn mp_table_is_where_linux_scans_for_it() {
    let mem = guest_memory();
    mptable::write(&mem, 2).unwrap();
    let mut signature = [0u8; 4];
    mem.read_slice(&mut signature, GuestAddress(MPTABLE_ADDR)).unwrap();
    assert_eq!(&signature, b"_MP_");
    // Linux scans the last KiB below 640 KiB in 16-byte steps.
    assert_eq!(MPTABLE_ADDR % 16, 0);
    const { assert!(MPTABLE_ADDR >= 639 * 1024 && MPTABLE_ADDR < 640 * 1024) };
    let table: u32 = mem.read_obj(GuestAddress(MPTABLE_ADDR + 4)).unwrap();
    let mut pcmp = [0u8; 4];
    mem.read_slice(&mut pcmp, GuestAddress(table.into())).unwrap();
    assert_eq!(&pcmp, b"PCMP");
}

#[test]
fn kernel_too_big_for_memory_is_refused() {
    let Some(vmlinux) = kernel() else { return };
    let tiny = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let err = x86_64::load_kernel(&tiny, &vmlinux).unwrap_err().to_string();
    assert!(err.contains("not a kernel") || err.contains("load"), "{err}");
}
