//! The files outside git's own directories that host programs take code or configuration from,
//! which no share may let the guest write: what the project's git configuration names (the
//! files it includes, `core.hooksPath`, programs given as paths), cvm's own files, and, when a
//! share holds the home directory, every dot-file directly in it (shell start-up files,
//! `~/.gitconfig`, `~/.ssh`, `~/.config`, `~/.cvm.toml`...). The fs servers keep them as the
//! host had them ([`cvm_backends::fs::Policy::protected_paths`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Git keys whose values are commands: `*` stands for one subsection name.
const COMMAND_KEYS: &[&str] = &[
    "core.fsmonitor",
    "core.sshcommand",
    "core.pager",
    "core.editor",
    "core.askpass",
    "core.gitproxy",
    "sequence.editor",
    "diff.external",
    "diff.*.command",
    "diff.*.textconv",
    "difftool.*.cmd",
    "mergetool.*.cmd",
    "merge.*.driver",
    "filter.*.clean",
    "filter.*.smudge",
    "filter.*.process",
    "gpg.program",
    "gpg.*.program",
    "credential.helper",
    "credential.*.helper",
    "pager.*",
    "alias.*",
    "uploadpack.packobjectshook",
    "interactive.difffilter",
];

/// A glob for every dot-name in a directory.
const DOT_NAMES: &str = ".*";

/// Whether git key `key` (as `git config --list` writes it, lower case but for subsection
/// names) matches `pattern`.
fn key_matches(pattern: &str, key: &str) -> bool {
    match pattern.split_once(".*") {
        Some((section, "")) => key.strip_prefix(section).is_some_and(|rest| rest.starts_with('.') && rest.len() > 1),
        Some((section, name)) => {
            key.strip_prefix(section).and_then(|rest| rest.strip_suffix(name)).is_some_and(|sub| sub.len() > 1 && sub.starts_with('.'))
        }
        None => key == pattern,
    }
}

/// `text` as a path: `~/` is `home`, a relative one is below `base`.
fn resolve(text: &str, base: &Path, home: &Path) -> PathBuf {
    match text.strip_prefix("~/") {
        Some(rest) => home.join(rest),
        None => base.join(text),
    }
}

/// The words of a command that name files: those with a `/` in them, quotes taken off.
fn path_words(command: &str) -> impl Iterator<Item = &str> {
    command.trim_start_matches('!').split_whitespace().map(|w| w.trim_matches(|c| c == '"' || c == '\'')).filter(|w| w.contains('/'))
}

