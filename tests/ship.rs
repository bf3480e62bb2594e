//! cvm as users get it: the .deb installed in a clean Debian container, and cvm's container
//! image under podman (with runc) and docker (a dockerd this test starts), each given only
//! /dev/kvm: no --privileged, no added capability.
//!
//! scripts/test builds what these test (scripts/build-deb, scripts/build-oci) and names it in
//! CVM_TEST_DEB, CVM_TEST_OCI and CVM_TEST_DEBIAN_OCI. Without them a test skips with a line;
//! with CVM_REQUIRE_SHIP=1 (scripts/test sets it) a skip is a failure. Each test keeps its
//! containers' store (podman's, dockerd's) in a directory of its own: when it ends, failed or
//! not, its containers are removed, its daemon stopped and the store deleted.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{deadline, describe, download_deadline, kvm_usable, processes_marked, text, wait_output_within};

/// What scripts/test built: the .deb, cvm's image and a clean Debian image (OCI references).
struct Built {
    deb: PathBuf,
    image: String,
    clean_debian: String,
}

fn built() -> Option<Built> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    match (var("CVM_TEST_DEB"), var("CVM_TEST_OCI"), var("CVM_TEST_DEBIAN_OCI")) {
        (Some(deb), Some(image), Some(clean_debian)) => Some(Built { deb: deb.into(), image, clean_debian }),
        _ => {
            assert!(
                std::env::var("CVM_REQUIRE_SHIP").as_deref() != Ok("1"),
                "CVM_REQUIRE_SHIP=1 but CVM_TEST_DEB, CVM_TEST_OCI or CVM_TEST_DEBIAN_OCI is unset"
            );
            eprintln!("skipped: no CVM_TEST_DEB, CVM_TEST_OCI and CVM_TEST_DEBIAN_OCI (scripts/test builds them)");
            None
        }
    }
}

/// What the images are called in a test's store.
const IMAGE: &str = "localhost/cvm-image:test";
const CLEAN_DEBIAN: &str = "localhost/clean-debian:test";

