//! End-to-end tests of the layered configuration and the everyday commands around it: what
//! `~/.cvm.toml`, the project's `.cvm.toml`, `CVM_*` variables and flags do to a real VM,
//! `cvm config show` and `validate`, the environment options and secrets, `--worktree`,
//! `cvm doctor`, completions and the man page. Full stack on the QEMU engine here.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use common::{arg, engine, text, wait_output, Env};

/// A project directory under the test's HOME.
fn project(env: &Env) -> PathBuf {
    let dir = env.home.path().join("work/app");
    std::fs::create_dir_all(&dir).unwrap();
    dir.canonicalize().unwrap()
}

#[test]
fn the_layers_reach_the_vm_in_order() {
    let Some(env) = Env::new() else { return };
    let dir = project(&env);
    let data = env.home.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("fact"), "from the data dir\n").unwrap();
    std::fs::write(env.home.path().join(".cvm.toml"), "[vm]\ncpus = 1\nmemory = \"384M\"\n[context]\ninstructions = \"Global words.\"\n")
        .unwrap();
    // The project sets cpus back to the default: it still wins over the global 1.
    std::fs::write(
        dir.join(".cvm.toml"),
        "[vm]\ncpus = 2\n[defaults]\ncommand = [\"sh\", \"-c\", \"echo default command; grep -c ^processor /proc/cpuinfo\"]\n\
         [context]\ninstructions = \"Run make check before committing.\"\n\
         [[mounts]]\nhost = \"../../data\"\nguest = \"/mnt/data\"\nread_only = true\n",
    )
    .unwrap();
    let mem_kib = "grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2";
    let engine = engine();
    // The guest can rewrite the project's file: its mount waits for the user's trust.
    let out = wait_output(env.command(engine, &[arg(&dir), "--", "true"]).spawn().unwrap());
    assert_eq!(out.status.code(), Some(125), "[{engine}] {}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("sets mounts, which widen the sandbox, and is not trusted")
            && text(&out.stderr).contains(&format!("cvm trust {}", dir.display())),
        "{}",
        text(&out.stderr)
    );
    let trusted = env.cvm(&["trust", arg(&dir)]).output().unwrap();
    assert_eq!(trusted.status.code(), Some(0), "{}", text(&trusted.stderr));
    assert!(text(&trusted.stdout).contains("mounts = [\"../../data:/mnt/data:ro\"]"), "{}", text(&trusted.stdout));
    // No command: the project's default command, on 2 vCPUs.
    let out = wait_output(env.command(engine, &[arg(&dir)]).spawn().unwrap());
    assert_eq!(text(&out.stdout), "default command\n2\n", "[{engine}] {}", text(&out.stderr));

    let script = format!("{mem_kib}; cat /mnt/data/fact; echo x > /mnt/data/new 2>/dev/null || echo read-only; grep -A1 'Run make' ~/.claude/CLAUDE.md | head -1");
    let out = wait_output(env.command(engine, &[arg(&dir), "--", "sh", "-c", &script]).spawn().unwrap());
    let lines: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    assert_eq!(out.status.code(), Some(0), "[{engine}] {}", text(&out.stderr));
    let kib: u64 = lines[0].parse().unwrap();
    assert!((300_000..=393_216).contains(&kib), "[{engine}] 384M from ~/.cvm.toml: MemTotal {kib} KiB");
    assert_eq!(lines[1..], ["from the data dir", "read-only", "Run make check before committing."], "[{engine}]");
    assert!(!text(&out.stdout).contains("Global words"), "[{engine}] the project's instructions replace the global ones");

    // The environment beats the files, and a flag beats the environment.
    let out = wait_output(env.command(engine, &[arg(&dir), "--", "sh", "-c", mem_kib]).env("CVM_MEMORY", "320M").spawn().unwrap());
    let kib: u64 = text(&out.stdout).trim().parse().unwrap();
    assert!(kib <= 327_680, "[{engine}] CVM_MEMORY=320M: {kib} KiB");
    let out = wait_output(
        env.command(engine, &[arg(&dir), "--cpus", "1", "--", "grep", "-c", "^processor", "/proc/cpuinfo"])
            .env("CVM_CPUS", "2")
            .spawn()
            .unwrap(),
    );
    assert_eq!(text(&out.stdout), "1\n", "[{engine}] --cpus over CVM_CPUS");
    env.assert_clean();

    let show = env.cvm(&["config", "show", arg(&dir)]).env("CVM_MEMORY", "1G").output().unwrap();
    let shown = text(&show.stdout);
    let line = |key: &str| {
        shown.lines().find(|l| l.starts_with(&format!("{key} "))).unwrap_or_else(|| panic!("{key} missing: {shown}")).to_string()
    };
    assert!(
        line("vm.cpus").contains("= 2") && line("vm.cpus").ends_with(&format!("# {}", dir.join(".cvm.toml").display())),
        "{}",
        line("vm.cpus")
    );
    assert!(line("vm.memory").contains("1024M") && line("vm.memory").ends_with("# $CVM_MEMORY"), "{}", line("vm.memory"));
    assert!(line("vm.vmm").ends_with("# default"), "{}", line("vm.vmm"));
    assert!(line("mounts").contains("/mnt/data:ro"), "{}", line("mounts"));

    // A change that widens more is refused until trusted again; one that widens nothing more is not.
    let file = dir.join(".cvm.toml");
    let original = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, original.replace("cpus = 2", "cpus = 1")).unwrap();
    assert_eq!(env.cvm(&["config", "show", arg(&dir)]).output().unwrap().status.code(), Some(0));
    std::fs::write(&file, original.clone() + "[network]\nallow = [\"evil.example\"]\nmode = \"open\"\n").unwrap();
    let show = env.cvm(&["config", "show", arg(&dir)]).output().unwrap();
    assert_eq!(show.status.code(), Some(1));
    assert!(text(&show.stderr).contains("changed since you trusted it: network.mode, network.allow now widen"), "{}", text(&show.stderr));
    let revoked = env.cvm(&["trust", "--revoke", arg(&dir)]).output().unwrap();
    assert!(text(&revoked.stdout).starts_with("no longer trusted"), "{}", text(&revoked.stdout));
}

