//! What cvm reads of the host it runs on: the environment commands get ([`environment`]),
//! files the guest may have written, read without being led out ([`host_files`]), and the
//! user's terminal ([`terminal`]).

pub mod environment;
pub mod host_files;
pub mod terminal;
