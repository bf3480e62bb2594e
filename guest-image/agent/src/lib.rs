//! cvm-agent: the guest's PID 1 and exec server, and the protocol the host speaks to it.
//!
//! The binary (`main.rs`) is the agent; the host side (`cvm`) uses [`protocol`] from here so
//! both ends share one definition of the frames.

pub mod fs_workloads;
pub mod protocol;
