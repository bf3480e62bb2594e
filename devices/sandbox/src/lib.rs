//! What confines cvm's threads and helper processes, for the VMM and the backends alike.
//!
//! - [`seccomp`]: the system calls each role (VMM, fs and vsock backends, listeners, relays,
//!   janitor) may make.
//! - [`process`]: helper processes given descriptors at fixed numbers, dying with cvm.

pub mod process;
pub mod seccomp;
