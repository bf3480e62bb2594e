//! The user's terminal: raw mode while a guest terminal is attached, always restored, and
//! what of the guest's output may reach it ([`escapes`]).

pub mod escapes;

use std::os::fd::BorrowedFd;
use std::sync::Mutex;

use rustix::termios::{tcgetattr, tcgetwinsize, tcsetattr, OptionalActions, Termios};

use cvm_agent::protocol::TtySize;

/// The settings to put back, kept where the panic hook can reach them.
static SAVED: Mutex<Option<Termios>> = Mutex::new(None);

fn stdin() -> BorrowedFd<'static> {
    rustix::stdio::stdin()
}

/// Whether both stdin and stdout are terminals: then the guest command gets a terminal too.
pub fn is_interactive() -> bool {
    rustix::termios::isatty(rustix::stdio::stdin()) && rustix::termios::isatty(rustix::stdio::stdout())
}

/// The size of the terminal on stdout.
pub fn size() -> Option<TtySize> {
    let ws = tcgetwinsize(rustix::stdio::stdout()).ok()?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some(TtySize { rows: ws.ws_row, cols: ws.ws_col })
}

/// Raw mode on stdin until dropped: every key, Ctrl-C included, goes to the guest.
pub struct RawMode(());

impl RawMode {
    pub fn enter() -> std::io::Result<RawMode> {
        let original = tcgetattr(stdin())?;
        let mut raw = original.clone();
        raw.make_raw();
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(original);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        tcsetattr(stdin(), OptionalActions::Now, &raw)?;
        Ok(RawMode(()))
    }
}

/// Puts the saved terminal settings back, if any.
pub fn restore() {
    if let Some(original) = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = tcsetattr(stdin(), OptionalActions::Now, &original);
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}
