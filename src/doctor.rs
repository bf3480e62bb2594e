//! `cvm doctor`: what this host has of what cvm needs, and how to fix each problem.

use std::path::{Path, PathBuf};

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// cvm works without it, with less (a missing optional tool, no hardware KVM).
    Warn,
    /// `cvm run` cannot work until it is fixed.
    Fail,
}

#[derive(Clone, Debug)]
pub struct Check {
    pub what: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do about it, for Warn and Fail.
    pub fix: Option<String>,
}

impl Check {
    fn ok(what: &'static str, detail: impl Into<String>) -> Check {
        Check { what, status: Status::Ok, detail: detail.into(), fix: None }
    }

    fn bad(what: &'static str, status: Status, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { what, status, detail: detail.into(), fix: Some(fix.into()) }
    }
}

/// Host tools: (program, Debian package, what needs it, required).
const TOOLS: &[(&str, &str, &str, bool)] = &[
    ("qemu-system-x86_64", "qemu-system-x86", "--vmm qemu and `cvm bench`", false),
    ("passt", "passt", "--network open", false),
    ("mkfs.ext4", "e2fsprogs", "--disk and `cvm setup`", true),
    ("git", "git", "`cvm worktree` and --worktree", false),
    ("gpgconf", "gnupg", "--gpg", false),
    ("mmdebstrap", "mmdebstrap", "`cvm image build debian`", false),
    ("mkfs.erofs", "erofs-utils", "`cvm image build debian`", false),
    ("npm", "npm", "`cvm image build debian` (Claude Code)", false),
];

/// Runs every check.
pub fn checks() -> Vec<Check> {
    let device = std::env::var_os("CVM_KVM_DEVICE").map_or_else(|| PathBuf::from("/dev/kvm"), PathBuf::from);
    let mut checks = vec![kvm(&device)];
    checks.push(match crate::project::images::kernel(None) {
        Ok(path) => Check::ok("guest kernel", path.display().to_string()),
        Err(e) => Check::bad("guest kernel", Status::Fail, e.to_string(), "scripts/build-kernel (about 5 minutes on 2 cores)"),
    });
    checks.push(match crate::project::images::image("debian") {
        Ok(image) => Check::ok("debian image", image.path().display().to_string()),
        Err(e) => Check::bad("debian image", Status::Fail, e.to_string(), "cvm image build debian"),
    });
    checks.push(match crate::project::images::image("minimal") {
        Ok(image) => Check::ok("minimal image", image.path().display().to_string()),
        Err(e) => Check::bad("minimal image", Status::Warn, e.to_string(), "cvm image build minimal"),
    });
    checks.push(match crate::session::rundir::runtime_base() {
        Ok(runtime) => Check::ok("session directory", runtime.display().to_string()),
        Err(e) => Check::bad("session directory", Status::Fail, format!("{e:#}"), "set XDG_RUNTIME_DIR to a directory only you can use"),
    });
    checks.push(match cvm_backends::fs::sandbox_on_this_host() {
        ("namespaces", _) => Check::ok("fs sandbox", "namespaces (mount, PID, network)"),
        ("chroot", why) if cvm_vmm::host::in_container() => Check::bad(
            "fs sandbox",
            Status::Warn,
            format!("a chroot only: {} (root in a container has no CAP_SYS_ADMIN)", why.unwrap_or_default()),
            "run the container as a user other than root (the image's user cvm): the backends then get namespaces of a user namespace",
        ),
        ("chroot", why) => Check::bad(
            "fs sandbox",
            Status::Warn,
            format!("a chroot only: {}", why.unwrap_or_default()),
            "allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1)",
        ),
        (_, why) => Check::bad(
            "fs sandbox",
            Status::Fail,
            format!("none: {}; sessions with shares refuse to start", why.unwrap_or_default()),
            "allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1), or run with --allow-unsandboxed-fs",
        ),
    });
    checks.push(match cvm_vmm::jail::available() {
        Ok(()) => Check::ok("VMM jail", "user, mount, PID, IPC and network namespaces"),
        Err(e) if cvm_vmm::host::in_container() => Check::bad(
            "VMM jail",
            Status::Warn,
            format!("user namespaces are refused in this container ({e}); cvm's VMM does not start without its jail (QEMU still works)"),
            "run the container with a seccomp profile that allows them: --security-opt seccomp=deploy/seccomp.json (docker's default refuses them; podman's allows them)",
        ),
        Err(e) => Check::bad("VMM jail", Status::Warn, format!("{e}; cvm's VMM does not start without its jail (--vmm qemu still works)"), "allow user namespaces (sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone=1)"),
    });
    checks.push(open_files(cvm_backends::fs::guest_open_file_limit()));
    if let Some(check) = git_bare_repositories() {
        checks.push(check);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for &(program, package, needed_by, required) in TOOLS {
        let found = std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file());
        checks.push(match found {
            Some(p) => Check::ok(program, p.display().to_string()),
            None => Check::bad(
                program,
                if required { Status::Fail } else { Status::Warn },
                format!("not installed; needed by {needed_by}"),
                format!("apt-get install {package} (or scripts/bootstrap)"),
            ),
        });
    }
    checks
}