/// The deploy/ seccomp profile, as a user passes it.
fn seccomp_profile() -> String {
    format!("seccomp={}", Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/seccomp.json").display())
}

/// The micro-guest that prints a line and resets (tests/guests/hello.S).
fn hello_guest() -> PathBuf {
    PathBuf::from(env!("CVM_MICRO_GUESTS")).join("hello.elf")
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Podman,
    Docker,
}

/// A container engine with a store of its own.
struct Containers {
    kind: Kind,
    dir: tempfile::TempDir,
    daemon: Option<Child>,
    /// Every container this test starts carries it: a label, and a variable its processes
    /// inherit, which finds them on the host.
    marker: String,
}

impl Containers {
    /// podman with runc and cgroupfs (crun cannot run here: "cgroups in hybrid mode not
    /// supported"), and limits runc accepts.
    fn podman() -> Containers {
        let dir = tempfile::tempdir().unwrap();
        let conf = "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]\n[engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\n";
        std::fs::write(dir.path().join("containers.conf"), conf).unwrap();
        Containers { kind: Kind::Podman, marker: marker(&dir), dir, daemon: None }
    }

    /// A dockerd of this test's own, with the cgroupfs driver and no network set-up of its own.
    fn docker() -> Containers {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name).display().to_string();
        let daemon = Command::new("dockerd")
            .args(["--exec-opt", "native.cgroupdriver=cgroupfs", "--bridge", "none", "--iptables=false", "--ip6tables=false"])
            .args(["--data-root", &path("data"), "--exec-root", &path("exec"), "--pidfile", &path("docker.pid")])
            .args(["-H", &format!("unix://{}", path("docker.sock"))])
            .stdout(std::fs::File::create(path("dockerd.log")).unwrap())
            .stderr(Stdio::from(std::fs::File::create(path("dockerd.err")).unwrap()))
            .spawn()
            .expect("dockerd (Debian package docker.io, from scripts/bootstrap --test)");
        let docker = Containers { kind: Kind::Docker, marker: marker(&dir), dir, daemon: Some(daemon) };
        let started = Instant::now();
        while !docker.cli().arg("version").stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap().success() {
            let log = std::fs::read_to_string(docker.dir.path().join("dockerd.err")).unwrap_or_default();
            assert!(started.elapsed() < deadline(), "dockerd did not answer within {:?}: {log}", deadline());
            std::thread::sleep(Duration::from_millis(200));
        }
        docker
    }

    /// The engine's command line, on this test's store.
    fn cli(&self) -> Command {
        let path = |name: &str| self.dir.path().join(name);
        match self.kind {
            Kind::Podman => {
                let mut c = Command::new("podman");
                c.arg("--root").arg(path("storage")).arg("--runroot").arg(path("run")).env("CONTAINERS_CONF", path("containers.conf"));
                c
            }
            Kind::Docker => {
                // Debian's client, which speaks its daemon's API (a newer one may be first on PATH).
                let mut c = Command::new("/usr/bin/docker");
                c.env("DOCKER_HOST", format!("unix://{}", path("docker.sock").display()));
                c
            }
        }
    }

    /// Copies the OCI image `reference` into the store as `name` (skopeo: no registry).
    fn load(&self, reference: &str, name: &str) {
        let storage = self.dir.path().join("storage");
        let archive = self.dir.path().join("image.tar");
        let target = match self.kind {
            Kind::Podman => format!("containers-storage:[overlay@{}+{}]{name}", storage.display(), self.dir.path().join("run").display()),
            Kind::Docker => format!("docker-archive:{}:{name}", archive.display()),
        };
        let copy = wait_output_within(
            Command::new("skopeo")
                .args(["copy", "--quiet", reference, &target])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
            deadline(),
        );
        assert!(copy.status.success(), "skopeo copy {reference}: {}", text(&copy.stderr));
        if self.kind == Kind::Docker {
            let load = wait_output_within(
                self.cli()
                    .arg("load")
                    .arg("--quiet")
                    .arg("--input")
                    .arg(&archive)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap(),
                deadline(),
            );
            assert!(load.status.success(), "docker load: {}", text(&load.stderr));
            std::fs::remove_file(&archive).unwrap();
        }
    }

    /// `run` with this test's label and variable, inside the test's memory cgroup, then `args`.
    fn run_command(&self, args: &[&str]) -> Command {
        let mut c = self.cli();
        c.args(["run", "--label", &format!("cvm-test={}", self.marker), "--env", &format!("CVM_TEST_MARKER={}", self.marker)]);
        if let Some(parent) = cgroup_parent() {
            c.arg(format!("--cgroup-parent={parent}/cvm-test-containers"));
        }
        c.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        c
    }

    /// Runs a container that is removed when it ends, within `wait`.
    fn run(&self, args: &[&str], wait: Duration) -> Output {
        let all = [&["--rm"], args].concat();
        wait_output_within(self.run_command(&all).spawn().unwrap(), wait)
    }

    /// Waits until no process on this host carries the test's variable.
    /// Waits until no process on this host carries the test's variable and no container's root
    /// of this store is mounted on the host.
    fn assert_nothing_left(&self, what: &str) {
        let started = Instant::now();
        let store = self.dir.path().display().to_string();
        loop {
            let mut left: Vec<String> = processes_marked(&self.marker).into_iter().map(describe).collect();
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            // The store's own bind mount (dockerd keeps its data root private) is not a container's.
            left.extend(mounts.lines().filter(|l| l.contains(&store) && l.contains("merged")).map(|l| format!("mount: {l}")));
            if left.is_empty() {
                return;
            }
            assert!(started.elapsed() < deadline(), "{:?}: still there {:?} after {what}: {left:?}", self.kind, deadline());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        let filter = format!("label=cvm-test={}", self.marker);
        if let Ok(out) = self.cli().args(["ps", "--all", "--quiet", "--filter", &filter]).output() {
            for id in text(&out.stdout).split_whitespace() {
                let _ = self.cli().args(["rm", "--force", id]).output();
            }
        }
        if self.kind == Kind::Podman {
            // podman keeps no daemon: its images go with the store's directory, after this
            // unmounts whatever of them is still mounted.
            let _ = self.cli().args(["rmi", "--all", "--force"]).output();
        }
        if let Some(mut daemon) = self.daemon.take() {
            // SAFETY (test): SIGTERM to the daemon this test started; it stops its containerd.
            unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
            let started = Instant::now();
            while daemon.try_wait().ok().flatten().is_none() && started.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }
}

fn marker(dir: &tempfile::TempDir) -> String {
    format!("cvm-ship-{}", dir.path().file_name().unwrap().to_string_lossy())
}

/// The memory cgroup (v1) this test runs in, for containers to go below it and so stay within
/// the test run's limits.
fn cgroup_parent() -> Option<String> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cgroups.lines().find_map(|l| l.split_once(":memory:").map(|(_, path)| path.to_string())).filter(|p| p != "/")
}

/// Runs the checks every engine must pass on cvm's image; `secure` are the options that make
/// user namespaces available (none for podman, the profile for docker).
fn image_checks(engine: &Containers, secure: &[&str]) {
    let project = tempfile::tempdir().unwrap();
    let volume = format!("{}:/work", project.path().display());
    let guest = format!("{}:/guest.elf:ro", hello_guest().display());
    let base = [secure, &["--device", "/dev/kvm", "--user", "root"]].concat();
    let with = |more: &[&str]| -> Vec<String> { base.iter().chain(more).map(|s| s.to_string()).collect() };
    let run = |args: Vec<String>| engine.run(&args.iter().map(String::as_str).collect::<Vec<_>>(), deadline());
    let kind = engine.kind;

    // doctor: everything found where the image put it, the VMM's jail available.
    let out = run(with(&[IMAGE, "doctor"]));
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "[{kind:?}] doctor: {report}{}", text(&out.stderr));
    for line in [
        "ok    guest kernel         /usr/lib/cvm/vmlinux",
        "ok    debian image         /usr/lib/cvm/debian.erofs",
        "ok    minimal image        /usr/lib/cvm/minimal.cpio",
        "ok    VMM jail",
    ] {
        assert!(report.contains(line), "[{kind:?}] doctor lacks {line:?}: {report}");
    }

    // A micro-guest on /dev/kvm, through cvm's VMM in its jail.
    if kvm_usable() {
        let out = run(with(&["--volume", &guest, IMAGE, "boot", "--kernel", "/guest.elf"]));
        assert_eq!(text(&out.stdout), "cvm micro-guest: hello from the guest\n", "[{kind:?}] boot: {}", text(&out.stderr));
        assert!(out.status.success(), "[{kind:?}] boot: {}", text(&out.stderr));
    }

    // A session on the Debian image with the project bind-mounted: the file lands on the host,
    // the status comes back.
    let out =
        run(with(&["--volume", &volume, IMAGE, "run", ".", "--", "sh", "-c", "grep -q bookworm /etc/os-release && echo x > f; exit 3"]));
    assert_eq!(out.status.code(), Some(3), "[{kind:?}] run: {}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(project.path().join("f")).unwrap(), "x\n", "[{kind:?}] the guest's file on the host");

    let out = run(with(&["--volume", &volume, IMAGE, "run", "--image", "minimal", "--timeout", "3s", ".", "--", "sleep", "600"]));
    assert_eq!(out.status.code(), Some(124), "[{kind:?}] --timeout: {}", text(&out.stderr));

    // The container stopped (SIGTERM to cvm, its PID 1), then killed: nothing left on the host.
    for (signal, stop) in [("SIGTERM", vec!["stop", "--time", "30"]), ("SIGKILL", vec!["kill", "--signal", "KILL"])] {
        let name = format!("{}-{}", engine.marker, signal.to_lowercase());
        let args = with(&["--name", &name, "--volume", &volume, IMAGE, "run", "--image", "minimal", ".", "--", "sleep", "600"]);
        let args: Vec<&str> = ["--rm"].into_iter().chain(args.iter().map(String::as_str)).collect();
        let mut container = engine.run_command(&args).spawn().unwrap();
        let started = Instant::now();
        // Running once QEMU (the engine here) or cvm's VMM runs under the container.
        while !processes_marked(&engine.marker)
            .into_iter()
            .any(|pid| describe(pid).contains("qemu-system") || describe(pid).contains("__vmm"))
        {
            assert!(container.try_wait().unwrap().is_none(), "[{kind:?}] the session ended before its VM ran");
            assert!(started.elapsed() < deadline(), "[{kind:?}] no VM within {:?}", deadline());
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = engine.cli().args(&stop).arg(&name).output().unwrap();
        assert!(out.status.success(), "[{kind:?}] {stop:?}: {}", text(&out.stderr));
        let _ = wait_output_within(container, deadline());
        engine.assert_nothing_left(&format!("the container got {signal}"));
    }

    // Named by doctor with its fix: no /dev/kvm given at all.
    let out = run([secure, &["--user", "root", IMAGE, "doctor"]].concat().iter().map(|s| s.to_string()).collect());
    assert!(
        text(&out.stdout).contains("/dev/kvm is not in this container: start it with --device /dev/kvm"),
        "[{kind:?}] doctor without /dev/kvm: {}",
        text(&out.stdout)
    );
    // Refused, each in one line, never a hang: /dev/kvm bind-mounted without the device rule.
    let out =
        run([secure, &["--volume", "/dev/kvm:/dev/kvm", "--user", "root", "--volume", &guest, IMAGE, "boot", "--kernel", "/guest.elf"]]
            .concat()
            .iter()
            .map(|s| s.to_string())
            .collect());
    assert!(
        !out.status.success() && text(&out.stderr).contains("EPERM: the device cgroup refuses it): pass it with --device /dev/kvm"),
        "[{kind:?}] bind-mounted /dev/kvm: {}",
        text(&out.stderr)
    );
    // The image's own user, where /dev/kvm is not open to others (root's only here, or a kvm
    // group the container's user is not in).
    let mode = std::fs::metadata("/dev/kvm").map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions())).unwrap_or(0);
    if mode & 0o006 != 0o006 {
        let out = run([secure, &["--device", "/dev/kvm", IMAGE, "doctor"]].concat().iter().map(|s| s.to_string()).collect());
        assert!(
            text(&out.stdout).contains("permission denied opening /dev/kvm in this container: start it with --group-add"),
            "[{kind:?}] doctor as the image's user: {}",
            text(&out.stdout)
        );
    }
}

