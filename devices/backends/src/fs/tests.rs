//! A hostile guest against the fs backend: FUSE requests over real vrings, through cvm's
//! vhost-user frontend and virtio-mmio transport, to the backend serving a temporary share.
//! Every test checks the host side: nothing outside the share is read, written or created.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use super::{serve_in_process, Policy, Quota, ShareConfig};
use cvm_virtual_guest::fuse::{FuseGuest, SetattrIn, ROOT};

const SECRET: &str = "host secret\n";

/// A share and a directory beside it that the guest must never reach.
struct Fixture {
    _dir: tempfile::TempDir,
    share: PathBuf,
    outside: PathBuf,
    backend: Option<JoinHandle<std::io::Result<()>>>,
}

impl Fixture {
    fn new(policy: Policy, prepare: impl FnOnce(&Path, &Path)) -> (Fixture, FuseGuest) {
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("share");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&share).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), SECRET).unwrap();
        std::fs::write(share.join("file"), "in the share\n").unwrap();
        prepare(&share, &outside);
        let socket = dir.path().join("fs.vhost");
        let listener = UnixListener::bind(&socket).unwrap();
        let uid = rustix::process::geteuid().as_raw();
        let gid = rustix::process::getegid().as_raw();
        let config =
            ShareConfig { dir: share.clone(), tag: "test".into(), policy, guest_uid: uid, guest_gid: gid, allow_no_sandbox: false };
        let backend = std::thread::spawn(move || serve_in_process(listener, &config));
        let guest = FuseGuest::connect(&socket).unwrap();
        (Fixture { _dir: dir, share, outside, backend: Some(backend) }, guest)
    }

    /// The directory beside the share holds exactly what it held at the start.
    fn assert_outside_untouched(&self) {
        let names: Vec<_> = std::fs::read_dir(&self.outside).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["secret"], "something was created outside the share");
        assert_eq!(std::fs::read_to_string(self.outside.join("secret")).unwrap(), SECRET);
        assert!(!self.outside.parent().unwrap().join("x").exists());
    }

    /// Ends the guest and checks the backend stopped cleanly on the disconnect.
    fn finish(mut self, guest: FuseGuest) {
        drop(guest);
        self.backend.take().unwrap().join().unwrap().unwrap();
        self.assert_outside_untouched();
    }
}

fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or_else(|| panic!("not an errno: {e}"))
}

#[test]
fn reads_and_writes_reach_the_share() {
    let (fx, mut g) = Fixture::new(Policy::default(), |_, _| {});
    let file = g.lookup(ROOT, b"file").unwrap();
    let fh = g.open(file.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(g.read(file.nodeid, fh, 0, 4096).unwrap(), b"in the share\n");
    let (new, fh) = g.create(ROOT, b"new", 0o644).unwrap();
    assert_eq!(g.write(new.nodeid, fh, 0, b"from the guest").unwrap(), 14);
    g.release(new.nodeid, fh, false).unwrap();
    assert_eq!(std::fs::read_to_string(fx.share.join("new")).unwrap(), "from the guest");
    let names = g.list(ROOT).unwrap();
    assert!(names.contains(&b"new".to_vec()) && names.contains(&b"file".to_vec()));
    fx.finish(g);
}

#[test]
fn back_to_back_requests_are_taken_without_kicks_while_the_backend_watches_the_queue() {
    let (fx, mut g) = Fixture::new(Policy::default(), |_, _| {});
    let file = g.lookup(ROOT, b"file").unwrap();
    let fh = g.open(file.nodeid, libc::O_RDONLY).unwrap();
    let (posted_before, kicks_before) = g.kicks();
    for _ in 0..2000 {
        assert_eq!(g.read(file.nodeid, fh, 0, 4096).unwrap(), b"in the share\n");
    }
    let (posted, kicks) = g.kicks();
    let (posted, kicks) = (posted - posted_before, kicks - kicks_before);
    assert_eq!(posted, 2000);
    // Without the watch every request kicks; with it, almost none do (0 to 19 here), and a
    // loaded test machine still leaves most of them to the watch.
    assert!(kicks < posted * 9 / 10, "{kicks} kicks for {posted} requests sent as soon as each reply came");
    g.release(file.nodeid, fh, false).unwrap();
    fx.finish(g);
}

#[test]
fn dot_dot_names_with_slashes_and_nul_stay_in_the_share() {
    let (fx, mut g) = Fixture::new(Policy::default(), |_, _| {});
    let sub = g.mkdir(ROOT, b"sub", 0o755).unwrap();
    // Only single path components are names: anything else is refused before it reaches the
    // host, in every operation that takes a name.
    for name in [&b".."[..], b".", b"", b"../outside/secret", b"../outside", b"sub/../../outside", b"/etc/passwd", b"../x"] {
        let shown = String::from_utf8_lossy(name);
        assert_eq!(g.lookup(ROOT, name).map_err(errno), Err(libc::EINVAL), "lookup {shown:?}");
        assert_eq!(g.lookup(sub.nodeid, name).map_err(errno), Err(libc::EINVAL), "lookup in sub {shown:?}");
        assert_eq!(g.create(sub.nodeid, name, 0o644).map_err(errno), Err(libc::EINVAL), "create {shown:?}");
        assert_eq!(g.mkdir(ROOT, name, 0o755).map_err(errno), Err(libc::EINVAL), "mkdir {shown:?}");
        assert_eq!(g.symlink(sub.nodeid, name, b"/").map_err(errno), Err(libc::EINVAL), "symlink {shown:?}");
        assert_eq!(g.unlink(sub.nodeid, name).map_err(errno), Err(libc::EINVAL), "unlink {shown:?}");
        assert_eq!(g.rename(ROOT, b"file", sub.nodeid, name).map_err(errno), Err(libc::EINVAL), "rename to {shown:?}");
    }
    // A NUL ends a name: what follows it is not part of the path.
    assert!(g.create(sub.nodeid, b"ok\0/../../x", 0o644).is_ok());
    assert!(fx.share.join("sub/ok").exists());
    let mut names: Vec<_> = std::fs::read_dir(&fx.share).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["file", "sub"]);
    fx.finish(g);
}