/// Host git's output for `args`, run in `dir` (git reads configuration and runs nothing for
/// the commands used here).
fn git_output(dir: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git").arg("-C").arg(dir).args(args).stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// What the git configuration that applies in `project` names, resolved as git resolves each:
/// relative commands and hooks from the top of its work tree, includes from their file.
fn git_named_paths(project: &Path, home: &Path) -> Vec<PathBuf> {
    let Some(text) = git_output(project, &["config", "--list", "--show-origin", "--includes", "-z"]) else { return Vec::new() };
    let top = git_output(project, &["rev-parse", "--show-toplevel"]).map(|t| PathBuf::from(t.trim_end_matches('\n')));
    let worktree = top.as_deref().unwrap_or(project);
    let mut fields = text.split('\0');
    let mut paths = Vec::new();
    while let (Some(origin), Some(entry)) = (fields.next(), fields.next()) {
        let Some(file) = origin.strip_prefix("file:") else { continue };
        // Git names the files it found from the top of the work tree, where it went.
        let file = worktree.join(file);
        let (key, value) = entry.split_once('\n').unwrap_or((entry, ""));
        let file_dir = file.parent().unwrap_or(worktree).to_path_buf();
        if key == "include.path" || (key.starts_with("includeif.") && key.ends_with(".path")) {
            paths.push(resolve(value, &file_dir, home));
        } else if key == "core.hookspath" {
            let hooks = resolve(value, worktree, home);
            // husky's layout: the wrappers in `.husky/_` run the hooks written beside it.
            match hooks.parent().filter(|_| hooks.file_name().is_some_and(|n| n == "_")) {
                Some(parent) => paths.push(parent.to_path_buf()),
                None => paths.push(hooks),
            }
        } else if COMMAND_KEYS.iter().any(|p| key_matches(p, key)) {
            paths.extend(path_words(value).map(|w| resolve(w, worktree, home)));
        }
        paths.push(file);
    }
    paths
}

/// Every host path to protect for a session on `project` (absolute; the last component of a
/// path may be [`DOT_NAMES`]).
pub fn host_code_paths(project: Option<&Path>, home: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = project.map(|p| git_named_paths(p, home)).unwrap_or_default();
    paths.push(home.join(DOT_NAMES));
    paths.push(home.join(crate::host::CONFIG_FILE));
    for (variable, under_home) in [
        ("XDG_CONFIG_HOME", ".config"),
        ("XDG_CACHE_HOME", ".cache"),
        ("XDG_STATE_HOME", ".local/state"),
        ("XDG_DATA_HOME", ".local/share"),
    ] {
        paths.push(crate::xdg_dir(variable, under_home).join("cvm"));
    }
    // Taken by name, as git takes a configured path.
    let mut paths: Vec<PathBuf> = paths.iter().map(|p| crate::host::host_files::normalize(p)).collect();
    paths.sort();
    paths.dedup();
    paths
}

/// The paths of `paths` strictly inside the share `dir`, relative to it. A share that is
/// itself one of them (a `--mount` of `~/.config/cvm`, the conversations folder in
/// `~/.claude`) is what the user asked for, so a path protects only what is below a share.
pub fn within(paths: &[PathBuf], dir: &Path) -> Vec<PathBuf> {
    paths.iter().filter_map(|p| p.strip_prefix(dir).ok()).filter(|rel| !rel.as_os_str().is_empty()).map(Path::to_path_buf).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_keys_match_their_sections() {
        assert!(key_matches("core.fsmonitor", "core.fsmonitor"));
        assert!(!key_matches("core.fsmonitor", "core.fsmonitorhookversion"));
        assert!(key_matches("alias.*", "alias.st"));
        assert!(!key_matches("alias.*", "alias."));
        assert!(key_matches("filter.*.clean", "filter.lfs.clean"));
        assert!(key_matches("filter.*.clean", "filter.a.b.clean"), "a subsection with a dot");
        assert!(!key_matches("filter.*.clean", "filter.clean"));
        assert!(!key_matches("diff.*.command", "diff.command"));
    }

    #[test]
    fn words_with_a_slash_are_paths() {
        assert_eq!(path_words("!./scripts/z.sh --fast").collect::<Vec<_>>(), ["./scripts/z.sh"]);
        assert_eq!(path_words("sh 'tools/fsmon' x").collect::<Vec<_>>(), ["tools/fsmon"]);
        assert_eq!(path_words("less -R").count(), 0);
    }

    #[test]
    fn paths_protect_only_what_is_below_a_share() {
        let paths = [PathBuf::from("/h/.*"), PathBuf::from("/h/p/.husky/_"), PathBuf::from("/h/.claude")];
        assert_eq!(within(&paths, Path::new("/h")), [PathBuf::from(".*"), PathBuf::from("p/.husky/_"), PathBuf::from(".claude")]);
        assert_eq!(within(&paths, Path::new("/h/p")), [PathBuf::from(".husky/_")]);
        assert!(within(&paths, Path::new("/h/.claude")).is_empty(), "the share itself is the user's choice");
        assert!(within(&paths, Path::new("/h/pp")).is_empty());
        assert_eq!(crate::host::host_files::normalize(Path::new("/h/p/.git/../inc.cfg")), PathBuf::from("/h/p/inc.cfg"));
    }

    #[test]
    fn a_project_below_its_work_trees_top_resolves_from_the_top() {
        let dir = tempfile::tempdir().unwrap();
        let (home, top) = (dir.path().join("home"), dir.path().join("top"));
        std::fs::create_dir_all(top.join("sub")).unwrap();
        let git = |args: &[&str]| assert!(Command::new("git").arg("-C").arg(&top).args(args).status().unwrap().success());
        git(&["init", "-q"]);
        git(&["config", "core.hooksPath", "sub/hooks"]);
        let paths: Vec<PathBuf> = git_named_paths(&top.join("sub"), &home).iter().map(|p| crate::host::host_files::normalize(p)).collect();
        assert!(paths.contains(&top.join("sub/hooks")), "{paths:?}");
        assert!(paths.contains(&top.join(".git/config")), "{paths:?}");
    }

    #[test]
    fn what_the_projects_git_configuration_names_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let (home, project) = (dir.path().join("home"), dir.path().join("project"));
        std::fs::create_dir_all(project.join("conf")).unwrap();
        std::fs::create_dir_all(&home).unwrap();
        let git =
            |args: &[&str]| assert!(Command::new("git").arg("-C").arg(&project).args(args).env("HOME", &home).status().unwrap().success());
        git(&["init", "-q"]);
        git(&["config", "core.hooksPath", ".husky/_"]);
        git(&["config", "include.path", "../conf/git.inc"]);
        git(&["config", "includeIf.onbranch:x.path", "../conf/x.inc"]);
        git(&["config", "alias.z", "!./scripts/z.sh"]);
        std::fs::write(project.join("conf/git.inc"), "[core]\n\tfsmonitor = tools/fsmon\n").unwrap();
        let paths: Vec<PathBuf> = git_named_paths(&project, &home).iter().map(|p| crate::host::host_files::normalize(p)).collect();
        for expected in [".husky", "conf/git.inc", "conf/x.inc", "scripts/z.sh", "tools/fsmon", ".git/config"] {
            assert!(paths.contains(&project.join(expected)), "{expected} not in {paths:?}");
        }
    }
}
