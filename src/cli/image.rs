//! `cvm image build|ls|rm`: the cached root images.

use super::*;

#[derive(Subcommand)]
pub(crate) enum ImageCommand {
    /// Build an image (or reuse the cached build of the same recipe), with progress.
    Build {
        /// `debian` (Debian with Claude Code) or `minimal` (cvm-agent and busybox).
        #[arg(default_value = "debian")]
        name: String,
    },
    /// List the cached builds: name, recipe hash, size, and which one `--image NAME` uses.
    Ls,
    /// Remove cached builds that are not in use (`--all`: those in use too).
    Rm {
        /// Also the builds `--image NAME` uses now.
        #[arg(long)]
        all: bool,
    },
}

pub(crate) fn image_command(command: ImageCommand) -> anyhow::Result<ExitCode> {
    match command {
        ImageCommand::Build { name } => {
            // The recipe prints its progress on stderr and the image's path last on stdout.
            let status = std::process::Command::new(cvm::project::images::recipe(&name)?).status()?;
            Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        ImageCommand::Ls => {
            println!("{:<8} {:<17} {:>9}  PATH", "IMAGE", "RECIPE", "SIZE");
            for image in cvm::project::images::cached() {
                let mark = if image.current { " (current)" } else { "" };
                println!("{:<8} {:<17} {:>8}M  {}{mark}", image.name, image.key, image.bytes >> 20, image.path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Rm { all } => {
            for image in cvm::project::images::cached().into_iter().filter(|i| all || !i.current) {
                let dir = image.path.parent().expect("a build directory");
                std::fs::remove_dir_all(dir)?;
                println!("removed {} {}", image.name, image.key);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
