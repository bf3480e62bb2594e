//! cvm-agent: PID 1 of a cvm guest (a static binary), and the same exec server as a host
//! process in tests.
//!
//! As PID 1 it mounts the kernel file systems, names the host, starts reaping, listens on
//! vsock port [`CONTROL_PORT`], pokes the boot timer and tells the host it is ready by
//! connecting to [`READY_PORT`]. Then each connection is one exec (see `exec.rs`). It says
//! nothing on the console unless the kernel command line has `cvm.debug`.
//!
//! `cvm.boot_test` on the command line makes it print one line and reset the machine at once:
//! the boot tests and the boot benchmark time exactly that.
//!
//! As a host process: `cvm-agent --listen unix:PATH [--ready unix:PATH]`.
//!
//! `cvm-agent bench-fs ...` (not as PID 1) runs one of `cvm bench fs --in-vm`'s workloads and
//! prints its rate: see [`bench_fs`].

mod exec;
mod net;
mod reaper;
mod relay;
mod setup;
mod transport;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use cvm_agent::protocol::{self, Reply, CONTROL_PORT, READY_PORT};
use transport::{Address, Listener};

/// The boot timer register in guest-physical memory (cvm_vmm::layout::BOOT_TIMER_ADDR) and the
/// byte that says "init reached".
const BOOT_TIMER_ADDR: u64 = 0xc000_0000;
const BOOT_TIMER_MAGIC: u8 = 123;

static DEBUG: AtomicBool = AtomicBool::new(false);

fn is_init() -> bool {
    std::process::id() == 1
}

pub(crate) fn debug(msg: &str) {
    if DEBUG.load(Ordering::Relaxed) {
        eprintln!("cvm-agent: {msg}");
    }
}

fn mount(source: &str, target: &str, fstype: &str, data: Option<&str>) {
    let _ = std::fs::create_dir_all(target);
    if let Err(e) = setup::mount(source, std::path::Path::new(target), Some(fstype), libc::MS_NOSUID, data) {
        eprintln!("cvm-agent: mount {fstype} on {target}: {e}");
    }
}

fn poke_boot_timer() -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mem = std::fs::OpenOptions::new().read(true).write(true).open("/dev/mem")?;
    // SAFETY: maps one page of the boot timer's MMIO window, writes one byte to it and unmaps
    // it; the mapping is private to this function.
    unsafe {
        let page =
            libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_WRITE, libc::MAP_SHARED, mem.as_raw_fd(), BOOT_TIMER_ADDR as libc::off_t);
        if page == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        std::ptr::write_volatile(page.cast::<u8>(), BOOT_TIMER_MAGIC);
        libc::munmap(page, 4096);
    }
    Ok(())
}

/// Syncs and ends the machine (as PID 1) or the process (in tests).
pub(crate) fn shutdown() -> ! {
    // SAFETY: sync takes no arguments.
    unsafe { libc::sync() };
    if is_init() {
        // SAFETY: reboot takes no pointers. With reboot=k the kernel resets through the i8042,
        // which ends the VM on either engine.
        unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    }
    std::process::exit(0)
}

/// Mounts, names the machine; returns the kernel command line. Resets at once under
/// `cvm.boot_test`.
fn init_system() -> String {
    if let Err(e) = setup::make_root_writable() {
        eprintln!("cvm-agent: cannot make the root writable: {e}");
    }
    mount("devtmpfs", "/dev", "devtmpfs", None);
    mount("proc", "/proc", "proc", None);
    mount("sysfs", "/sys", "sysfs", None);
    mount("devpts", "/dev/pts", "devpts", Some("gid=5,mode=620,ptmxmode=666"));
    mount("tmpfs", "/tmp", "tmpfs", Some("mode=1777"));
    mount("tmpfs", "/run", "tmpfs", Some("mode=755"));
    let name = b"cvm";
    // SAFETY: sethostname reads name.len() bytes.
    unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    // The name resolves without a network (sudo and others look it up).
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    if !hosts.split_whitespace().any(|w| w == "cvm") {
        let _ = std::fs::write("/etc/hosts", format!("127.0.0.1 localhost\n127.0.1.1 cvm\n::1 localhost\n{hosts}"));
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|w| w == protocol::CMDLINE_SNAPSHOT_TEST) {
        snapshot_test();
    }
    if cmdline.split_whitespace().any(|w| w == protocol::CMDLINE_BOOT_TEST) {
        // SAFETY: sysconf only reads system configuration.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        let kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1).map(str::to_string)))
            .unwrap_or_default();
        let _ = poke_boot_timer();
        println!("{}, {cpus} cpus, {kib} kB", protocol::BOOT_TEST_LINE);
        let _ = std::io::stdout().flush();
        // The line must leave the serial port before the kernel prints its reboot message,
        // which would otherwise cut it in two on the console.
        // SAFETY: tcdrain only waits on the given descriptor.
        unsafe { libc::tcdrain(1) };
        shutdown();
    }
    cmdline
}

