//! End-to-end tests of what the guest gets of the host's files: `cvm run PROJECT` with the
//! project at its host path, the `~/.claude` view, the conversation folder, `--mount`, through
//! cvm's own fs backends. The full stack runs on the QEMU engine here, and on cvm's VMM where
//! there is hardware KVM.

mod common;

use std::os::unix::fs::MetadataExt;

use common::{arg, engine, text, Env};

/// The uid the guest user has: the host user's, or an unprivileged one for root.
fn guest_uid() -> u32 {
    match rustix::process::getuid().as_raw() {
        0 => 1000,
        uid => uid,
    }
}

fn project(env: &Env) -> std::path::PathBuf {
    let dir = env.home.path().join("my project");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.txt"), "from the host\n").unwrap();
    dir.canonicalize().unwrap()
}

#[test]
fn the_project_is_at_its_host_path_and_files_are_the_host_users() {
    let Some(env) = Env::new() else { return };
    let dir = project(&env);
    let engine = engine();
    let out = env.run(engine, &[arg(&dir), "--", "sh", "-c", "pwd; id -u; echo $HOME; cat a.txt; echo made > made.txt"], b"");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "[{engine}] {stdout} {}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, [arg(&dir), &guest_uid().to_string(), arg(env.home.path()), "from the host"], "[{engine}]");
    let made = std::fs::metadata(dir.join("made.txt")).unwrap();
    assert_eq!(made.uid(), rustix::process::getuid().as_raw(), "[{engine}] the file is the host user's");
    assert_eq!(std::fs::read_to_string(dir.join("made.txt")).unwrap(), "made\n");
    std::fs::remove_file(dir.join("made.txt")).unwrap();
    env.assert_clean();
}

