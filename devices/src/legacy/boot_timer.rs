use std::sync::{Arc, OnceLock};
use std::time::Instant;

use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;

/// The byte the guest writes to say "init reached" (the value Firecracker's boot timer uses,
/// so the same guest-side poke works on both).
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// A write-once MMIO register: the first time the guest writes [`BOOT_TIMER_MAGIC`] to offset 0
/// the VMM records the instant, so it can report how long the guest took to reach its init.
#[derive(Default)]
pub struct BootTimer {
    reached: Arc<OnceLock<Instant>>,
    /// Called on the vCPU thread that wrote, before it goes back to the guest.
    on_reached: Option<Box<dyn Fn() + Send>>,
}

impl BootTimer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls `hook` when the guest reaches init, on the vCPU thread that wrote, before the
    /// guest's next instruction (a snapshot at init pauses the VM there).
    pub fn on_reached(mut self, hook: impl Fn() + Send + 'static) -> Self {
        self.on_reached = Some(Box::new(hook));
        self
    }

    /// A handle that reads the recorded instant after the VM has run.
    pub fn stamp(&self) -> Arc<OnceLock<Instant>> {
        self.reached.clone()
    }
}

impl MutDeviceMmio for BootTimer {
    fn mmio_read(&mut self, _base: MmioAddress, _offset: MmioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if offset == 0 && data.first() == Some(&BOOT_TIMER_MAGIC) {
            let now = Instant::now();
            if self.reached.set(now).is_ok() {
                tracing::debug!("boot timer: guest reached init");
                if let Some(hook) = &self.on_reached {
                    hook();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_the_first_magic_write_only() {
        let mut timer = BootTimer::new();
        let stamp = timer.stamp();
        timer.mmio_write(MmioAddress(0), 0, &[1]);
        timer.mmio_write(MmioAddress(0), 4, &[BOOT_TIMER_MAGIC]);
        assert!(stamp.get().is_none(), "wrong value or offset must not count");
        timer.mmio_write(MmioAddress(0), 0, &[BOOT_TIMER_MAGIC, 0, 0, 0]);
        let first = *stamp.get().expect("magic write recorded");
        timer.mmio_write(MmioAddress(0), 0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(*stamp.get().unwrap(), first);
        timer.mmio_write(MmioAddress(0), 0, &[]);
    }

    #[test]
    fn the_hook_runs_once_at_the_first_magic_write() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let mut timer = BootTimer::new().on_reached(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        timer.mmio_write(MmioAddress(0), 0, &[1]);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
        timer.mmio_write(MmioAddress(0), 0, &[BOOT_TIMER_MAGIC]);
        timer.mmio_write(MmioAddress(0), 0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
