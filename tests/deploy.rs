//! The fleet recipes in deploy/ and the GitHub Action, checked offline with the validators
//! scripts/install-checkers installs (CVM_TEST_CHECKERS, their bin directory) and agent-sandbox's
//! CRDs (CVM_TEST_AGENT_SANDBOX_CRDS): each recipe passes, and the same recipe broken fails,
//! so a check that accepts anything is caught. No cluster, Nomad or runner runs here.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{deadline, text, wait_output_within, Env};

/// The validators' bin directory, and the CRDs.
fn checkers() -> Option<(PathBuf, PathBuf)> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    match (var("CVM_TEST_CHECKERS"), var("CVM_TEST_AGENT_SANDBOX_CRDS")) {
        (Some(bin), Some(crds)) => Some((bin, crds)),
        _ => {
            assert!(
                std::env::var("CVM_REQUIRE_SHIP").as_deref() != Ok("1"),
                "CVM_REQUIRE_SHIP=1 but CVM_TEST_CHECKERS or CVM_TEST_AGENT_SANDBOX_CRDS is unset"
            );
            eprintln!("skipped: no CVM_TEST_CHECKERS and CVM_TEST_AGENT_SANDBOX_CRDS (scripts/test sets them)");
            None
        }
    }
}

fn source(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn run(command: &mut Command) -> Output {
    wait_output_within(command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap(), deadline())
}

/// `file` with `from` replaced by `to`, in a directory of its own under `dir` (with the same
/// name, which some checkers read).
fn broken(dir: &Path, file: &str, from: &str, to: &str) -> PathBuf {
    let original = std::fs::read_to_string(source(file)).unwrap();
    assert!(original.contains(from), "{file} has no {from:?} to break");
    let path = dir.join(Path::new(file).file_name().unwrap());
    std::fs::write(&path, original.replacen(from, to, 1)).unwrap();
    path
}

#[test]
fn the_kubernetes_job_validates_strictly() {
    let Some((bin, _)) = checkers() else { return };
    let validate = |path: &Path| run(Command::new(bin.join("kubernetes-validate")).arg("--strict").arg(path));
    let out = validate(&source("deploy/kubernetes/job.yaml"));
    assert!(
        out.status.success() && text(&out.stdout).contains("passed for resource job/cvm-agent-task"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // A hostPath of /dev/kvm is what users try first; the field does not even exist there.
    let dir = tempfile::tempdir().unwrap();
    let bad =
        broken(dir.path(), "deploy/kubernetes/job.yaml", "      restartPolicy: Never", "      restartPolicy: Never\n      kvm: /dev/kvm");
    assert!(!validate(&bad).status.success(), "an unknown field passed");
}

#[test]
fn the_agent_sandbox_manifests_match_their_crds() {
    let Some((_, crds)) = checkers() else { return };
    let check = |paths: &[PathBuf]| run(Command::new(source("scripts/check-recipes")).arg("crd").arg(&crds).args(paths));
    let manifests: Vec<PathBuf> = ["sandbox-template", "sandbox-warm-pool", "sandbox-claim"]
        .iter()
        .map(|n| source(&format!("deploy/kubernetes/agent-sandbox/{n}.yaml")))
        .collect();
    let out = check(&manifests);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    for kind in ["SandboxTemplate cvm", "SandboxWarmPool cvm", "SandboxClaim agent-session-1"] {
        assert!(text(&out.stdout).lines().any(|l| l.starts_with("ok   ") && l.contains(kind)), "{kind}: {}", text(&out.stdout));
    }
    let dir = tempfile::tempdir().unwrap();
    // An unknown field in the claim, and one in the pod template's container.
    let claim = broken(dir.path(), "deploy/kubernetes/agent-sandbox/sandbox-claim.yaml", "  warmPoolRef:", "  warmPool:");
    assert!(!check(&[claim]).status.success(), "an unknown field in the claim passed");
    let template = broken(
        dir.path(),
        "deploy/kubernetes/agent-sandbox/sandbox-template.yaml",
        "          workingDir: /work",
        "          workDir: /work",
    );
    let out = check(&[template]);
    assert!(!out.status.success() && text(&out.stdout).contains("workDir"), "an unknown container field passed: {}", text(&out.stdout));
}

#[test]
fn the_nomad_job_runs_cvm_with_the_device_and_the_profile() {
    let Some(_) = checkers() else { return };
    let check = |path: &Path| run(Command::new(source("scripts/check-recipes")).arg("nomad").arg(path));
    let out = check(&source("deploy/nomad/cvm.nomad.hcl"));
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let dir = tempfile::tempdir().unwrap();
    let no_device = broken(dir.path(), "deploy/nomad/cvm.nomad.hcl", "host_path      = \"/dev/kvm\"", "host_path      = \"/dev/null\"");
    assert!(text(&check(&no_device).stdout).contains("no /dev/kvm device"));
    let not_hcl = broken(dir.path(), "deploy/nomad/cvm.nomad.hcl", "group \"task\" {", "group \"task\" {{");
    assert!(!check(&not_hcl).status.success(), "broken HCL passed");
}

#[test]
fn the_action_and_its_example_workflow_pass_their_linters() {
    let Some((bin, _)) = checkers() else { return };
    let actionlint = |path: &Path| run(Command::new(bin.join("actionlint")).arg(path));
    let schema = |name: &str, path: &Path| run(Command::new(bin.join("check-jsonschema")).args(["--builtin-schema", name]).arg(path));
    let workflow = source("deploy/github-actions/example.yml");
    let out = actionlint(&workflow);
    assert!(out.status.success(), "actionlint: {}{}", text(&out.stdout), text(&out.stderr));
    let out = schema("vendor.github-workflows", &workflow);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let out = schema("vendor.github-actions", &source("action.yml"));
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));

    let dir = tempfile::tempdir().unwrap();
    let bad_workflow = broken(dir.path(), "deploy/github-actions/example.yml", "timeout-minutes: 60", "timeout-minutes: an hour");
    assert!(!actionlint(&bad_workflow).status.success(), "actionlint passed a bad timeout");
    let bad_action = broken(dir.path(), "action.yml", "  using: composite", "  using: compost");
    assert!(!schema("vendor.github-actions", &bad_action).status.success(), "a bad action passed its schema");
}

/// The action's `cvm run` step, its bash as the runner would run it, with the action's inputs
/// as its variables: the command's status is the step's.
#[test]
fn the_actions_run_step_passes_the_commands_status() {
    let Some((bin, _)) = checkers() else { return };
    let Some(env) = Env::debian() else { return };
    let extract = "import sys, yaml; steps = yaml.safe_load(open(sys.argv[1]))['runs']['steps']; print(next(s['run'] for s in steps if s.get('name') == 'cvm run'))";
    let out = run(Command::new(bin.join("python")).args(["-c", extract]).arg(source("action.yml")));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let step = text(&out.stdout);
    let project = tempfile::tempdir().unwrap();
    let cvm_dir = Path::new(env!("CARGO_BIN_EXE_cvm")).parent().unwrap();
    let path = format!("{}:{}", cvm_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut step_command = Command::new("bash");
    step_command
        .args(["-e", "-c", &step])
        .current_dir(project.path())
        .env("PATH", path)
        .env("CVM_KERNEL", &env.kernel)
        .env("XDG_RUNTIME_DIR", env.runtime.path())
        .env("HOME", env.home.path())
        .env("XDG_CACHE_HOME", env.home.path().join(".cache"))
        .envs([
            ("COMMAND", "echo from-bash > out; exit 5"),
            ("PROJECT", "."),
            ("TIMEOUT", "5m"),
            ("MEMORY", "1G"),
            ("CPUS", "1"),
            ("ALLOW", "a.example b.example"),
        ])
        .env("IMAGE", &env.image);
    let out = run(&mut step_command);
    assert_eq!(out.status.code(), Some(5), "stdout: {}\nstderr: {}", text(&out.stdout), text(&out.stderr));
    assert_eq!(std::fs::read_to_string(project.path().join("out")).unwrap(), "from-bash\n");
}

#[test]
fn the_seccomp_profile_is_the_one_its_script_writes() {
    let Some(_) = checkers() else { return };
    let out = run(Command::new(source("scripts/build-seccomp-profile")).arg("--check"));
    assert!(out.status.success(), "{}", text(&out.stderr));
}