/// The KVM device (`CVM_KVM_DEVICE`, else /dev/kvm): present, usable by this user, and
/// hardware (PVM cannot run Linux).
fn kvm(device: &Path) -> Check {
    match cvm_vmm::host::open_kvm_at(device.to_path_buf()) {
        // The error says what to do: here, and where `cvm run --vmm cvm` refuses.
        Err(e) => Check::bad(
            "/dev/kvm",
            Status::Warn,
            format!("{} cannot be used: sessions run on QEMU's TCG (slow)", device.display()),
            e.to_string(),
        ),
        Ok(_) if cvm_vmm::host::is_pvm() => Check::bad(
            "/dev/kvm",
            Status::Warn,
            "PVM, a software hypervisor: cvm's VMM cannot run Linux here, so sessions run on QEMU (--vmm auto)",
            "for cvm's VMM, use a host with hardware KVM (vmx/svm)",
        ),
        Ok(_) => Check::ok("/dev/kvm", "hardware KVM, usable"),
    }
}

/// Below this many files a share's guest can hold, a large project (or its `node_modules`) no
/// longer fits.
const FEW_OPEN_FILES: u64 = 100_000;

/// How many files of a share a guest can keep in its cache before it gets "Too many open files
/// in system".
fn open_files(limit: u64) -> Check {
    let what = "open files per share";
    if limit >= FEW_OPEN_FILES {
        return Check::ok(what, format!("{limit}"));
    }
    Check::bad(
        what,
        Status::Warn,
        format!("{limit}: a guest that keeps more files of one share in its cache (a git status of a large project does) gets \"Too many open files in system\""),
        "raise the hard limit on open files (ulimit -Hn; LimitNOFILE= for a systemd service, nofile in /etc/security/limits.conf) to 1048576",
    )
}

/// Host git's word on repositories found outside a `.git` (`safe.bareRepository`); none
/// without git.
fn git_bare_repositories() -> Option<Check> {
    let git = |args: &[&str]| std::process::Command::new("git").args(args).stdin(std::process::Stdio::null()).output().ok();
    let version = git(&["--version"]).filter(|o| o.status.success())?;
    let setting = git(&["config", "--get", "safe.bareRepository"]).filter(|o| o.status.success());
    Some(bare_repositories(
        &String::from_utf8_lossy(&version.stdout),
        setting.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).as_deref(),
    ))
}

