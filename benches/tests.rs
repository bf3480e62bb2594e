use super::*;
use crate::cli::boot::{format_exits, format_timings};
use cvm_vmm::BootTimings;

#[test]
fn boot_timings_print_the_set_up_steps_and_parse_back() {
    let ms = Duration::from_millis;
    let timings = BootTimings {
        setup: vec![("vm".into(), ms(2)), ("kernel".into(), ms(40))],
        first_instruction: Some(ms(50)),
        boot_timer: None,
        exit: ms(900),
    };
    let printed = format_timings(&timings);
    assert!(printed.ends_with("\ncvm set-up (ms from VMM start, each step done): vm 2.000 kernel 40.000"), "{printed}");
    assert_eq!(parse_timings(&printed), Some((Some(50.0), None)));
}

#[test]
fn exit_counts_round_trip_through_their_line() {
    let counts = cvm_vmm::vstate::exit_stats::ExitCounts::from([("exits".into(), 4321), ("io_exits".into(), 12)]);
    let stderr = format!("cvm timings (ms from VMM start): first-instruction 1.0 boot-timer 2.0 exit 3.0\n{}\n", format_exits(&counts));
    assert_eq!(parse_exits(&stderr), Some(vec![("exits".into(), 4321), ("io_exits".into(), 12)]));
    assert_eq!(parse_exits("no such line"), None);
    assert_eq!(parse_exits(&format!("{EXITS_PREFIX} exits x")), None, "a count that is not a number");
    assert_eq!(parse_exits(&format!("{EXITS_PREFIX} exits")), None, "a name without its count");
}

#[test]
fn firecracker_is_given_the_same_vm() {
    let dir = tempfile::tempdir().unwrap();
    let args = BootBench {
        runs: 1,
        kernel: Some("/k/vmlinux".into()),
        initrd: Some("/k/initrd".into()),
        append: "console=ttyS0 cvm.boot_test".into(),
        qemu: "qemu-system-x86_64".into(),
        firecracker: Some("/fc".into()),
        memory: "256M".into(),
        cpus: 2,
    };
    let cmd = firecracker_command(Path::new("/fc"), &args, Path::new("/k/vmlinux"), dir.path()).unwrap();
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("firecracker.json")).unwrap()).unwrap();
    assert_eq!(config["boot-source"]["kernel_image_path"], "/k/vmlinux");
    assert_eq!(config["boot-source"]["initrd_path"], "/k/initrd");
    assert_eq!(config["boot-source"]["boot_args"], "console=ttyS0 cvm.boot_test");
    assert_eq!(config["machine-config"]["vcpu_count"], 2);
    assert_eq!(config["machine-config"]["mem_size_mib"], 256);
    let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    assert_eq!(args[..2], ["--no-api".to_string(), "--config-file".to_string()]);
}

#[test]
fn run_timings_print_every_phase_and_parse_back() {
    let ms = Duration::from_millis;
    let line = cvm::session::run::timings_line([ms(1), ms(2), ms(3), ms(4), ms(7), ms(8), ms(9), ms(30)], true);
    assert_eq!(
        line,
        "cvm run timings (ms): host 1.0 vm 2.0 agent 3.0 guest-setup 4.0 boot 7.0 exec 8.0 teardown 9.0 total 30.0 start warm"
    );
    assert_eq!(parse_run_timings(&format!("other\n{line}\n")), Some(vec![1.0, 2.0, 3.0, 4.0, 7.0, 8.0, 9.0, 30.0]));
    assert_eq!(parse_run_start(&line), Some(true));
    assert_eq!(parse_run_start(&cvm::session::run::timings_line([ms(1); 8], false)), Some(false));
    assert_eq!(parse_run_start("cvm run timings (ms): host 1.0 start"), None);
    assert_eq!(parse_run_start("cvm run timings (ms): host 1.0 start lukewarm"), None);
    assert!(check_start("--vmm cvm, warm", true, Some(true)).is_ok());
    let booted = check_start("--vmm cvm, warm", true, Some(false)).unwrap_err().to_string();
    assert!(booted.contains("the session was booted"), "{booted}");
    assert!(check_start("--vmm cvm, cold", false, None).is_err());
    assert_eq!(parse_run_timings("cvm run timings (ms): host 1.0"), None, "a phase missing");
    assert_eq!(parse_run_timings("nothing"), None);
}

#[test]
fn a_session_holds_the_memory_file_its_processes_share_once() {
    assert_eq!(status_kib("Name:\tcvm\nRssAnon:\t    1234 kB\nRssFile:\t 9 kB\n", "RssAnon:"), Some(1234));
    assert_eq!(status_kib("RssAnon:\t12 MB\n", "RssAnon:"), None, "not in kB");
    assert_eq!(status_kib("RssFile:\t9 kB\n", "RssAnon:"), None);
    // This process holds 32 MiB of a memory file, written; a child inherits it and sleeps:
    // the file counts once, with both processes' own memory.
    let memory = rustix::fs::memfd_create("bench-test", rustix::fs::MemfdFlags::empty()).unwrap();
    let file = std::fs::File::from(memory);
    std::io::Write::write_all(&mut &file, &vec![1u8; 32 << 20]).unwrap();
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    let me = std::process::id();
    assert!(process_tree(me).contains(&child.id()));
    let anon = |pid: u32| status_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap(), "RssAnon:").unwrap();
    let held = session_memory(me).unwrap();
    let (own, childs) = (anon(me), anon(child.id()));
    child.kill().unwrap();
    child.wait().unwrap();
    let files = held.memory_files_kib;
    assert!((32 << 10..48 << 10).contains(&files), "{files} KiB of memory files: not counted, or counted twice?");
    assert!(
        held.anonymous_kib >= childs && held.anonymous_kib < own + childs + (16 << 10),
        "{} KiB anonymous, against {own} + {childs}",
        held.anonymous_kib
    );
}
