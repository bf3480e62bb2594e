//! Where the agent listens and whom it tells it is ready: vsock in a guest, Unix sockets when
//! it runs as a host process in tests. Connections are plain byte streams (`File`s over the
//! socket), so the exec server does not know which it got.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};

/// An address the agent listens on or connects to: `vsock:CID:PORT` / `vsock:PORT` or
/// `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Vsock { cid: u32, port: u32 },
    Unix(std::path::PathBuf),
}

impl Address {
    pub fn parse(s: &str) -> Option<Self> {
        if let Some(path) = s.strip_prefix("unix:") {
            return (!path.is_empty()).then(|| Address::Unix(path.into()));
        }
        let rest = s.strip_prefix("vsock:")?;
        match rest.split_once(':') {
            Some((cid, port)) => Some(Address::Vsock { cid: cid.parse().ok()?, port: port.parse().ok()? }),
            None => Some(Address::Vsock { cid: libc::VMADDR_CID_ANY, port: rest.parse().ok()? }),
        }
    }
}

pub enum Listener {
    Vsock(OwnedFd),
    Unix(UnixListener),
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; zeroed is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

const VSOCK_ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

impl Listener {
    pub fn bind(addr: &Address) -> io::Result<Self> {
        match addr {
            Address::Unix(path) => Ok(Listener::Unix(UnixListener::bind(path)?)),
            Address::Vsock { cid, port } => {
                let fd = vsock_socket()?;
                let sa = vsock_addr(*cid, *port);
                // SAFETY: sa is a valid sockaddr_vm for the duration of the call.
                check(unsafe { libc::bind(fd.as_raw_fd(), (&sa as *const libc::sockaddr_vm).cast(), VSOCK_ADDR_LEN) })?;
                // SAFETY: listen on our own socket.
                check(unsafe { libc::listen(fd.as_raw_fd(), 64) })?;
                Ok(Listener::Vsock(fd))
            }
        }
    }

    pub fn accept(&self) -> io::Result<File> {
        match self {
            Listener::Unix(l) => Ok(File::from(OwnedFd::from(l.accept()?.0))),
            Listener::Vsock(fd) => loop {
                // SAFETY: accept4 with no address output; the new fd is owned at once.
                let conn = unsafe { libc::accept4(fd.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
                if conn >= 0 {
                    // SAFETY: conn is a fresh fd we own.
                    return Ok(File::from(unsafe { OwnedFd::from_raw_fd(conn) }));
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            },
        }
    }
}

pub fn connect(addr: &Address) -> io::Result<File> {
    match addr {
        Address::Unix(path) => Ok(File::from(OwnedFd::from(UnixStream::connect(path)?))),
        Address::Vsock { cid, port } => {
            let fd = vsock_socket()?;
            let sa = vsock_addr(*cid, *port);
            // SAFETY: sa is a valid sockaddr_vm for the duration of the call.
            check(unsafe { libc::connect(fd.as_raw_fd(), (&sa as *const libc::sockaddr_vm).cast(), VSOCK_ADDR_LEN) })?;
            Ok(File::from(fd))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(Address::parse("vsock:1024"), Some(Address::Vsock { cid: libc::VMADDR_CID_ANY, port: 1024 }));
        assert_eq!(Address::parse("vsock:2:1025"), Some(Address::Vsock { cid: 2, port: 1025 }));
        assert_eq!(Address::parse("unix:/tmp/a"), Some(Address::Unix("/tmp/a".into())));
        for bad in ["", "unix:", "vsock:", "vsock:x", "vsock:2:", "tcp:1", "vsock:1:2:3"] {
            assert_eq!(Address::parse(bad), None, "{bad}");
        }
    }
}
