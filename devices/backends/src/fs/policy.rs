//! What a guest may see and change in one share, enforced in the server, on the host side.
//!
//! [`PolicyFs`] wraps virtiofsd's passthrough file system. Rules apply to the names directly
//! under the share's root (the only place cvm needs them): a name can be hidden (not found,
//! not listed), or, in a read-only share, the one writable file. Everywhere, git's control
//! files are protected ([`git_guard`](super::git_guard)): they and everything below them are
//! read-only, and their names cannot be removed, replaced or created. So are the paths the
//! policy names (files host programs read code or configuration from: a `core.hooksPath`,
//! files git's config includes, cvm's own files), and every name on the way to them. Inodes are tracked by
//! FUSE node id, which virtiofsd never reuses, so an inode reached through a protected name
//! stays protected however the guest addresses it later.
//!
//! Every method of the trait that is not listed here keeps the trait's default (ENOSYS), so
//! an operation this wrapper does not know about is refused rather than passed through.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::Duration;

use virtiofsd::filesystem::{
    Context, DirEntry, DirectoryIterator, Entry, Extensions, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions,
    SerializableFileSystem, SetattrValid, SetxattrFlags, ZeroCopyReader, ZeroCopyWriter,
};
use virtiofsd::fuse;

use super::git_guard::{self, EntryChange, GitRole};

/// The root directory's FUSE node id.
const ROOT: u64 = fuse::ROOT_ID;

/// A share's rules, as plain data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Nothing in the share can be changed (except `writable_file`).
    pub read_only: bool,
    /// When set, only these names under the root exist for the guest.
    pub visible: Option<Vec<String>>,
    /// The share's root is a git directory (a worktree's main `.git`), whose control files
    /// are protected like those of any `.git` found in a share.
    pub git_dir: bool,
    /// In a read-only share: one existing file under the root whose contents the guest may
    /// rewrite (not create, remove, rename or link).
    pub writable_file: Option<String>,
    /// Paths relative to the root that the guest can neither change nor create, with
    /// everything below them and every name on the way to them. A component ending in `*`
    /// stands for every name that begins with what comes before the `*`.
    pub protected_paths: Vec<PathBuf>,
    /// How much the guest may add to the share, if it is limited.
    pub quota: Option<Quota>,
}

/// What the guest may add to a share over a session: bytes of file size (sparse or not) and
/// new inodes, net of what it removes. Past either the guest gets EDQUOT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub bytes: u64,
    pub inodes: u64,
}

/// What the guest has added so far, against its [`Quota`].
#[derive(Debug, Default)]
struct Usage {
    bytes: i128,
    inodes: i128,
    /// The first refusal is logged; the rest are not.
    refused: bool,
}

/// The rest of a protected path, one component a name.
type PathRule = Vec<Vec<u8>>;

/// Whether `name` is what a protected path's `component` stands for.
fn component_matches(component: &[u8], name: &[u8]) -> bool {
    match component.strip_suffix(b"*") {
        Some(prefix) => name.starts_with(prefix),
        None => component == name,
    }
}

/// A name the guest gives must be one path component: never empty, `.`, `..`, or with a `/`.
/// The sandbox would contain such names too, but the server must not depend on one (the
/// last-resort mode has none).
fn check_name(name: &CStr) -> io::Result<()> {
    match name.to_bytes() {
        b"" | b"." | b".." => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        bytes if bytes.contains(&b'/') => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        _ => Ok(()),
    }
}

fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

fn enoent() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOENT)
}

fn over_quota() -> io::Error {
    io::Error::from_raw_os_error(libc::EDQUOT)
}

/// The guest may not make a repository for host git to find outside a `.git`.
fn not_a_repository() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

pub struct PolicyFs<F> {
    inner: F,
    policy: Policy,
    /// Node ids that must not change (reached through a protected name).
    protected: RwLock<HashSet<u64>>,
    /// Node ids of `writable_file`.
    writable: RwLock<HashSet<u64>>,
    /// What the directories met so far are to git.
    git_roles: RwLock<HashMap<u64, GitRole>>,
    /// Held while a name that could complete a repository is checked and made, so that two
    /// requests cannot each make half of one.
    repository_names: Mutex<()>,
    /// The protected paths still to be walked, by the directory they continue from.
    path_rules: RwLock<HashMap<u64, Vec<PathRule>>>,
    usage: Mutex<Usage>,
    /// What the share is called in messages (its host path).
    label: String,
}

