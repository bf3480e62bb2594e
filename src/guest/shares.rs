//! What a session shares with its guest, planned as plain data: which host directories get an
//! fs backend and under which rules, where the agent mounts them, and who runs the command.
//!
//! - The project, read-write, at its host absolute path (so `getcwd()` in the guest is the
//!   host path, and Claude Code's per-path keys match the host's).
//! - A selected view of `~/.claude` (only what configures Claude), read-only on the host side,
//!   as the lower layer of an in-guest overlay; its `.credentials.json` is the one file the
//!   guest may rewrite, bind-mounted over the overlay so an OAuth token refresh reaches the
//!   host (Claude Code rewrites the file in place when it is a mount point).
//! - The project's conversation folder `~/.claude/projects/<encoded path>`, read-write.
//! - The main repository's `.git` when the project is a git worktree. In it, as in every git
//!   directory of every share, git's control files are read-only on the host side, and so
//!   are the files outside them that host programs take code from ([`crate::guest::host_code`]).
//! - `--mount` directories, read-write or read-only.
//! - The meta dir, read-only at [`META_GUEST_DIR`]: who and where the host user is.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cvm_agent::protocol::{Exec, Setup, Step, User};
use cvm_backends::fs::{Policy, Quota, ShareConfig};

/// What `~/.claude` shows the guest by default: what configures Claude, never other projects'
/// conversations, sessions, todos, history or memory.
pub const CLAUDE_DEFAULT_ITEMS: &[&str] =
    &[".credentials.json", "CLAUDE.md", "settings.json", "file-suggestion.sh", "statusline.sh", "skills", "commands", "agents", "plugins"];
/// The one file in `~/.claude` whose rewrites reach the host (OAuth token refresh).
const CREDENTIALS: &str = ".credentials.json";
/// Where the agent mounts shares that are not mounted at a host path.
const GUEST_SHARE_DIR: &str = "/run/cvm/fs";
/// Where the guest finds the meta dir.
pub const META_GUEST_DIR: &str = "/run/cvm/meta";
/// The guest user when the host user is root: Claude Code refuses to skip permissions as root.
const UNPRIVILEGED_UID: u32 = 1000;

/// A `--mount /host[:/guest][:ro|rw]` as given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    pub host: PathBuf,
    pub guest: PathBuf,
    pub read_only: bool,
}

/// Expands a leading `~` to `home`.
pub(crate) fn expand_home(text: &str, home: &Path) -> PathBuf {
    match text.strip_prefix('~') {
        Some("") => home.to_path_buf(),
        Some(rest) if rest.starts_with('/') => home.join(&rest[1..]),
        _ => PathBuf::from(text),
    }
}

/// Whether `path` is absolute and has no `.` or `..` in it (checked on the bytes:
/// `Path::components` drops inner `.`s).
fn is_plain_absolute(path: &Path) -> bool {
    path.is_absolute() && path.as_os_str().as_bytes().split(|&b| b == b'/').all(|part| part != b"." && part != b"..")
}

/// Parses `--mount /host[:/guest][:ro|rw]` (docker's form; `~` is the host home). The guest
/// path defaults to the host path.
pub fn parse_mount_spec(text: &str, home: &Path) -> std::result::Result<MountSpec, String> {
    let mut parts: Vec<&str> = text.split(':').collect();
    let mut read_only = false;
    if parts.len() > 1 {
        match *parts.last().expect("non-empty") {
            "ro" => {
                read_only = true;
                parts.pop();
            }
            "rw" => {
                parts.pop();
            }
            _ => {}
        }
    }
    let (host, guest) = match parts.as_slice() {
        [host] => (*host, *host),
        [host, guest] => (*host, *guest),
        _ => return Err(format!("bad mount {text:?}: expected /host[:/guest][:ro|rw]")),
    };
    MountSpec::new(expand_home(host, home), expand_home(guest, home), read_only).map_err(|e| format!("bad mount {text:?}: {e}"))
}

impl MountSpec {
    /// A mount of `host` at `guest`: both plain absolute paths (no `.` or `..`), the guest's
    /// not its `/`.
    pub fn new(host: PathBuf, guest: PathBuf, read_only: bool) -> std::result::Result<MountSpec, String> {
        for (what, path) in [("host", &host), ("guest", &guest)] {
            if !is_plain_absolute(path) {
                return Err(format!("the {what} path must be absolute, without . or .."));
            }
        }
        if guest == Path::new("/") {
            return Err("cannot mount over the guest's /".into());
        }
        Ok(MountSpec { host, guest, read_only })
    }
}