#[test]
fn claude_sees_only_its_configuration_and_its_own_conversations() {
    let Some(env) = Env::new() else { return };
    let dir = project(&env);
    let claude = env.home.path().join(".claude");
    let folder = claude.join("projects").join(cvm::guest::shares::encode_project_path(&dir));
    std::fs::create_dir_all(claude.join("projects/-other-project")).unwrap();
    std::fs::write(claude.join("projects/-other-project/s.jsonl"), "another project's conversation").unwrap();
    std::fs::write(claude.join("history.jsonl"), "every prompt ever").unwrap();
    std::fs::write(claude.join("settings.json"), "{\"theme\":\"dark\"}").unwrap();
    std::fs::write(claude.join(".credentials.json"), "{\"token\":\"old\"}").unwrap();
    std::fs::create_dir_all(claude.join("skills/mine")).unwrap();
    let state =
        format!(r#"{{"hasCompletedOnboarding":true,"projects":{{"{}":{{"allowedTools":[]}},"/other-secret":{{}}}}}}"#, dir.display());
    std::fs::write(env.home.path().join(".claude.json"), &state).unwrap();
    let script = "cd ~/.claude; ls -A; ls projects; cat settings.json; echo; \
                  test -e history.jsonl && echo LEAK; \
                  echo debug > debug.log; echo '{}' > settings.json; mkdir -p todos; \
                  echo '{\"token\":\"refreshed\"}' > .credentials.json; \
                  echo turn > \"projects/$(ls projects)/session.jsonl\"; \
                  grep -c other-secret ~/.claude.json; grep -c hasCompletedOnboarding ~/.claude.json; \
                  echo '{}' > ~/.claude.json";
    let engine = engine();
    let out = env.run(engine, &[arg(&dir), "--", "sh", "-c", script], b"");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "[{engine}] {stdout} {}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    // CLAUDE.md is the guest's own, with the context block the runtime prologue wrote.
    assert_eq!(
        lines[..5],
        [".credentials.json", "CLAUDE.md", "projects", "settings.json", "skills"],
        "[{engine}] what ~/.claude shows: {stdout}"
    );
    assert_eq!(lines[5], folder.file_name().unwrap().to_str().unwrap(), "[{engine}] only this project's folder: {stdout}");
    assert_eq!(lines[6], "{\"theme\":\"dark\"}", "[{engine}]");
    assert!(!stdout.contains("LEAK"), "[{engine}] history.jsonl is visible");
    assert_eq!(lines[7..9], ["0", "1"], "[{engine}] ~/.claude.json without other projects: {stdout}");
    assert_eq!(std::fs::read_to_string(env.home.path().join(".claude.json")).unwrap(), state, "[{engine}] the guest's copy is its own");
    // On the host: the refreshed token and the conversation arrived; nothing else did.
    assert_eq!(std::fs::read_to_string(claude.join(".credentials.json")).unwrap(), "{\"token\":\"refreshed\"}\n", "[{engine}]");
    assert_eq!(std::fs::read_to_string(folder.join("session.jsonl")).unwrap(), "turn\n", "[{engine}]");
    assert_eq!(std::fs::read_to_string(claude.join("settings.json")).unwrap(), "{\"theme\":\"dark\"}", "[{engine}]");
    assert!(
        !claude.join("debug.log").exists() && !claude.join("todos").exists() && !claude.join("CLAUDE.md").exists(),
        "[{engine}] guest writes stayed in the guest"
    );
    std::fs::remove_file(folder.join("session.jsonl")).unwrap();

    // Without the conversation folder, the guest's conversation stays in the guest.
    let out = env.run(
        engine,
        &[
            arg(&dir),
            "--no-conversations",
            "--",
            "sh",
            "-c",
            "ls ~/.claude/projects 2>/dev/null | wc -l; mkdir -p ~/.claude/projects/x; echo t > ~/.claude/projects/x/s",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(0), "[{engine}] {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "0", "[{engine}]");
    assert!(!claude.join("projects/x").exists(), "[{engine}]");
    env.assert_clean();
}

#[test]
fn mounts_are_shared_read_only_when_asked_and_bad_ones_are_refused() {
    let Some(env) = Env::new() else { return };
    let data = env.home.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("in.txt"), "data\n").unwrap();
    let ro = format!("{}:/mnt/data:ro", data.display());
    let rw = format!("{}:/mnt/rw", data.display());
    let engine = engine();
    let out = env.run(
        engine,
        &[
            "--mount",
            &ro,
            "--mount",
            &rw,
            "--",
            "sh",
            "-c",
            "cat /mnt/data/in.txt; echo x > /mnt/data/new; echo status $?; echo w > /mnt/rw/new",
        ],
        b"",
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "[{engine}] {stdout} {}", text(&out.stderr));
    assert_eq!(stdout, "data\nstatus 1\n", "[{engine}]");
    assert!(text(&out.stderr).contains("Read-only file system"), "[{engine}] {}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(data.join("new")).unwrap(), "w\n", "[{engine}] the read-write mount of the same directory");
    std::fs::remove_file(data.join("new")).unwrap();
    env.assert_clean();
    // Malformed specs are usage errors; a missing directory or a guest path used twice is
    // refused before any VM starts.
    for bad in ["relative/path", "/data:relative", "/a/../b", "/data:/mnt:rx:ro"] {
        let out = env.run(engine, &["--mount", bad, "--", "true"], b"");
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("bad mount"), "{bad}: {}", text(&out.stderr));
    }
    let missing = env.run(engine, &["--mount", "/no/such/dir", "--", "true"], b"");
    assert_eq!(missing.status.code(), Some(125));
    assert!(text(&missing.stderr).contains("/no/such/dir"), "{}", text(&missing.stderr));
    // A mount the guest cannot make fails the session with the guest's reason.
    let unmountable = format!("{}:/proc/cvm-test", data.display());
    let out = env.run(engine, &["--mount", &unmountable, "--", "true"], b"");
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("could not set up its shares") && text(&out.stderr).contains("/proc/cvm-test"),
        "{}",
        text(&out.stderr)
    );
    // Two host directories at one guest path (the same mount given twice is only one).
    let (first, second) = (format!("{}:/mnt/x", data.display()), format!("{}:/mnt/x", env.home.path().display()));
    let out = env.run(engine, &["--mount", &first, "--mount", &second, "--", "true"], b"");
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("mounted twice"), "{}", text(&out.stderr));
    env.assert_clean();
}

