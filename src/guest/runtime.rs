//! What runs before every command of a project session: the runtime scripts, and the block in
//! the guest's `~/.claude/CLAUDE.md` that tells Claude what VM it is in.
//!
//! Runtime scripts (`./.cvm.runtime.sh` in the project, then each `--runtime-script`) are read
//! on the host and written into the guest at set-up. A prologue, run by `/bin/sh` in front of
//! the command, sources them in order in one shell (so what they export reaches the command),
//! stops at the first failure with its status, then writes the context block (what cvm knows,
//! then `~/.cvm/context/*.txt`, which runtime scripts may write) between marker comments in
//! `~/.claude/CLAUDE.md`, and finally execs the command.

use std::path::{Path, PathBuf};

use anyhow::Result;
use cvm_agent::protocol::{Exec, Step};

/// The project's own runtime script.
pub const PROJECT_SCRIPT: &str = ".cvm.runtime.sh";
/// Where the guest finds the scripts and the context text.
const GUEST_DIR: &str = "/run/cvm/runtime";

/// The prologue: `$0` is a name, the command follows. Every runtime script is sourced with
/// `set -e` (fail fast); the context block replaces the previous one in CLAUDE.md.
const PROLOGUE: &str = r#"set -e
for cvm_script in /run/cvm/runtime/*.sh; do
  [ -e "$cvm_script" ] || continue
  . "$cvm_script"
done
set +e
cvm_md="$HOME/.claude/CLAUDE.md"
mkdir -p "$HOME/.claude"
{
  [ -f "$cvm_md" ] && sed '/^<!-- cvm:begin -->$/,/^<!-- cvm:end -->$/d' "$cvm_md"
  echo '<!-- cvm:begin -->'
  cat /run/cvm/runtime/context.md
  for cvm_context in "$HOME"/.cvm/context/*.txt; do
    [ -e "$cvm_context" ] && { echo; cat "$cvm_context"; }
  done
  echo '<!-- cvm:end -->'
} > "$cvm_md.cvm" && mv "$cvm_md.cvm" "$cvm_md"
unset cvm_script cvm_md cvm_context
exec "$@"
"#;

/// A session's runtime scripts and context, as plain data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Runtime {
    /// (file name, contents), in the order they run.
    pub scripts: Vec<(String, Vec<u8>)>,
    /// What cvm tells Claude about the VM.
    pub context: String,
}

/// What the VM is, for the context block.
pub struct VmFacts<'a> {
    pub cpus: u8,
    pub memory_bytes: u64,
    pub project: &'a Path,
    /// (host path, guest path, read-only) of each share the user asked for.
    pub mounts: Vec<(PathBuf, PathBuf, bool)>,
    pub network: crate::network::egress::NetworkMode,
    /// The project's own words (`[context]`), after cvm's.
    pub instructions: Option<&'a str>,
}

impl Runtime {
    /// The project's runtime script (if it has one), then `extra` in order; the context block
    /// from `facts`.
    pub fn new(project: &Path, extra: &[PathBuf], facts: &VmFacts<'_>) -> Result<Runtime> {
        let mut scripts = Vec::new();
        let own = project.join(PROJECT_SCRIPT);
        let paths = own.is_file().then_some(own).into_iter().chain(extra.iter().cloned());
        for (index, path) in paths.enumerate() {
            let contents = crate::host::host_files::read(&path, Some(project), crate::host::host_files::MAX_PROJECT_FILE)?;
            scripts.push((format!("{index:02}.sh"), contents));
        }
        Ok(Runtime { scripts, context: context(facts) })
    }

    /// The files the guest's set-up writes.
    pub fn files(&self) -> Vec<Step> {
        let mut files: Vec<Step> = self
            .scripts
            .iter()
            .map(|(name, contents)| Step::File { target: format!("{GUEST_DIR}/{name}").into_bytes(), contents: contents.clone() })
            .collect();
        files.push(Step::File { target: format!("{GUEST_DIR}/context.md").into_bytes(), contents: self.context.clone().into_bytes() });
        files
    }

    /// Puts the prologue in front of `exec`'s command.
    pub fn wrap(&self, exec: &mut Exec) {
        let mut argv = vec![b"/bin/sh".to_vec(), b"-c".to_vec(), PROLOGUE.as_bytes().to_vec(), b"cvm".to_vec()];
        argv.append(&mut exec.argv);
        exec.argv = argv;
    }
}

/// The static part of the context block.
fn context(facts: &VmFacts<'_>) -> String {
    let mut text = String::from("## cvm: you are in a disposable microVM\n\n");
    text.push_str(&format!(
        "- {} vCPUs and {} MiB of memory; you may use `sudo`.\n\
         - The project `{}` is shared with the host: changes there are kept.\n\
         - Everything else you change (installed packages, files outside the shares, `~/.claude` \
         apart from this project's conversations) is discarded when the session ends.\n\
         - {}\n",
        facts.cpus,
        facts.memory_bytes >> 20,
        facts.project.display(),
        match facts.network {
            crate::network::egress::NetworkMode::Proxy => "No network interface: HTTP and HTTPS go through cvm's proxy on the host (HTTPS_PROXY is set), to allowed hosts only; others get 403.",
            crate::network::egress::NetworkMode::None => "No network at all: nothing outside this VM can be reached.",
            crate::network::egress::NetworkMode::Open => "An open network interface (eth0, through passt on the host): direct TCP and UDP to the internet, no proxy.",
        }
    ));
    for (host, guest, read_only) in &facts.mounts {
        text.push_str(&format!(
            "- `{}` is the host's `{}`, {}.\n",
            guest.display(),
            host.display(),
            if *read_only { "read-only" } else { "read-write" }
        ));
    }
    if let Some(instructions) = facts.instructions {
        text.push('\n');
        text.push_str(instructions.trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_run_in_order_and_the_context_says_what_the_vm_is() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(PROJECT_SCRIPT), "export A=1\n").unwrap();
        let extra = dir.path().join("more.sh");
        std::fs::write(&extra, "export B=2\n").unwrap();
        let facts = VmFacts {
            cpus: 2,
            memory_bytes: 512 << 20,
            project: dir.path(),
            mounts: vec![("/data".into(), "/mnt/data".into(), true)],
            network: crate::network::egress::NetworkMode::None,
            instructions: Some("Run `make check` before committing."),
        };
        let runtime = Runtime::new(dir.path(), &[extra], &facts).unwrap();
        assert_eq!(runtime.scripts, [("00.sh".to_string(), b"export A=1\n".to_vec()), ("01.sh".to_string(), b"export B=2\n".to_vec())]);
        assert!(runtime.context.contains("2 vCPUs and 512 MiB"), "{}", runtime.context);
        assert!(runtime.context.contains("`/mnt/data` is the host's `/data`, read-only"), "{}", runtime.context);
        assert!(runtime.context.contains("No network at all"), "{}", runtime.context);
        assert!(runtime.context.ends_with("\nRun `make check` before committing.\n"), "{}", runtime.context);
        let files = runtime.files();
        assert_eq!(files.len(), 3);
        assert!(matches!(&files[2], Step::File { target, .. } if target == b"/run/cvm/runtime/context.md"));

        let mut exec = Exec { argv: vec![b"make".to_vec(), b"test".to_vec()], ..Exec::default() };
        runtime.wrap(&mut exec);
        assert_eq!(exec.argv[0], b"/bin/sh");
        assert_eq!(exec.argv[3..], [b"cvm".to_vec(), b"make".to_vec(), b"test".to_vec()]);
        assert!(PROLOGUE.contains("<!-- cvm:begin -->") && PROLOGUE.contains("<!-- cvm:end -->"));
        assert!(PROLOGUE.contains(GUEST_DIR));

        let missing = Runtime::new(dir.path(), &[dir.path().join("nope.sh")], &facts).unwrap_err();
        assert!(format!("{missing:#}").contains("nope.sh"));
        let none = Runtime::new(&dir.path().join("elsewhere"), &[], &facts).unwrap();
        assert!(none.scripts.is_empty(), "a project without the script runs none");
    }
}
