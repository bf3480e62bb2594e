//! `cvm worktree create|list|remove`.

use super::*;

#[derive(Subcommand)]
pub(crate) enum WorktreeCommand {
    /// Make the worktree of BRANCH (a new branch from BASE, default HEAD, if it does not
    /// exist) at <repo>-<branch> beside the main checkout; prints its path.
    Create { branch: String, base: Option<String> },
    /// List the repository's worktrees: path and branch.
    List,
    /// Remove the worktree of BRANCH (the branch stays).
    Remove {
        branch: String,
        /// Even with uncommitted changes.
        #[arg(long)]
        force: bool,
    },
}

pub(crate) fn worktree_command(command: WorktreeCommand) -> anyhow::Result<()> {
    let here = std::env::current_dir()?;
    match command {
        WorktreeCommand::Create { branch, base } => {
            println!("{}", cvm::project::worktree::create(&here, &branch, base.as_deref())?.display())
        }
        WorktreeCommand::List => {
            for w in cvm::project::worktree::list(&here)? {
                println!("{}  {}", w.path.display(), w.branch.as_deref().unwrap_or("(detached)"));
            }
        }
        WorktreeCommand::Remove { branch, force } => {
            println!("removed {}", cvm::project::worktree::remove(&here, &branch, force)?.display())
        }
    }
    Ok(())
}
