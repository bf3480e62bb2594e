//! Git's control files, read-only in every git directory of a share, on the host side.
//!
//! A guest that writes `core.fsmonitor` or a hook into a git directory runs code on the host
//! the next time the user runs `git status` there. So, in any share: a `.git` entry (at any
//! depth) cannot be created, removed or replaced, and an existing `.git` file (a worktree's or
//! submodule's pointer) cannot change; in every git directory (each `.git` directory, the
//! share root when it is a worktree's main `.git`, each directory below `modules/`, each one
//! in `worktrees/`) the control names cannot be created, changed or removed; a directory
//! cannot be moved into one of those directories (it would bring its own `config`) nor out of
//! `modules/` or `worktrees/` (its control files would leave where git looks), and no
//! symbolic link can be made where git looks for a git directory. Objects, refs, the index,
//! HEAD, logs and git's lock and state files stay writable, so commits, rebases and fetches
//! work. Names compare without ASCII case, as they would on a case-insensitive host.
//!
//! Git also takes any directory that holds `HEAD` beside `objects` (or beside a `commondir`
//! naming where its objects are) for a repository, whatever its name (an implicit bare
//! repository, `safe.bareRepository=all` being git's default), and runs what its `config`
//! says. So outside git's own layout no directory may gain the one of those names that would
//! complete such a set, and a directory that already is one (found on the host) is a git
//! directory like any `.git`.

/// What a directory is to git, as far as the guard cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum GitRole {
    /// A git directory: `.git`, the root of a worktree's main git dir, one in `worktrees/`.
    GitDir,
    /// `modules/` in a git directory: the directories below it are submodules' git dirs.
    Modules,
    /// A directory below `modules/`: a submodule's git dir, or a part of a submodule name
    /// that has a slash, so both a git dir and a container of more.
    ModuleDir,
    /// `worktrees/` in a git directory: each directory in it is a worktree's git dir.
    Worktrees,
    /// `objects/` in a git directory.
    ObjectsDir,
    /// `objects/info/` in a git directory, where `alternates` names other object stores.
    ObjectsInfo,
}

impl GitRole {
    pub(super) fn is_git_dir(self) -> bool {
        matches!(self, GitRole::GitDir | GitRole::ModuleDir)
    }

    /// Whether git looks up git directories by name in it.
    fn is_container(self) -> bool {
        matches!(self, GitRole::Modules | GitRole::ModuleDir | GitRole::Worktrees)
    }
}

/// Names in a git directory that git reads configuration or runs code from.
const CONTROL_NAMES: &[&str] = &["config", "config.worktree", "hooks", "info", "commondir", "gitdir"];
/// Directories git itself keeps in a git directory: below `modules/`, these are not parts of
/// a submodule's name.
const INTERNAL_DIRS: &[&str] = &[
    "objects",
    "refs",
    "logs",
    "hooks",
    "info",
    "branches",
    "remotes",
    "rr-cache",
    "lfs",
    "rebase-merge",
    "rebase-apply",
    "sequencer",
    "fsmonitor--daemon",
];

/// `HEAD`, which with one of [`OBJECT_MARKERS`] makes a directory a repository.
const HEAD: &str = "HEAD";
/// Where a repository's objects are: its own `objects/`, or the common dir `commondir` names.
const OBJECT_MARKERS: &[&str] = &["objects", "commondir"];

fn is(name: &[u8], expected: &str) -> bool {
    name.eq_ignore_ascii_case(expected.as_bytes())
}

fn is_dot_git(name: &[u8]) -> bool {
    is(name, ".git")
}

/// Files in `objects/info/` that make git read objects from elsewhere: a guest that pointed
/// one at a repository only the host has would have host git push that repository's objects.
const ALTERNATES: &[&str] = &["alternates", "http-alternates"];

fn is_control(parent: Option<GitRole>, name: &[u8]) -> bool {
    match parent {
        Some(GitRole::ObjectsInfo) => ALTERNATES.iter().any(|c| is(name, c)),
        Some(role) => role.is_git_dir() && CONTROL_NAMES.iter().any(|c| is(name, c)),
        None => false,
    }
}

/// `modules` or `worktrees` in a git directory: only ever a real directory.
fn is_structural(parent: Option<GitRole>, name: &[u8]) -> bool {
    parent.is_some_and(GitRole::is_git_dir) && (is(name, "modules") || is(name, "worktrees"))
}

/// Whether what lookups find under `name` in `parent` must never change: control files and
/// directories, and `.git` pointer files (`is_dir` false).
pub(super) fn is_protected_entry(parent: Option<GitRole>, name: &[u8], is_dir: bool) -> bool {
    is_control(parent, name) || (is_dot_git(name) && !is_dir)
}

