use super::*;

fn home() -> PathBuf {
    PathBuf::from("/home/dev")
}

#[test]
fn mount_specs() {
    let m = |t: &str| parse_mount_spec(t, &home());
    assert_eq!(m("/data"), Ok(MountSpec { host: "/data".into(), guest: "/data".into(), read_only: false }));
    assert_eq!(m("/data:ro"), Ok(MountSpec { host: "/data".into(), guest: "/data".into(), read_only: true }));
    assert_eq!(m("/data:/mnt/d"), Ok(MountSpec { host: "/data".into(), guest: "/mnt/d".into(), read_only: false }));
    assert_eq!(m("/data:/mnt/d:rw"), Ok(MountSpec { host: "/data".into(), guest: "/mnt/d".into(), read_only: false }));
    assert_eq!(m("~/src:/src:ro"), Ok(MountSpec { host: "/home/dev/src".into(), guest: "/src".into(), read_only: true }));
    assert_eq!(m("~"), Ok(MountSpec { host: "/home/dev".into(), guest: "/home/dev".into(), read_only: false }));
    for bad in [
        "",
        "data",
        "./data",
        "/data:mnt",
        "/a/../etc",
        "/data:/mnt/./x",
        "/a:/b:ro:rw",
        "/a:/b:/c",
        "/data:/",
        "~user/x",
        ":ro",
        "/a:ro:/b",
    ] {
        assert!(m(bad).is_err(), "{bad:?} should be refused");
    }
}

#[test]
fn project_folder_names() {
    assert_eq!(encode_project_path(Path::new("/home/dev/my project.v2")), "-home-dev-my-project-v2");
    assert_eq!(encode_project_path(Path::new("/work/main")), "-work-main");
}

fn request(project: &Path) -> ShareRequest {
    ShareRequest {
        project: Some(project.to_path_buf()),
        conversations: true,
        claude_items: CLAUDE_DEFAULT_ITEMS.iter().map(|s| s.to_string()).collect(),
        ..ShareRequest::default()
    }
}

#[test]
fn a_project_with_claude_and_conversations() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let project = dir.path().join("proj");
    std::fs::create_dir_all(home.join(".claude")).unwrap();
    std::fs::write(home.join(".claude/.credentials.json"), "{}").unwrap();
    std::fs::create_dir_all(&project).unwrap();
    let host = HostUser { name: "dev".into(), uid: 1234, gid: 99, home: home.clone() };
    let plan = SharePlan::new(&request(&project), &host, &dir.path().join("meta")).unwrap();

    let tags: Vec<&str> = plan.shares.iter().map(|s| s.backend.tag.as_str()).collect();
    assert_eq!(tags, ["project", "claude", "conversations", "meta"]);
    assert_eq!(plan.shares[0].guest_path, project);
    assert_eq!(plan.workdir.as_deref(), Some(project.as_path()));
    let claude = &plan.shares[1].backend;
    assert!(claude.policy.read_only);
    assert_eq!(claude.policy.writable_file.as_deref(), Some(CREDENTIALS));
    assert!(!claude.policy.visible.as_ref().unwrap().iter().any(|n| n == "projects" || n == "history.jsonl"));
    let folder = home.join(".claude/projects").join(encode_project_path(&project));
    assert!(folder.is_dir(), "the conversation folder is created on the host");
    assert_eq!(plan.shares[2].backend.dir, folder);
    assert!(plan.shares[3].backend.policy.read_only, "the meta dir is read-only");
    let user = plan.setup.user.as_ref().unwrap();
    assert_eq!((user.uid, user.gid, user.name.as_str()), (1234, 99, "dev"));
    assert!(plan.shares.iter().all(|s| s.backend.guest_uid == 1234 && s.backend.guest_gid == 99));
    // The overlay and the credentials bind come right after the claude share.
    assert!(matches!(&plan.setup.steps[2], Step::Overlay { target, .. } if target.ends_with(b"/.claude")));
    assert!(matches!(&plan.setup.steps[3], Step::Bind { target, .. } if target.ends_with(b"/.claude/.credentials.json")));
    let mut exec = Exec { env: vec![(b"TERM".to_vec(), b"xterm".to_vec())], ..Exec::default() };
    plan.prepare(&mut exec);
    assert_eq!((exec.uid, exec.gid, exec.cwd), (Some(1234), Some(99), Some(bytes(&project))));
    assert_eq!(exec.env[0], (b"HOME".to_vec(), bytes(&home)));
    assert_eq!(exec.env.last().unwrap().0, b"TERM", "the caller's variables come after, so they win");

    let mut no_conv = request(&project);
    no_conv.conversations = false;
    let plan = SharePlan::new(&no_conv, &host, &dir.path().join("meta")).unwrap();
    assert!(!plan.shares.iter().any(|s| s.backend.tag == "conversations"));
}