#[test]
fn a_large_file_and_many_small_ones_round_trip() {
    let Some(env) = Env::new() else { return };
    let dir = project(&env);
    let data: Vec<u8> = (0..32u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(dir.join("big"), &data).unwrap();
    // 10,000 files; 2,000 inside L1, where each of their ~5 FUSE round trips is a chain of
    // VM exits emulated by QEMU's TCG.
    let files = if std::env::var_os("CVM_NESTED").is_some() { 2_000 } else { 10_000 };
    let script = format!(
        "sha256sum big | cut -d' ' -f1; cp big copy; \
         mkdir many && cd many && i=0; while [ $i -lt {files} ]; do echo $i > f$i; i=$((i+1)); done; \
         ls | wc -l; cat f{}; cd .. && rm -r many && echo removed",
        files - 1
    );
    let engine = engine();
    let out = env.run(engine, &[arg(&dir), "--", "sh", "-c", &script], b"");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "[{engine}] {stdout} {}", text(&out.stderr));
    let host_sum = {
        let o = std::process::Command::new("sha256sum").arg(dir.join("big")).output().unwrap();
        text(&o.stdout).split_whitespace().next().unwrap().to_string()
    };
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, [host_sum.as_str(), &files.to_string(), &(files - 1).to_string(), "removed"], "[{engine}]");
    assert!(std::fs::read(dir.join("copy")).unwrap() == data, "[{engine}] the guest's copy differs");
    assert!(!dir.join("many").exists(), "[{engine}]");
    std::fs::remove_file(dir.join("copy")).unwrap();
    env.assert_clean();
}

#[test]
fn a_worktree_gets_its_main_git_dir_with_hooks_and_config_read_only() {
    let Some(env) = Env::new() else { return };
    // The layout `git worktree add` makes, written by hand (the minimal image has no git).
    let main_git = env.home.path().join("main/.git");
    for dir in ["hooks", "info", "objects", "refs", "worktrees/wt"] {
        std::fs::create_dir_all(main_git.join(dir)).unwrap();
    }
    std::fs::write(main_git.join("config"), "[core]\n").unwrap();
    std::fs::write(main_git.join("HEAD"), "ref: refs/heads/main\n").unwrap();
    std::fs::write(main_git.join("worktrees/wt/commondir"), "../..\n").unwrap();
    let wt = env.home.path().join("wt");
    std::fs::write(main_git.join("worktrees/wt/gitdir"), format!("{}\n", wt.join(".git").display())).unwrap();
    std::fs::create_dir_all(&wt).unwrap();
    std::fs::write(wt.join(".git"), format!("gitdir: {}\n", main_git.join("worktrees/wt").display())).unwrap();
    let git = main_git.canonicalize().unwrap();
    let script = format!(
        "cd {g}; cat config; echo evil > hooks/post-checkout; echo hooks $?; echo evil >> config; echo config $?; \
         mkdir info/x; echo info $?; echo blob > objects/ab; echo objects $?",
        g = git.display()
    );
    let engine = engine();
    let out = env.run(engine, &[arg(&wt), "--", "sh", "-c", &script], b"");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "[{engine}] {stdout} {}", text(&out.stderr));
    assert_eq!(stdout, "[core]\nhooks 1\nconfig 1\ninfo 1\nobjects 0\n", "[{engine}] {}", text(&out.stderr));
    assert!(!git.join("hooks/post-checkout").exists(), "[{engine}]");
    assert_eq!(std::fs::read_to_string(git.join("config")).unwrap(), "[core]\n", "[{engine}]");
    assert_eq!(std::fs::read_to_string(git.join("objects/ab")).unwrap(), "blob\n", "[{engine}]");
    std::fs::remove_file(git.join("objects/ab")).unwrap();
    env.assert_clean();
}

