//! What cvm reads of the host it runs on: the environment commands get ([`environment`]),
//! files the guest may have written, read without being led out ([`host_files`]), and the
//! user's terminal ([`terminal`]).

pub mod environment;
pub mod host_files;
pub mod terminal;

/// The name of cvm's configuration files (`~/.cvm.toml`, a project's `.cvm.toml`): the
/// configuration reads them, and no share lets the guest write the user's own.
pub const CONFIG_FILE: &str = ".cvm.toml";