#[test]
fn a_conversation_folder_another_project_maps_to_is_not_shared() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap();
    let home = base.join("home");
    std::fs::create_dir_all(home.join(".claude")).unwrap();
    let host = HostUser { name: "dev".into(), uid: 1234, gid: 99, home: home.clone() };
    let project = base.join("a/b.c");
    std::fs::create_dir_all(&project).unwrap();
    let plan = SharePlan::new(&request(&project), &host, &base.join("meta")).unwrap();
    assert!(plan.shares.iter().any(|s| s.backend.tag == "conversations") && plan.warnings.is_empty(), "{:?}", plan.warnings);
    for other in ["a/b-c", "a/b/c", "a-b/c"] {
        std::fs::create_dir_all(base.join(other)).unwrap();
        let plan = SharePlan::new(&request(&project), &host, &base.join("meta")).unwrap();
        assert!(!plan.shares.iter().any(|s| s.backend.tag == "conversations"), "{other}");
        assert!(plan.warnings.len() == 1 && plan.warnings[0].contains("maps to it too"), "{other}: {:?}", plan.warnings);
        std::fs::remove_dir(base.join(other)).unwrap();
    }
    // A symbolic link is not a project of its own.
    std::os::unix::fs::symlink(&project, base.join("a/b-c")).unwrap();
    assert!(SharePlan::new(&request(&project), &host, &base.join("meta")).unwrap().warnings.is_empty());
}