#[test]
fn symlinks_are_never_followed_on_the_host() {
    let (fx, mut g) = Fixture::new(Policy::default(), |share, outside| {
        std::os::unix::fs::symlink(outside.join("secret"), share.join("abs")).unwrap();
        std::os::unix::fs::symlink("../outside/secret", share.join("rel")).unwrap();
        std::os::unix::fs::symlink(outside, share.join("dirlink")).unwrap();
    });
    for link in [&b"abs"[..], b"rel"] {
        let e = g.lookup(ROOT, link).unwrap();
        assert_eq!(e.mode & libc::S_IFMT, libc::S_IFLNK, "the guest sees the link itself");
        assert!(!g.readlink(e.nodeid).unwrap().is_empty());
        let opened = g.open(e.nodeid, libc::O_RDONLY).and_then(|fh| g.read(e.nodeid, fh, 0, 4096));
        assert!(opened.is_err(), "opening a symlink read through it: {opened:?}");
        assert!(g.open(e.nodeid, libc::O_WRONLY | libc::O_TRUNC).is_err());
        assert!(g.truncate(e.nodeid, 0).is_err() || std::fs::read_to_string(fx.outside.join("secret")).unwrap() == SECRET);
    }
    // A directory symlink is not a directory to the server.
    let dirlink = g.lookup(ROOT, b"dirlink").unwrap();
    assert!(g.lookup(dirlink.nodeid, b"secret").is_err());
    assert!(g.create(dirlink.nodeid, b"planted", 0o644).is_err());
    assert!(g.mkdir(dirlink.nodeid, b"planted", 0o755).is_err());
    // A symlink the guest makes is only text on the host.
    let mine = g.symlink(ROOT, b"mine", b"/etc/shadow").unwrap();
    assert!(g.open(mine.nodeid, libc::O_RDONLY).is_err());
    assert_eq!(std::fs::read_link(fx.share.join("mine")).unwrap(), Path::new("/etc/shadow"));
    fx.finish(g);
}

#[test]
fn a_directory_swapped_for_a_symlink_during_use_does_not_lead_out() {
    let (fx, mut g) = Fixture::new(Policy::default(), |_, _| {});
    let d = g.mkdir(ROOT, b"d", 0o755).unwrap();
    // The host (or a racing guest) swaps the directory for a link to the outside.
    std::fs::rename(fx.share.join("d"), fx.share.join("d_old")).unwrap();
    std::os::unix::fs::symlink(&fx.outside, fx.share.join("d")).unwrap();
    assert!(g.lookup(d.nodeid, b"secret").is_err(), "the old directory's node now leads outside");
    let (_, fh) = g.create(d.nodeid, b"x", 0o644).unwrap();
    let _ = fh;
    assert!(fx.share.join("d_old/x").exists(), "the node still names the directory it was");
    let now = g.lookup(ROOT, b"d").unwrap();
    assert!(g.lookup(now.nodeid, b"secret").is_err());
    assert!(g.create(now.nodeid, b"planted", 0o644).is_err());
    fx.finish(g);
}

#[test]
fn links_and_renames_cannot_name_anything_outside() {
    let (fx, mut g) = Fixture::new(Policy::default(), |share, outside| {
        // A hard link the host made to a file outside is the host's business; the guest can
        // only reach it by its name in the share, and can make no new one.
        let _ = (share, outside);
    });
    let file = g.lookup(ROOT, b"file").unwrap();
    for bogus in [0u64, 999_999, u64::MAX] {
        assert!(g.link(bogus, ROOT, b"stolen").is_err(), "link from node {bogus}");
        assert!(g.rename(ROOT, b"file", bogus, b"x").is_err(), "rename into node {bogus}");
        assert!(g.lookup(bogus, b"secret").is_err());
    }
    for name in [&b"../x"[..], b"../outside/x", b"a/b", b".."] {
        assert!(g.rename(ROOT, b"file", ROOT, name).is_err(), "rename to {:?}", String::from_utf8_lossy(name));
        assert!(g.link(file.nodeid, ROOT, name).is_err(), "link to {:?}", String::from_utf8_lossy(name));
    }
    assert!(fx.share.join("file").exists());
    fx.finish(g);
}

