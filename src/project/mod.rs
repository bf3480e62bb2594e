//! The project's side of a session: where the kernel and images are ([`images`]), its
//! template that `cvm setup` makes ([`template`]), and git worktrees per branch ([`worktree`]).

pub mod images;
pub mod template;
pub mod worktree;