#[test]
fn claude_json_keeps_only_this_projects_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".claude.json");
    std::fs::write(&path, r#"{"hasCompletedOnboarding":true,"projects":{"/p":{"history":[1]},"/secret":{"history":[2]}},"userID":"u"}"#)
        .unwrap();
    let state: serde_json::Value = serde_json::from_str(&claude_state(&path, Path::new("/p")).unwrap()).unwrap();
    assert_eq!(state["hasCompletedOnboarding"], true);
    assert_eq!(state["userID"], "u");
    assert_eq!(state["projects"].as_object().unwrap().keys().collect::<Vec<_>>(), ["/p"]);
    for bad in ["not json", "[1,2]", ""] {
        std::fs::write(&path, bad).unwrap();
        assert_eq!(claude_state(&path, Path::new("/p")), None, "{bad:?}");
    }
    std::fs::write(&path, format!(r#"{{"big":"{}"}}"#, "x".repeat(300 << 10))).unwrap();
    assert_eq!(claude_state(&path, Path::new("/p")), None, "too large to send");
    assert_eq!(claude_state(&dir.path().join("missing"), Path::new("/p")), None);
}

#[test]
fn root_gets_an_unprivileged_guest_user() {
    let dir = tempfile::tempdir().unwrap();
    let host = HostUser { name: "root".into(), uid: 0, gid: 0, home: dir.path().to_path_buf() };
    let plan = SharePlan::new(&request(dir.path()), &host, &dir.path().join("meta")).unwrap();
    let user = plan.setup.user.unwrap();
    assert_ne!(user.uid, 0);
    assert_ne!(user.name, "root");
    assert_eq!(user.home, bytes(dir.path()));
}

#[test]
fn a_worktree_shares_its_main_git_dir_with_hooks_protected() {
    let dir = tempfile::tempdir().unwrap();
    let (main, wt) = fake_worktree(dir.path());
    let main_git = main.join(".git");
    let host = HostUser { name: "dev".into(), uid: 1000, gid: 1000, home: dir.path().join("nohome") };
    let plan = SharePlan::new(&request(&wt), &host, &dir.path().join("meta")).unwrap();
    let git = plan.shares.iter().find(|s| s.backend.tag == "git").expect("the main .git is shared");
    assert_eq!(git.backend.dir, main_git.canonicalize().unwrap());
    assert_eq!(git.guest_path, git.backend.dir, "at its host path, where the worktree's pointer leads");
    assert!(git.backend.policy.git_dir, "its control files are guarded");
    assert!(!git.backend.policy.read_only);
}

#[test]
fn a_forged_git_pointer_shares_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let (main, wt) = fake_worktree(dir.path());
    assert_eq!(main_repository(&wt), Some(main.canonicalize().unwrap()));
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(elsewhere.join("objects")).unwrap();
    std::fs::write(elsewhere.join("HEAD"), "x").unwrap();
    // An admin dir the guest made in the project, pointing at a directory it wants shared.
    let fake = wt.join("fake");
    std::fs::create_dir_all(&fake).unwrap();
    std::fs::write(fake.join("gitdir"), format!("{}\n", wt.join(".git").display())).unwrap();
    std::fs::write(fake.join("commondir"), format!("{}\n", elsewhere.display())).unwrap();
    std::fs::write(wt.join(".git"), format!("gitdir: {}\n", fake.display())).unwrap();
    assert_eq!(main_repository(&wt), None, "an admin dir outside the common dir's worktrees/");
    // The real admin dir, but its commondir rewritten.
    std::fs::write(wt.join(".git"), format!("gitdir: {}\n", main.join(".git/worktrees/wt").display())).unwrap();
    std::fs::write(main.join(".git/worktrees/wt/commondir"), format!("{}\n", elsewhere.display())).unwrap();
    assert_eq!(main_repository(&wt), None, "a common dir that does not hold the admin dir");
    std::fs::write(main.join(".git/worktrees/wt/commondir"), "../..\n").unwrap();
    // Another worktree's admin dir: it points back at that worktree, not this one.
    std::fs::write(main.join(".git/worktrees/wt/gitdir"), "/somewhere/else/.git\n").unwrap();
    assert_eq!(main_repository(&wt), None, "the back-pointer names another worktree");
    // A FIFO or a link out of the project instead of a pointer file: no hang, no share.
    std::fs::remove_file(wt.join(".git")).unwrap();
    rustix::fs::mknodat(rustix::fs::CWD, wt.join(".git"), rustix::fs::FileType::Fifo, rustix::fs::Mode::from_raw_mode(0o600), 0).unwrap();
    assert_eq!(main_repository(&wt), None);
    std::fs::remove_file(wt.join(".git")).unwrap();
    std::fs::write(dir.path().join("pointer"), format!("gitdir: {}\n", main.join(".git/worktrees/wt").display())).unwrap();
    std::os::unix::fs::symlink(dir.path().join("pointer"), wt.join(".git")).unwrap();
    assert_eq!(main_repository(&wt), None);
}

#[test]
fn bad_shares_fail_before_a_vm_starts() {
    let dir = tempfile::tempdir().unwrap();
    let host = HostUser { name: "dev".into(), uid: 1000, gid: 1000, home: dir.path().to_path_buf() };
    let meta = dir.path().join("meta");
    let missing = ShareRequest { project: Some(dir.path().join("nope")), ..ShareRequest::default() };
    assert!(SharePlan::new(&missing, &host, &meta).is_err());
    let file = dir.path().join("f");
    std::fs::write(&file, "x").unwrap();
    let not_dir = ShareRequest { mounts: vec![MountSpec { host: file, guest: "/f".into(), read_only: false }], ..ShareRequest::default() };
    assert!(SharePlan::new(&not_dir, &host, &meta).is_err());
    let twice = ShareRequest {
        mounts: vec![
            MountSpec { host: dir.path().to_path_buf(), guest: "/x".into(), read_only: false },
            MountSpec { host: dir.path().to_path_buf(), guest: "/x".into(), read_only: true },
        ],
        ..ShareRequest::default()
    };
    assert!(SharePlan::new(&twice, &host, &meta).unwrap_err().to_string().contains("twice"));
    let nothing = SharePlan::new(&ShareRequest::default(), &host, &meta).unwrap();
    assert_eq!(nothing, SharePlan::default(), "nothing shared, nothing planned");
    let mut exec = Exec::default();
    nothing.prepare(&mut exec);
    assert_eq!(exec, Exec::default(), "root in / as it stands");
}

#[test]
fn files_host_programs_take_code_from_are_protected_in_every_share_that_holds_them() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let project = home.join("proj");
    std::fs::create_dir_all(&project).unwrap();
    let git = |args: &[&str]| assert!(std::process::Command::new("git").arg("-C").arg(&project).args(args).status().unwrap().success());
    git(&["init", "-q"]);
    git(&["config", "core.hooksPath", "tools/hooks"]);
    let host = HostUser { name: "dev".into(), uid: 1000, gid: 1000, home: home.clone() };
    let mut req = request(&project);
    req.mounts.push(MountSpec::new(home.clone(), PathBuf::from("/h"), false).unwrap());
    let plan = SharePlan::new(&req, &host, &dir.path().join("meta")).unwrap();
    let protected = |tag: &str| plan.shares.iter().find(|s| s.backend.tag == tag).unwrap().backend.policy.protected_paths.clone();
    let in_project = protected("project");
    assert!(in_project.contains(&PathBuf::from("tools/hooks")), "{in_project:?}");
    assert!(in_project.contains(&PathBuf::from(".git/config")));
    assert!(!in_project.iter().any(|p| p.starts_with(".*")), "the home is not in the project");
    let in_home = protected("mount0");
    for expected in [".*", "proj/tools/hooks", ".cvm.toml"] {
        assert!(in_home.contains(&PathBuf::from(expected)), "{expected} not in {in_home:?}");
    }
    assert!(protected("meta").is_empty());
}