/// The host user cvm runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl HostUser {
    pub fn current() -> Result<HostUser> {
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        let home = std::env::var_os("HOME").map(PathBuf::from).context("HOME is not set")?;
        let name = std::env::var("USER").ok().filter(|n| !n.is_empty()).unwrap_or_else(|| {
            if uid == 0 {
                "root".into()
            } else {
                format!("user{uid}")
            }
        });
        Ok(HostUser { name, uid, gid, home })
    }

    /// The guest user: the host user's name and ids, except that root becomes an
    /// unprivileged user (whose files the fs backends still write as root).
    pub fn guest(&self) -> User {
        let home = self.home.as_os_str().as_bytes().to_vec();
        if self.uid == 0 {
            return User { name: "cvm".into(), uid: UNPRIVILEGED_UID, gid: UNPRIVILEGED_UID, home };
        }
        User { name: self.name.clone(), uid: self.uid, gid: self.gid, home }
    }
}

/// What the user asked to share.
#[derive(Clone, Debug, Default)]
pub struct ShareRequest {
    /// The project directory (`cvm run PATH`).
    pub project: Option<PathBuf>,
    pub mounts: Vec<MountSpec>,
    /// Share the project's conversation folder (`--no-conversations` turns it off).
    pub conversations: bool,
    /// What `~/.claude` shows the guest.
    pub claude_items: Vec<String>,
    /// The file servers may run without a sandbox where the host has none
    /// (`--allow-unsandboxed-fs`).
    pub allow_unsandboxed_fs: bool,
    /// Shares whose servers the caller runs (`cvm bench fs --in-vm`'s virtiofsd).
    pub external: Vec<ExternalShare>,
    /// The most the guest may add to the writable shares on one file system, together; none:
    /// what [`share_quota`] finds free.
    pub quota: Option<u64>,
}

/// Of a file system's free space and files, what is kept from a guest: a tenth of its size,
/// and at least this much.
const MIN_RESERVE: u64 = 1 << 30;

/// What the guest may add to the share `dir` by default: what its file system has free, less
/// a tenth of its size (at least [`MIN_RESERVE`]), in bytes and likewise in files; `bytes`
/// instead when given.
pub fn share_quota(dir: &Path, bytes: Option<u64>) -> Result<Quota> {
    let stat = rustix::fs::statvfs(dir).with_context(|| format!("cannot read the free space of {}", dir.display()))?;
    let block = stat.f_frsize.max(1);
    let (total, free) = (stat.f_blocks.saturating_mul(block), stat.f_bavail.saturating_mul(block));
    let auto_bytes = free.saturating_sub((total / 10).max(MIN_RESERVE));
    // A file system that counts no inodes (btrfs) has no limit on them to protect.
    let inodes = if stat.f_files == 0 { u64::MAX } else { stat.f_favail.saturating_sub(stat.f_files / 10) };
    Ok(Quota { bytes: bytes.unwrap_or(auto_bytes), inodes })
}

/// Divides each file system's quota among the session's writable shares on it, so that
/// together they add no more than one share may: the session's budget, not each share's.
fn split_quotas(shares: &mut [PlannedShare]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut devices = Vec::new();
    for share in shares.iter() {
        let device = match share.backend.policy.quota {
            Some(_) => {
                Some(std::fs::metadata(&share.backend.dir).with_context(|| format!("cannot share {}", share.backend.dir.display()))?.dev())
            }
            None => None,
        };
        devices.push(device);
    }
    for (share, device) in shares.iter_mut().zip(&devices) {
        let (Some(quota), Some(device)) = (&mut share.backend.policy.quota, device) else { continue };
        let sharing = devices.iter().filter(|d| d.as_ref() == Some(device)).count() as u64;
        quota.bytes /= sharing;
        if quota.inodes != u64::MAX {
            quota.inodes /= sharing;
        }
    }
    Ok(())
}

/// A share served by a vhost-user fs server that is not cvm's: the session connects the VM to
/// its socket and has the agent mount it, and the caller keeps the server running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalShare {
    /// Where the server listens.
    pub socket: PathBuf,
    pub tag: String,
    pub guest_path: PathBuf,
}

