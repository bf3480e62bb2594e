//! End-to-end tests of the Debian image: Claude Code in a fresh VM on the project, as the
//! user, with every change outside the shares thrown away. Full stack on the QEMU engine here
//! (slow under TCG, so few), and on cvm's VMM where there is hardware KVM.

mod common;

use common::{engine, text, Env};

#[test]
fn claude_code_runs_as_the_user_on_the_project_and_root_changes_vanish() {
    let Some(env) = Env::debian() else { return };
    let dir = env.home.path().join("project");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.txt"), "x").unwrap();
    let project = dir.to_str().unwrap();
    let script = "claude --version; id -u; ls \"$PWD\"; cat /etc/debian_version; \
                  claude --dangerously-skip-permissions -p hello </dev/null 2>&1 | head -n 1; \
                  sudo sh -c 'echo left > /usr/local/leftover' && echo wrote";
    let engine = engine();
    let out = env.run(engine, &[project, "--", "sh", "-c", script], b"");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "[{engine}] {stdout} {}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].ends_with("(Claude Code)"), "[{engine}] claude runs: {stdout}");
    let uid = match rustix::process::getuid().as_raw() {
        0 => 1000,
        uid => uid,
    };
    assert_eq!(lines[1], uid.to_string(), "[{engine}] as the user, never root");
    assert_eq!(lines[2], "a.txt", "[{engine}]");
    assert!(lines[3].starts_with("12."), "[{engine}] Debian bookworm: {stdout}");
    // Claude Code refuses to skip permissions as root; as the guest user it goes on (and,
    // with no credentials here, asks for a login).
    assert!(!lines[4].contains("root"), "[{engine}] {stdout}");
    assert_eq!(lines[5], "wrote", "[{engine}] the user is root in its VM (sudo), and the root is writable");
    let out = env.run(engine, &["--", "sh", "-c", "test -e /usr/local/leftover && echo kept || echo gone"], b"");
    assert_eq!(text(&out.stdout), "gone\n", "[{engine}] a file written to /usr in one session is gone in the next: {}", text(&out.stderr));
    env.assert_clean();
}

#[test]
fn image_ls_and_rm_manage_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let debian = cache.path().join("cvm/images/debian");
    for key in ["aaaa", "bbbb"] {
        std::fs::create_dir_all(debian.join(key)).unwrap();
        std::fs::write(debian.join(key).join("root.erofs"), vec![0u8; 2 << 20]).unwrap();
    }
    std::os::unix::fs::symlink("bbbb", debian.join("current")).unwrap();
    let cvm = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cvm")).args(args).env("XDG_CACHE_HOME", cache.path()).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let listing = cvm(&["image", "ls"]);
    let rows: Vec<&str> = listing.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{listing}");
    assert!(rows[0].starts_with("debian") && rows[0].contains("bbbb") && rows[0].ends_with("(current)"), "{listing}");
    assert!(rows[1].contains("aaaa") && !rows[1].contains("current"), "{listing}");
    assert_eq!(cvm(&["image", "rm"]), "removed debian aaaa\n");
    assert!(!debian.join("aaaa").exists() && debian.join("bbbb/root.erofs").exists(), "the image in use stays");
    assert_eq!(cvm(&["image", "rm", "--all"]), "removed debian bbbb\n");
    assert!(!debian.join("bbbb").exists());
    // A missing named image says how to build it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cvm"))
        .args(["run", "--vmm", engine(), "--kernel", env!("CARGO_BIN_EXE_cvm"), "--", "true"])
        .env("XDG_CACHE_HOME", cache.path())
        .env_remove("CVM_DEBIAN_IMAGE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("cvm image build debian"), "{}", text(&out.stderr));
}

#[test]
fn a_prompt_alone_starts_claude_code_on_the_current_directory() {
    let Some(env) = Env::debian() else { return };
    let dir = env.home.path().join("here");
    std::fs::create_dir_all(&dir).unwrap();
    // `cvm PROMPT` takes its settings from the environment; no credentials here, so Claude
    // Code, having accepted the prompt and --dangerously-skip-permissions as the guest user,
    // asks for a login.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cvm"))
        .arg("list the files")
        .current_dir(&dir)
        .env("CVM_VMM", engine())
        .env("CVM_KERNEL", &env.kernel)
        .env("CVM_DEBIAN_IMAGE", &env.image)
        .env("HOME", env.home.path())
        .env("XDG_RUNTIME_DIR", env.runtime.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(all.contains("Not logged in"), "{all}");
    assert!(!all.contains("root"), "{all}");
    env.assert_clean();
}

#[test]
fn a_scratch_disk_holds_more_than_memory_and_goes_with_the_session() {
    let Some(env) = Env::debian() else { return };
    let write = "dd if=/dev/zero of=/usr/local/big bs=1M count=200 2>/dev/null && echo wrote || echo full";
    let engine = engine();
    let out = env.run(engine, &["--memory", "256M", "--disk", "1G", "--", "sh", "-c", write], b"");
    assert_eq!(text(&out.stdout), "wrote\n", "[{engine}] 200 MiB fit on the scratch disk: {}", text(&out.stderr));
    let out = env.run(engine, &["--memory", "256M", "--", "sh", "-c", write], b"");
    assert_eq!(text(&out.stdout), "full\n", "[{engine}] but not in 256 MiB of memory: {}", text(&out.stderr));
    env.assert_clean();
    let Some(minimal) = Env::new() else { return };
    let out = minimal.run(engine, &["--disk", "1G", "--", "true"], b"");
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("needs a disk image"), "{}", text(&out.stderr));
}