#[test]
fn config_validate_points_at_the_mistake() {
    let Some(env) = Env::new() else { return };
    let dir = project(&env);
    let file = dir.join(".cvm.toml");
    std::fs::write(&file, "[vm]\ncpus = 2\n\n[tools]\nnode = true\ncobol = true\n").unwrap();
    let out = env.cvm(&["config", "validate", arg(&file)]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).starts_with(&format!("{}:6:1: unknown tool \"cobol\"", file.display())), "{}", text(&out.stderr));
    std::fs::write(&file, "[vm]\ncpus = 2\nmemroy = \"1G\"\n").unwrap();
    let out = env.cvm(&["config", "validate", arg(&file)]).output().unwrap();
    assert!(text(&out.stderr).starts_with(&format!("{}:3:1: unknown key `memroy`", file.display())), "{}", text(&out.stderr));
    // A session refuses a bad file the same way, before any VM starts.
    let run = wait_output(env.command(engine(), &[arg(&dir), "--", "true"]).spawn().unwrap());
    assert_eq!(run.status.code(), Some(125));
    assert!(text(&run.stderr).contains(":3:1: unknown key `memroy`"), "{}", text(&run.stderr));
    std::fs::write(&file, "[vm]\ncpus = 2\n[network]\nallow = { replace = [\"api.anthropic.com\"] }\n").unwrap();
    let out = env.cvm(&["config", "validate", arg(&file)]).output().unwrap();
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(0), format!("{}: ok\n", file.display())));
}