#[test]
fn a_read_only_share_refuses_every_change_with_erofs() {
    let (fx, mut g) =
        Fixture::new(Policy { read_only: true, ..Policy::default() }, |share, _| std::fs::create_dir(share.join("dir")).unwrap());
    let file = g.lookup(ROOT, b"file").unwrap();
    let dir = g.lookup(ROOT, b"dir").unwrap();
    let fh = g.open(file.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(g.read(file.nodeid, fh, 0, 100).unwrap(), b"in the share\n", "reading still works");
    let refused = [
        ("create", g.create(ROOT, b"new", 0o644).map(drop)),
        ("mkdir", g.mkdir(ROOT, b"newdir", 0o755).map(drop)),
        ("open for writing", g.open(file.nodeid, libc::O_WRONLY).map(drop)),
        ("open with O_TRUNC", g.open(file.nodeid, libc::O_RDONLY | libc::O_TRUNC).map(drop)),
        ("write on a read handle", g.write(file.nodeid, fh, 0, b"x").map(drop)),
        ("truncate", g.truncate(file.nodeid, 0)),
        ("unlink", g.unlink(ROOT, b"file")),
        ("rmdir", g.rmdir(ROOT, b"dir")),
        ("rename", g.rename(ROOT, b"file", dir.nodeid, b"moved")),
        ("link", g.link(file.nodeid, dir.nodeid, b"again").map(drop)),
        ("symlink", g.symlink(ROOT, b"l", b"file").map(drop)),
    ];
    for (what, result) in refused {
        assert_eq!(result.map_err(errno), Err(libc::EROFS), "{what}");
    }
    assert_eq!(std::fs::read_to_string(fx.share.join("file")).unwrap(), "in the share\n");
    assert_eq!(std::fs::read_dir(&fx.share).unwrap().count(), 2);
    fx.finish(g);
}

#[test]
fn a_selected_view_hides_names_and_lets_only_its_one_file_be_rewritten() {
    let policy = Policy {
        read_only: true,
        visible: Some(vec!["settings.json".into(), ".credentials.json".into(), "skills".into()]),
        writable_file: Some(".credentials.json".into()),
        ..Policy::default()
    };
    let (fx, mut g) = Fixture::new(policy, |share, _| {
        std::fs::write(share.join("settings.json"), "{}").unwrap();
        std::fs::write(share.join(".credentials.json"), "old token").unwrap();
        std::fs::write(share.join("history.jsonl"), "other sessions").unwrap();
        std::fs::create_dir_all(share.join("projects/-other")).unwrap();
        std::fs::write(share.join("projects/-other/s.jsonl"), "other project").unwrap();
    });
    let mut names = g.list(ROOT).unwrap();
    names.sort();
    assert_eq!(names, [&b"."[..], b"..", b".credentials.json", b"settings.json"], "skills is listed only where it exists");
    for hidden in [&b"history.jsonl"[..], b"projects", b"file"] {
        assert_eq!(g.lookup(ROOT, hidden).map_err(errno), Err(libc::ENOENT));
    }
    let settings = g.lookup(ROOT, b"settings.json").unwrap();
    assert_eq!(g.open(settings.nodeid, libc::O_WRONLY).map_err(errno), Err(libc::EROFS));

    // The token refresh: rewritten in place, and only that.
    let creds = g.lookup(ROOT, b".credentials.json").unwrap();
    let fh = g.open(creds.nodeid, libc::O_WRONLY | libc::O_TRUNC).unwrap();
    g.write(creds.nodeid, fh, 0, b"new token").unwrap();
    g.release(creds.nodeid, fh, false).unwrap();
    assert_eq!(std::fs::read_to_string(fx.share.join(".credentials.json")).unwrap(), "new token");
    // Its size may change, with the times a truncation sets; its other attributes may not.
    const SIZE: u32 = 1 << 3;
    const MTIME_CTIME: u32 = (1 << 5) | (1 << 10);
    g.setattr(creds.nodeid, SetattrIn { size: 3, ..SetattrIn::only(SIZE | MTIME_CTIME) }).unwrap();
    let mode_before = std::fs::metadata(fx.share.join(".credentials.json")).unwrap().permissions();
    for (what, attr) in [
        ("chmod", SetattrIn { mode: 0o4777, ..SetattrIn::only(1) }),
        ("chown", SetattrIn { uid: 0, ..SetattrIn::only(1 << 1) }),
        ("set its times", SetattrIn::only((1 << 4) | (1 << 5) | (1 << 7) | (1 << 8))),
        ("chmod with a truncation", SetattrIn { mode: 0o777, size: 0, ..SetattrIn::only(1 | SIZE) }),
    ] {
        assert_eq!(g.setattr(creds.nodeid, attr).map_err(errno), Err(libc::EROFS), "{what}");
    }
    assert_eq!(std::fs::metadata(fx.share.join(".credentials.json")).unwrap().permissions(), mode_before);
    assert_eq!(std::fs::read_to_string(fx.share.join(".credentials.json")).unwrap(), "new");
    assert_eq!(g.unlink(ROOT, b".credentials.json").map_err(errno), Err(libc::EROFS));
    assert_eq!(g.rename(ROOT, b".credentials.json", ROOT, b"settings.json").map_err(errno), Err(libc::EROFS));
    assert_eq!(g.link(creds.nodeid, ROOT, b"copy").map_err(errno), Err(libc::EROFS));
    assert_eq!(g.create(ROOT, b"history.jsonl", 0o644).map_err(errno), Err(libc::EROFS));
    assert_eq!(std::fs::read_to_string(fx.share.join("history.jsonl")).unwrap(), "other sessions");
    fx.finish(g);
}

/// Walks `path` (names separated by `/`) from the root.
fn walk(g: &mut FuseGuest, path: &str) -> u64 {
    path.split('/').fold(ROOT, |dir, name| g.lookup(dir, name.as_bytes()).unwrap_or_else(|e| panic!("{path}: {e}")).nodeid)
}

#[test]
fn git_control_files_stay_read_only_in_every_git_directory() {
    let (fx, mut g) = Fixture::new(Policy::default(), |share, _| {
        for dir in [
            ".git/hooks",
            ".git/info",
            ".git/objects",
            ".git/refs/heads",
            ".git/modules/sub/hooks",
            ".git/modules/a/b/objects",
            ".git/worktrees/wt",
            "sub",
            "plain/inner",
            "evil",
        ] {
            std::fs::create_dir_all(share.join(dir)).unwrap();
        }
        for file in [
            ".git/config",
            ".git/hooks/pre-commit",
            ".git/modules/sub/config",
            ".git/modules/a/b/config",
            ".git/worktrees/wt/commondir",
            ".git/worktrees/wt/gitdir",
            "evil/config",
        ] {
            std::fs::write(share.join(file), "original\n").unwrap();
        }
        std::fs::write(share.join("sub/.git"), "gitdir: ../.git/modules/sub\n").unwrap();
    });
    let git = walk(&mut g, ".git");
    let config = walk(&mut g, ".git/config");
    let hooks = walk(&mut g, ".git/hooks");
    let hook = walk(&mut g, ".git/hooks/pre-commit");
    let objects = walk(&mut g, ".git/objects");
    let modules = walk(&mut g, ".git/modules");
    let sub_git = walk(&mut g, ".git/modules/sub");
    let sub_config = walk(&mut g, ".git/modules/sub/config");
    let nested = walk(&mut g, ".git/modules/a/b");
    let nested_config = walk(&mut g, ".git/modules/a/b/config");
    let sub_hooks = walk(&mut g, ".git/modules/sub/hooks");
    let worktrees = walk(&mut g, ".git/worktrees");
    let commondir = walk(&mut g, ".git/worktrees/wt/commondir");
    let pointer = walk(&mut g, "sub/.git");
    let sub = walk(&mut g, "sub");
    let plain = walk(&mut g, "plain");
    let inner = walk(&mut g, "plain/inner");
    let new_module = g.mkdir(modules, b"new", 0o755).expect("git makes a new submodule's git dir");
    let new_worktree = g.mkdir(worktrees, b"wt2", 0o755).expect("git makes a new worktree's git dir");
    let refused = [
        ("write config", g.open(config, libc::O_RDWR).map(drop)),
        ("truncate config", g.truncate(config, 0)),
        ("remove config", g.unlink(git, b"config")),
        ("replace config", g.rename(plain, b"inner", git, b"config")),
        ("create CONFIG, as a case-insensitive host sees it", g.create(git, b"CONFIG", 0o644).map(drop)),
        ("create config.worktree", g.create(git, b"config.worktree", 0o644).map(drop)),
        ("add a hook", g.create(hooks, b"post-checkout", 0o755).map(drop)),
        ("write a hook", g.open(hook, libc::O_WRONLY).map(drop)),
        ("link a hook elsewhere", g.link(hook, objects, b"writable").map(drop)),
        ("rename hooks away", g.rename(git, b"hooks", objects, b"h")),
        ("write a submodule's config", g.open(sub_config, libc::O_WRONLY | libc::O_APPEND).map(drop)),
        ("write a nested submodule's config", g.open(nested_config, libc::O_WRONLY).map(drop)),
        ("add a submodule hook", g.create(sub_hooks, b"x", 0o755).map(drop)),
        ("give a new submodule git dir a config", g.create(new_module.nodeid, b"config", 0o644).map(drop)),
        ("write a worktree's commondir", g.open(commondir, libc::O_WRONLY | libc::O_TRUNC).map(drop)),
        ("give a new worktree a commondir", g.create(new_worktree.nodeid, b"commondir", 0o644).map(drop)),
        ("give a new worktree a gitdir", g.symlink(new_worktree.nodeid, b"gitdir", b"/tmp").map(drop)),
        ("rewrite a submodule's .git pointer", g.open(pointer, libc::O_WRONLY).map(drop)),
        ("remove a submodule's .git pointer", g.unlink(sub, b".git")),
        ("make a .git file", g.create(plain, b".git", 0o644).map(drop)),
        ("make a .git dir", g.mkdir(inner, b".git", 0o755).map(drop)),
        ("make a .GIT dir", g.mkdir(inner, b".GIT", 0o755).map(drop)),
        ("move a directory with its own config to .git", g.rename(ROOT, b"evil", plain, b".git")),
        ("move a directory with its own config into modules", g.rename(ROOT, b"evil", modules, b"evil")),
        ("move a directory with its own config into worktrees", g.rename(ROOT, b"evil", worktrees, b"evil")),
        ("link a submodule git dir elsewhere", g.symlink(modules, b"link", b"../../evil").map(drop)),
        ("swap modules for a link", g.rename(git, b"modules", objects, b"m")),
        ("a modules symlink", g.symlink(nested, b"modules", b"/tmp").map(drop)),
        ("rename .git away", g.rename(ROOT, b".git", ROOT, b"git-old")),
        ("exchange .git with a directory", g.rename2(plain, b"inner", ROOT, b".git", libc::RENAME_EXCHANGE)),
    ];
    for (what, result) in refused {
        assert_eq!(result.map_err(errno), Err(libc::EROFS), "{what}");
    }
    // What git writes in a commit, a rebase or a fetch stays the guest's to change.
    let (lock, fh) = g.create(git, b"index.lock", 0o644).unwrap();
    g.write(lock.nodeid, fh, 0, b"index").unwrap();
    g.release(lock.nodeid, fh, false).unwrap();
    g.rename(git, b"index.lock", git, b"index").unwrap();
    let (lock, fh) = g.create(sub_git, b"HEAD.lock", 0o644).unwrap();
    g.release(lock.nodeid, fh, false).unwrap();
    g.rename(sub_git, b"HEAD.lock", sub_git, b"HEAD").unwrap();
    g.mkdir(git, b"rebase-merge", 0o755).unwrap();
    g.rmdir(git, b"rebase-merge").unwrap();
    let (obj, fh) = g.create(objects, b"ab", 0o644).unwrap();
    g.release(obj.nodeid, fh, false).unwrap();
    g.rmdir(worktrees, b"wt2").expect("git prunes worktree dirs");
    g.rename(ROOT, b"evil", plain, b"moved").expect("directories move freely outside git dirs");

    for file in [
        ".git/config",
        ".git/hooks/pre-commit",
        ".git/modules/sub/config",
        ".git/modules/a/b/config",
        ".git/worktrees/wt/commondir",
        ".git/worktrees/wt/gitdir",
        "plain/moved/config",
    ] {
        assert_eq!(std::fs::read_to_string(fx.share.join(file)).unwrap(), "original\n", "{file}");
    }
    assert_eq!(std::fs::read_to_string(fx.share.join("sub/.git")).unwrap(), "gitdir: ../.git/modules/sub\n");
    assert_eq!(std::fs::read_to_string(fx.share.join(".git/index")).unwrap(), "index");
    assert!(fx.share.join(".git/modules/sub/HEAD").exists() && fx.share.join(".git/objects/ab").exists());
    for absent in [
        ".git/hooks/post-checkout",
        ".git/CONFIG",
        ".git/modules/new/config",
        ".git/worktrees/wt2",
        ".git/modules/link",
        "plain/.git",
        "plain/inner/.git",
    ] {
        assert!(std::fs::symlink_metadata(fx.share.join(absent)).is_err(), "{absent} was made");
    }
    fx.finish(g);
}

#[test]
fn a_worktrees_main_git_dir_is_guarded_from_its_root() {
    let (fx, mut g) = Fixture::new(Policy { git_dir: true, ..Policy::default() }, |share, _| {
        std::fs::write(share.join("config"), "[core]\n").unwrap();
    });
    let config = g.lookup(ROOT, b"config").unwrap();
    assert_eq!(g.open(config.nodeid, libc::O_WRONLY).map(drop).map_err(errno), Err(libc::EROFS));
    assert_eq!(g.mkdir(ROOT, b"hooks", 0o755).map(drop).map_err(errno), Err(libc::EROFS));
    assert!(g.create(ROOT, b"ORIG_HEAD", 0o644).is_ok());
    assert_eq!(std::fs::read_to_string(fx.share.join("config")).unwrap(), "[core]\n");
    fx.finish(g);
}

#[test]
fn no_directory_outside_git_layout_becomes_a_repository() {
    let (fx, mut g) = Fixture::new(Policy::default(), |share, _| {
        // A bare repository the host already had (a test fixture, say), and a `.git` whose
        // refs/remotes/origin/HEAD git itself writes.
        for dir in ["fixture.git/objects", "fixture.git/refs", ".git/objects", ".git/refs/remotes/origin", ".git/logs/refs"] {
            std::fs::create_dir_all(share.join(dir)).unwrap();
        }
        std::fs::write(share.join("fixture.git/HEAD"), "ref: refs/heads/main\n").unwrap();
        std::fs::write(share.join("fixture.git/config"), "[core]\n\tbare = true\n").unwrap();
        std::fs::write(share.join(".git/HEAD"), "ref: refs/heads/main\n").unwrap();
    });
    // `git init --bare sub`, made by hand in either order, and with `commondir`.
    let sub = g.mkdir(ROOT, b"sub", 0o755).unwrap().nodeid;
    g.mkdir(sub, b"objects", 0o755).unwrap();
    g.mkdir(sub, b"refs", 0o755).unwrap();
    g.create(sub, b"config", 0o644).expect("config is an ordinary name outside a repository");
    assert_eq!(g.create(sub, b"HEAD", 0o644).map(drop).map_err(errno), Err(libc::EPERM));
    assert_eq!(g.symlink(sub, b"HEAD", b"refs/heads/main").map(drop).map_err(errno), Err(libc::EPERM));
    let (lock, fh) = g.create(sub, b"HEAD.lock", 0o644).unwrap();
    g.release(lock.nodeid, fh, false).unwrap();
    assert_eq!(g.rename(sub, b"HEAD.lock", sub, b"HEAD").map_err(errno), Err(libc::EPERM), "git's own way of writing HEAD");
    assert_eq!(g.link(lock.nodeid, sub, b"head").map(drop).map_err(errno), Err(libc::EPERM), "case does not matter");
    let other = g.mkdir(ROOT, b"other", 0o755).unwrap().nodeid;
    g.create(other, b"HEAD", 0o644).expect("HEAD alone is no repository");
    assert_eq!(g.mkdir(other, b"objects", 0o755).map(drop).map_err(errno), Err(libc::EPERM));
    assert_eq!(g.create(other, b"commondir", 0o644).map(drop).map_err(errno), Err(libc::EPERM));
    assert_eq!(g.rename(sub, b"objects", other, b"objects").map_err(errno), Err(libc::EPERM));
    // The host's own bare repository is a git directory: its config is read-only.
    let fixture = g.lookup(ROOT, b"fixture.git").unwrap().nodeid;
    let config = g.lookup(fixture, b"config").unwrap().nodeid;
    assert_eq!(g.open(config, libc::O_WRONLY).map(drop).map_err(errno), Err(libc::EROFS));
    assert_eq!(g.mkdir(fixture, b"hooks", 0o755).map(drop).map_err(errno), Err(libc::EROFS));
    g.create(fixture, b"ORIG_HEAD", 0o644).expect("the rest of it stays writable");
    // Git's own HEADs below a git directory.
    let git = g.lookup(ROOT, b".git").unwrap().nodeid;
    let refs = g.lookup(git, b"refs").unwrap().nodeid;
    let remotes = g.lookup(refs, b"remotes").unwrap().nodeid;
    let origin = g.lookup(remotes, b"origin").unwrap().nodeid;
    g.create(origin, b"HEAD", 0o644).expect("refs/remotes/origin/HEAD");
    let logs = g.lookup(git, b"logs").unwrap().nodeid;
    g.create(logs, b"HEAD", 0o644).expect("logs/HEAD");
    // Not inside git's own directories either: .git/objects made a bare repository.
    let objects = g.lookup(git, b"objects").unwrap().nodeid;
    g.mkdir(objects, b"refs", 0o755).unwrap();
    g.create(objects, b"HEAD", 0o644).expect("HEAD alone");
    assert_eq!(g.mkdir(objects, b"objects", 0o755).map(drop).map_err(errno), Err(libc::EPERM));
    // Nor may it borrow objects from a repository only the host has.
    let info = g.mkdir(objects, b"info", 0o755).unwrap().nodeid;
    assert_eq!(g.create(info, b"alternates", 0o644).map(drop).map_err(errno), Err(libc::EROFS));
    g.create(info, b"packs", 0o644).expect("update-server-info's file");
    assert!(!fx.share.join("sub/HEAD").exists() && !fx.share.join("other/objects").exists() && !fx.share.join("other/commondir").exists());
    assert_eq!(std::fs::read_to_string(fx.share.join("fixture.git/config")).unwrap(), "[core]\n\tbare = true\n");
    let status = std::process::Command::new("git")
        .args(["-C", fx.share.join("sub").to_str().unwrap(), "rev-parse", "--git-dir"])
        .env("GIT_CEILING_DIRECTORIES", &fx.share)
        .output()
        .unwrap();
    assert!(!status.status.success(), "host git found a repository in sub/");
    fx.finish(g);
}

#[test]
fn protected_paths_and_every_name_on_the_way_stay_as_the_host_had_them() {
    let policy = Policy { protected_paths: vec![".husky/_".into(), "conf/git.inc".into(), "home/.*".into()], ..Policy::default() };
    let (fx, mut g) = Fixture::new(policy, |share, _| {
        std::fs::create_dir_all(share.join(".husky")).unwrap();
        std::fs::create_dir_all(share.join("conf")).unwrap();
        std::fs::create_dir_all(share.join("home/.ssh")).unwrap();
        std::fs::write(share.join("conf/git.inc"), "[user]\n").unwrap();
        std::fs::write(share.join("conf/other"), "free\n").unwrap();
        std::fs::write(share.join("home/.bashrc"), "rc\n").unwrap();
        std::fs::write(share.join(".husky/pre-commit"), "npm test\n").unwrap();
    });
    let husky = g.lookup(ROOT, b".husky").unwrap().nodeid;
    assert_eq!(g.mkdir(husky, b"_", 0o755).map(drop).map_err(errno), Err(libc::EROFS), "a hooks path that is not there yet");
    assert_eq!(g.symlink(husky, b"_", b"/tmp").map(drop).map_err(errno), Err(libc::EROFS));
    assert_eq!(g.rename(ROOT, b".husky", ROOT, b"moved").map_err(errno), Err(libc::EROFS), "a name on the way");
    assert_eq!(g.rmdir(ROOT, b"conf").map_err(errno), Err(libc::EROFS));
    let pre_commit = g.lookup(husky, b"pre-commit").unwrap().nodeid;
    g.open(pre_commit, libc::O_WRONLY).expect("beside the path, files are the guest's");
    let conf = g.lookup(ROOT, b"conf").unwrap().nodeid;
    let include = g.lookup(conf, b"git.inc").unwrap().nodeid;
    assert_eq!(g.open(include, libc::O_WRONLY).map(drop).map_err(errno), Err(libc::EROFS));
    assert_eq!(g.unlink(conf, b"git.inc").map_err(errno), Err(libc::EROFS));
    assert_eq!(g.link(include, conf, b"copy").map(drop).map_err(errno), Err(libc::EROFS));
    let other = g.lookup(conf, b"other").unwrap().nodeid;
    g.open(other, libc::O_WRONLY).unwrap();
    let (scratch, fh) = g.create(conf, b"scratch", 0o644).unwrap();
    g.release(scratch.nodeid, fh, false).unwrap();
    assert_eq!(g.rename(conf, b"scratch", conf, b"git.inc").map_err(errno), Err(libc::EROFS));
    let home = g.lookup(ROOT, b"home").unwrap().nodeid;
    assert_eq!(g.create(home, b".profile", 0o644).map(drop).map_err(errno), Err(libc::EROFS), "every dot-name");
    let ssh = g.lookup(home, b".ssh").unwrap().nodeid;
    assert_eq!(g.create(ssh, b"authorized_keys", 0o644).map(drop).map_err(errno), Err(libc::EROFS), "everything below one");
    let bashrc = g.lookup(home, b".bashrc").unwrap().nodeid;
    assert_eq!(g.open(bashrc, libc::O_WRONLY | libc::O_APPEND).map(drop).map_err(errno), Err(libc::EROFS));
    g.create(home, b"notes", 0o644).expect("a name without a dot");
    assert!(!fx.share.join(".husky/_").exists() && !fx.share.join("home/.profile").exists());
    assert_eq!(std::fs::read_to_string(fx.share.join("conf/git.inc")).unwrap(), "[user]\n");
    fx.finish(g);
}

#[test]
fn the_guest_adds_no_more_than_its_quota_net_of_what_it_removes() {
    let quota = Quota { bytes: 1 << 20, inodes: 4 };
    let (fx, mut g) = Fixture::new(Policy { quota: Some(quota), ..Policy::default() }, |_, _| {});
    let (big, fh) = g.create(ROOT, b"big", 0o644).unwrap();
    let half = vec![7u8; 512 << 10];
    assert_eq!(g.write(big.nodeid, fh, 0, &half).unwrap() as usize, half.len());
    assert_eq!(g.write(big.nodeid, fh, 0, &half).unwrap() as usize, half.len(), "rewriting in place adds nothing");
    assert_eq!(g.write(big.nodeid, fh, 512 << 10, &half).unwrap() as usize, half.len(), "up to the quota");
    assert_eq!(g.write(big.nodeid, fh, 1 << 20, b"x").map(drop).map_err(errno), Err(libc::EDQUOT), "one byte past it");
    // A sparse file counts by its size: 8 TiB of nothing is refused too.
    let (sparse, sfh) = g.create(ROOT, b"sparse", 0o644).unwrap();
    assert_eq!(g.truncate(sparse.nodeid, 8 << 40).map_err(errno), Err(libc::EDQUOT));
    g.release(sparse.nodeid, sfh, false).unwrap();
    // Inodes: "big" and "sparse" so far, then two more, then none.
    g.mkdir(ROOT, b"dir", 0o755).unwrap();
    g.symlink(ROOT, b"link", b"big").unwrap();
    assert_eq!(g.create(ROOT, b"fifth", 0o644).map(drop).map_err(errno), Err(libc::EDQUOT));
    assert_eq!(g.mkdir(ROOT, b"fifth", 0o755).map(drop).map_err(errno), Err(libc::EDQUOT));
    // What the guest removes is its to use again.
    g.release(big.nodeid, fh, false).unwrap();
    g.unlink(ROOT, b"big").unwrap();
    g.rmdir(ROOT, b"dir").unwrap();
    let (again, afh) = g.create(ROOT, b"again", 0o644).expect("an inode freed");
    assert_eq!(g.write(again.nodeid, afh, 0, &half).unwrap() as usize, half.len(), "bytes freed");
    g.truncate(again.nodeid, 0).unwrap();
    assert_eq!(g.write(again.nodeid, afh, 0, &vec![1u8; 1 << 20]).unwrap() as usize, 1 << 20, "a truncation down frees its bytes");
    g.release(again.nodeid, afh, false).unwrap();
    // A rename over a file frees it (as an editor's save does): "again" goes, its MiB with it.
    let (saved, sfh) = g.create(ROOT, b"saved", 0o644).unwrap();
    g.release(saved.nodeid, sfh, false).unwrap();
    g.rename(ROOT, b"saved", ROOT, b"again").unwrap();
    let (after, afh) = g.create(ROOT, b"after", 0o644).expect("the replaced file's inode freed");
    assert_eq!(g.write(after.nodeid, afh, 0, &vec![2u8; 1 << 20]).unwrap() as usize, 1 << 20, "the replaced file's bytes freed");
    g.release(after.nodeid, afh, false).unwrap();
    assert!(!fx.share.join("fifth").exists());
    assert_eq!(std::fs::metadata(fx.share.join("sparse")).unwrap().len(), 0);
    fx.finish(g);
}

#[test]
fn set_id_bits_and_device_nodes_never_reach_the_host() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let (fx, mut g) = Fixture::new(Policy::default(), |_, _| {});
    let mode = |name: &str| std::fs::symlink_metadata(fx.share.join(name)).unwrap().permissions().mode();
    let (created, fh) = g.create(ROOT, b"suid", 0o6755).unwrap();
    g.release(created.nodeid, fh, false).unwrap();
    assert_eq!(mode("suid") & 0o7777, 0o755, "create");
    let file = g.lookup(ROOT, b"file").unwrap();
    g.setattr(file.nodeid, SetattrIn { mode: 0o104755, ..SetattrIn::only(1) }).unwrap(); // FATTR_MODE
    assert_eq!(mode("file") & 0o7777, 0o755, "chmod");
    g.mkdir(ROOT, b"dir", 0o2775).unwrap();
    assert_eq!(mode("dir") & 0o7000, 0, "mkdir");
    for (kind, rdev) in [(libc::S_IFCHR, 0x0103), (libc::S_IFBLK, 0x0800)] {
        assert_eq!(g.mknod(ROOT, b"dev", kind | 0o666, rdev).map(drop).map_err(errno), Err(libc::EPERM));
    }
    g.mknod(ROOT, b"fifo", libc::S_IFIFO | 0o4644, 0).expect("a FIFO is no device");
    assert!(std::fs::symlink_metadata(fx.share.join("fifo")).unwrap().file_type().is_fifo());
    assert_eq!(mode("fifo") & 0o7000, 0);
    assert_eq!(
        g.rename2(ROOT, b"file", ROOT, b"renamed", libc::RENAME_WHITEOUT).map_err(errno),
        Err(libc::EPERM),
        "a whiteout is a device node"
    );
    // The guest's root cannot give a file to another host user; its own owner stays settable.
    let owner = std::fs::metadata(fx.share.join("file")).map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap();
    assert_eq!(g.setattr(file.nodeid, SetattrIn { uid: 4242, ..SetattrIn::only(2) }).map_err(errno), Err(libc::EPERM)); // FATTR_UID
    g.setattr(file.nodeid, SetattrIn { uid: rustix::process::geteuid().as_raw(), ..SetattrIn::only(2) })
        .expect("a chown to the owner it has");
    assert_eq!(std::fs::metadata(fx.share.join("file")).map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap(), owner);
    assert!(!fx.share.join("dev").exists() && fx.share.join("file").exists());
    fx.finish(g);
}

