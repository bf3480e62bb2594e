//! Where the guest kernel and images are: built by the project's scripts into the cache, with
//! a `current` link to the latest build of each, else installed beside cvm (`scripts/install`,
//! the .deb, the container image: `<prefix>/lib/cvm/` for `<prefix>/bin/cvm`).
//!
//! An image is a root file system in one of two forms: an initramfs (the minimal image, a cpio
//! the kernel unpacks into memory) or a disk image (the Debian image, EROFS on a read-only
//! virtio-blk device). Which one a file is, is read from the file itself.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// `$XDG_CACHE_HOME/cvm`, else `~/.cache/cvm`: where scripts/build-* put their results.
pub fn cache_dir() -> PathBuf {
    crate::xdg_dir("XDG_CACHE_HOME", ".cache").join("cvm")
}

/// Where an installed cvm keeps its kernel, images and image recipe: `<prefix>/lib/cvm` for
/// `<prefix>/bin/cvm` (`/usr/lib/cvm` from the .deb).
pub fn installed_dir() -> Option<PathBuf> {
    let exe = crate::cvm_exe().ok()?;
    Some(exe.parent()?.parent()?.join("lib/cvm"))
}

/// The file an installed cvm ships as `name` in [`installed_dir`], if it does.
fn installed(name: &str) -> Option<PathBuf> {
    installed_dir().map(|dir| dir.join(name)).filter(|path| path.exists())
}

/// The cache's latest build (`<dir>/current/<file>`) when there is one, else the installed
/// `installed_name`; the cache's path when neither exists, for the error.
fn built_or_installed(dir: &str, file: &str, installed_name: &str) -> PathBuf {
    let cached = cache_dir().join(dir).join("current").join(file);
    match cached.exists() {
        true => cached,
        false => installed(installed_name).unwrap_or(cached),
    }
}

/// The guest kernel: `--kernel`, else `$CVM_KERNEL`, else the latest scripts/build-kernel, else
/// the installed one.
pub fn kernel(explicit: Option<PathBuf>) -> Result<PathBuf> {
    let path = explicit
        .or_else(|| std::env::var_os("CVM_KERNEL").map(PathBuf::from))
        .unwrap_or_else(|| built_or_installed("kernel", "vmlinux", "vmlinux"));
    if !path.exists() {
        bail!("no guest kernel at {}: build it with scripts/build-kernel or pass --kernel", path.display());
    }
    Ok(path)
}

/// A root image, by its form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Image {
    /// A cpio archive the kernel unpacks into memory; its `/init` is cvm-agent.
    Initramfs(PathBuf),
    /// An EROFS or ext4 file system served read-only as the guest's /dev/vda; its `/init` is
    /// cvm-agent, which lays a writable in-memory layer over it.
    Disk(PathBuf),
}

impl Image {
    /// Gives `vm` this image as its root: the initrd, or the first disk (read-only, the
    /// guest's /dev/vda) and the kernel arguments that mount it.
    pub fn configure(&self, vm: &mut cvm_vmm::VmConfig) {
        match self {
            Image::Initramfs(path) => vm.initrd = Some(path.clone()),
            Image::Disk(path) => {
                vm.disks.insert(0, cvm_vmm::DiskConfig { path: path.clone(), read_only: true });
                vm.cmdline.push_str(" root=/dev/vda ro init=/init");
            }
        }
    }
}

/// A built-in image: its name, the variable that overrides its path, where its recipe caches
/// builds (`<dir>/<recipe hash>/<file>`, with `<dir>/current` the latest), its file's name
/// where cvm is installed, and the recipe (in the source tree; installed beside the image).
struct Named {
    name: &'static str,
    variable: &'static str,
    dir: &'static str,
    file: &'static str,
    installed: &'static str,
    script: &'static str,
}

const NAMED: &[Named] = &[
    Named {
        name: "minimal",
        variable: "CVM_MINIMAL_IMAGE",
        dir: "initramfs",
        file: "initramfs.cpio",
        installed: "minimal.cpio",
        script: "scripts/build-initramfs",
    },
    Named {
        name: "debian",
        variable: "CVM_DEBIAN_IMAGE",
        dir: "images/debian",
        file: "root.erofs",
        installed: "debian.erofs",
        script: "scripts/build-image",
    },
];