/// The role of the directory `name` in a directory of role `parent`.
pub(super) fn child_role(parent: Option<GitRole>, name: &[u8]) -> Option<GitRole> {
    if is_dot_git(name) {
        return Some(GitRole::GitDir);
    }
    if parent == Some(GitRole::ObjectsDir) {
        return is(name, "info").then_some(GitRole::ObjectsInfo);
    }
    match parent? {
        role if role.is_git_dir() && is(name, "objects") => Some(GitRole::ObjectsDir),
        role if role.is_git_dir() && is(name, "modules") => Some(GitRole::Modules),
        role if role.is_git_dir() && is(name, "worktrees") => Some(GitRole::Worktrees),
        GitRole::Modules => Some(GitRole::ModuleDir),
        GitRole::ModuleDir if !INTERNAL_DIRS.iter().any(|d| is(name, d)) => Some(GitRole::ModuleDir),
        GitRole::Worktrees => Some(GitRole::GitDir),
        _ => None,
    }
}

/// Whether git's discovery would look at `name` in a directory to decide that it is a
/// repository, or read configuration or code from it if it were one: a directory outside
/// git's layout is checked when such a name in it is looked up or changed.
pub(super) fn marks_repository(name: &[u8]) -> bool {
    is(name, HEAD) || OBJECT_MARKERS.iter().chain(CONTROL_NAMES).any(|m| is(name, m))
}

/// The names whose presence in a directory must stop `name` being made there (outside git's
/// layout): each would complete a repository with it.
pub(super) fn repository_complements(name: &[u8]) -> &'static [&'static str] {
    if is(name, HEAD) {
        OBJECT_MARKERS
    } else if OBJECT_MARKERS.iter().any(|m| is(name, m)) {
        &[HEAD]
    } else {
        &[]
    }
}

/// The names a directory must hold to be a repository: `HEAD` and one of the others.
pub(super) fn repository_names() -> (&'static str, &'static [&'static str]) {
    (HEAD, OBJECT_MARKERS)
}

/// A change to a directory entry, as the guard sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum EntryChange {
    MakeDir,
    RemoveDir,
    /// A regular file, a node or a hard link made under the name.
    MakeFile,
    MakeSymlink,
    RemoveFile,
    RenameFrom {
        is_dir: bool,
    },
    RenameTo {
        is_dir: bool,
    },
}

impl EntryChange {
    /// Whether the change makes an entry appear under its name.
    pub(super) fn creates(self) -> bool {
        matches!(self, EntryChange::MakeDir | EntryChange::MakeFile | EntryChange::MakeSymlink | EntryChange::RenameTo { .. })
    }
}