/// `git --version`'s text and the `safe.bareRepository` setting, judged: cvm's fs servers stop
/// a guest making a repository outside `.git` in a share, and git itself can refuse to use
/// one from 2.38 on, which also covers directories cvm never shared.
fn bare_repositories(version: &str, setting: Option<&str>) -> Check {
    let what = "git bare repositories";
    let number: Vec<u32> = version.split_whitespace().nth(2).unwrap_or("").split('.').map_while(|p| p.parse().ok()).collect();
    if number.as_slice() < [2, 38].as_slice() {
        return Check::bad(
            what,
            Status::Warn,
            format!("{}: git before 2.38 uses any repository it finds in a directory", version.trim()),
            "install git 2.38 or newer, then: git config --global safe.bareRepository explicit",
        );
    }
    match setting {
        Some(value) if value.eq_ignore_ascii_case("explicit") => Check::ok(what, "safe.bareRepository=explicit"),
        other => Check::bad(
            what,
            Status::Warn,
            format!(
                "safe.bareRepository={}: host git uses a repository a guest could plant in any directory you cd into",
                other.unwrap_or("all (git's default)")
            ),
            "git config --global safe.bareRepository explicit",
        ),
    }
}

/// The report, one line per check, with each fix under its problem.
pub fn report(checks: &[Check]) -> String {
    let mut out = String::new();
    for check in checks {
        let mark = match check.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        out.push_str(&format!("{mark}  {:<20} {}\n", check.what, check.detail));
        if let Some(fix) = &check.fix {
            out.push_str(&format!("      {:<20} fix: {fix}\n", ""));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_says_how_to_fix_each_problem() {
        let checks = [
            Check::ok("/dev/kvm", "hardware KVM, usable"),
            Check::bad("guest kernel", Status::Fail, "no guest kernel", "scripts/build-kernel"),
            Check::bad("passt", Status::Warn, "not installed", "apt-get install passt"),
        ];
        let text = report(&checks);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ok    /dev/kvm"));
        assert!(lines[1].starts_with("FAIL  guest kernel") && lines[2].trim_start().starts_with("fix: scripts/build-kernel"), "{text}");
        assert!(lines[3].starts_with("warn  passt") && lines[4].contains("fix: apt-get install passt"), "{text}");
    }

    #[test]
    fn a_low_open_file_limit_is_a_warning_with_a_fix() {
        let low = open_files(19_936);
        assert_eq!(low.status, Status::Warn);
        assert!(low.detail.starts_with("19936: ") && low.fix.as_deref().is_some_and(|f| f.contains("ulimit -Hn")), "{low:?}");
        assert_eq!(open_files(999_936).status, Status::Ok);
    }

    #[test]
    fn a_missing_kvm_device_is_reported_with_a_fix() {
        let check = kvm(Path::new("/nonexistent/kvm"));
        assert_eq!(check.status, Status::Warn);
        assert!(check.detail.starts_with("/nonexistent/kvm cannot be used"), "{check:?}");
        // "does not exist" on a host, "is not in this container" in one: each with what to do.
        assert!(check.fix.as_deref().is_some_and(|f| f.starts_with("/nonexistent/kvm ") && f.contains(": ")), "{check:?}");
    }

    #[test]
    fn host_git_is_told_to_refuse_implicit_bare_repositories() {
        let check = bare_repositories("git version 2.47.3\n", None);
        assert_eq!(check.status, Status::Warn);
        assert_eq!(check.fix.as_deref(), Some("git config --global safe.bareRepository explicit"));
        assert!(check.detail.contains("all (git's default)"), "{check:?}");
        assert_eq!(bare_repositories("git version 2.47.3", Some("explicit")).status, Status::Ok);
        assert_eq!(bare_repositories("git version 2.38.0", Some("Explicit")).status, Status::Ok);
        let old = bare_repositories("git version 2.30.2", Some("explicit"));
        assert!(old.status == Status::Warn && old.fix.as_deref().is_some_and(|f| f.contains("2.38")), "{old:?}");
        assert_eq!(bare_repositories("git version 2.39.5 (Apple Git-154)", Some("all")).status, Status::Warn);
    }
}