/// The quota is the session's: writable shares on one file system split it, so that a guest
/// cannot add a quota's worth to each of them.
#[test]
fn writable_shares_on_one_file_system_split_its_quota() {
    let dir = tempfile::tempdir().unwrap();
    let (home, project, data, docs) = (dir.path().join("home"), dir.path().join("proj"), dir.path().join("data"), dir.path().join("docs"));
    for d in [&home, &project, &data, &docs] {
        std::fs::create_dir_all(d).unwrap();
    }
    let host = HostUser { name: "dev".into(), uid: 1234, gid: 99, home };
    let mounts = vec![
        MountSpec { host: data.clone(), guest: "/data".into(), read_only: false },
        MountSpec { host: docs.clone(), guest: "/docs".into(), read_only: true },
    ];
    let request = ShareRequest { project: Some(project.clone()), mounts, quota: Some(9 << 30), ..ShareRequest::default() };
    let plan = SharePlan::new(&request, &host, &dir.path().join("meta")).unwrap();
    let quota = |dir: &Path| plan.shares.iter().find(|s| s.backend.dir == dir).unwrap().backend.policy.quota;
    let whole = share_quota(&project, None).unwrap();
    for writable in [&project, &data] {
        let split = quota(writable).unwrap();
        assert_eq!(split.bytes, (9 << 30) / 2, "{}", writable.display());
        // Free inodes are read twice, here and in the plan, while other processes make and
        // remove files: within 1% of half.
        assert!(whole.inodes == u64::MAX || split.inodes.abs_diff(whole.inodes / 2) <= whole.inodes / 100, "{split:?} of {whole:?}");
    }
    assert_eq!(quota(&docs), None, "a read-only share has no quota to take a part of");
}