impl ShareRequest {
    /// Nothing to share: the session runs as root in `/` with no fs backend.
    pub fn is_empty(&self) -> bool {
        self.project.is_none() && self.mounts.is_empty() && self.external.is_empty()
    }
}

/// One share: its backend and where the guest sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedShare {
    pub backend: ShareConfig,
    pub guest_path: PathBuf,
}

/// Everything a session needs to share, as plain data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharePlan {
    pub shares: Vec<PlannedShare>,
    /// Shares another server serves, as requested.
    pub external: Vec<ExternalShare>,
    /// What the agent does before the first exec.
    pub setup: Setup,
    /// Where commands start (the project's host path).
    pub workdir: Option<PathBuf>,
    /// The meta dir's files (name, contents), written by the session into its own directory.
    pub meta: Vec<(&'static str, String)>,
    /// What the user should know about the plan (a share left out, and why).
    pub warnings: Vec<String>,
}

/// Claude Code's folder name for a project: every character other than a letter or a digit
/// becomes `-`.
pub fn encode_project_path(path: &Path) -> String {
    path.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect()
}

/// Another existing directory whose conversation folder is `project`'s: Claude Code's encoding
/// makes `/a/b.c`, `/a/b-c` and `/a/b/c` one folder. Searched from `/` through the directories
/// (not symbolic links) whose encoded path begins the project's, reading at most a few
/// thousand entries.
fn colliding_project(project: &Path) -> Option<PathBuf> {
    let target = encode_project_path(project);
    let mut budget = 20_000usize;
    let mut pending = vec![(PathBuf::from("/"), String::new())];
    while let Some((dir, encoded)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            budget = budget.checked_sub(1)?;
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            let name = encode_project_path(Path::new(&entry.file_name()));
            let child = format!("{encoded}-{name}");
            if child == target && path != project {
                return Some(path);
            }
            if target.starts_with(&child) && target.as_bytes().get(child.len()) == Some(&b'-') {
                pending.push((path, child));
            }
        }
    }
    None
}

/// The most of `~/.claude.json` a guest gets: Claude Code's settings and account state, with
/// the per-project entries of every other project left out. None when there is no readable
/// JSON object, or when even that is too large to send.
fn claude_state(path: &Path, project: &Path) -> Option<String> {
    const MAX: usize = 256 << 10;
    let text = std::fs::read_to_string(path).ok()?;
    let mut state: serde_json::Value = serde_json::from_str(&text).ok()?;
    let object = state.as_object_mut()?;
    if let Some(serde_json::Value::Object(projects)) = object.get_mut("projects") {
        let keep = project.to_string_lossy();
        projects.retain(|key, _| *key == keep);
    }
    let out = state.to_string();
    (out.len() <= MAX).then_some(out)
}

/// The main repository's `.git` when `project` is a git worktree (its `.git` is a file that
/// points into `<main>/.git/worktrees/<name>`). The guest may have written the pointer, so it
/// is verified, as git would: the admin dir it names must point back at this worktree and be
/// one of its common dir's `worktrees/`, and the common dir must be a repository.
fn worktree_common_dir(project: &Path) -> Option<PathBuf> {
    const MAX_POINTER: u64 = 4096;
    let read = |path: &Path, root: Option<&Path>| crate::host::host_files::read_text(path, root, MAX_POINTER).ok();
    let resolve = |base: &Path, text: &str| {
        let path = PathBuf::from(text.trim());
        if path.is_absolute() { path } else { base.join(path) }.canonicalize().ok()
    };
    let pointer = read(&project.join(".git"), Some(project))?;
    let gitdir = resolve(project, pointer.strip_prefix("gitdir:")?)?;
    let back = resolve(&gitdir, &read(&gitdir.join("gitdir"), None)?)?;
    let common = resolve(&gitdir, &read(&gitdir.join("commondir"), None)?)?;
    let verified = back == project.join(".git")
        && gitdir.parent() == Some(&common.join("worktrees"))
        && common.join("HEAD").is_file()
        && common.join("objects").is_dir();
    verified.then_some(common)
}

/// The main repository of a git worktree (the directory holding the `.git` it points into).
pub fn main_repository(project: &Path) -> Option<PathBuf> {
    worktree_common_dir(project).and_then(|git| git.parent().map(Path::to_path_buf))
}

