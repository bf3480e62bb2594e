//! The guest's way out: a relay from 127.0.0.1:[`PROXY_PORT`] to the host's egress proxy on
//! vsock port [`PROXY_PORT`]. The guest has no other route: commands reach the outside
//! through `HTTP_PROXY`/`HTTPS_PROXY`, and the host decides what gets through.

use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};

use cvm_agent::protocol::PROXY_PORT;

use crate::transport::{self, Address};

/// Brings the loopback interface up (the kernel starts with it down).
pub fn bring_up_loopback() -> io::Result<()> {
    // SAFETY: a plain datagram socket, used for two ioctls on an ifreq we own, then closed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let result = if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            Err(io::Error::last_os_error())
        } else {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        libc::close(fd);
        result
    }
}

/// Relays every connection to 127.0.0.1:PROXY_PORT to the host's proxy, on its own thread.
pub fn start_relay() -> io::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, PROXY_PORT as u16))?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                if let Err(e) = relay(conn) {
                    crate::debug(&format!("egress relay: {e}"));
                }
            });
        }
    });
    Ok(())
}

fn relay(guest: TcpStream) -> io::Result<()> {
    let host = transport::connect(&Address::Vsock { cid: libc::VMADDR_CID_HOST, port: PROXY_PORT })?;
    let (mut guest_in, mut host_out) = (guest.try_clone()?, host.try_clone()?);
    let upstream = std::thread::spawn(move || {
        let _ = io::copy(&mut guest_in, &mut host_out);
        // SAFETY: shutdown on our own socket fd: the host sees the end of the request.
        unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&host_out), libc::SHUT_WR) };
    });
    let (mut host_in, mut guest_out) = (host, guest);
    let _ = io::copy(&mut host_in, &mut guest_out);
    let _ = guest_out.shutdown(std::net::Shutdown::Write);
    let _ = upstream.join();
    Ok(())
}
