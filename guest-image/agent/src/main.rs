//! cvm-agent: PID 1 of a cvm guest, built as a static binary.
//!
//! Today it does what the boot tests and the boot benchmark need from an init: mount the
//! kernel file systems, report readiness (a console line, and the boot timer so the VMM can
//! time the boot), and reset the machine, which ends the VM. The exec server over vsock grows
//! from here.

use std::ffi::CString;
use std::io::Write;

/// The boot timer register in guest-physical memory (cvm_vmm::layout::BOOT_TIMER_ADDR) and the
/// byte that says "init reached".
const BOOT_TIMER_ADDR: u64 = 0xc000_0000;
const BOOT_TIMER_MAGIC: u8 = 123;

fn mount(source: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f) = (CString::new(source).unwrap(), CString::new(target).unwrap(), CString::new(fstype).unwrap());
    // SAFETY: all pointers are NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        eprintln!("cvm-agent: mount {fstype} on {target}: {}", std::io::Error::last_os_error());
    }
}

fn poke_boot_timer() -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mem = std::fs::OpenOptions::new().read(true).write(true).open("/dev/mem")?;
    // SAFETY: maps one page of the boot timer's MMIO window, writes one byte to it and unmaps
    // it; the mapping is private to this function.
    unsafe {
        let page = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_WRITE,
            libc::MAP_SHARED,
            mem.as_raw_fd(),
            BOOT_TIMER_ADDR as libc::off_t,
        );
        if page == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        std::ptr::write_volatile(page.cast::<u8>(), BOOT_TIMER_MAGIC);
        libc::munmap(page, 4096);
    }
    Ok(())
}

fn main() {
    mount("devtmpfs", "/dev", "devtmpfs");
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    // SAFETY: sysconf only reads system configuration.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1).map(str::to_string)))
        .unwrap_or_default();
    if let Err(e) = poke_boot_timer() {
        eprintln!("cvm-agent: cannot poke the boot timer: {e}");
    }
    println!("cvm-agent: init reached, {cpus} cpus, {kib} kB");
    let _ = std::io::stdout().flush();
    // SAFETY: sync and reboot take no pointers; PID 1 resetting the machine ends the VM.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
}