#[test]
fn the_image_runs_under_podman_with_only_dev_kvm() {
    let Some(built) = built() else { return };
    let podman = Containers::podman();
    podman.load(&built.image, IMAGE);
    image_checks(&podman, &[]);
}

#[test]
fn the_image_runs_under_docker_with_the_seccomp_profile() {
    let Some(built) = built() else { return };
    let docker = Containers::docker();
    docker.load(&built.image, IMAGE);
    image_checks(&docker, &["--security-opt", &seccomp_profile()]);

    // docker's default profile refuses user namespaces: doctor names the profile, and cvm's VMM
    // refuses to start in one line.
    let out = docker.run(&["--device", "/dev/kvm", "--user", "root", IMAGE, "doctor"], deadline());
    assert!(
        text(&out.stdout)
            .contains("fix: run the container with a seccomp profile that allows them: --security-opt seccomp=deploy/seccomp.json"),
        "{}",
        text(&out.stdout)
    );
    let guest = format!("{}:/guest.elf:ro", hello_guest().display());
    let out =
        docker.run(&["--device", "/dev/kvm", "--user", "root", "--volume", &guest, IMAGE, "boot", "--kernel", "/guest.elf"], deadline());
    assert!(!out.status.success() && text(&out.stderr).contains("seccomp profile"), "{}", text(&out.stderr));
}

