//! Per-project templates. `cvm setup` runs a session whose writable layer is a scratch disk,
//! installs what the project needs there (Debian packages in one batched `apt-get install`,
//! through the egress proxy, then the user's setup scripts), and keeps that disk as the
//! project's template: a read-only layer between the image and every later session's own
//! writable layer. A failed setup keeps nothing.
//!
//! Templates live in `$XDG_CACHE_HOME/cvm/templates/<hash of the project path>/`: `layer.ext4`,
//! and `base`, the image it was made on (a template over another image is not used).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// `cvm setup --NAME` and the Debian packages each brings.
pub const CAPABILITIES: &[Capability] = &[
    Capability { name: "node", about: "Node.js and npm", packages: &["nodejs", "npm"] },
    Capability { name: "python", about: "Python 3 with pip and venv", packages: &["python3", "python3-pip", "python3-venv"] },
    Capability { name: "rust", about: "Rust (Debian's cargo and rustc)", packages: &["cargo", "rustc"] },
    Capability { name: "docker", about: "Docker (docker.io)", packages: &["docker.io"] },
    Capability { name: "chromium", about: "Chromium", packages: &["chromium"] },
    Capability { name: "gh", about: "GitHub's CLI (gh)", packages: &["gh"] },
    Capability { name: "git", about: "Git (already in the image)", packages: &["git"] },
    Capability { name: "gpg", about: "GnuPG", packages: &["gnupg"] },
];

/// A tool `cvm setup` installs: its flag and `[tools]` key, what it is, its Debian packages.
pub struct Capability {
    pub name: &'static str,
    pub about: &'static str,
    pub packages: &'static [&'static str],
}
/// The user's own setup scripts: in the home, then in the project.
pub const HOME_SCRIPT: &str = ".cvm.setup.sh";
/// The size of a template's disk (sparse: it takes what is written).
pub const LAYER_BYTES: u64 = 16 << 30;

/// The directory of `project`'s template (for a git worktree, its main repository's, so the
/// worktrees of one repository share it).
pub fn dir_for(project: &Path) -> PathBuf {
    let owner = crate::guest::shares::main_repository(project).unwrap_or_else(|| project.to_path_buf());
    let key = fnv_hash(owner.to_string_lossy().as_bytes());
    crate::project::images::cache_dir().join("templates").join(key)
}

/// A short, stable hash for directory names (FNV-1a, 64 bits).
fn fnv_hash(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{hash:016x}")
}

/// The template layer to use for `project` over `image`, if there is one made on that image.
pub fn find(project: &Path, image: &Path) -> Option<PathBuf> {
    let dir = dir_for(project);
    let layer = dir.join("layer.ext4");
    let base = std::fs::read_to_string(dir.join("base")).ok()?;
    let image = image.canonicalize().ok()?;
    if Path::new(base.trim()) != image {
        eprintln!("cvm: the project's template was made on another image; run `cvm setup` again to use it");
        return None;
    }
    layer.is_file().then_some(layer)
}

/// The command `cvm setup` runs as the user (`sudo` for apt): one batched install, then each
/// setup script's text, evaluated in the same shell, failing fast. All of it is progress, so
/// its output goes to standard error: with `--auto-setup`, standard output is the command's.
pub fn command(packages: &[String], scripts: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut s = String::from("set -e\nexec >&2\n");
    if !packages.is_empty() {
        s.push_str("echo 'cvm setup: installing Debian packages' >&2\n");
        s.push_str("sudo -E apt-get update -q\n");
        s.push_str(&format!(
            "sudo -E DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {}\n",
            packages.join(" ")
        ));
        s.push_str("sudo apt-get clean\n");
    }
    s.push_str("for cvm_setup_script in \"$@\"; do echo 'cvm setup: running a setup script' >&2; eval \"$cvm_setup_script\"; done\n");
    let mut argv = vec![b"/bin/sh".to_vec(), b"-c".to_vec(), s.into_bytes(), b"cvm-setup".to_vec()];
    argv.extend(scripts.iter().cloned());
    argv
}