#[test]
fn unknown_requests_and_a_flood_get_answers() {
    let (fx, mut g) = Fixture::new(Policy::default(), |_, _| {});
    // Requests the server does not know: answered with an error. (Requests that do not decode,
    // and chains that break virtio, end the backend's process by virtiofsd's design:
    // tests/fs_backend.rs checks that only that process ends.)
    let header = |opcode: u32| {
        let mut h = vec![0u8; 40];
        h[..4].copy_from_slice(&40u32.to_le_bytes());
        h[4..8].copy_from_slice(&opcode.to_le_bytes());
        h[16..24].copy_from_slice(&ROOT.to_le_bytes());
        h
    };
    let requests = [header(9999), header(0), header(u32::MAX)];
    for round in 0..20 {
        for (i, request) in requests.iter().enumerate() {
            let addr = 0x70_0000 + 0x1000 * i as u64;
            g.write_ram(addr, request).unwrap();
            g.post_raw(&[(addr, request.len() as u32, false), (0x80_0000 + 0x1000 * i as u64, 4096, true)]).unwrap();
        }
        assert_eq!(g.lookup(ROOT, b"missing").map_err(errno), Err(libc::ENOENT), "round {round}");
    }
    for i in 0..5000 {
        assert!(g.lookup(ROOT, format!("missing{i}").as_bytes()).is_err());
    }
    assert!(g.lookup(ROOT, b"file").is_ok());
    fx.finish(g);
}