impl<F: FileSystem> PolicyFs<F> {
    pub fn new(inner: F, policy: Policy, label: String) -> Self {
        let git_roles = if policy.git_dir { HashMap::from([(ROOT, GitRole::GitDir)]) } else { HashMap::new() };
        let rules: Vec<PathRule> = policy
            .protected_paths
            .iter()
            .map(|p| {
                p.components()
                    .filter_map(|c| match c {
                        std::path::Component::Normal(name) => Some(name.as_bytes().to_vec()),
                        _ => None,
                    })
                    .collect()
            })
            .filter(|rule: &PathRule| !rule.is_empty())
            .collect();
        let path_rules = if rules.is_empty() { HashMap::new() } else { HashMap::from([(ROOT, rules)]) };
        Self {
            inner,
            policy,
            protected: RwLock::default(),
            writable: RwLock::default(),
            git_roles: RwLock::new(git_roles),
            repository_names: Mutex::new(()),
            path_rules: RwLock::new(path_rules),
            usage: Mutex::default(),
            label,
        }
    }

    /// Counts `bytes` and `inodes` (either may be negative: freed) against the quota; refuses
    /// an addition that would pass it.
    fn charge(&self, bytes: i128, inodes: i128) -> io::Result<()> {
        let Some(quota) = self.policy.quota else { return Ok(()) };
        let mut usage = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        let (new_bytes, new_inodes) = (usage.bytes + bytes, usage.inodes + inodes);
        if (bytes > 0 && new_bytes > i128::from(quota.bytes)) || (inodes > 0 && new_inodes > i128::from(quota.inodes)) {
            if !usage.refused {
                usage.refused = true;
                // Whatever the log level: the user should know why the guest's writes fail.
                super::notice(&format!(
                    "the guest reached its quota on the share {} (it may add {} MiB and {} files): it gets EDQUOT (\"Disk quota exceeded\"); --share-quota sets it",
                    self.label,
                    quota.bytes >> 20,
                    quota.inodes
                ));
            }
            return Err(over_quota());
        }
        (usage.bytes, usage.inodes) = (new_bytes, new_inodes);
        Ok(())
    }

    /// The size of `inode` now (asked of the inner file system), where a quota needs it.
    fn size_of(&self, ctx: Context, inode: u64) -> io::Result<u64> {
        Ok(self.inner.getattr(ctx, inode.into(), None)?.0.size)
    }

    /// Charges the growth of `inode` to `end` bytes, if it grows; returns what was charged.
    fn charge_growth(&self, ctx: Context, inode: u64, end: u64) -> io::Result<i128> {
        if self.policy.quota.is_none() {
            return Ok(0);
        }
        let growth = i128::from(end) - i128::from(self.size_of(ctx, inode)?);
        let charged = growth.max(0);
        self.charge(charged, 0)?;
        Ok(charged)
    }

    /// What removing `name` in `dir` frees, when it is the last link: (bytes, inodes).
    fn freed_by_removing(&self, ctx: Context, dir: u64, name: &CStr) -> (i128, i128) {
        if self.policy.quota.is_none() {
            return (0, 0);
        }
        match self.inner.lookup(ctx, dir.into(), name) {
            Ok(entry) => {
                self.inner.forget(ctx, entry.inode.into(), 1);
                let is_dir = entry.attr.mode & libc::S_IFMT == libc::S_IFDIR;
                if is_dir || entry.attr.nlink <= 1 {
                    (i128::from(entry.attr.size), 1)
                } else {
                    (0, 0)
                }
            }
            Err(_) => (0, 0),
        }
    }

    fn git_role(&self, inode: u64) -> Option<GitRole> {
        self.git_roles.read().unwrap_or_else(|e| e.into_inner()).get(&inode).copied()
    }

    /// What `dir` is to git where `name` in it matters: its role in git's layout, or, for a
    /// directory that is no git directory but holds a repository's names (an implicit bare
    /// repository the host already had), a git directory from now on.
    fn git_role_for(&self, ctx: Context, dir: u64, name: &CStr) -> Option<GitRole> {
        let role = self.git_role(dir);
        if role.is_some_and(GitRole::is_git_dir) || !git_guard::marks_repository(name.to_bytes()) {
            return role;
        }
        let (head, objects) = git_guard::repository_names();
        let is_repository = self.has_entry(ctx, dir, head) && objects.iter().any(|o| self.has_entry(ctx, dir, o));
        if !is_repository {
            return role;
        }
        self.git_roles.write().unwrap_or_else(|e| e.into_inner()).insert(dir, GitRole::GitDir);
        Some(GitRole::GitDir)
    }