/// `cvm.snapshot_test` (see [`protocol::CMDLINE_SNAPSHOT_TEST`]).
fn snapshot_test() -> ! {
    let say = |line: String| {
        println!("{line}");
        let _ = std::io::stdout().flush();
    };
    say(protocol::SNAPSHOT_TEST_BEFORE.to_string());
    // SAFETY: tcdrain only waits on the given descriptor.
    unsafe { libc::tcdrain(1) };
    let _ = poke_boot_timer();
    let started = std::time::Instant::now();
    for tick in 1..=protocol::SNAPSHOT_TEST_TICKS {
        std::thread::sleep(std::time::Duration::from_millis(100));
        say(format!("cvm-agent: tick {tick}"));
    }
    // SAFETY: sysconf only reads system configuration.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    say(format!("{}, {cpus} cpus, {} ms", protocol::SNAPSHOT_TEST_DONE, started.elapsed().as_millis()));
    // SAFETY: as above.
    unsafe { libc::tcdrain(1) };
    shutdown()
}

struct Options {
    listen: Address,
    ready: Option<Address>,
}

fn parse_args() -> Result<Options, String> {
    let mut listen = None;
    let mut ready = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next().and_then(|v| Address::parse(&v)).ok_or(format!("{name} needs vsock:PORT, vsock:CID:PORT or unix:PATH"))
        };
        match arg.as_str() {
            "--listen" => listen = Some(value("--listen")?),
            "--ready" => ready = Some(value("--ready")?),
            "--debug" => DEBUG.store(true, Ordering::Relaxed),
            // The kernel passes unknown command line words to init; ignore them.
            _ if is_init() => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if is_init() {
        return Ok(Options {
            listen: listen.unwrap_or(Address::Vsock { cid: libc::VMADDR_CID_ANY, port: CONTROL_PORT }),
            ready: ready.or(Some(Address::Vsock { cid: libc::VMADDR_CID_HOST, port: READY_PORT })),
        });
    }
    Ok(Options { listen: listen.ok_or("--listen is required outside a VM")?, ready })
}

/// `bench-fs WORKLOAD DIR FILE_BYTES RANDOM_READS FILES ROUND`, or `bench-fs compile SRC OUT`:
/// runs the workload once and prints its rate (units per second).
fn bench_fs(args: &[String]) -> Result<f64, String> {
    use cvm_agent::fs_workloads::{self, Sizes, Workload};
    let number = |text: &String| text.parse::<u64>().map_err(|_| format!("bench-fs: bad number {text:?}"));
    match args {
        [compile, src, out] if compile == "compile" => {
            let started = std::time::Instant::now();
            let files = fs_workloads::compile(src.as_ref(), out.as_ref()).map_err(|e| format!("bench-fs compile: {e}"))?;
            Ok(files as f64 / started.elapsed().as_secs_f64().max(1e-9))
        }
        [workload, dir, file, random_reads, files, round] => {
            let workload = Workload::from_key(workload).ok_or(format!("bench-fs: no workload {workload:?}"))?;
            let sizes = Sizes { file: number(file)?, random_reads: number(random_reads)? as usize, files: number(files)? as usize };
            fs_workloads::measure(workload, dir.as_ref(), sizes, number(round)? as usize)
                .map_err(|e| format!("bench-fs {}: {e}", workload.key()))
        }
        _ => Err("usage: cvm-agent bench-fs WORKLOAD DIR FILE_BYTES RANDOM_READS FILES ROUND | bench-fs compile SRC OUT".into()),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !is_init() && args.get(1).map(String::as_str) == Some("bench-fs") {
        match bench_fs(&args[2..]) {
            Ok(rate) => println!("{rate}"),
            Err(e) => {
                eprintln!("cvm-agent: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if is_init() {
        let cmdline = init_system();
        if cmdline.split_whitespace().any(|w| w == protocol::CMDLINE_DEBUG) {
            DEBUG.store(true, Ordering::Relaxed);
        }
    }
    let options = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("cvm-agent: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = serve(options) {
        eprintln!("cvm-agent: {e}");
        if is_init() {
            shutdown();
        }
        std::process::exit(1);
    }
}

fn serve(options: Options) -> std::io::Result<()> {
    let listener = Listener::bind(&options.listen)?;
    if is_init() {
        // Commands reach the outside only through the host's proxy.
        if let Err(e) = net::bring_up_loopback().and_then(|()| relay::start_egress()) {
            eprintln!("cvm-agent: no egress relay: {e}");
        }
        if let Err(e) = poke_boot_timer() {
            debug(&format!("cannot poke the boot timer: {e}"));
        }
    }
    if let Some(ready) = &options.ready {
        let mut conn = transport::connect(ready)?;
        protocol::write_frame(&mut conn, &Reply::Ready(env!("CARGO_PKG_VERSION").into()).encode())?;
    }
    debug("ready");
    loop {
        let conn = listener.accept()?;
        std::thread::spawn(move || exec::serve(conn));
    }
}