#[test]
fn no_sandbox_only_when_the_user_allowed_it() {
    use virtiofsd::sandbox::SandboxMode::*;
    assert_eq!(super::sandbox_modes(false, true, false), [Namespace]);
    assert_eq!(super::sandbox_modes(true, true, false), [Namespace, Chroot]);
    assert_eq!(super::sandbox_modes(false, true, true), [Namespace, None]);
    assert_eq!(super::sandbox_modes(true, true, true), [Namespace, Chroot, None]);
    // Where namespaces are refused (root without CAP_SYS_ADMIN in a container), none is tried.
    assert_eq!(super::sandbox_modes(true, false, false), [Chroot]);
    assert_eq!(super::sandbox_modes(false, false, false), []);
    // This host (CI's too) has namespaces: the test suite's backends run in them.
    assert_eq!(super::sandbox_on_this_host(), ("namespaces", Option::None));
}

#[test]
fn share_configs_round_trip_through_arguments_and_bad_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = ShareConfig {
        dir: dir.path().to_path_buf(),
        tag: "claude".into(),
        policy: Policy {
            read_only: true,
            visible: Some(vec!["a".into(), "b c".into()]),
            git_dir: true,
            writable_file: Some("a".into()),
            protected_paths: vec![".husky/_".into(), ".*".into()],
            quota: Some(Quota { bytes: 1 << 30, inodes: 1000 }),
        },
        guest_uid: 1000,
        guest_gid: 100,
        allow_no_sandbox: true,
    };
    assert_eq!(ShareConfig::from_args(config.to_args()), Ok(config.clone()));
    let plain = ShareConfig { policy: Policy::default(), allow_no_sandbox: false, ..config.clone() };
    assert_eq!(ShareConfig::from_args(plain.to_args()), Ok(plain));
    for bad in [
        &["--dir"][..],
        &["--tag", "t", "--uid", "1", "--gid", "1"],
        &["--dir", "/", "--tag", "t", "--uid", "x", "--gid", "1"],
        &["--bogus", "1"],
    ] {
        assert!(ShareConfig::from_args(bad.iter().map(std::ffi::OsString::from)).is_err(), "{bad:?}");
    }
    assert!(config.validate().is_ok());
    let invalid = |change: &dyn Fn(&mut ShareConfig)| {
        let mut c = config.clone();
        change(&mut c);
        c.validate().is_err()
    };
    assert!(invalid(&|c| c.tag = String::new()));
    assert!(invalid(&|c| c.tag = "x".repeat(37)));
    assert!(invalid(&|c| c.tag = "a,b".into()));
    assert!(invalid(&|c| c.dir = "relative".into()));
    assert!(invalid(&|c| c.dir = dir.path().join("missing")));
    let non_utf8 = dir.path().join(std::ffi::OsStr::from_bytes(b"\xff"));
    std::fs::create_dir(&non_utf8).unwrap();
    assert!(invalid(&|c| c.dir = non_utf8.clone()));
}

