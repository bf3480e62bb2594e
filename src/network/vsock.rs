//! The host end of a connection to a guest's vsock port: the VM's vsock socket speaks
//! Firecracker's protocol (`CONNECT <port>`, then `OK <host port>`), and every wait on the
//! guest's answer has a deadline.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long the guest may take to answer a connection request: a hung or hostile guest must
/// not hold cvm. A healthy one answers in milliseconds, even nested.
const CONNECT_ANSWER: Duration = Duration::from_secs(30);
/// Opens a stream to guest vsock `port` with the Firecracker protocol.
pub fn connect_port(host_socket: &Path, port: u32) -> io::Result<UnixStream> {
    connect_port_within(host_socket, port, CONNECT_ANSWER)
}

/// [`connect_port`], with the guest's answer due within `answer`.
pub fn connect_port_within(host_socket: &Path, port: u32, answer: Duration) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(host_socket)?;
    stream.set_read_timeout(Some(answer))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        let n = stream.read(&mut byte).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the guest did not answer a connection to vsock port {port} within {} s", answer.as_secs()),
            ),
            _ => e,
        })?;
        match n {
            0 => break,
            _ if byte[0] == b'\n' => {
                if line.starts_with(b"OK ") {
                    stream.set_read_timeout(None)?;
                    return Ok(stream);
                }
                break;
            }
            _ => line.push(byte[0]),
        }
    }
    Err(io::Error::new(io::ErrorKind::ConnectionRefused, format!("the guest refused a connection to vsock port {port}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::time::Instant;

    /// A vsock socket whose "guest" reads the request and then says `answer`, or nothing.
    fn guest_saying(answer: Option<&'static [u8]>) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 11];
            conn.read_exact(&mut request).unwrap();
            assert_eq!(&request, b"CONNECT 52\n");
            match answer {
                Some(bytes) => conn.write_all(bytes).unwrap(),
                None => std::thread::sleep(Duration::from_secs(5)),
            }
        });
        (dir, path)
    }

    #[test]
    fn a_connection_the_guest_does_not_answer_gives_up_at_its_deadline() {
        let (_dir, path) = guest_saying(None);
        let started = Instant::now();
        let err = connect_port_within(&path, 52, Duration::from_millis(200)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("did not answer a connection to vsock port 52"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(4));
    }

    #[test]
    fn answers_are_accepted_or_refused() {
        let (_dir, path) = guest_saying(Some(b"OK 1073741824\n"));
        assert!(connect_port_within(&path, 52, Duration::from_secs(5)).is_ok());
        let (_dir, path) = guest_saying(Some(b"NO\n"));
        assert_eq!(connect_port_within(&path, 52, Duration::from_secs(5)).unwrap_err().kind(), io::ErrorKind::ConnectionRefused);
        let (_dir, path) = guest_saying(Some(&[b'x'; 100]));
        assert_eq!(
            connect_port_within(&path, 52, Duration::from_secs(5)).unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused,
            "an endless line"
        );
    }
}
