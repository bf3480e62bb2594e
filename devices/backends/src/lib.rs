//! cvm's host-side backends: what serves a guest's virtio devices from outside the VMM, over
//! vhost-user. The VMM does not link this crate; the session starts these backends (the fs one
//! as its own sandboxed process) and hands the VMM their sockets.
//!
//! - [`fs`]: the virtio-fs backend (virtiofsd's server), its share rules and its sandbox.
//! - [`vsock`]: the vsock backend and its host Unix-socket muxer.

pub mod fs;
pub mod vsock;