/// One request of a hostile guest, on node ids and names drawn from small sets.
#[derive(Clone, Debug)]
enum Op {
    Lookup(usize, usize),
    Create(usize, usize, u32),
    Mkdir(usize, usize, u32),
    Mknod(usize, usize, u32),
    Symlink(usize, usize),
    Unlink(usize, usize),
    Rmdir(usize, usize),
    Rename(usize, usize, usize, usize, u32),
    Link(usize, usize, usize),
    Write(usize, i32),
    Chmod(usize, u32),
}

const NAMES: &[&[u8]] =
    &[b".git", b".GIT", b"config", b"Config", b"hooks", b"modules", b"worktrees", b"commondir", b"sub", b"a", b"b", b"..", b"a/b", b""];

fn any_op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    let node = 0usize..16;
    let name = 0..NAMES.len();
    let mode = prop_oneof![Just(0o644u32), Just(0o4755), Just(0o2755), Just(0o6777)];
    let kind = prop_oneof![Just(libc::S_IFCHR), Just(libc::S_IFBLK), Just(libc::S_IFIFO), Just(libc::S_IFREG), Just(libc::S_IFSOCK)];
    let flags = prop_oneof![Just(0u32), Just(libc::RENAME_EXCHANGE), Just(libc::RENAME_NOREPLACE), Just(libc::RENAME_WHITEOUT)];
    let open = prop_oneof![Just(libc::O_WRONLY), Just(libc::O_RDWR | libc::O_TRUNC), Just(libc::O_WRONLY | libc::O_APPEND)];
    prop_oneof![
        (node.clone(), name.clone()).prop_map(|(n, a)| Op::Lookup(n, a)),
        (node.clone(), name.clone(), mode.clone()).prop_map(|(n, a, m)| Op::Create(n, a, m)),
        (node.clone(), name.clone(), mode.clone()).prop_map(|(n, a, m)| Op::Mkdir(n, a, m)),
        (node.clone(), name.clone(), kind, mode.clone()).prop_map(|(n, a, k, m)| Op::Mknod(n, a, k | m)),
        (node.clone(), name.clone()).prop_map(|(n, a)| Op::Symlink(n, a)),
        (node.clone(), name.clone()).prop_map(|(n, a)| Op::Unlink(n, a)),
        (node.clone(), name.clone()).prop_map(|(n, a)| Op::Rmdir(n, a)),
        (node.clone(), name.clone(), node.clone(), name.clone(), flags).prop_map(|(n, a, m, b, f)| Op::Rename(n, a, m, b, f)),
        (node.clone(), node.clone(), name.clone()).prop_map(|(n, m, a)| Op::Link(n, m, a)),
        (node.clone(), open).prop_map(|(n, f)| Op::Write(n, f)),
        (node, mode).prop_map(|(n, m)| Op::Chmod(n, m)),
    ]
}

