//! The x86_64 platform: loading a kernel, the boot structures it reads (PVH start info or the
//! Linux zero page, the e820 map, the command line, the MP table) and the vCPU state it
//! starts in.

mod boot;
pub mod cpu;
pub mod mptable;
pub mod page_tables;
pub mod state;

pub use boot::{
    e820_map, kernel_format, load_initrd, load_kernel, write_boot_info, BootInfo, E820Entry, EntryPoint, KernelFormat, LoadedKernel,
};

/// The MP table has room for this many processors (and APIC IDs stay below the IOAPIC's).
pub const MAX_VCPUS: usize = 32;
