//! Assembles the micro-guests in tests/guests/ into PVH ELF files with the system assembler
//! and linker (binutils). The tests boot them; `cvm bench boot` embeds hello.elf.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install binutils and gcc: scripts/bootstrap)"));
    assert!(status.success(), "{cmd:?} failed");
}

fn main() {
    let src = Path::new("tests/guests");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap()).join("guests");
    std::fs::create_dir_all(&out).unwrap();
    println!("cargo:rerun-if-changed={}", src.display());
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let Some(stem) = name.strip_suffix(".S") else { continue };
        if stem == "common" {
            continue;
        }
        let object = out.join(format!("{stem}.o"));
        let elf = out.join(format!("{stem}.elf"));
        run(Command::new(&cc).args(["-c", "-m64", "-nostdlib", "-fno-pic", "-I"]).arg(src).arg("-o").arg(&object).arg(&path));
        run(Command::new("ld")
            .args(["-m", "elf_x86_64", "-static", "--build-id=none", "-z", "noexecstack", "-T"])
            .arg(src.join("guest.ld"))
            .arg("-o")
            .arg(&elf)
            .arg(&object));
    }
    println!("cargo:rustc-env=CVM_MICRO_GUESTS={}", out.display());
}