#[test]
fn the_deb_installs_in_a_clean_debian_container() {
    let Some(built) = built() else { return };
    let podman = Containers::podman();
    podman.load(&built.clean_debian, CLEAN_DEBIAN);
    let project = tempfile::tempdir().unwrap();
    let deb = format!("{}:/tmp/cvm.deb:ro", built.deb.display());
    let volume = format!("{}:/work", project.path().display());
    // apt reaches Debian's mirror through the host's network. Without Recommends, QEMU named:
    // the engine on a host without hardware KVM.
    let script = "set -e; apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends /tmp/cvm.deb qemu-system-x86 >/dev/null; \
                  test -f /usr/share/man/man1/cvm-run.1.gz; test -f /usr/share/bash-completion/completions/cvm; \
                  cvm doctor || true; cd /work && cvm run --vmm auto --image minimal . -- sh -c 'echo from-the-guest; exit 7'";
    let out = podman.run(
        &["--network", "host", "--device", "/dev/kvm", "--volume", &deb, "--volume", &volume, CLEAN_DEBIAN, "sh", "-c", script],
        download_deadline(),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(7), "stdout: {stdout}\nstderr: {stderr}");
    for line in ["ok    guest kernel         /usr/lib/cvm/vmlinux", "ok    minimal image        /usr/lib/cvm/minimal.cpio", "ok    passt"] {
        assert!(stdout.contains(line), "doctor lacks {line:?}: {stdout}");
    }
    assert!(stdout.ends_with("from-the-guest\n"), "{stdout}");
    // The Debian image is built on the user's machine: doctor says how.
    assert!(stdout.contains("fix: cvm image build debian"), "{stdout}");
    assert!(stderr.contains("cvm: using "), "auto says which engine: {stderr}");
}
