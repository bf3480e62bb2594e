use std::io::Write;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use crate::EventFdTrigger;

/// The 8250 UART at COM1 (ports 0x3f8-0x3ff): the guest's console, written to `out`.
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    /// `interrupt` is the irqfd of the UART's line (IRQ 4 on COM1).
    pub fn new(interrupt: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self { uart: Serial::new(interrupt, out) }
    }

    /// Queues host input for the guest to read. Returns how many bytes fit in the FIFO; the
    /// rest is the caller's to retry once the guest drained it.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(input).unwrap_or(0)
    }

    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

impl MutDevicePio for SerialConsole {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            *byte = self.uart.read(offset);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // A failed write to the host terminal must not stop the guest.
            if let Err(e) = self.uart.write(offset, *byte) {
                tracing::debug!("serial: {e:?}");
            }
        }
    }
}
