//! Legacy devices: the few port-mapped and MMIO devices a microVM still needs.

mod boot_timer;
mod i8042;
mod serial;

pub use boot_timer::{BootTimer, BOOT_TIMER_MAGIC};
pub use i8042::I8042;
pub use serial::{SerialConsole, SerialConsoleState};
