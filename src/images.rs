//! Where the guest kernel and images are: built by the project's scripts into the cache, with
//! a `current` link to the latest build of each.

use std::path::PathBuf;

use anyhow::{bail, Result};

/// `$XDG_CACHE_HOME/cvm`, else `~/.cache/cvm`: where scripts/build-* put their results.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("cvm")
}

/// The guest kernel: `--kernel`, else `$CVM_KERNEL`, else the latest scripts/build-kernel.
pub fn kernel(explicit: Option<PathBuf>) -> Result<PathBuf> {
    let path = explicit
        .or_else(|| std::env::var_os("CVM_KERNEL").map(PathBuf::from))
        .unwrap_or_else(|| cache_dir().join("kernel/current/vmlinux"));
    if !path.exists() {
        bail!("no guest kernel at {}: build it with scripts/build-kernel or pass --kernel", path.display());
    }
    Ok(path)
}

/// The root image for `--image`: `minimal` is the initramfs scripts/build-initramfs makes
/// (or `$CVM_MINIMAL_IMAGE`); anything else is a path to an initramfs.
pub fn image(name: &str) -> Result<PathBuf> {
    let path = match name {
        "minimal" => std::env::var_os("CVM_MINIMAL_IMAGE")
            .map(PathBuf::from)
            .unwrap_or_else(|| cache_dir().join("initramfs/current/initramfs.cpio")),
        other => PathBuf::from(other),
    };
    if !path.exists() {
        if name == "minimal" {
            bail!("the minimal image is not built ({} is missing): run scripts/build-initramfs", path.display());
        }
        bail!("no image at {}", path.display());
    }
    Ok(path)
}
