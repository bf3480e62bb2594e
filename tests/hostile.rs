//! A hostile guest against the host, end to end: the escapes a prompt-injected agent would try
//! from inside a session, checked on the host side after it. Full stack on both engines.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{arg, engine, nested_scale, text, Env};

/// Runs host git in `dir` and says what it printed.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git").arg("-C").arg(dir).args(["-c", "user.name=host", "-c", "user.email=host@example.com"]).args(args).output().unwrap();
    assert!(out.status.success(), "git {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn git_works_in_the_guest_but_cannot_plant_code_for_the_host() {
    let Some(env) = Env::debian() else { return };
    let home = env.home.path();
    let project = home.join("project");
    let remote = home.join("remote.git");
    std::fs::create_dir_all(&project).unwrap();
    git(&project, &["init", "-q", "-b", "main"]);
    std::fs::write(project.join("a.txt"), "one\n").unwrap();
    git(&project, &["add", "a.txt"]);
    git(&project, &["commit", "-qm", "base"]);
    git(home, &["clone", "-q", "--bare", arg(&project), arg(&remote)]);
    let upstream = git(&remote, &["commit-tree", "-m", "upstream", "HEAD^{tree}", "-p", "HEAD"]);
    git(&remote, &["update-ref", "refs/heads/main", upstream.trim()]);
    let config = std::fs::read(project.join(".git/config")).unwrap();
    let hooks = || {
        let mut names: Vec<_> = std::fs::read_dir(project.join(".git/hooks")).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        names
    };
    let hooks_before = hooks();

    let script = r##"
        t() { label=$1; shift; if "$@" >/dev/null 2>&1; then echo "$label ok"; else echo "$label refused"; fi; }
        git config --global user.name guest; git config --global user.email guest@example.com
        t commit sh -c 'echo two > a.txt && git commit -qam two'
        t branch git checkout -q -b feature
        t feature-commit sh -c 'echo three > b.txt && git add b.txt && git commit -qm three'
        t main-commit sh -c 'git checkout -q main && echo four > c.txt && git add c.txt && git commit -qm four && git checkout -q feature'
        t rebase git rebase -q main
        t fetch git fetch -q /remote main:refs/remotes/upstream/main
        t worktree-list git worktree list
        t fsmonitor git config core.fsmonitor 'touch /tmp/pwned'
        t config-append sh -c 'echo "[core] hooksPath = /tmp" >> .git/config'
        t hook sh -c 'printf "#!/bin/sh\ntouch /tmp/pwned\n" > .git/hooks/post-checkout'
        t nested-init git init -q nested
        t dot-git-file sh -c 'mkdir -p other && echo "gitdir: /tmp" > other/.git'
    "##;
    let engine = engine();
    let mount = format!("{}:/remote:ro", remote.display());
    let out = env.run(engine, &[arg(&project), "--mount", &mount, "--", "sh", "-c", script], b"");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "[{engine}] {stdout} {}", text(&out.stderr));
    let expected = "commit ok\nbranch ok\nfeature-commit ok\nmain-commit ok\nrebase ok\nfetch ok\nworktree-list ok\n\
                    fsmonitor refused\nconfig-append refused\nhook refused\nnested-init refused\ndot-git-file refused\n";
    assert_eq!(stdout, expected, "[{engine}] {}", text(&out.stderr));

    // The guest's history is the host's; its control files are as they were.
    assert_eq!(git(&project, &["log", "--format=%s", "feature"]), "three\nfour\ntwo\nbase\n", "[{engine}]");
    assert_eq!(git(&project, &["rev-parse", "upstream/main"]), git(&remote, &["rev-parse", "main"]), "[{engine}]");
    assert_eq!(std::fs::read(project.join(".git/config")).unwrap(), config, "[{engine}] .git/config changed");
    assert_eq!(hooks(), hooks_before, "[{engine}] hooks changed");
    assert!(!project.join("nested/.git").exists() && !project.join("other/.git").exists(), "[{engine}]");
    git(&project, &["status", "--short"]);
    env.assert_clean();
}