fn named(name: &str) -> Option<&'static Named> {
    NAMED.iter().find(|n| n.name == name)
}

/// Whether `name` is one of cvm's own images (not a path).
pub fn is_named(name: &str) -> bool {
    named(name).is_some()
}

/// The smallest scratch disk `--disk` makes.
pub const MIN_SCRATCH: u64 = 64 << 20;

/// Makes a sparse, empty ext4 file system of `bytes` at `path`: a session's writable layer on
/// disk instead of in memory. No journal: it is thrown away with the session.
pub fn make_scratch_disk(path: &Path, bytes: u64) -> Result<()> {
    if bytes < MIN_SCRATCH {
        bail!("--disk must be at least {} MiB", MIN_SCRATCH >> 20);
    }
    std::fs::File::create(path).and_then(|f| f.set_len(bytes)).with_context(|| format!("cannot create {}", path.display()))?;
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^has_journal", "-E", "lazy_itable_init=1", "-m", "0"])
        .arg(path)
        .output()
        .context("cannot run mkfs.ext4 (Debian package e2fsprogs)")?;
    if !out.status.success() {
        bail!("mkfs.ext4 failed on {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A disk layered over a disk image: the agent finds it by the kernel argument that names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// A project's template, read-only, under the session's writable layer.
    Template,
    /// The session's writable layer on a scratch disk.
    Scratch,
}

impl Image {
    /// Adds `path` as `layer` over this image.
    pub fn add_layer(&self, vm: &mut cvm_vmm::VmConfig, path: &Path, layer: Layer) -> Result<()> {
        if let Image::Initramfs(image) = self {
            let what = if layer == Layer::Scratch { "--disk" } else { "a template" };
            bail!("{what} needs a disk image: {} is an initramfs, whose root is memory", image.display());
        }
        // virtio-blk disks are vda, vdb, ... in the order given.
        let letter = char::from(b'a' + vm.disks.len() as u8);
        let (read_only, arg) = match layer {
            Layer::Template => (true, "cvm.template"),
            Layer::Scratch => (false, "cvm.upper"),
        };
        vm.disks.push(cvm_vmm::DiskConfig { path: path.to_path_buf(), read_only });
        vm.cmdline.push_str(&format!(" {arg}=/dev/vd{letter}"));
        Ok(())
    }

    pub fn path(&self) -> &Path {
        match self {
            Image::Initramfs(p) | Image::Disk(p) => p,
        }
    }
}

/// One cached build of a named image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedImage {
    pub name: &'static str,
    /// The recipe's hash: the build's directory name.
    pub key: String,
    pub path: PathBuf,
    pub bytes: u64,
    /// What `--image NAME` uses.
    pub current: bool,
}

/// Every cached build of the named images, current ones first.
pub fn cached() -> Vec<CachedImage> {
    let mut out = Vec::new();
    for named in NAMED {
        let base = cache_dir().join(named.dir);
        let current = std::fs::read_link(base.join("current")).ok();
        let Ok(entries) = std::fs::read_dir(&base) else { continue };
        for entry in entries.flatten() {
            let path = entry.path().join(named.file);
            let key = entry.file_name().to_string_lossy().into_owned();
            if key == "current" || !path.is_file() {
                continue;
            }
            let bytes = path.metadata().map(|m| m.len()).unwrap_or(0);
            let is_current = current.as_deref() == Some(Path::new(&key));
            out.push(CachedImage { name: named.name, key, path, bytes, current: is_current });
        }
    }
    out.sort_by_key(|i| (i.name, !i.current, i.key.clone()));
    out
}

/// The recipe that builds a named image: in the source tree this cvm was built from, else
/// installed beside cvm (the .deb ships the Debian image's, with its agent).
pub fn recipe(name: &str) -> Result<PathBuf> {
    let named = named(name).with_context(|| format!("no image is called {name} (debian, minimal)"))?;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(named.script);
    if path.is_file() {
        return Ok(path);
    }
    let script = Path::new(named.script).file_name().expect("a recipe is a file");
    match installed(&script.to_string_lossy()) {
        Some(installed) => Ok(installed),
        None => bail!("no recipe for the {name} image: {} is gone and this installation has none", path.display()),
    }
}

/// The root image for `--image`: a name (`debian`, `minimal`) or a path to an image.
pub fn image(name: &str) -> Result<Image> {
    let path = match named(name) {
        Some(n) => {
            let path = std::env::var_os(n.variable).map(PathBuf::from).unwrap_or_else(|| built_or_installed(n.dir, n.file, n.installed));
            if !path.exists() {
                bail!("the {name} image is not built ({} is missing): run `cvm image build {name}` ({})", path.display(), n.script);
            }
            path
        }
        None => PathBuf::from(name),
    };
    if !path.exists() {
        bail!("no image at {}", path.display());
    }
    identify(&path)
}

/// Reads which form of image `path` is from its magic numbers.
fn identify(path: &Path) -> Result<Image> {
    let mut head = vec![0u8; 2048];
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let n = f.read(&mut head).with_context(|| format!("cannot read {}", path.display()))?;
    head.truncate(n);
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if at(0, b"070701") || at(0, b"070702") {
        return Ok(Image::Initramfs(path.to_path_buf()));
    }
    // EROFS: le32 0xE0F5E1E2 at 1024; ext2/3/4: le16 0xEF53 at 1080.
    if at(1024, &0xE0F5_E1E2u32.to_le_bytes()) || at(1080, &0xEF53u16.to_le_bytes()) {
        return Ok(Image::Disk(path.to_path_buf()));
    }
    bail!("{} is not an image cvm can boot: neither an initramfs (cpio) nor an EROFS or ext4 file system", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_known_by_their_contents() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[(usize, &[u8])]| {
            let mut data = vec![0u8; 4096];
            for (offset, b) in bytes {
                data[*offset..offset + b.len()].copy_from_slice(b);
            }
            let p = dir.path().join(name);
            std::fs::write(&p, data).unwrap();
            p
        };
        let cpio = write("a.cpio", &[(0, b"070701")]);
        let erofs = write("root.img", &[(1024, &0xE0F5_E1E2u32.to_le_bytes())]);
        let ext4 = write("disk", &[(1080, &0xEF53u16.to_le_bytes())]);
        let junk = write("junk.erofs", &[(0, b"hello")]);
        assert_eq!(image(cpio.to_str().unwrap()).unwrap(), Image::Initramfs(cpio.clone()));
        assert_eq!(image(erofs.to_str().unwrap()).unwrap(), Image::Disk(erofs.clone()));
        assert_eq!(image(ext4.to_str().unwrap()).unwrap(), Image::Disk(ext4));
        let err = image(junk.to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("not an image"), "{err}");
        let mut vm = cvm_vmm::VmConfig::new("/k");
        Image::Disk(erofs.clone()).configure(&mut vm);
        assert_eq!(vm.disks, [cvm_vmm::DiskConfig { path: erofs.clone(), read_only: true }]);
        assert!(vm.cmdline.ends_with(" root=/dev/vda ro init=/init") && vm.initrd.is_none());
        Image::Disk(erofs.clone()).add_layer(&mut vm, Path::new("/t"), Layer::Template).unwrap();
        Image::Disk(erofs).add_layer(&mut vm, Path::new("/s"), Layer::Scratch).unwrap();
        assert_eq!(vm.disks[1], cvm_vmm::DiskConfig { path: "/t".into(), read_only: true });
        assert_eq!(vm.disks[2], cvm_vmm::DiskConfig { path: "/s".into(), read_only: false });
        assert!(vm.cmdline.ends_with(" cvm.template=/dev/vdb cvm.upper=/dev/vdc"));
        assert!(Image::Initramfs(cpio.clone()).add_layer(&mut vm, Path::new("/s"), Layer::Scratch).is_err());
        std::fs::write(dir.path().join("short"), b"07").unwrap();
        assert!(image(dir.path().join("short").to_str().unwrap()).is_err());
        assert!(image("/no/such/image").unwrap_err().to_string().contains("/no/such/image"));
    }
}