#[test]
fn environment_options_and_secrets_reach_commands_and_nothing_else() {
    let Some(env) = Env::new() else { return };
    let dir = project(&env);
    let secrets = env.home.path().join(".config/cvm/secrets.env");
    std::fs::create_dir_all(secrets.parent().unwrap()).unwrap();
    std::fs::write(&secrets, "# tokens\nexport API_TOKEN=\"hunter2-secret\"\n").unwrap();
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).unwrap();
    let env_file = env.home.path().join("vars.env");
    std::fs::write(&env_file, "FROM_FILE=file value\nOVERRIDDEN=from the file\n").unwrap();
    // The project's [env] needs no trust (it widens nothing); the files and flags beat it.
    std::fs::write(dir.join(".cvm.toml"), "[env]\nFROM_CONFIG = \"config value\"\nFROM_FILE = \"from the config\"\n").unwrap();
    let script = "echo \"$API_TOKEN|$FROM_FILE|$OVERRIDDEN|$PASSED|$FLAG|$FROM_CONFIG\"; grep -rl hunter2 /run/cvm 2>/dev/null | wc -l";
    let engine = engine();
    let out = wait_output(
        env.command(
            engine,
            &[
                "-v",
                "--debug",
                arg(&dir),
                "--env-file",
                arg(&env_file),
                "--inherit-env",
                "PASSED",
                "--inherit-env",
                "UNSET_ONE",
                "-e",
                "OVERRIDDEN=by the flag",
                "--env",
                "FLAG=yes",
                "--",
                "sh",
                "-c",
                script,
            ],
        )
        .env("PASSED", "from my shell")
        .spawn()
        .unwrap(),
    );
    assert_eq!(
        text(&out.stdout),
        "hunter2-secret|file value|by the flag|from my shell|yes|config value\n0\n",
        "[{engine}] {}",
        text(&out.stderr)
    );
    let logged = text(&out.stderr);
    assert!(
        logged.contains("guest console") && !logged.contains("hunter2"),
        "[{engine}] the logs and the console never show a secret: {logged}"
    );
    env.assert_clean();
    let show = env.cvm(&["config", "show", arg(&dir)]).output().unwrap();
    assert!(!text(&show.stdout).contains("hunter2") && text(&show.stdout).contains(arg(&secrets)), "{}", text(&show.stdout));
    // A secrets file others can read is refused.
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = env.run(engine, &["--", "true"], b"");
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("chmod 600"), "{}", text(&out.stderr));
    let bad = env.run(engine, &["--env", "NOT A NAME=1", "--", "true"], b"");
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
    // A project cannot point the guest's tools past cvm's proxy.
    std::fs::write(dir.join(".cvm.toml"), "[env]\nHTTPS_PROXY = \"http://10.0.0.1:3128\"\n").unwrap();
    let out = wait_output(env.command(engine, &[arg(&dir), "--", "true"]).spawn().unwrap());
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains(".cvm.toml:2:1: HTTPS_PROXY is cvm's to set"), "{}", text(&out.stderr));
}

#[test]
fn run_worktree_makes_and_uses_a_branch_worktree() {
    let Some(env) = Env::new() else { return };
    let main = project(&env);
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(&main)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", text(&out.stderr));
    };
    git(&["init", "-q", "-b", "main"]);
    std::fs::write(main.join("README"), "hello\n").unwrap();
    git(&["add", "README"]);
    git(&["commit", "-q", "-m", "first"]);
    let worktree = main.with_file_name("app-agent-1");
    let engine = engine();
    let out = wait_output(
        env.command(engine, &["--worktree", "agent/1", "--", "sh", "-c", "pwd; cat README; git branch --show-current 2>/dev/null || true"])
            .current_dir(&main)
            .spawn()
            .unwrap(),
    );
    assert_eq!(out.status.code(), Some(0), "[{engine}] {}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with(&format!("{}\nhello\n", worktree.display())), "[{engine}] {}", text(&out.stdout));
    env.assert_clean();
    let list = env.cvm(&["worktree", "list"]).current_dir(&main).output().unwrap();
    assert!(text(&list.stdout).contains(&format!("{}  agent/1", worktree.display())), "{}", text(&list.stdout));
    let remove = env.cvm(&["worktree", "remove", "agent/1"]).current_dir(&main).output().unwrap();
    assert_eq!(remove.status.code(), Some(0), "{}", text(&remove.stderr));
    assert!(!worktree.exists());
}

#[test]
fn doctor_completions_and_man_page() {
    let Some(env) = Env::new() else { return };
    let out = env.cvm(&["doctor"]).env("CVM_KVM_DEVICE", "/nonexistent/kvm").env("CVM_KERNEL", "/nonexistent/vmlinux").output().unwrap();
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "a missing kernel fails: {report}");
    assert!(report.contains("warn  /dev/kvm") && report.contains("/nonexistent/kvm does not exist"), "{report}");
    assert!(report.lines().any(|l| l.starts_with("FAIL  guest kernel")) && report.contains("fix: scripts/build-kernel"), "{report}");
    let out = env.cvm(&["doctor"]).env("CVM_KERNEL", &env.kernel).env("CVM_DEBIAN_IMAGE", &env.image).output().unwrap();
    assert!(text(&out.stdout).lines().any(|l| l.starts_with("ok    guest kernel")), "{}", text(&out.stdout));

    let bash = env.cvm(&["completions", "bash"]).output().unwrap();
    assert!(text(&bash.stdout).contains("complete -F _cvm") && text(&bash.stdout).contains("worktree"), "bash completions");
    let zsh = env.cvm(&["completions", "zsh"]).output().unwrap();
    assert!(text(&zsh.stdout).starts_with("#compdef cvm"));
    let man = env.cvm(&["man", "run"]).output().unwrap();
    assert!(text(&man.stdout).contains(".TH cvm-run 1") && text(&man.stdout).contains("\\-\\-worktree"), "{}", text(&man.stdout));
}
