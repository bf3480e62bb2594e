//! Streams between the guest and the host that are not execs: the egress relay (guest
//! 127.0.0.1:[`PROXY_PORT`] to the host's proxy), relays the host asked for at set-up (a port
//! on the host's loopback, the host's SSH agent), and forwards of published ports into the
//! guest. The guest has no other route out: every byte goes over vsock to cvm.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

use cvm_agent::protocol::{Listen, PROXY_PORT};

use crate::transport::{self, Address};

/// The egress relay, always there: 127.0.0.1:PROXY_PORT to the host's proxy.
pub fn start_egress() -> io::Result<()> {
    start(&Listen::Tcp(PROXY_PORT as u16), PROXY_PORT, None)
}

/// Relays every connection to `listen` to the host's vsock `host_port`, on its own thread. A
/// Unix socket is given to `owner` (uid, gid) and only it may use it.
pub fn start(listen: &Listen, host_port: u32, owner: Option<(u32, u32)>) -> io::Result<()> {
    let accept: Box<dyn Fn() -> io::Result<File> + Send> = match listen {
        Listen::Tcp(port) => {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, *port))?;
            Box::new(move || listener.accept().map(|(s, _)| File::from(OwnedFd::from(s))))
        }
        Listen::Unix(path) => {
            let path = Path::new(OsStr::from_bytes(path));
            // A directory made for the socket is the owner's alone (gpg insists on that for
            // its home).
            if let Some(dir) = path.parent().filter(|d| !d.exists()) {
                std::fs::create_dir_all(dir)?;
                std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
                }
            }
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path)?;
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
            }
            Box::new(move || listener.accept().map(|(s, _)| File::from(OwnedFd::from(s))))
        }
    };
    std::thread::spawn(move || loop {
        let Ok(guest) = accept() else { continue };
        std::thread::spawn(move || match transport::connect(&Address::Vsock { cid: libc::VMADDR_CID_HOST, port: host_port }) {
            Ok(host) => splice(guest, host),
            Err(e) => crate::debug(&format!("relay to host port {host_port}: {e}")),
        });
    });
    Ok(())
}

/// Connects to 127.0.0.1:`port` in the guest, for a published port.
pub fn connect_local(port: u16) -> io::Result<File> {
    Ok(File::from(OwnedFd::from(TcpStream::connect((Ipv4Addr::LOCALHOST, port))?)))
}

/// Copies both ways until each side ends, passing each end on.
pub fn splice(a: File, b: File) {
    let (Ok(a_read), Ok(b_read)) = (a.try_clone(), b.try_clone()) else { return };
    let forward = std::thread::spawn(move || copy_then_close(a_read, b));
    copy_then_close(b_read, a);
    let _ = forward.join();
}

fn copy_then_close(mut from: File, mut to: File) {
    let _ = io::copy(&mut from, &mut to);
    // SAFETY: shutdown on a socket fd we own: the other side sees the end of the stream.
    unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
}
