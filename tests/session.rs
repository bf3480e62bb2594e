//! A session ended at any point, by an error or by being dropped without its shutdown (a `?`
//! between start and shutdown), leaves nothing behind: no thread of its VM or backends, no
//! helper process (the VMM process and its teardown helper included), no file in the runtime
//! directory. One test, so that the process's own threads and children are the sessions'
//! alone; on the engine CVM_TEST_ENGINE names.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cvm::guest::shares::ShareRequest;
use cvm::project::images::Image;
use cvm::session::{Session, SessionConfig};
use cvm_vmm::Engine;

fn threads() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .map(|task| std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string())
        .collect();
    names.sort();
    names
}

/// This process's children, found by their parent in /proc (L1's kernel has no
/// /proc/PID/task/TID/children).
fn children() -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // The parent is the second field after the command's name, which ends at the last ')'.
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let parent = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_string));
        if parent.as_deref() == Some(me.as_str()) {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push(format!("{pid} {}", String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    found
}

/// What marks this test's processes in their environment (set once, before any session).
fn marker() -> String {
    format!("CVM_TEST_SESSION={}", std::process::id())
}

/// Processes of this test that are not its children: forks of its own executable and the
/// processes that inherit its environment (cvm's VMM process, reparented as soon as it starts,
/// and its teardown helper).
fn forks() -> Vec<String> {
    let me = std::process::id().to_string();
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    let marker = marker();
    let marked =
        |dir: &Path| std::fs::read(dir.join("environ")).is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == marker.as_bytes()));
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if pid != me
            && pid.bytes().all(|b| b.is_ascii_digit())
            && (std::fs::read_link(entry.path().join("exe")).is_ok_and(|e| e == exe) || marked(&entry.path()))
        {
            found.push(pid);
        }
    }
    found
}

fn files(runtime: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(runtime.join("cvm")).into_iter().flatten().flatten().map(|e| e.path()).collect()
}

/// Waits (bounded) until the threads are `threads` again, no child is left and the runtime
/// directory holds no session; says what was left otherwise.
fn assert_nothing_left(case: &str, baseline: &[String], runtime: &Path) {
    let deadline = Instant::now() + common::nested_scale(Duration::from_secs(10));
    loop {
        let (now, kept) = (threads(), files(runtime));
        let left = [children(), forks()].concat();
        if now == baseline && left.is_empty() && kept.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!("{case}: left behind\n  threads {now:?} (before: {baseline:?})\n  processes {left:?}\n  files {kept:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_session_that_fails_or_is_dropped_leaves_no_thread_process_or_file() {
    let Some((kernel, _)) = common::linux_artifacts() else { return };
    let Some(image) = std::env::var_os("CVM_TEST_DEBIAN_IMAGE").map(PathBuf::from) else {
        assert!(std::env::var("CVM_REQUIRE_KERNEL").as_deref() != Ok("1"), "CVM_REQUIRE_KERNEL=1 but CVM_TEST_DEBIAN_IMAGE is not set");
        return;
    };
    let engine = match common::engine() {
        "cvm" => Engine::Cvm,
        _ => Engine::Qemu,
    };
    let runtime = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let project = tempfile::tempdir().unwrap();
    // One test in this binary: nothing else reads the environment while it changes.
    std::env::set_var("XDG_RUNTIME_DIR", runtime.path());
    std::env::set_var("HOME", home.path());
    let (name, value) = marker().split_once('=').map(|(n, v)| (n.to_string(), v.to_string())).unwrap();
    std::env::set_var(name, value);
    cvm::set_cvm_exe(env!("CARGO_BIN_EXE_cvm"));
    let config = SessionConfig {
        shares: ShareRequest { project: Some(project.path().to_path_buf()), ..ShareRequest::default() },
        ..SessionConfig::new(engine, kernel, Image::Disk(image), 1, 512 << 20)
    };
    let baseline = threads();

    // The VM cannot start: the kernel is not one.
    let not_a_kernel = project.path().join("not-a-kernel");
    std::fs::write(&not_a_kernel, vec![0x5a; 64 << 10]).unwrap();
    let error = Session::start(&SessionConfig { kernel: not_a_kernel, ..config.clone() }, None)
        .err()
        .expect("a session on a file that is not a kernel started");
    eprintln!("not a kernel: {error:#}");
    assert_nothing_left("a VM that could not start", &baseline, runtime.path());

    // The VM starts, but the deadline passes before its agent is ready.
    let error = Session::start(&config, Some(Instant::now())).err().expect("a session started after its deadline");
    assert!(format!("{error:#}").contains("not ready"), "{error:#}");
    assert_nothing_left("a VM whose agent was not ready in time", &baseline, runtime.path());

    // A running session with a share, dropped without its shutdown.
    let session = Session::start(&config, Some(Instant::now() + common::deadline())).expect("the session did not start");
    eprintln!("running: started in {:?}", session.timings);
    assert!(!children().is_empty(), "a session with a share runs its fs backend as a process");
    if engine == Engine::Cvm {
        assert!(
            forks().len() >= 2,
            "cvm's VMM runs in a process of its own, with a helper for the kernel's side of the VM's end: {:?}",
            forks()
        );
    }
    assert!(!files(runtime.path()).is_empty(), "a running session has its directory");
    drop(session);
    assert_nothing_left("a running session dropped", &baseline, runtime.path());
}
