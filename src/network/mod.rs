//! The guest's only ways out, each decided on the host: the egress proxy and its allow-list
//! ([`egress`]), TLS interception that swaps placeholders for secrets ([`interception`],
//! [`secrets`]), published ports, host ports and agents relayed over vsock ([`forward`]), and
//! passt for `--network open` ([`open_network`]), all through the VM's vsock socket
//! ([`vsock`]). [`loopback_https`] is a loopback HTTPS server
//! for the proxy's bench and tests.

pub mod egress;
pub mod forward;
pub mod interception;
pub mod loopback_https;
pub mod open_network;
pub mod secrets;
pub mod vsock;
