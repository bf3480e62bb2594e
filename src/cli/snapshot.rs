//! `cvm snapshot ls|rm`: the warm-start snapshots ([`cvm::session::warm`]).

use std::process::ExitCode;
use std::time::SystemTime;

#[derive(clap::Subcommand)]
pub(crate) enum SnapshotCommand {
    /// List the warm-start snapshots, most recently used first: key, room taken on disk, when
    /// last used, path.
    Ls,
    /// Remove warm-start snapshots: those named, or all of them. The next session of their
    /// kind boots cold and makes its snapshot again.
    Rm {
        #[arg(required_unless_present = "all")]
        keys: Vec<String>,
        #[arg(long, conflicts_with = "keys")]
        all: bool,
    },
}

pub(crate) fn snapshot_command(command: SnapshotCommand) -> anyhow::Result<ExitCode> {
    match command {
        SnapshotCommand::Ls => {
            println!("{:<17} {:>9}  {:<12} PATH", "KEY", "SIZE", "USED");
            for entry in cvm::session::warm::list() {
                let ago = SystemTime::now().duration_since(entry.used).unwrap_or_default().as_secs();
                let used = match ago {
                    0..=59 => format!("{ago} s ago"),
                    60..=3599 => format!("{} min ago", ago / 60),
                    3600..=86399 => format!("{} h ago", ago / 3600),
                    _ => format!("{} days ago", ago / 86400),
                };
                println!("{:<17} {:>8}M  {used:<12} {}", entry.key, entry.disk_bytes >> 20, entry.path.display());
            }
        }
        SnapshotCommand::Rm { keys, all } => {
            let keys = if all { cvm::session::warm::list().into_iter().map(|e| e.key).collect() } else { keys };
            for key in keys {
                cvm::session::warm::remove(&key)?;
                println!("removed {key}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
