//! Reaps every child, PID 1's orphans included, and hands each exec its own exit status.
//!
//! A single thread calls `waitpid(-1)`. Spawning happens under the same lock the reaper takes
//! to deliver a status, so a child that exits at once is never reaped before its exec is
//! registered to receive the status.

use std::collections::HashMap;
use std::io;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

struct Reaper {
    waiting: Mutex<HashMap<libc::pid_t, Sender<libc::c_int>>>,
    children_appeared: Condvar,
}

fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    REAPER.get_or_init(|| {
        std::thread::Builder::new().name("reaper".into()).spawn(reap_forever).expect("cannot start the reaper thread");
        Reaper { waiting: Mutex::new(HashMap::new()), children_appeared: Condvar::new() }
    })
}

fn reap_forever() {
    let reaper = reaper();
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only to `status`.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid > 0 {
            if let Some(tx) = reaper.waiting.lock().unwrap().remove(&pid) {
                let _ = tx.send(status);
            }
            continue;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => {}
            // No children: sleep until an exec spawns one. Orphans handed to PID 1 only exist
            // while some exec's child does, but wake now and then in case.
            _ => {
                let guard = reaper.waiting.lock().unwrap();
                let _ = reaper.children_appeared.wait_timeout(guard, Duration::from_secs(1));
            }
        }
    }
}

/// Runs `fork` (which returns the new child's pid) so that the child's wait status is
/// delivered to the returned receiver.
pub fn spawn(fork: impl FnOnce() -> io::Result<libc::pid_t>) -> io::Result<(libc::pid_t, Receiver<libc::c_int>)> {
    let reaper = reaper();
    let mut waiting = reaper.waiting.lock().unwrap();
    let pid = fork()?;
    let (tx, rx) = channel();
    waiting.insert(pid, tx);
    drop(waiting);
    reaper.children_appeared.notify_all();
    Ok((pid, rx))
}