    /// Whether `dir` has an entry `name` (asked of the inner file system, whose lookup count
    /// is left as it was).
    fn has_entry(&self, ctx: Context, dir: u64, name: &str) -> bool {
        let Ok(name) = CString::new(name) else { return false };
        match self.inner.lookup(ctx, dir.into(), &name) {
            Ok(entry) => {
                self.inner.forget(ctx, entry.inode.into(), 1);
                true
            }
            Err(_) => false,
        }
    }

    /// Held across a change that makes any of `names`, when one could complete a repository.
    fn hold_repository_names(&self, names: &[&CStr]) -> Option<MutexGuard<'_, ()>> {
        names
            .iter()
            .any(|n| !git_guard::repository_complements(n.to_bytes()).is_empty())
            .then(|| self.repository_names.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The protected paths that go through `name` in `dir`: whether one ends there, and the
    /// rests of those that go on below it.
    fn rules_through(&self, dir: u64, name: &[u8]) -> (bool, Vec<PathRule>) {
        let rules = self.path_rules.read().unwrap_or_else(|e| e.into_inner());
        let mut ends = false;
        let mut rests = Vec::new();
        for rule in rules.get(&dir).into_iter().flatten() {
            if component_matches(&rule[0], name) {
                if rule.len() == 1 {
                    ends = true;
                } else {
                    rests.push(rule[1..].to_vec());
                }
            }
        }
        (ends, rests)
    }

    /// Whether `name` in `dir` is a directory (asked of the inner file system, whose lookup
    /// count is left as it was).
    fn is_dir(&self, ctx: Context, dir: u64, name: &CStr) -> io::Result<bool> {
        let entry = self.inner.lookup(ctx, dir.into(), name)?;
        self.inner.forget(ctx, entry.inode.into(), 1);
        Ok(entry.attr.mode & libc::S_IFMT == libc::S_IFDIR)
    }

    fn is_visible(&self, parent: u64, name: &CStr) -> bool {
        if parent != ROOT {
            return true;
        }
        let bytes = name.to_bytes();
        match &self.policy.visible {
            None => true,
            Some(names) => bytes == b"." || bytes == b".." || names.iter().any(|n| n.as_bytes() == bytes),
        }
    }

    fn is_protected(&self, inode: u64) -> bool {
        self.protected.read().unwrap_or_else(|e| e.into_inner()).contains(&inode)
    }

    /// Whether the contents and attributes of `inode` may change.
    fn can_modify(&self, inode: u64) -> bool {
        if self.policy.read_only {
            return self.writable.read().unwrap_or_else(|e| e.into_inner()).contains(&inode);
        }
        !self.is_protected(inode)
    }

    /// Whether the entry `name` in `parent` may be changed as `change` says. A change that
    /// makes a name that could complete a repository runs under [`Self::hold_repository_names`].
    fn can_change_entry(&self, ctx: Context, parent: u64, name: &CStr, change: EntryChange) -> io::Result<()> {
        check_name(name)?;
        let role = self.git_role_for(ctx, parent, name);
        let (ends, rests) = self.rules_through(parent, name.to_bytes());
        if self.policy.read_only
            || self.is_protected(parent)
            || ends
            || !rests.is_empty()
            || !git_guard::allows(role, name.to_bytes(), change)
        {
            return Err(erofs());
        }
        if !self.is_visible(parent, name) {
            return Err(enoent());
        }
        if !role.is_some_and(GitRole::is_git_dir)
            && change.creates()
            && git_guard::repository_complements(name.to_bytes()).iter().any(|c| self.has_entry(ctx, parent, c))
        {
            return Err(not_a_repository());
        }
        Ok(())
    }

    /// Records what a lookup (or a creation) found, so the rules follow the inode.
    fn note(&self, ctx: Context, parent: u64, name: &CStr, entry: &Entry) {
        let role = self.git_role_for(ctx, parent, name);
        let is_dir = entry.attr.mode & libc::S_IFMT == libc::S_IFDIR;
        let (ends, rests) = self.rules_through(parent, name.to_bytes());
        if ends || self.is_protected(parent) || git_guard::is_protected_entry(role, name.to_bytes(), is_dir) {
            self.protected.write().unwrap_or_else(|e| e.into_inner()).insert(entry.inode);
        }
        if is_dir && !rests.is_empty() {
            let mut rules = self.path_rules.write().unwrap_or_else(|e| e.into_inner());
            let known = rules.entry(entry.inode).or_default();
            for rest in rests {
                if !known.contains(&rest) {
                    known.push(rest);
                }
            }
        }
        if let Some(child) = git_guard::child_role(role, name.to_bytes()).filter(|_| is_dir) {
            self.git_roles.write().unwrap_or_else(|e| e.into_inner()).insert(entry.inode, child);
        }
        if parent == ROOT && self.policy.writable_file.as_deref().is_some_and(|f| f.as_bytes() == name.to_bytes()) {
            self.writable.write().unwrap_or_else(|e| e.into_inner()).insert(entry.inode);
        }
    }

    /// `result`, with what was charged for it given back when it failed.
    fn refund_on_error<T>(&self, result: io::Result<T>, bytes: i128, inodes: i128) -> io::Result<T> {
        if result.is_err() && (bytes != 0 || inodes != 0) {
            let _ = self.charge(-bytes, -inodes);
        }
        result
    }

    fn check_modify(&self, inode: u64) -> io::Result<()> {
        if self.can_modify(inode) {
            Ok(())
        } else {
            Err(erofs())
        }
    }

    /// Mode, owner, times and extended attributes: in a read-only view nothing's may change,
    /// the writable file's included (only its contents and size may).
    fn check_attributes(&self, inode: u64) -> io::Result<()> {
        if self.policy.read_only || self.is_protected(inode) {
            Err(erofs())
        } else {
            Ok(())
        }
    }
}

/// `mode` without the set-user-ID and set-group-ID bits: the guest never makes a program that
/// runs as another host user (root, when cvm runs as root).
fn without_set_id(mode: u32) -> u32 {
    mode & !(libc::S_ISUID | libc::S_ISGID)
}

/// Whether `open` flags ask for anything beyond reading.
fn open_writes(flags: u32) -> bool {
    let flags = flags as i32;
    if flags & libc::O_PATH != 0 {
        return false;
    }
    flags & libc::O_ACCMODE != libc::O_RDONLY
        || flags & (libc::O_TRUNC | libc::O_CREAT | libc::O_APPEND) != 0
        || flags & libc::O_TMPFILE == libc::O_TMPFILE
}

/// A directory listing: passed through, or (for the root of a share that hides names) read
/// whole and filtered.
pub enum PolicyDirIter<I> {
    Pass(I),
    Filtered { entries: VecDeque<(u64, u64, u32, CString)>, current: Option<(u64, u64, u32, CString)> },
}

impl<I: DirectoryIterator> DirectoryIterator for PolicyDirIter<I> {
    fn next(&mut self) -> Option<DirEntry<'_>> {
        match self {
            PolicyDirIter::Pass(inner) => inner.next(),
            PolicyDirIter::Filtered { entries, current } => {
                *current = entries.pop_front();
                current.as_ref().map(|(ino, offset, type_, name)| DirEntry {
                    ino: *ino,
                    offset: *offset,
                    type_: *type_,
                    name: name.as_c_str(),
                })
            }
        }
    }
}