/// Whether `change` of `name` in a directory of role `parent` is allowed.
pub(super) fn allows(parent: Option<GitRole>, name: &[u8], change: EntryChange) -> bool {
    use EntryChange::*;
    if is_dot_git(name) || is_control(parent, name) {
        return false;
    }
    if is_structural(parent, name) {
        // Git makes and prunes them; an empty one holds nothing to keep.
        return matches!(change, MakeDir | RemoveDir);
    }
    match change {
        MakeSymlink | RenameFrom { is_dir: true } => !parent.is_some_and(GitRole::is_container),
        RenameTo { is_dir: true } => parent.is_none(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::EntryChange::*;
    use super::GitRole::*;
    use super::*;

    const ALL: [EntryChange; 9] = [
        MakeDir,
        RemoveDir,
        MakeFile,
        MakeSymlink,
        RemoveFile,
        RenameFrom { is_dir: false },
        RenameFrom { is_dir: true },
        RenameTo { is_dir: false },
        RenameTo { is_dir: true },
    ];

    #[test]
    fn dot_git_and_control_names_never_change_whatever_their_case() {
        for name in [&b".git"[..], b".GIT", b".Git"] {
            for parent in [None, Some(GitDir), Some(Modules), Some(ModuleDir), Some(Worktrees)] {
                assert!(ALL.iter().all(|&c| !allows(parent, name, c)), "{parent:?} {name:?}");
            }
        }
        for name in ["config", "CONFIG", "config.worktree", "hooks", "Hooks", "info", "commondir", "gitdir"] {
            for parent in [Some(GitDir), Some(ModuleDir)] {
                assert!(ALL.iter().all(|&c| !allows(parent, name.as_bytes(), c)), "{parent:?} {name}");
                assert!(is_protected_entry(parent, name.as_bytes(), true));
            }
            // Outside git directories they are ordinary names.
            assert!(ALL.iter().all(|&c| allows(None, name.as_bytes(), c)), "{name}");
            assert!(!is_protected_entry(None, name.as_bytes(), false));
        }
        assert!(is_protected_entry(None, b".git", false), "a pointer file");
        assert!(!is_protected_entry(None, b".git", true), "a git dir is guarded by its role, not frozen");
    }

    #[test]
    fn the_rest_of_a_git_directory_stays_writable() {
        for name in [
            "index",
            "index.lock",
            "HEAD",
            "ORIG_HEAD",
            "FETCH_HEAD",
            "packed-refs",
            "objects",
            "refs",
            "logs",
            "rebase-merge",
            "COMMIT_EDITMSG",
        ] {
            for change in [MakeFile, RemoveFile, RenameFrom { is_dir: false }, RenameTo { is_dir: false }, MakeDir, RemoveDir] {
                assert!(allows(Some(GitDir), name.as_bytes(), change), "{name} {change:?}");
                assert!(allows(Some(ModuleDir), name.as_bytes(), change), "{name} {change:?}");
            }
        }
    }

    #[test]
    fn modules_and_worktrees_are_real_directories_that_nothing_moves_into() {
        for name in ["modules", "worktrees", "Modules"] {
            assert!(allows(Some(GitDir), name.as_bytes(), MakeDir));
            assert!(allows(Some(GitDir), name.as_bytes(), RemoveDir));
            for change in [
                MakeFile,
                MakeSymlink,
                RemoveFile,
                RenameFrom { is_dir: false },
                RenameFrom { is_dir: true },
                RenameTo { is_dir: true },
                RenameTo { is_dir: false },
            ] {
                assert!(!allows(Some(GitDir), name.as_bytes(), change), "{name} {change:?}");
            }
        }
        for parent in [Modules, ModuleDir, Worktrees] {
            assert!(!allows(Some(parent), b"sub", MakeSymlink), "a link to a git dir elsewhere");
            assert!(!allows(Some(parent), b"sub", RenameTo { is_dir: true }), "a directory with its own config");
            assert!(!allows(Some(parent), b"sub", RenameFrom { is_dir: true }), "a git dir moved from where git looks");
            assert!(allows(Some(parent), b"index.lock", RenameFrom { is_dir: false }));
            assert!(allows(Some(parent), b"sub", MakeDir));
        }
        assert!(!allows(Some(GitDir), b"refs", RenameTo { is_dir: true }));
        assert!(allows(None, b"dir", RenameTo { is_dir: true }));
        assert!(allows(None, b"link", MakeSymlink));
    }

    #[test]
    fn head_and_objects_complete_each_other_whatever_their_case() {
        assert_eq!(repository_complements(b"HEAD"), &["objects", "commondir"]);
        assert_eq!(repository_complements(b"head"), &["objects", "commondir"]);
        assert_eq!(repository_complements(b"objects"), &["HEAD"]);
        assert_eq!(repository_complements(b"commondir"), &["HEAD"]);
        for name in ["refs", "ORIG_HEAD", "head-name", "config", "objects.txt"] {
            assert!(repository_complements(name.as_bytes()).is_empty(), "{name}");
        }
        for name in ["HEAD", "objects", "commondir", "config", "hooks", "config.worktree"] {
            assert!(marks_repository(name.as_bytes()), "{name}");
        }
        assert!(!marks_repository(b"src") && !marks_repository(b"refs"));
        assert!(MakeDir.creates() && MakeSymlink.creates() && RenameTo { is_dir: false }.creates());
        assert!(!RemoveFile.creates() && !RenameFrom { is_dir: true }.creates());
    }

    #[test]
    fn roles_follow_git_layout() {
        assert_eq!(child_role(None, b".git"), Some(GitDir));
        assert_eq!(child_role(None, b"src"), None);
        assert_eq!(child_role(None, b"modules"), None);
        assert_eq!(child_role(Some(GitDir), b"modules"), Some(Modules));
        assert_eq!(child_role(Some(GitDir), b"worktrees"), Some(Worktrees));
        assert_eq!(child_role(Some(GitDir), b"objects"), Some(ObjectsDir));
        assert_eq!(child_role(Some(ObjectsDir), b"info"), Some(ObjectsInfo));
        assert_eq!(child_role(Some(ObjectsDir), b"pack"), None);
        assert_eq!(child_role(Some(ObjectsInfo), b"x"), None);
        assert!(
            is_protected_entry(Some(ObjectsInfo), b"alternates", false) && is_protected_entry(Some(ObjectsInfo), b"http-alternates", false)
        );
        assert!(!is_protected_entry(Some(ObjectsInfo), b"packs", false) && !is_protected_entry(Some(ObjectsDir), b"alternates", false));
        assert!(!allows(Some(ObjectsInfo), b"alternates", MakeFile) && allows(Some(ObjectsInfo), b"packs", MakeFile));
        assert_eq!(child_role(Some(Modules), b"objects"), Some(ModuleDir), "a submodule may be called objects");
        assert_eq!(child_role(Some(ModuleDir), b"nested"), Some(ModuleDir), "a name with a slash");
        assert_eq!(child_role(Some(ModuleDir), b"modules"), Some(Modules));
        assert_eq!(child_role(Some(ModuleDir), b"objects"), Some(ObjectsDir));
        assert_eq!(child_role(Some(ModuleDir), b"refs"), None);
        assert_eq!(child_role(Some(Worktrees), b"wt"), Some(GitDir));
    }
}