#[test]
fn setup_makes_a_template_that_later_sessions_start_from_and_a_failed_setup_keeps_nothing() {
    let Some(env) = Env::debian() else { return };
    let dir = env.home.path().join("project");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(".cvm.setup.sh"), "echo set-up > /tmp/m; sudo cp /tmp/m /usr/local/project-setup\n").unwrap();
    let project = dir.to_str().unwrap();
    let engine = engine();
    // Python through the egress proxy (Debian's mirror is on the default allow list), and the
    // project's setup script. Inside L1 (CVM_NESTED), where dpkg's work under nested TCG takes
    // minutes, one small package instead: the same path through the proxy into the template.
    let (setup_args, tool_check): (&[&str], &str) = match std::env::var_os("CVM_NESTED") {
        None => (&["--python"], "python3 -c 'print(6*7)'"),
        Some(_) => (&["--package", "jq"], "jq -n '6*7'"),
    };
    let out = env.subcommand("setup", engine, &[&[project][..], setup_args].concat()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("template for"), "{}", text(&out.stderr));
    // Lists /usr/local before writing to it: the previous session's file must be gone.
    let check = format!("{tool_check}; cat /usr/local/project-setup; ls /usr/local; sudo touch /usr/local/session-only");
    for _ in 0..2 {
        // Each session starts from the template, without running setup again, and what it
        // writes itself is gone in the next.
        let out = env.run(engine, &[project, "--", "sh", "-c", &check], b"");
        let stdout = text(&out.stdout);
        assert!(stdout.starts_with("42\nset-up\n"), "{stdout} {}", text(&out.stderr));
        assert_eq!(stdout.matches("session-only").count(), 0, "{stdout}");
        assert!(!text(&out.stderr).contains("cvm setup"), "setup did not run again");
    }
    // A failing setup exits with its status and leaves the template as it was.
    let failing = env.home.path().join("fail.sh");
    std::fs::write(&failing, "exit 3\n").unwrap();
    let out = env.subcommand("setup", engine, &[project, "--setup-script", failing.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let out = env.run(engine, &[project, "--", "sh", "-c", &format!("{tool_check} >/dev/null && echo still")], b"");
    assert_eq!(text(&out.stdout), "still\n", "the old template is still used");
    let templates = env.home.path().join(".cache/cvm/templates");
    let files: Vec<String> = std::fs::read_dir(templates)
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!files.iter().any(|f| f.ends_with(".new")), "no half-made template: {files:?}");

    // cvm list, clean: asks first, and without a terminal only --yes agrees.
    let cvm = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cvm"))
            .args(args)
            .env("HOME", env.home.path())
            .env("XDG_CACHE_HOME", env.home.path().join(".cache"))
            .env("CVM_DEBIAN_IMAGE", &env.image)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    assert_eq!(text(&cvm(&["list"]).stdout), format!("{project}\n"));
    assert_eq!(text(&cvm(&["list", "--unused"]).stdout), "", "made on the current image, for a project that exists");
    let refused = cvm(&["clean", project]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(text(&refused.stderr).contains("--yes"), "{}", text(&refused.stderr));
    assert_eq!(text(&cvm(&["clean", project, "--yes"]).stdout), format!("removed the template of {project}\n"));
    assert_eq!(text(&cvm(&["list"]).stdout), "");
    env.assert_clean();
}

#[test]
fn auto_setup_builds_the_template_the_configuration_asks_for_once() {
    let Some(env) = Env::debian() else { return };
    let dir = env.home.path().join("configured");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(".cvm.toml"), "[packages]\nsystem = [\"jq\"]\n").unwrap();
    let project = dir.to_str().unwrap();
    // Its setup downloads Debian's package lists and jq: the mirror's speed, not cvm's.
    let out = env.run_within(engine(), &[project, "--auto-setup", "--", "jq", "-n", "6*7"], b"", common::download_deadline());
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(0), "42\n".into()), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("running cvm setup first"), "{}", text(&out.stderr));
    // The template is there now: no setup again, with or without the flag.
    for args in [&[project, "--auto-setup", "--", "jq", "-n", "1"][..], &[project, "--", "jq", "-n", "1"][..]] {
        let out = env.run(engine(), args, b"");
        assert_eq!(text(&out.stdout), "1\n", "{}", text(&out.stderr));
        assert!(!text(&out.stderr).contains("cvm setup"), "{}", text(&out.stderr));
    }
    env.assert_clean();
}
