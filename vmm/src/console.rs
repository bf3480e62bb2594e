//! The serial console's sink: standard output or the console log (through a relay thread),
//! counting what the guest wrote and watching it for a kernel panic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::exit::ExitReason;
use crate::guest_panic::{PanicWatch, Seen};
use crate::vstate::vcpu::Shared;
use crate::{lock, Error, Result, VmConfig};

/// The console's panic watch, and when it saw the panic.
#[derive(Default)]
pub(crate) struct ConsolePanic {
    pub(crate) watch: PanicWatch,
    pub(crate) since: Option<Instant>,
}

/// The serial console's sink (standard output or the console log), counting what the guest
/// wrote and watching it for a kernel panic.
pub(crate) struct ConsoleOut {
    pub(crate) written: Arc<AtomicU64>,
    pub(crate) panic: Arc<Mutex<ConsolePanic>>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) sink: Box<dyn std::io::Write + Send>,
}

pub(crate) fn console_sink(config: &VmConfig) -> Result<(Box<dyn std::io::Write + Send>, Option<ConsoleRelay>)> {
    let Some(path) = &config.console_log else { return Ok((Box::new(std::io::stdout()), None)) };
    let (reader, writer) = std::io::pipe()?;
    let thread = crate::console_log::relay(reader, path).map_err(|source| Error::File { path: path.clone(), source })?;
    let pipe = Arc::new(Mutex::new(Some(writer)));
    Ok((Box::new(ConsolePipe(pipe.clone())), Some(ConsoleRelay { pipe, thread })))
}

/// The console log's writer: a thread of its own, started before the VM's threads confine
/// themselves (it creates and renames files as the log rotates; they never open a file), fed
/// through a pipe that the VM closes when it ends.
pub(crate) struct ConsoleRelay {
    pub(crate) pipe: Arc<Mutex<Option<std::io::PipeWriter>>>,
    pub(crate) thread: JoinHandle<()>,
}

impl ConsoleRelay {
    /// Closes the pipe and waits until all the guest wrote is in the log.
    pub(crate) fn finish(self) {
        lock(&self.pipe).take();
        let _ = self.thread.join();
    }
}

/// The serial console's end of the pipe to the [`ConsoleRelay`]; once closed, it drops what
/// a stopping guest still writes.
pub(crate) struct ConsolePipe(Arc<Mutex<Option<std::io::PipeWriter>>>);

impl std::io::Write for ConsolePipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match lock(&self.0).as_mut() {
            Some(pipe) => pipe.write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::io::Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written.fetch_add(buf.len() as u64, Ordering::Relaxed);
        let written = self.sink.write(buf)?;
        let mut state = lock(&self.panic);
        match state.watch.feed(&buf[..written]) {
            Seen::Nothing => {}
            Seen::Panic => state.since = Some(Instant::now()),
            // `panic=0`: the kernel spins from here on.
            Seen::End => {
                if let Some(panic) = state.watch.panic() {
                    self.shared.request_exit(ExitReason::GuestPanic(panic.clone()));
                }
            }
        }
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.sink.flush()
    }
}