#[test]
fn files_the_guest_plants_in_the_project_do_not_widen_the_next_session() {
    let Some(env) = Env::new() else { return };
    let project = env.home.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    let secret = env.home.path().join("secret");
    std::fs::write(&secret, "host secret\n").unwrap();
    let script = format!(
        "printf '[[mounts]]\\nhost = \"~\"\\n[network]\\nmode = \"open\"\\n' > .cvm.toml && ln -s {} .cvm.runtime.sh && echo planted",
        secret.display()
    );
    let engine = engine();
    let out = env.run(engine, &[arg(&project), "--", "sh", "-c", &script], b"");
    assert_eq!(text(&out.stdout), "planted\n", "[{engine}] {}", text(&out.stderr));

    // The next session refuses the planted configuration before any VM starts.
    let out = env.run(engine, &[arg(&project), "--", "cat", "/etc/hostname"], b"");
    assert_eq!(out.status.code(), Some(125), "[{engine}] {}", text(&out.stdout));
    assert!(text(&out.stderr).contains("sets mounts, network.mode, which widen the sandbox, and is not trusted"), "[{engine}] {}", text(&out.stderr));
    // Without it, the planted runtime script is a link out of the project, and is not read.
    std::fs::remove_file(project.join(".cvm.toml")).unwrap();
    let out = env.run(engine, &[arg(&project), "--", "true"], b"");
    assert_eq!(out.status.code(), Some(125), "[{engine}] {}", text(&out.stdout));
    assert!(text(&out.stderr).contains("a symbolic link leads out of"), "[{engine}] {}", text(&out.stderr));
    assert!(!text(&out.stdout).contains("host secret"));
    env.assert_clean();
}

/// The live processes whose command line names `marker`: "PID COMMAND LINE" each.
fn processes_naming(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let line = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if pid != std::process::id() && line.contains(marker) {
            found.push(format!("{pid} {line}"));
        }
    }
    found
}

#[test]
fn killing_cvm_at_any_moment_leaves_no_helper_running() {
    let Some(env) = Env::new() else { return };
    let project = env.home.path().join("project");
    std::fs::create_dir_all(project.join("sub")).unwrap();
    // Every helper names a path of this test's: the fs backends their share, QEMU and the
    // janitor the session's directory under the private XDG_RUNTIME_DIR.
    let markers = [env.home.path().display().to_string(), env.runtime.path().display().to_string()];
    let alive = || markers.iter().flat_map(|m| processes_naming(m)).collect::<Vec<_>>();
    let engine = engine();
    // Kill points spread over start-up, the command and teardown of a session that takes
    // about a second on the QEMU engine here.
    let span = nested_scale(Duration::from_millis(2000)).as_micros() as u64;
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("kill points from seed {seed}");
    let mut survivors = Vec::new();
    for round in 0..100 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_micros(seed % span);
        let mut child = env.command(engine, &[arg(&project), "--mount", &format!("{}:/mnt/sub", project.join("sub").display()), "--", "sh", "-c", "sleep 0.2"]);
        let mut child = child.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(delay);
        child.kill().unwrap();
        child.wait().unwrap();
        let deadline = Instant::now() + nested_scale(Duration::from_secs(5));
        while !alive().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = alive();
        if !left.is_empty() {
            survivors.push(format!("round {round}, killed after {delay:?}: {left:?}"));
            for line in left {
                let pid: i32 = line.split(' ').next().unwrap().parse().unwrap();
                // SAFETY (test): SIGKILL to a helper this test's cvm left behind.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    assert!(survivors.is_empty(), "[{engine}] helpers outlived a killed cvm:\n{}", survivors.join("\n"));
    env.assert_clean();
}

#[test]
fn a_command_that_ignores_sigterm_cannot_hold_cvm() {
    let Some(env) = Env::new() else { return };
    let engine = engine();
    let mut child = env.command(engine, &["--", "sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"]).stdin(Stdio::null()).spawn().unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line, "ready\n", "[{engine}]");
    let sent = Instant::now();
    // SAFETY (test): SIGTERM to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = common::wait_output(child);
    assert_eq!(out.status.code(), Some(143), "[{engine}] {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("did not end within 10s of signal 15"), "[{engine}] {}", text(&out.stderr));
    assert!(sent.elapsed() < nested_scale(Duration::from_secs(25)), "[{engine}] {:?}", sent.elapsed());
    env.assert_clean();
}