/// For tests: the layout `git worktree add` makes, by hand: `<dir>/main` with its `.git`, and
/// the worktree `<dir>/wt`. Returns (main, worktree).
#[cfg(test)]
pub(crate) fn fake_worktree(dir: &Path) -> (PathBuf, PathBuf) {
    let (main, wt) = (dir.join("main"), dir.join("wt"));
    std::fs::create_dir_all(main.join(".git/worktrees/wt")).unwrap();
    std::fs::create_dir_all(main.join(".git/objects")).unwrap();
    std::fs::write(main.join(".git/HEAD"), "ref: refs/heads/main\n").unwrap();
    std::fs::write(main.join(".git/worktrees/wt/commondir"), "../..\n").unwrap();
    std::fs::write(main.join(".git/worktrees/wt/gitdir"), format!("{}\n", wt.join(".git").display())).unwrap();
    std::fs::create_dir_all(&wt).unwrap();
    std::fs::write(wt.join(".git"), format!("gitdir: {}\n", main.join(".git/worktrees/wt").display())).unwrap();
    (main, wt)
}

fn bytes(path: &Path) -> Vec<u8> {
    path.as_os_str().as_bytes().to_vec()
}

impl SharePlan {
    /// Plans `request` for `host`; `meta_dir` is the host directory the session will write
    /// the meta files into. Every host path is checked here, so bad input fails before a VM
    /// starts.
    pub fn new(request: &ShareRequest, host: &HostUser, meta_dir: &Path) -> Result<SharePlan> {
        let user = host.guest();
        let mut plan = SharePlan::default();
        let project =
            request.project.as_ref().map(|p| p.canonicalize().with_context(|| format!("cannot share {}", p.display()))).transpose()?;
        let host_code = crate::guest::host_code::host_code_paths(project.as_deref(), &host.home);
        let mut add =
            |plan: &mut SharePlan, tag: String, dir: PathBuf, mut policy: Policy, guest_path: PathBuf, read_only: bool| -> Result<()> {
                policy.protected_paths = crate::guest::host_code::within(&host_code, &dir);
                if !policy.read_only {
                    policy.quota = Some(share_quota(&dir, request.quota)?);
                }
                let backend = ShareConfig {
                    dir,
                    tag: tag.clone(),
                    policy,
                    guest_uid: user.uid,
                    guest_gid: user.gid,
                    allow_no_sandbox: request.allow_unsandboxed_fs,
                };
                plan.setup.steps.push(Step::Share { tag, target: bytes(&guest_path), read_only });
                plan.shares.push(PlannedShare { backend, guest_path });
                Ok(())
            };

        if let Some(project) = project {
            if !project.is_dir() {
                bail!("cannot share {}: not a directory", project.display());
            }
            add(&mut plan, "project".into(), project.clone(), Policy::default(), project.clone(), false)?;
            if let Some(git) = worktree_common_dir(&project).filter(|g| !g.starts_with(&project)) {
                let policy = Policy { git_dir: true, ..Policy::default() };
                add(&mut plan, "git".into(), git.clone(), policy, git, false)?;
            }
            plan.plan_claude(request, host, &user, &project, &mut add)?;
            if let Some(state) = claude_state(&host.home.join(".claude.json"), &project) {
                plan.setup
                    .steps
                    .push(Step::File { target: [user.home.as_slice(), b"/.claude.json"].concat(), contents: state.into_bytes() });
            }
            plan.workdir = Some(project);
        }

        for (index, spec) in request.mounts.iter().enumerate() {
            let host_dir = spec.host.canonicalize().with_context(|| format!("cannot mount {}", spec.host.display()))?;
            if !host_dir.is_dir() {
                bail!("cannot mount {}: not a directory", spec.host.display());
            }
            if plan.shares.iter().any(|s| s.guest_path == spec.guest) {
                bail!("{} is mounted twice in the guest", spec.guest.display());
            }
            let policy = Policy { read_only: spec.read_only, ..Policy::default() };
            add(&mut plan, format!("mount{index}"), host_dir, policy, spec.guest.clone(), spec.read_only)?;
        }
        for share in &request.external {
            if plan.shares.iter().any(|s| s.guest_path == share.guest_path) {
                bail!("{} is mounted twice in the guest", share.guest_path.display());
            }
            plan.setup.steps.push(Step::Share { tag: share.tag.clone(), target: bytes(&share.guest_path), read_only: false });
            plan.external.push(share.clone());
        }

        if !plan.shares.is_empty() {
            plan.meta = vec![
                ("user", user.name.clone()),
                ("uid", user.uid.to_string()),
                ("gid", user.gid.to_string()),
                ("home", host.home.display().to_string()),
                ("project", plan.workdir.as_ref().map(|p| p.display().to_string()).unwrap_or_default()),
                (
                    "mounts",
                    plan.shares
                        .iter()
                        .map(|s| {
                            format!(
                                "{} {} {}\n",
                                s.backend.dir.display(),
                                s.guest_path.display(),
                                if s.backend.policy.read_only { "ro" } else { "rw" }
                            )
                        })
                        .collect(),
                ),
            ];
            let policy = Policy { read_only: true, ..Policy::default() };
            add(&mut plan, "meta".into(), meta_dir.to_path_buf(), policy, PathBuf::from(META_GUEST_DIR), true)?;
            plan.setup.user = Some(user);
        }
        split_quotas(&mut plan.shares)?;
        Ok(plan)
    }

