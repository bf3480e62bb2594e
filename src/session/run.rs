//! `cvm run -- CMD` and `cvm shell`: boot, run one command with this terminal or these pipes,
//! pass its exit status through, tear everything down.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use cvm_agent::protocol::Exec;

use crate::host::terminal;
use crate::session::exec::Outcome;
use crate::session::{Session, SessionConfig};

/// Exit status when `--timeout` expires (as timeout(1)).
pub const EXIT_TIMEOUT: u8 = 124;
/// Exit status when cvm itself fails (as `docker run`).
pub const EXIT_CVM_FAILED: u8 = 125;

/// `cvm run [PATH] [-- CMD]`: with no command, the agent runs in the project (`.` by
/// default); with one, no project is shared unless PATH is given.
pub fn default_project(path: Option<PathBuf>, has_command: bool) -> Option<PathBuf> {
    match has_command {
        true => path,
        false => Some(path.unwrap_or_else(|| PathBuf::from("."))),
    }
}

/// Prefix of the line `--timings` prints on stderr (`cvm bench run` reads it).
pub const TIMINGS_PREFIX: &str = "cvm run timings (ms):";
/// The phases that line names, in order, each followed by its milliseconds: the session's
/// start ([`crate::session::StartTimings`]; `boot` is agent and guest-setup together), the
/// command, the teardown, and the whole. Then `start warm` or `start cold`: whether the guest
/// was restored from a warm-start snapshot or booted.
pub const TIMING_PHASES: [&str; 8] = ["host", "vm", "agent", "guest-setup", "boot", "exec", "teardown", "total"];

/// The `--timings` line: each of [`TIMING_PHASES`] with its time, and how the guest started.
pub fn timings_line(times: [Duration; TIMING_PHASES.len()], warm: bool) -> String {
    let phases: String = TIMING_PHASES.iter().zip(times).map(|(name, d)| format!(" {name} {:.1}", d.as_secs_f64() * 1e3)).collect();
    format!("{TIMINGS_PREFIX}{phases} start {}", if warm { "warm" } else { "cold" })
}

/// Runs `argv` in a fresh VM; returns the exit status cvm should exit with. With `timings`,
/// prints how long each phase took on stderr.
pub fn run(config: &SessionConfig, argv: Vec<OsString>, timeout: Option<Duration>, timings: bool) -> Result<u8> {
    let started = Instant::now();
    let deadline = timeout.map(|t| started + t);
    let session = match Session::start(config, deadline) {
        Ok(s) => s,
        Err(e) if deadline.is_some_and(|d| Instant::now() >= d) => {
            eprintln!("cvm: timed out after {:?} while booting ({e})", timeout.unwrap_or_default());
            return Ok(EXIT_TIMEOUT);
        }
        Err(e) => return Err(e),
    };
    let mut exec = exec_request(argv);
    session.prepare(&mut exec);
    let raw = if exec.tty.is_some() { Some(terminal::RawMode::enter()?) } else { None };
    let exec_started = Instant::now();
    let outcome = session.exec(exec, deadline);
    let exec_time = exec_started.elapsed();
    drop(raw);
    let (start, session_warm) = (session.timings, session.warm);
    let panic = matches!(outcome, Ok(Outcome::MachineStopped)).then(|| session.guest_panic()).flatten();
    let teardown_started = Instant::now();
    let vm_end = session.shutdown();
    if timings {
        eprintln!(
            "{}",
            timings_line(
                [
                    start.host,
                    start.vm,
                    start.agent,
                    start.guest_setup,
                    start.boot(),
                    exec_time,
                    teardown_started.elapsed(),
                    started.elapsed()
                ],
                session_warm
            )
        );
    }
    if let Some(panic) = panic {
        eprintln!("cvm: {}", crate::session::panic_report(&panic));
        return Ok(EXIT_CVM_FAILED);
    }
    Ok(exit_status(outcome?, timeout, vm_end))
}

/// What cvm exits with after an exec: the command's status as a shell reports it, 124 past
/// the timeout, 125 when the VM went away first (with why, when `vm_end` says).
pub fn exit_status(outcome: Outcome, timeout: Option<Duration>, vm_end: Option<String>) -> u8 {
    match outcome {
        Outcome::Exited(status) => status.shell_code().clamp(0, 255) as u8,
        Outcome::TimedOut => {
            eprintln!("cvm: timed out after {:?}", timeout.unwrap_or_default());
            EXIT_TIMEOUT
        }
        Outcome::Terminated(signal) => {
            eprintln!(
                "cvm: the command did not end within {:?} of signal {signal}; the VM was stopped",
                crate::session::exec::TERMINATE_GRACE
            );
            128 + signal as u8
        }
        Outcome::MachineStopped => {
            match vm_end {
                Some(why) => eprintln!("cvm: the VM stopped before the command finished: {why}"),
                None => eprintln!("cvm: the VM stopped before the command finished"),
            }
            EXIT_CVM_FAILED
        }
    }
}

/// The exec request for `argv` with this process's terminal (if both ends are one) and TERM.
pub fn exec_request(argv: Vec<OsString>) -> Exec {
    let interactive = terminal::is_interactive();
    let mut env = Vec::new();
    if interactive {
        if let Some(term) = std::env::var_os("TERM") {
            env.push((b"TERM".to_vec(), term.into_vec()));
        }
    }
    Exec {
        argv: argv.into_iter().map(OsString::into_vec).collect(),
        env,
        tty: if interactive { Some(terminal::size().unwrap_or(cvm_agent::protocol::TtySize { rows: 24, cols: 80 })) } else { None },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_command_the_agent_runs_in_the_project() {
        assert_eq!(default_project(None, false), Some(PathBuf::from(".")));
        assert_eq!(default_project(Some("/p".into()), false), Some(PathBuf::from("/p")));
        assert_eq!(default_project(None, true), None, "a command shares nothing unasked");
        assert_eq!(default_project(Some("/p".into()), true), Some(PathBuf::from("/p")));
    }
}
