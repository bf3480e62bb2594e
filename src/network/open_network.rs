//! `--network open`: the guest gets a virtio-net interface whose wire is passt (Debian's
//! `passt` package), a userspace network stack that runs unprivileged and turns the guest's
//! TCP, UDP and ICMP into ordinary sockets of the host. Weaker than the proxy: any host and
//! port the host can reach, with no allow-list and no audit log; for tools that need raw TCP
//! (`git push` over ssh). The host's own loopback stays out of reach (`--host-port` is the
//! way there).
//!
//! cvm listens on a socket in the session directory; the engine (cvm's VMM or QEMU's
//! `-netdev stream`) connects to it, and the connection itself becomes passt's wire (`--fd`),
//! so frames go straight between the two without passing through cvm.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use cvm_agent::protocol::Step;
use cvm_vmm::NetConfig;

/// The guest's side of the link, as QEMU's user networking numbers it.
pub const GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const PREFIX_LEN: u8 = 24;
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// passt answers DNS queries sent here with the host's resolver.
pub const NAMESERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// A locally administered unicast address.
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// Jumbo frames: under QEMU's software CPU a download ran about 4 to 10 times faster than at
/// 1500 (fewer frames, each costing the same), and larger MTUs measured slower again. Frames
/// over one RX buffer arrive in mergeable buffers, which both engines' devices offer.
pub const MTU: u16 = 9000;
/// passt's wire in its process: the first descriptor after stdio.
const WIRE_FD: i32 = 3;

/// The host end of an open network: the socket the engine connects to, and passt once it has.
pub struct OpenNetwork {
    socket: PathBuf,
    passt: Arc<Mutex<Option<Child>>>,
}

impl OpenNetwork {
    /// Listens at `net.sock` in `dir`; the first connection gets a passt of its own.
    pub fn start(dir: &Path) -> Result<OpenNetwork> {
        let program = find_program("passt").context("--network open needs passt (Debian package passt; scripts/bootstrap installs it)")?;
        let socket = dir.join("net.sock");
        let listener = UnixListener::bind(&socket).with_context(|| format!("cannot listen on {}", socket.display()))?;
        let passt = Arc::new(Mutex::new(None));
        let slot = passt.clone();
        std::thread::spawn(move || {
            let wire = match listener.accept() {
                Ok((wire, _)) => wire,
                Err(e) => return tracing::warn!("--network open: the engine did not connect: {e}"),
            };
            match spawn_passt(&program, wire.as_raw_fd()) {
                Ok(child) => *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(child),
                Err(e) => tracing::warn!("--network open: cannot start passt: {e}"),
            }
            // passt holds its own copy of the wire now.
            drop(wire);
        });
        Ok(OpenNetwork { socket, passt })
    }

    /// The VM's virtio-net device.
    pub fn device(&self) -> NetConfig {
        NetConfig { socket: self.socket.clone(), mac: GUEST_MAC }
    }

    /// The agent's step that addresses the guest's interface.
    pub fn step() -> Step {
        Step::Network { address: GUEST_ADDRESS, prefix_len: PREFIX_LEN, gateway: GATEWAY, nameserver: NAMESERVER, mtu: MTU }
    }
}

impl Drop for OpenNetwork {
    fn drop(&mut self) {
        // passt also leaves by itself once the engine's end of the wire closes.
        if let Some(mut child) = self.passt.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// passt's arguments: the guest's static addressing, no mapping of the gateway address to the
/// host's loopback, no inbound ports (`-p` goes over vsock), and quiet in the foreground.
pub fn passt_arguments() -> Vec<String> {
    let mut args: Vec<String> = ["--foreground", "--quiet", "--one-off", "--no-map-gw"].map(String::from).to_vec();
    args.extend(["--fd".into(), WIRE_FD.to_string()]);
    args.extend(["--address".into(), GUEST_ADDRESS.to_string(), "--netmask".into(), PREFIX_LEN.to_string()]);
    args.extend(["--gateway".into(), GATEWAY.to_string(), "--dns-forward".into(), NAMESERVER.to_string()]);
    args.extend(["--tcp-ports".into(), "none".into(), "--udp-ports".into(), "none".into()]);
    args
}

fn spawn_passt(program: &Path, wire: i32) -> std::io::Result<Child> {
    let mut command = Command::new(program);
    command.args(passt_arguments()).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // No PDEATHSIG: it would fire when this short-lived thread ends. passt leaves when the
    // engine's end of the wire closes, which cvm's death closes too (its VMM holds the end,
    // or QEMU, which dies with cvm).
    cvm_sandbox::process::pass_fd(&mut command, wire, WIRE_FD);
    command.spawn()
}

/// `name` on `$PATH`.
fn find_program(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    match std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file()) {
        Some(found) => Ok(found),
        None => bail!("{name} is not installed"),
    }
}