    /// The `~/.claude` view and the project's conversation folder.
    fn plan_claude(
        &mut self,
        request: &ShareRequest,
        host: &HostUser,
        user: &User,
        project: &Path,
        add: &mut impl FnMut(&mut SharePlan, String, PathBuf, Policy, PathBuf, bool) -> Result<()>,
    ) -> Result<()> {
        let claude = host.home.join(".claude");
        if !claude.is_dir() {
            return Ok(());
        }
        let guest_claude = Path::new(OsStr::from_bytes(&user.home)).join(".claude");
        let lower = Path::new(GUEST_SHARE_DIR).join("claude");
        let writable_file = request.claude_items.iter().any(|i| i == CREDENTIALS).then(|| CREDENTIALS.to_string());
        let policy = Policy {
            read_only: true,
            visible: Some(request.claude_items.clone()),
            writable_file: writable_file.clone(),
            ..Policy::default()
        };
        // Mounted read-write in the guest so the credentials bind can write: the backend's
        // policy is what makes the rest read-only.
        add(self, "claude".into(), claude.clone(), policy, lower.clone(), false)?;
        self.setup.steps.push(Step::Overlay { lower: bytes(&lower), target: bytes(&guest_claude) });
        if writable_file.is_some() && claude.join(CREDENTIALS).is_file() {
            self.setup.steps.push(Step::Bind { source: bytes(&lower.join(CREDENTIALS)), target: bytes(&guest_claude.join(CREDENTIALS)) });
        }
        if let Some(other) = request.conversations.then(|| colliding_project(project)).flatten() {
            // Its conversations are another project's too: sharing them would show them here.
            self.warnings.push(format!(
                "not sharing the conversation folder ~/.claude/projects/{}: {} maps to it too (Claude Code names it by the path, with every character other than a letter or digit as '-'); this session's conversations stay in the VM",
                encode_project_path(project),
                other.display()
            ));
        } else if request.conversations {
            let folder = Path::new("projects").join(encode_project_path(project));
            let host_folder = claude.join(&folder);
            std::fs::create_dir_all(&host_folder).with_context(|| format!("cannot create {}", host_folder.display()))?;
            add(self, "conversations".into(), host_folder, Policy::default(), guest_claude.join(folder), false)?;
        }
        Ok(())
    }

    /// Writes the meta files into `dir` (the session's own directory).
    pub fn write_meta(&self, dir: &Path) -> Result<()> {
        if self.meta.is_empty() {
            return Ok(());
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for (name, contents) in &self.meta {
            std::fs::write(dir.join(name), contents).with_context(|| format!("cannot write {}", dir.join(name).display()))?;
        }
        Ok(())
    }

    /// Gives `exec` the identity and place commands run with: the guest user in the project
    /// (its home without one), or, when nothing is shared, root in `/` as it stands.
    pub fn prepare(&self, exec: &mut Exec) {
        let Some(user) = &self.setup.user else { return };
        exec.uid = Some(user.uid);
        exec.gid = Some(user.gid);
        exec.cwd = Some(self.workdir.as_deref().map(bytes).unwrap_or_else(|| user.home.clone()));
        let identity = [
            (b"HOME".to_vec(), user.home.clone()),
            (b"USER".to_vec(), user.name.as_bytes().to_vec()),
            (b"LOGNAME".to_vec(), user.name.as_bytes().to_vec()),
        ];
        exec.env.splice(0..0, identity);
    }
}

#[cfg(test)]
mod tests;
