//! KVM's state of a VM: the VM and its memory slots (`vm`), guest RAM (`memory`), the vCPU
//! threads (`vcpu`) and KVM's per-vCPU statistics (`exit_stats`).

pub mod exit_stats;
pub mod memory;
pub(crate) mod vcpu;
pub(crate) mod vm;