/// The packages for the capability flags and `--package`s, in order, once each.
pub fn packages(capabilities: &[&str], extra: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in capabilities {
        for capability in CAPABILITIES.iter().filter(|c| c.name == *name) {
            out.extend(capability.packages.iter().map(|p| p.to_string()));
        }
    }
    out.extend(extra.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    out
}

/// Keeps a finished setup's disk as the project's template, replacing the old one.
pub fn keep(project: &Path, layer: &Path, image: &Path) -> Result<PathBuf> {
    let dir = dir_for(project);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let image = image.canonicalize()?;
    std::fs::write(dir.join("base"), image.to_string_lossy().as_bytes())?;
    std::fs::write(dir.join("project"), project.to_string_lossy().as_bytes())?;
    std::fs::rename(layer, dir.join("layer.ext4")).with_context(|| format!("cannot keep the template in {}", dir.display()))?;
    Ok(dir.join("layer.ext4"))
}

/// One kept template, as `cvm list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pub dir: PathBuf,
    /// The project it was made for.
    pub project: PathBuf,
    /// What its disk takes on the host (it is sparse).
    pub bytes: u64,
    /// The image it was made on.
    pub base: PathBuf,
}

impl Template {
    /// Its project is gone, or its image is no longer the one `--image` would use.
    pub fn unused(&self, current_image: Option<&Path>) -> bool {
        !self.project.is_dir() || current_image.is_some_and(|i| i.canonicalize().ok().as_deref() != Some(self.base.as_path()))
    }
}

/// Every kept template.
pub fn list() -> Vec<Template> {
    let Ok(entries) = std::fs::read_dir(crate::project::images::cache_dir().join("templates")) else { return Vec::new() };
    let mut out: Vec<Template> = entries
        .flatten()
        .filter_map(|e| {
            let dir = e.path();
            let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok().map(|s| PathBuf::from(s.trim()));
            let bytes = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(dir.join("layer.ext4")).ok()?) * 512;
            Some(Template { project: read("project")?, base: read("base")?, bytes, dir })
        })
        .collect();
    out.sort_by(|a, b| a.project.cmp(&b.project));
    out
}

/// Removes a template.
pub fn remove(template: &Template) -> Result<()> {
    std::fs::remove_dir_all(&template.dir).with_context(|| format!("cannot remove {}", template.dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_are_batched_once_each() {
        assert_eq!(packages(&["python", "git"], &["git".into(), "tree".into()]), ["python3", "python3-pip", "python3-venv", "git", "tree"]);
        assert!(packages(&[], &[]).is_empty());
        let argv = command(&["tree".into()], &[b"echo one".to_vec()]);
        let s = String::from_utf8(argv[2].clone()).unwrap();
        assert!(s.starts_with("set -e\nexec >&2\n"), "fail fast, progress on stderr");
        assert_eq!(s.matches("apt-get install").count(), 1, "one batched install");
        assert!(s.contains("--no-install-recommends tree\n"));
        assert_eq!(argv[3..], [b"cvm-setup".to_vec(), b"echo one".to_vec()]);
        assert!(!String::from_utf8(command(&[], &[])[2].clone()).unwrap().contains("apt-get"), "nothing to install, no apt");
    }

    #[test]
    fn the_worktrees_of_a_repository_share_its_template() {
        let dir = tempfile::tempdir().unwrap();
        let (main, wt) = crate::guest::shares::fake_worktree(dir.path());
        assert_eq!(dir_for(&wt), dir_for(&main.canonicalize().unwrap()));
        assert_ne!(dir_for(&wt), dir_for(dir.path()));
    }

    #[test]
    fn a_template_is_used_only_over_the_image_it_was_made_on() {
        let cache = tempfile::tempdir().unwrap();
        std::env::set_var("XDG_CACHE_HOME", cache.path());
        let project = cache.path().join("p");
        std::fs::create_dir_all(&project).unwrap();
        let (image, other) = (cache.path().join("image"), cache.path().join("other"));
        std::fs::write(&image, "i").unwrap();
        std::fs::write(&other, "o").unwrap();
        assert_eq!(find(&project, &image), None);
        let layer = cache.path().join("layer.tmp");
        std::fs::write(&layer, "l").unwrap();
        let kept = keep(&project, &layer, &image).unwrap();
        assert_eq!(find(&project, &image), Some(kept));
        assert_eq!(find(&project, &other), None, "made on another image");
        assert_ne!(dir_for(&project), dir_for(&other), "one template per project");
        let listed = list();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].project, project);
        assert!(!listed[0].unused(Some(&image)) && listed[0].unused(Some(&other)));
        remove(&listed[0]).unwrap();
        assert!(list().is_empty());
    }
}
