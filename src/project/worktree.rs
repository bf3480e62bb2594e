//! `cvm worktree create|list|remove` and `cvm run --worktree BRANCH`: a git worktree per
//! branch beside the main repository (`<parent>/<repo>-<branch>`, slashes in the branch name
//! becoming `-`), so an agent works on its own branch in its own VM while the main checkout
//! stays untouched. Worktrees share their main repository's template (see `template`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// A worktree as `git worktree list --porcelain` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Worktree {
    pub path: PathBuf,
    /// `None` when detached.
    pub branch: Option<String>,
}

/// The main checkout of the repository (or worktree) containing `dir`, which may be any
/// directory inside it: git knows, where `shares::main_repository` reads a worktree's `.git`
/// file.
pub fn main_checkout(dir: &Path) -> Result<PathBuf> {
    let common = git(dir, &["rev-parse", "--path-format=absolute", "--git-common-dir"])?;
    let common = PathBuf::from(common.trim());
    match common.file_name() {
        Some(name) if name == ".git" => Ok(common.parent().expect("a .git directory has a parent").to_path_buf()),
        _ => bail!("{} is not in a git repository with a working tree", dir.display()),
    }
}

/// Where the worktree of `branch` goes for the repository at `main`.
pub fn path_for(main: &Path, branch: &str) -> PathBuf {
    let repo = main.file_name().map_or_else(|| "repo".into(), |n| n.to_string_lossy().into_owned());
    let branch: String = branch.chars().map(|c| if c == '/' { '-' } else { c }).collect();
    main.with_file_name(format!("{repo}-{branch}"))
}

/// The worktrees of the repository containing `dir`, the main one first.
pub fn list(dir: &Path) -> Result<Vec<Worktree>> {
    let out = git(dir, &["worktree", "list", "--porcelain"])?;
    Ok(parse_list(&out))
}

fn parse_list(porcelain: &str) -> Vec<Worktree> {
    let mut worktrees = Vec::new();
    for block in porcelain.split("\n\n") {
        let mut path = None;
        let mut branch = None;
        for line in block.lines() {
            if let Some(p) = line.strip_prefix("worktree ") {
                path = Some(PathBuf::from(p));
            } else if let Some(b) = line.strip_prefix("branch ") {
                branch = Some(b.strip_prefix("refs/heads/").unwrap_or(b).to_string());
            }
        }
        if let Some(path) = path {
            worktrees.push(Worktree { path, branch });
        }
    }
    worktrees
}

/// The worktree of `branch`, made if there is none: from the existing branch, or a new branch
/// from `base` (default: the current HEAD).
pub fn create(dir: &Path, branch: &str, base: Option<&str>) -> Result<PathBuf> {
    check_branch(dir, branch)?;
    if let Some(existing) = list(dir)?.into_iter().find(|w| w.branch.as_deref() == Some(branch)) {
        return Ok(existing.path);
    }
    let main = main_checkout(dir)?;
    let path = path_for(&main, branch);
    if path.exists() {
        bail!("{} already exists and is not the worktree of {branch}", path.display());
    }
    let path_str = path.to_str().context("the worktree path is not UTF-8")?;
    let branch_exists = git(&main, &["rev-parse", "--verify", "--quiet", &format!("refs/heads/{branch}")]).is_ok();
    if branch_exists {
        if base.is_some() {
            bail!("the branch {branch} exists already: a base applies only to a new branch");
        }
        git(&main, &["worktree", "add", path_str, branch])?;
    } else {
        git(&main, &["worktree", "add", "-b", branch, path_str, base.unwrap_or("HEAD")])?;
    }
    Ok(path)
}

/// Removes the worktree of `branch` (the branch itself stays). Refused while it has changes
/// unless `force`.
pub fn remove(dir: &Path, branch: &str, force: bool) -> Result<PathBuf> {
    let Some(worktree) = list(dir)?.into_iter().skip(1).find(|w| w.branch.as_deref() == Some(branch)) else {
        bail!("no worktree of {branch} (cvm worktree list shows them)");
    };
    let path = worktree.path.to_str().context("the worktree path is not UTF-8")?;
    let mut args = vec!["worktree", "remove"];
    if force {
        args.push("--force");
    }
    args.push(path);
    git(dir, &args)?;
    Ok(worktree.path)
}

fn check_branch(dir: &Path, branch: &str) -> Result<()> {
    if branch.starts_with('-') || git(dir, &["check-ref-format", "--branch", branch]).is_err() {
        bail!("{branch:?} is not a valid branch name");
    }
    Ok(())
}

/// Runs git in `dir`; its output, or its error message.
fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git").arg("-C").arg(dir).args(args).output().context("cannot run git (Debian package git)")?;
    if !out.status.success() {
        bail!("git {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git_ok(dir: &Path, args: &[&str]) {
        let status = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .status()
            .unwrap();
        assert!(status.success(), "git {args:?}");
    }

    #[test]
    fn porcelain_lists() {
        let text = "worktree /src/app\nHEAD abc\nbranch refs/heads/main\n\nworktree /src/app-fix\nHEAD def\ndetached\n\n";
        assert_eq!(
            parse_list(text),
            [Worktree { path: "/src/app".into(), branch: Some("main".into()) }, Worktree { path: "/src/app-fix".into(), branch: None }]
        );
        assert_eq!(path_for(Path::new("/src/app"), "feature/login"), Path::new("/src/app-feature-login"));
    }

    #[test]
    fn create_list_and_remove_a_worktree() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("app");
        std::fs::create_dir(&main).unwrap();
        git_ok(&main, &["init", "-q", "-b", "main"]);
        std::fs::write(main.join("README"), "hi\n").unwrap();
        git_ok(&main, &["add", "README"]);
        git_ok(&main, &["commit", "-q", "-m", "first"]);

        let path = create(&main, "feature/x", None).unwrap();
        assert_eq!(path, dir.path().join("app-feature-x"));
        assert!(path.join("README").is_file());
        assert_eq!(create(&path, "feature/x", None).unwrap(), path, "asking again, even from inside, finds it");
        assert_eq!(main_checkout(&path).unwrap(), main.canonicalize().unwrap());
        let branches: Vec<Option<String>> = list(&main).unwrap().into_iter().map(|w| w.branch).collect();
        assert_eq!(branches, [Some("main".into()), Some("feature/x".into())]);

        for bad in ["-x", "a..b", "with space", ""] {
            assert!(create(&main, bad, None).is_err(), "{bad:?}");
        }
        std::fs::write(path.join("README"), "changed\n").unwrap();
        assert!(remove(&main, "feature/x", false).is_err(), "a worktree with changes stays unless forced");
        assert_eq!(remove(&main, "feature/x", true).unwrap(), path);
        assert!(!path.exists());
        assert!(remove(&main, "main", true).is_err(), "the main checkout is never removed");
    }
}