#[test]
fn runtime_scripts_prepare_the_shell_and_claude_md_says_where_claude_is() {
    let Some(env) = Env::new() else { return };
    let dir = project(&env);
    std::fs::write(
        dir.join(".cvm.runtime.sh"),
        "export GREETING=hello\nmkdir -p ~/.cvm/context\necho 'Build with make.' > ~/.cvm/context/build.txt\n",
    )
    .unwrap();
    let claude = env.home.path().join(".claude");
    std::fs::create_dir_all(&claude).unwrap();
    std::fs::write(claude.join("CLAUDE.md"), "My own rules.\n").unwrap();
    let extra = env.home.path().join("extra.sh");
    std::fs::write(&extra, "export SECOND=\"$GREETING again\"\n").unwrap();
    let failing = env.home.path().join("failing.sh");
    std::fs::write(&failing, "echo about to fail\nfalse\necho not reached\n").unwrap();
    let engine = engine();
    let out =
        env.run(engine, &[arg(&dir), "--runtime-script", arg(&extra), "--", "sh", "-c", "echo $SECOND; cat ~/.claude/CLAUDE.md"], b"");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "[{engine}] {stdout} {}", text(&out.stderr));
    assert!(stdout.starts_with("hello again\nMy own rules.\n<!-- cvm:begin -->\n"), "[{engine}] {stdout}");
    assert!(stdout.contains(arg(&dir)) && stdout.contains("Build with make.\n<!-- cvm:end -->"), "[{engine}] {stdout}");
    assert_eq!(
        std::fs::read_to_string(claude.join("CLAUDE.md")).unwrap(),
        "My own rules.\n",
        "[{engine}] the host's CLAUDE.md is untouched"
    );

    // A failing runtime script stops the run with its status; the command never runs.
    let out = env.run(engine, &[arg(&dir), "--runtime-script", arg(&failing), "--", "sh", "-c", "echo COMMAND RAN"], b"");
    assert_eq!(out.status.code(), Some(1), "[{engine}] {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "about to fail\n", "[{engine}]");
    env.assert_clean();
    let out = env.run(engine, &["--runtime-script", arg(&extra), "--", "true"], b"");
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("needs a project"), "{}", text(&out.stderr));
}

/// virtiofsd for the in-VM bench (scripts/test installs it): required where the kernel is.
fn virtiofsd() -> Option<String> {
    match std::env::var("CVM_TEST_VIRTIOFSD") {
        Ok(path) => Some(path),
        Err(_) => {
            assert!(std::env::var("CVM_REQUIRE_KERNEL").as_deref() != Ok("1"), "CVM_REQUIRE_KERNEL=1 but CVM_TEST_VIRTIOFSD is not set");
            eprintln!("skipped: CVM_TEST_VIRTIOFSD is not set (run scripts/test)");
            None
        }
    }
}

#[test]
fn bench_fs_in_vm_measures_the_share_against_virtiofsd_and_the_guests_tmpfs_in_one_guest() {
    let Some(env) = Env::debian() else { return };
    let Some(virtiofsd) = virtiofsd() else { return };
    let work = env.home.path().join("bench");
    std::fs::create_dir(&work).unwrap();
    let sizes = ["--size", "4M", "--random-reads", "200", "--files", "50", "--tree", "300", "--git-files", "200", "--rounds", "1"];
    let out = env
        .cvm(&[
            "bench",
            "fs",
            "--in-vm",
            "--json",
            "--vmm",
            engine(),
            "--kernel",
            arg(&env.kernel),
            "--virtiofsd",
            &virtiofsd,
            "--dir",
            arg(&work),
        ])
        .args(sizes)
        .env("CVM_DEBIAN_IMAGE", &env.image)
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stderr.contains("no virtiofsd reference"), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let tables = report["tables"].as_array().unwrap();
    assert_eq!(tables.len(), 1, "{report}");
    let title = tables[0]["title"].as_str().unwrap();
    let label = if engine() == "qemu" { "guest on QEMU" } else { "guest on cvm's VMM" };
    assert!(title.contains(label) && title.contains("200-file git project"), "{title}");
    assert_eq!(tables[0]["targets"], serde_json::json!(["guest tmpfs", "cvm backend", "virtiofsd"]), "{report}");
    let rows = tables[0]["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["workload"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 8, "{names:?}");
    assert!(
        names.contains(&"git checkout of the project")
            && names.contains(&"git status")
            && names.iter().any(|n| n.starts_with("compile-like")),
        "{names:?}"
    );
    for row in rows {
        for target in ["guest tmpfs", "cvm backend", "virtiofsd"] {
            let value = row["medians"][target].as_f64().unwrap_or(0.0);
            assert!(value.is_finite() && value > 0.0, "{target}: {row}");
        }
        assert!(row["cvm_over_virtiofsd"].as_f64().is_some_and(|r| r > 0.0), "{row}");
    }
    env.assert_clean();
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0, "the bench's files are removed");
}
