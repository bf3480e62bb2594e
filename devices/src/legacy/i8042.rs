use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::I8042Device;

use crate::EventFdTrigger;

/// The i8042 keyboard controller at ports 0x60-0x64, reduced to what `reboot=k` uses: the
/// "pulse reset line" command (0xfe to port 0x64) raises the reset event.
pub struct I8042 {
    controller: I8042Device<EventFdTrigger>,
}

impl I8042 {
    pub fn new(reset: EventFdTrigger) -> Self {
        Self { controller: I8042Device::new(reset) }
    }
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            *byte = self.controller.read(offset);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            if let Err(e) = self.controller.write(offset, *byte) {
                tracing::warn!("i8042: cannot signal the reset: {e}");
            }
        }
    }
}
