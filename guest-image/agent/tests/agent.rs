//! cvm-agent as a host process: the exec server the guest runs, over Unix sockets instead of
//! vsock. Exit statuses, pipes and a PTY, resizes, signals, concurrent execs, binary stdin.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cvm_agent::protocol::{self, Exec, ExitStatus, Reply, Request, TtySize};

struct Agent {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts the agent and waits for its readiness message, as cvm does.
    fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("control");
        let ready_path = dir.path().join("ready");
        let ready = UnixListener::bind(&ready_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cvm-agent"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--ready")
            .arg(format!("unix:{}", ready_path.display()))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let (mut conn, _) = ready.accept().unwrap();
        assert!(matches!(protocol::read_reply(&mut conn).unwrap(), Some(Reply::Ready(_))));
        Agent { child, socket, _dir: dir }
    }

    fn connect(&self, exec: Exec) -> UnixStream {
        let mut conn = UnixStream::connect(&self.socket).unwrap();
        // A hang bound, not a timing: generous for a loaded CI machine.
        conn.set_read_timeout(Some(READ_DEADLINE)).unwrap();
        protocol::write_frame(&mut conn, &Request::Exec(exec).encode()).unwrap();
        conn
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long a test waits for the agent's next reply before it fails.
const READ_DEADLINE: Duration = Duration::from_secs(60);

fn sh(script: &str) -> Exec {
    Exec { argv: vec![b"sh".to_vec(), b"-c".to_vec(), script.as_bytes().to_vec()], ..Default::default() }
}

#[derive(Default, Debug)]
struct Result {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    failed: Option<String>,
    pid: Option<u32>,
    status: Option<ExitStatus>,
}

/// Reads replies until the exit status.
fn collect(conn: &mut UnixStream) -> Result {
    let mut r = Result::default();
    loop {
        let reply =
            protocol::read_reply(conn).unwrap_or_else(|e| panic!("no reply from the agent within {READ_DEADLINE:?} ({e}) after {r:?}"));
        match reply {
            Some(Reply::Started { pid }) => r.pid = Some(pid),
            Some(Reply::Stdout(d)) => r.stdout.extend(d),
            Some(Reply::Stderr(d)) => r.stderr.extend(d),
            Some(Reply::Failed(m)) => r.failed = Some(m),
            Some(Reply::Exited(s)) => {
                r.status = Some(s);
                return r;
            }
            other => panic!("unexpected {other:?} after {r:?}"),
        }
    }
}

fn send(conn: &mut UnixStream, request: Request) {
    protocol::write_frame(conn, &request.encode()).unwrap();
}

#[test]
fn exit_codes_output_and_signals() {
    let agent = Agent::start();
    let r = collect(&mut agent.connect(sh("echo $((6*7)); echo oops >&2; exit 3")));
    assert_eq!(r.stdout, b"42\n");
    assert_eq!(r.stderr, b"oops\n");
    assert_eq!(r.status, Some(ExitStatus::Code(3)));

    let r = collect(&mut agent.connect(sh("kill -TERM $$")));
    assert_eq!(r.status, Some(ExitStatus::Signal(libc::SIGTERM)));
    assert_eq!(r.status.unwrap().shell_code(), 143);
}

#[test]
fn commands_that_cannot_start() {
    let agent = Agent::start();
    let r = collect(&mut agent.connect(Exec { argv: vec![b"no-such-command-cvm".to_vec()], ..Default::default() }));
    assert_eq!(r.status, Some(ExitStatus::Code(127)));
    assert!(r.failed.unwrap().contains("command not found"));

    let r = collect(&mut agent.connect(Exec { argv: vec![b"/etc/hostname".to_vec()], ..Default::default() }));
    assert_eq!(r.status, Some(ExitStatus::Code(126)), "not executable");

    let r = collect(&mut agent.connect(Exec { cwd: Some(b"/no/such/dir".to_vec()), ..sh("true") }));
    assert_eq!(r.status, Some(ExitStatus::Code(126)));
    assert!(r.failed.unwrap().contains("/no/such/dir"));

    let r = collect(&mut agent.connect(Exec::default()));
    assert_eq!(r.status, Some(ExitStatus::Code(126)), "empty argv");
}

#[test]
fn environment_and_working_directory() {
    let agent = Agent::start();
    let exec = Exec { env: vec![(b"CVM_TEST".to_vec(), b"a b=c".to_vec())], cwd: Some(b"/tmp".to_vec()), ..sh("echo \"$CVM_TEST\"; pwd") };
    let r = collect(&mut agent.connect(exec));
    assert_eq!(String::from_utf8_lossy(&r.stdout), "a b=c\n/tmp\n");
}

#[test]
fn ten_mib_of_binary_stdin_round_trips() {
    let agent = Agent::start();
    let data: Vec<u8> = (0..10 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut conn = agent.connect(Exec { argv: vec![b"cat".to_vec()], ..Default::default() });
    let mut writer = conn.try_clone().unwrap();
    let input = data.clone();
    let feeder = std::thread::spawn(move || {
        for chunk in input.chunks(protocol::MAX_DATA) {
            send(&mut writer, Request::Stdin(chunk.to_vec()));
        }
        send(&mut writer, Request::StdinEof);
    });
    let r = collect(&mut conn);
    feeder.join().unwrap();
    assert_eq!(r.status, Some(ExitStatus::Code(0)));
    assert_eq!(r.stdout.len(), data.len());
    assert!(r.stdout == data, "output differs from input");
}

#[test]
fn a_terminal_with_its_size_resizes_and_ctrl_c() {
    let agent = Agent::start();
    let exec =
        Exec { tty: Some(TtySize { rows: 24, cols: 80 }), ..sh("tty; stty size; read line; stty size; echo sleeping; exec sleep 100") };
    let mut conn = agent.connect(exec);
    let mut seen = Vec::new();
    let wait_for = |conn: &mut UnixStream, seen: &mut Vec<u8>, want: &str| {
        while !String::from_utf8_lossy(seen).contains(want) {
            match protocol::read_reply(conn).unwrap() {
                Some(Reply::Stdout(d)) => seen.extend(d),
                Some(Reply::Started { .. }) => {}
                other => panic!("unexpected {other:?}; output so far {:?}", String::from_utf8_lossy(seen)),
            }
        }
    };
    wait_for(&mut conn, &mut seen, "24 80");
    assert!(String::from_utf8_lossy(&seen).contains("/dev/pts/"), "{:?}", String::from_utf8_lossy(&seen));
    send(&mut conn, Request::Resize(TtySize { rows: 50, cols: 132 }));
    send(&mut conn, Request::Stdin(b"go\r".to_vec()));
    wait_for(&mut conn, &mut seen, "sleeping");
    assert!(String::from_utf8_lossy(&seen).contains("50 132"));
    // Ctrl-C as a byte: the terminal turns it into SIGINT for the foreground job. The shell
    // may still be on its way to `exec sleep` when "sleeping" arrives: the byte is sent again
    // each second until the job ends, and the reply that ends it is the exit status.
    conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let started = Instant::now();
    let status = loop {
        send(&mut conn, Request::Stdin(vec![3]));
        // Replies until a second passes without one: the echoed ^C, then the exit status.
        let ended = loop {
            match protocol::read_reply(&mut conn) {
                Ok(Some(Reply::Exited(status))) => break Some(status),
                Ok(Some(Reply::Stdout(_))) => {}
                Ok(other) => panic!("unexpected {other:?}"),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break None,
                Err(e) => panic!("{e}"),
            }
        };
        if let Some(status) = ended {
            break status;
        }
        assert!(started.elapsed() < READ_DEADLINE, "Ctrl-C did not end the job within {READ_DEADLINE:?}");
    };
    assert_eq!(status, ExitStatus::Signal(libc::SIGINT));
}

#[test]
fn signals_reach_the_whole_process_group() {
    let agent = Agent::start();
    let mut conn = agent.connect(sh("sleep 100 & sleep 100; wait"));
    let Some(Reply::Started { .. }) = protocol::read_reply(&mut conn).unwrap() else { panic!("not started") };
    send(&mut conn, Request::Signal(libc::SIGKILL));
    let r = collect(&mut conn);
    assert_eq!(r.status, Some(ExitStatus::Signal(libc::SIGKILL)));
}

#[test]
fn concurrent_execs_are_independent() {
    let agent = Agent::start();
    let conns: Vec<_> = (0..8).map(|i| (i, agent.connect(sh(&format!("sleep 0.2; echo {i}; exit {i}"))))).collect();
    for (i, mut conn) in conns {
        let r = collect(&mut conn);
        assert_eq!(r.stdout, format!("{i}\n").into_bytes());
        assert_eq!(r.status, Some(ExitStatus::Code(i)));
    }
}

#[test]
fn a_host_that_goes_away_takes_its_command_with_it() {
    let agent = Agent::start();
    let mut conn = agent.connect(sh("sleep 100"));
    let Some(Reply::Started { pid }) = protocol::read_reply(&mut conn).unwrap() else { panic!("not started") };
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(10);
    // SAFETY (test): kill with signal 0 only checks whether the process exists.
    while unsafe { libc::kill(pid as i32, 0) } == 0 {
        assert!(Instant::now() < deadline, "the command outlived its connection");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn output_of_a_background_child_does_not_hold_the_exec_open() {
    let agent = Agent::start();
    let started = Instant::now();
    let r = collect(&mut agent.connect(sh("sleep 30 & echo started")));
    assert_eq!(r.status, Some(ExitStatus::Code(0)));
    assert_eq!(r.stdout, b"started\n");
    assert!(started.elapsed() < Duration::from_secs(20), "the exit status waited for a background process");
}

#[test]
fn garbage_and_shutdown() {
    let agent = Agent::start();
    // A frame that is not a request, and a huge length: the agent drops the connection and
    // keeps serving.
    for junk in [&[5u8, 0, 0, 0, 99, 1, 2, 3, 4][..], &u32::MAX.to_le_bytes()[..]] {
        let mut conn = UnixStream::connect(&agent.socket).unwrap();
        conn.write_all(junk).unwrap();
        conn.set_read_timeout(Some(READ_DEADLINE)).unwrap();
        assert!(matches!(protocol::read_reply(&mut conn), Ok(None) | Err(_)));
    }
    let r = collect(&mut agent.connect(sh("echo still here")));
    assert_eq!(r.stdout, b"still here\n");

    let mut agent = agent;
    let mut conn = UnixStream::connect(&agent.socket).unwrap();
    send(&mut conn, Request::Shutdown);
    let status = agent.child.wait().unwrap();
    assert!(status.success(), "shutdown ends the agent cleanly outside a VM");
}