impl<F: FileSystem> FileSystem for PolicyFs<F> {
    type Inode = F::Inode;
    type Handle = F::Handle;
    type DirIter = PolicyDirIter<F::DirIter>;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.inner.init(capable)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: Context, parent: Self::Inode, name: &CStr) -> io::Result<Entry> {
        let parent: u64 = parent.into();
        check_name(name)?;
        if !self.is_visible(parent, name) {
            return Err(enoent());
        }
        let entry = self.inner.lookup(ctx, parent.into(), name)?;
        self.note(ctx, parent, name, &entry);
        Ok(entry)
    }

    fn forget(&self, ctx: Context, inode: Self::Inode, count: u64) {
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: Context, requests: Vec<(Self::Inode, u64)>) {
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(&self, ctx: Context, inode: Self::Inode, handle: Option<Self::Handle>) -> io::Result<(fuse::Attr, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: Context,
        inode: Self::Inode,
        attr: fuse::SetattrIn,
        handle: Option<Self::Handle>,
        valid: SetattrValid,
    ) -> io::Result<(fuse::Attr, Duration)> {
        let inode: u64 = inode.into();
        // A truncation, with the times it updates, changes contents; anything else attributes.
        let truncation =
            SetattrValid::SIZE | SetattrValid::MTIME | SetattrValid::MTIME_NOW | SetattrValid::CTIME | SetattrValid::KILL_SUIDGID;
        if valid.contains(SetattrValid::SIZE) && truncation.contains(valid) {
            self.check_modify(inode)?;
        } else {
            self.check_attributes(inode)?;
        }
        // Files in a share stay the host user's: an owner the guest gives (its root's chown)
        // would be another host user's file.
        if valid.intersects(SetattrValid::UID | SetattrValid::GID) {
            let (now, _) = self.inner.getattr(ctx, inode.into(), None)?;
            if (valid.contains(SetattrValid::UID) && attr.uid != now.uid) || (valid.contains(SetattrValid::GID) && attr.gid != now.gid) {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
        }
        let attr = fuse::SetattrIn { mode: without_set_id(attr.mode), ..attr };
        if !valid.contains(SetattrValid::SIZE) || self.policy.quota.is_none() {
            return self.inner.setattr(ctx, inode.into(), attr, handle, valid);
        }
        // A truncation up is charged, one down credited.
        let change = i128::from(attr.size) - i128::from(self.size_of(ctx, inode)?);
        self.charge(change, 0)?;
        self.refund_on_error(self.inner.setattr(ctx, inode.into(), attr, handle, valid), change, 0)
    }

    fn readlink(&self, ctx: Context, inode: Self::Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(&self, ctx: Context, linkname: &CStr, parent: Self::Inode, name: &CStr, extensions: Extensions) -> io::Result<Entry> {
        let parent: u64 = parent.into();
        let _held = self.hold_repository_names(&[name]);
        self.can_change_entry(ctx, parent, name, EntryChange::MakeSymlink)?;
        self.charge(0, 1)?;
        let entry = self.refund_on_error(self.inner.symlink(ctx, linkname, parent.into(), name, extensions), 0, 1)?;
        self.note(ctx, parent, name, &entry);
        Ok(entry)
    }

    fn mknod(
        &self,
        ctx: Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
        extensions: Extensions,
    ) -> io::Result<Entry> {
        let parent: u64 = parent.into();
        // A device node on the host is a door to that device for whoever can open it there.
        if matches!(mode & libc::S_IFMT, libc::S_IFCHR | libc::S_IFBLK) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let _held = self.hold_repository_names(&[name]);
        self.can_change_entry(ctx, parent, name, EntryChange::MakeFile)?;
        self.charge(0, 1)?;
        let entry =
            self.refund_on_error(self.inner.mknod(ctx, parent.into(), name, without_set_id(mode), rdev, umask, extensions), 0, 1)?;
        self.note(ctx, parent, name, &entry);
        Ok(entry)
    }

    fn mkdir(&self, ctx: Context, parent: Self::Inode, name: &CStr, mode: u32, umask: u32, extensions: Extensions) -> io::Result<Entry> {
        let parent: u64 = parent.into();
        let _held = self.hold_repository_names(&[name]);
        self.can_change_entry(ctx, parent, name, EntryChange::MakeDir)?;
        self.charge(0, 1)?;
        let entry = self.refund_on_error(self.inner.mkdir(ctx, parent.into(), name, without_set_id(mode), umask, extensions), 0, 1)?;
        self.note(ctx, parent, name, &entry);
        Ok(entry)
    }

    fn unlink(&self, ctx: Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        let parent: u64 = parent.into();
        self.can_change_entry(ctx, parent, name, EntryChange::RemoveFile)?;
        let (bytes, inodes) = self.freed_by_removing(ctx, parent, name);
        self.inner.unlink(ctx, parent.into(), name)?;
        self.charge(-bytes, -inodes)
    }

    fn rmdir(&self, ctx: Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        let parent: u64 = parent.into();
        self.can_change_entry(ctx, parent, name, EntryChange::RemoveDir)?;
        let (bytes, inodes) = self.freed_by_removing(ctx, parent, name);
        self.inner.rmdir(ctx, parent.into(), name)?;
        self.charge(-bytes, -inodes)
    }

    fn rename(&self, ctx: Context, olddir: Self::Inode, oldname: &CStr, newdir: Self::Inode, newname: &CStr, flags: u32) -> io::Result<()> {
        let (olddir, newdir): (u64, u64) = (olddir.into(), newdir.into());
        // A whiteout is a device node.
        if flags & libc::RENAME_WHITEOUT != 0 {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        // Where moving a directory matters (into or out of a git directory), ask what moves.
        let moves_dir = |dir: u64, name: &CStr, other: u64| -> io::Result<bool> {
            if self.git_role(dir).is_some() || self.git_role(other).is_some() {
                self.is_dir(ctx, dir, name)
            } else {
                Ok(false)
            }
        };
        let _held = self.hold_repository_names(&[oldname, newname]);
        let old_is_dir = moves_dir(olddir, oldname, newdir)?;
        self.can_change_entry(ctx, olddir, oldname, EntryChange::RenameFrom { is_dir: old_is_dir })?;
        self.can_change_entry(ctx, newdir, newname, EntryChange::RenameTo { is_dir: old_is_dir })?;
        if flags & libc::RENAME_EXCHANGE != 0 {
            let new_is_dir = moves_dir(newdir, newname, olddir)?;
            self.can_change_entry(ctx, newdir, newname, EntryChange::RenameFrom { is_dir: new_is_dir })?;
            self.can_change_entry(ctx, olddir, oldname, EntryChange::RenameTo { is_dir: new_is_dir })?;
        }
        // A rename over an entry removes it: what that frees is the guest's again.
        let (bytes, inodes) = match flags & (libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE) {
            0 => self.freed_by_removing(ctx, newdir, newname),
            _ => (0, 0),
        };
        self.inner.rename(ctx, olddir.into(), oldname, newdir.into(), newname, flags)?;
        self.charge(-bytes, -inodes)
    }

    fn link(&self, ctx: Context, inode: Self::Inode, newparent: Self::Inode, newname: &CStr) -> io::Result<Entry> {
        let (inode, newparent): (u64, u64) = (inode.into(), newparent.into());
        // A protected file linked elsewhere would be writable under its new name.
        self.check_modify(inode)?;
        let _held = self.hold_repository_names(&[newname]);
        self.can_change_entry(ctx, newparent, newname, EntryChange::MakeFile)?;
        let entry = self.inner.link(ctx, inode.into(), newparent.into(), newname)?;
        self.note(ctx, newparent, newname, &entry);
        Ok(entry)
    }

    fn open(&self, ctx: Context, inode: Self::Inode, kill_priv: bool, flags: u32) -> io::Result<(Option<Self::Handle>, OpenOptions)> {
        let inode: u64 = inode.into();
        if open_writes(flags) {
            self.check_modify(inode)?;
        }
        self.inner.open(ctx, inode.into(), kill_priv, flags)
    }

    fn create(
        &self,
        ctx: Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        kill_priv: bool,
        flags: u32,
        umask: u32,
        extensions: Extensions,
    ) -> io::Result<(Entry, Option<Self::Handle>, OpenOptions)> {
        let parent: u64 = parent.into();
        let _held = self.hold_repository_names(&[name]);
        self.can_change_entry(ctx, parent, name, EntryChange::MakeFile)?;
        self.charge(0, 1)?;
        let (entry, handle, options) = self.refund_on_error(
            self.inner.create(ctx, parent.into(), name, without_set_id(mode), kill_priv, flags, umask, extensions),
            0,
            1,
        )?;
        self.note(ctx, parent, name, &entry);
        Ok((entry, handle, options))
    }

    fn read<W: ZeroCopyWriter>(
        &self,
        ctx: Context,
        inode: Self::Inode,
        handle: Self::Handle,
        w: W,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner.read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write<R: ZeroCopyReader>(
        &self,
        ctx: Context,
        inode: Self::Inode,
        handle: Self::Handle,
        r: R,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        kill_priv: bool,
        flags: u32,
    ) -> io::Result<usize> {
        let inode: u64 = inode.into();
        self.check_modify(inode)?;
        let charged = self.charge_growth(ctx, inode, offset.saturating_add(u64::from(size)))?;
        let written = self.refund_on_error(
            self.inner.write(ctx, inode.into(), handle, r, size, offset, lock_owner, delayed_write, kill_priv, flags),
            charged,
            0,
        )?;
        // A short write grew the file less than was charged.
        let short = i128::from(size) - written as i128;
        if charged > 0 && short > 0 {
            let _ = self.charge(-short.min(charged), 0);
        }
        Ok(written)
    }

    fn flush(&self, ctx: Context, inode: Self::Inode, handle: Self::Handle, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: Context, inode: Self::Inode, datasync: bool, handle: Self::Handle) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(&self, ctx: Context, inode: Self::Inode, handle: Self::Handle, mode: u32, offset: u64, length: u64) -> io::Result<()> {
        let inode: u64 = inode.into();
        self.check_modify(inode)?;
        let mode_flags = mode as i32;
        let charged = if mode_flags & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_COLLAPSE_RANGE) != 0 {
            0
        } else if mode_flags & libc::FALLOC_FL_KEEP_SIZE != 0 {
            // Blocks past the end without a new size: disk used all the same.
            let charged = i128::from(length);
            self.charge(charged, 0)?;
            charged
        } else {
            self.charge_growth(ctx, inode, offset.saturating_add(length))?
        };
        self.refund_on_error(self.inner.fallocate(ctx, inode.into(), handle, mode, offset, length), charged, 0)
    }

    fn release(
        &self,
        ctx: Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner.release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: Context, inode: Self::Inode) -> io::Result<libc::statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        ctx: Context,
        inode: Self::Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
        extra_flags: SetxattrFlags,
    ) -> io::Result<()> {
        let inode: u64 = inode.into();
        self.check_attributes(inode)?;
        self.inner.setxattr(ctx, inode.into(), name, value, flags, extra_flags)
    }

    fn getxattr(&self, ctx: Context, inode: Self::Inode, name: &CStr, size: u32) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: Context, inode: Self::Inode, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: Context, inode: Self::Inode, name: &CStr) -> io::Result<()> {
        let inode: u64 = inode.into();
        self.check_attributes(inode)?;
        self.inner.removexattr(ctx, inode.into(), name)
    }

    fn opendir(&self, ctx: Context, inode: Self::Inode, flags: u32) -> io::Result<(Option<Self::Handle>, OpenOptions)> {
        self.inner.opendir(ctx, inode, flags)
    }

    fn readdir(&self, ctx: Context, inode: Self::Inode, handle: Self::Handle, size: u32, offset: u64) -> io::Result<Self::DirIter> {
        let inode: u64 = inode.into();
        let mut inner = self.inner.readdir(ctx, inode.into(), handle, size, offset)?;
        if inode != ROOT || self.policy.visible.is_none() {
            return Ok(PolicyDirIter::Pass(inner));
        }
        // One reply's worth of entries (bounded by `size`), read whole so hidden names can be
        // dropped; offsets stay the inner ones, so the next call resumes where this one ended.
        let mut entries = VecDeque::new();
        while let Some(e) = inner.next() {
            if self.is_visible(ROOT, e.name) {
                entries.push_back((e.ino, e.offset, e.type_, e.name.to_owned()));
            }
        }
        Ok(PolicyDirIter::Filtered { entries, current: None })
    }

    fn fsyncdir(&self, ctx: Context, inode: Self::Inode, datasync: bool, handle: Self::Handle) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: Context, inode: Self::Inode, flags: u32, handle: Self::Handle) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    fn access(&self, ctx: Context, inode: Self::Inode, mask: u32) -> io::Result<()> {
        let inode: u64 = inode.into();
        if mask & libc::W_OK as u32 != 0 && !self.can_modify(inode) {
            return Err(erofs());
        }
        self.inner.access(ctx, inode.into(), mask)
    }

    fn lseek(&self, ctx: Context, inode: Self::Inode, handle: Self::Handle, offset: u64, whence: u32) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn copyfilerange(
        &self,
        ctx: Context,
        inode_in: Self::Inode,
        handle_in: Self::Handle,
        offset_in: u64,
        inode_out: Self::Inode,
        handle_out: Self::Handle,
        offset_out: u64,
        len: u64,
        flags: u64,
    ) -> io::Result<usize> {
        let inode_out: u64 = inode_out.into();
        self.check_modify(inode_out)?;
        let charged = self.charge_growth(ctx, inode_out, offset_out.saturating_add(len))?;
        self.refund_on_error(
            self.inner.copyfilerange(ctx, inode_in, handle_in, offset_in, inode_out.into(), handle_out, offset_out, len, flags),
            charged,
            0,
        )
    }

    fn syncfs(&self, ctx: Context, inode: Self::Inode) -> io::Result<()> {
        self.inner.syncfs(ctx, inode)
    }
}

/// Live migration is not something cvm does: the trait's refusals stand.
impl<F> SerializableFileSystem for PolicyFs<F> {}