/// Every entry below `dir`: (path, metadata).
fn walk_host(dir: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.path().symlink_metadata().unwrap();
        if meta.is_dir() {
            out.extend(walk_host(&entry.path()));
        }
        out.push((entry.path(), meta));
    }
    out
}

// Cases: PROPTEST_CASES (scripts/test sets thousands; more by hand for a soak).
proptest::proptest! {
    /// Any sequence of requests, on a share holding a repository with a submodule: git's
    /// control files never change, no `.git` appears, no set-id file or device node is made,
    /// nothing outside the share is touched, and the server answers to the end.
    #[test]
    fn any_request_sequence_keeps_the_share_rules(ops in proptest::collection::vec(any_op(), 1..24)) {
        use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
        let (fx, mut g) = Fixture::new(Policy::default(), |share, _| {
            for dir in [".git/hooks", ".git/modules/sub", "sub", "a"] {
                std::fs::create_dir_all(share.join(dir)).unwrap();
            }
            for file in [".git/config", ".git/hooks/pre-commit", ".git/modules/sub/config"] {
                std::fs::write(share.join(file), "original\n").unwrap();
            }
            std::fs::write(share.join("sub/.git"), "gitdir: ../.git/modules/sub\n").unwrap();
        });
        // Git's files by inode: wherever a rename may take them, they must keep their contents.
        let control: Vec<(u64, Vec<u8>)> = [".git/config", ".git/hooks/pre-commit", ".git/modules/sub/config", "sub/.git"]
            .iter()
            .map(|f| (std::fs::metadata(fx.share.join(f)).unwrap().ino(), std::fs::read(fx.share.join(f)).unwrap()))
            .collect();
        let dot_gits_before = walk_host(&fx.share).iter().filter(|(p, _)| p.file_name().is_some_and(|n| n.eq_ignore_ascii_case(".git"))).count();
        let mut nodes = vec![ROOT];
        for path in [".git", ".git/hooks", ".git/modules", ".git/modules/sub", "sub", "a", ".git/config", "sub/.git"] {
            nodes.push(walk(&mut g, path));
        }
        let node = |nodes: &Vec<u64>, i: usize| nodes[i % nodes.len()];
        for op in ops {
            let found = match op {
                Op::Lookup(n, a) => g.lookup(node(&nodes, n), NAMES[a]).ok(),
                Op::Create(n, a, m) => g.create(node(&nodes, n), NAMES[a], m).ok().map(|(e, fh)| {
                    let _ = g.release(e.nodeid, fh, false);
                    e
                }),
                Op::Mkdir(n, a, m) => g.mkdir(node(&nodes, n), NAMES[a], m).ok(),
                Op::Mknod(n, a, m) => g.mknod(node(&nodes, n), NAMES[a], m, 0x0103).ok(),
                Op::Symlink(n, a) => g.symlink(node(&nodes, n), NAMES[a], b"/etc").ok(),
                Op::Unlink(n, a) => g.unlink(node(&nodes, n), NAMES[a]).ok().and(None),
                Op::Rmdir(n, a) => g.rmdir(node(&nodes, n), NAMES[a]).ok().and(None),
                Op::Rename(n, a, m, b, f) => g.rename2(node(&nodes, n), NAMES[a], node(&nodes, m), NAMES[b], f).ok().and(None),
                Op::Link(n, m, a) => g.link(node(&nodes, n), node(&nodes, m), NAMES[a]).ok(),
                Op::Write(n, flags) => {
                    let n = node(&nodes, n);
                    if let Ok(fh) = g.open(n, flags) {
                        let _ = g.write(n, fh, 0, b"guest was here");
                        let _ = g.release(n, fh, false);
                    }
                    None
                }
                Op::Chmod(n, m) => {
                    let _ = g.setattr(node(&nodes, n), SetattrIn { mode: m, ..SetattrIn::only(1) });
                    None
                }
            };
            if let Some(entry) = found {
                nodes.push(entry.nodeid);
            }
        }
        proptest::prop_assert!(g.lookup(ROOT, b".git").is_ok(), "the server still answers");
        let entries = walk_host(&fx.share);
        for (ino, contents) in &control {
            let found: Vec<&PathBuf> = entries.iter().filter(|(_, m)| m.ino() == *ino).map(|(p, _)| p).collect();
            proptest::prop_assert!(!found.is_empty(), "a control file is gone");
            for path in found {
                proptest::prop_assert_eq!(&std::fs::read(path).unwrap(), contents, "{} changed", path.display());
            }
        }
        let dot_gits = entries.iter().filter(|(p, _)| p.file_name().is_some_and(|n| n.eq_ignore_ascii_case(".git"))).count();
        proptest::prop_assert_eq!(dot_gits, dot_gits_before, "a .git was made or removed");
        for (path, meta) in &entries {
            proptest::prop_assert!(meta.permissions().mode() & 0o6000 == 0 || meta.is_dir() && meta.permissions().mode() & 0o4000 == 0, "{} is set-id", path.display());
            proptest::prop_assert!(!meta.file_type().is_char_device() && !meta.file_type().is_block_device(), "{} is a device", path.display());
        }
        fx.finish(g);
    }
}
