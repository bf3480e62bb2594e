use std::collections::VecDeque;
use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::serial::NoEvents;
use vm_superio::serial::SerialState;
use vm_superio::Serial;

use crate::EventFdTrigger;

/// Host input waiting for room in the UART's 64-byte FIFO (a paste, a script piped in).
pub const MAX_PENDING_INPUT: usize = 64 << 10;

/// The 8250 UART at COM1 (ports 0x3f8-0x3ff): the guest's console, written to `out`.
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
    /// Input the FIFO had no room for, moved into it as the guest reads.
    pending: VecDeque<u8>,
}

impl SerialConsole {
    /// `interrupt` is the irqfd of the UART's line (IRQ 4 on COM1).
    pub fn new(interrupt: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self { uart: Serial::new(interrupt, out), pending: VecDeque::new() }
    }

    /// A UART in a saved state (see [`SerialConsole::save_state`]), raising the interrupts that
    /// state has pending.
    pub fn from_state(state: &SerialConsoleState, interrupt: EventFdTrigger, out: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let uart_state = SerialState {
            baud_divisor_low: state.registers[0],
            baud_divisor_high: state.registers[1],
            interrupt_enable: state.registers[2],
            interrupt_identification: state.registers[3],
            line_control: state.registers[4],
            line_status: state.registers[5],
            modem_control: state.registers[6],
            modem_status: state.registers[7],
            scratch: state.registers[8],
            in_buffer: state.fifo.clone(),
        };
        let uart = Serial::from_state(&uart_state, interrupt, NoEvents, out)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("serial state: {e:?}")))?;
        Ok(Self { uart, pending: state.pending.iter().copied().take(MAX_PENDING_INPUT).collect() })
    }

    /// The UART's registers and the input not yet read, for a snapshot.
    pub fn save_state(&self) -> SerialConsoleState {
        let s = self.uart.state();
        SerialConsoleState {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            fifo: s.in_buffer,
            pending: self.pending.iter().copied().collect(),
        }
    }

    /// Queues host input for the guest to read: into the FIFO as far as it has room, the rest
    /// kept (up to [`MAX_PENDING_INPUT`]) until the guest drains it. Returns how many bytes were
    /// taken; the rest is dropped.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let taken = input.len().min(MAX_PENDING_INPUT - self.pending.len());
        self.pending.extend(&input[..taken]);
        self.refill();
        taken
    }

    /// Moves kept input into the FIFO as far as it has room.
    fn refill(&mut self) {
        let room = self.uart.fifo_capacity().min(self.pending.len());
        if room > 0 {
            let bytes: Vec<u8> = self.pending.drain(..room).collect();
            // Cannot fail: no more than the FIFO's free room.
            let _ = self.uart.enqueue_raw_bytes(&bytes);
        }
    }

    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

/// A [`SerialConsole`] as a snapshot keeps it: the UART's nine registers (divisor low and high,
/// IER, IIR, LCR, LSR, MCR, MSR, scratch), its receive FIFO and the input waiting for room.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConsoleState {
    registers: [u8; 9],
    fifo: Vec<u8>,
    pending: Vec<u8>,
}

impl MutDevicePio for SerialConsole {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            *byte = self.uart.read(offset);
            if !self.pending.is_empty() {
                self.refill();
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    const DATA: PioAddressOffset = 0;
    const LINE_STATUS: PioAddressOffset = 5;
    const DATA_READY: u8 = 1;

    fn console() -> SerialConsole {
        SerialConsole::new(EventFdTrigger::new(EventFd::new(0).unwrap()), Box::new(std::io::sink()))
    }

    /// Reads the UART as Linux's 8250 driver does: while the line status says data is ready.
    fn drain(uart: &mut SerialConsole) -> Vec<u8> {
        let mut out = Vec::new();
        let mut byte = [0u8];
        loop {
            uart.pio_read(PioAddress(0x3f8), LINE_STATUS, &mut byte);
            if byte[0] & DATA_READY == 0 {
                return out;
            }
            uart.pio_read(PioAddress(0x3f8), DATA, &mut byte);
            out.push(byte[0]);
        }
    }

    #[test]
    fn input_longer_than_the_fifo_reaches_the_guest_whole() {
        let mut uart = console();
        let line: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        assert_eq!(uart.enqueue_input(&line[..300]), 300);
        assert_eq!(uart.enqueue_input(&line[300..]), 700);
        assert_eq!(drain(&mut uart), line, "every byte, in order");
        assert_eq!(drain(&mut uart), b"");
    }

    #[test]
    fn input_the_guest_never_reads_is_bounded() {
        let mut uart = console();
        let chunk = [b'x'; 4096];
        let taken: usize = (0..100).map(|_| uart.enqueue_input(&chunk)).sum();
        // The FIFO's 64 bytes and the kept input, and not a byte more.
        assert_eq!(taken, 64 + MAX_PENDING_INPUT);
        assert_eq!(drain(&mut uart).len(), taken);
        assert_eq!(uart.enqueue_input(b"again"), 5, "room again once read");
    }

    /// A console saved with input in its FIFO and more waiting, restored: the guest reads all
    /// of it, in order; registers as they were.
    #[test]
    fn a_saved_console_restores_its_registers_and_unread_input() {
        let mut uart = console();
        uart.pio_write(PioAddress(0x3f8), 7, &[0x5a]); // scratch register
        let input: Vec<u8> = (0..200u8).collect();
        assert_eq!(uart.enqueue_input(&input), 200);
        let saved = uart.save_state();
        let mut restored =
            SerialConsole::from_state(&saved, EventFdTrigger::new(EventFd::new(0).unwrap()), Box::new(std::io::sink())).unwrap();
        assert_eq!(restored.save_state(), saved);
        let mut scratch = [0u8];
        restored.pio_read(PioAddress(0x3f8), 7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        assert_eq!(drain(&mut restored), input);

        let mut flood = saved.clone();
        flood.fifo = vec![0; 65];
        assert!(
            SerialConsole::from_state(&flood, EventFdTrigger::new(EventFd::new(0).unwrap()), Box::new(std::io::sink())).is_err(),
            "more than the FIFO holds"
        );
    }
}
