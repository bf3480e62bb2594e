//! A guest kernel panic, as the serial console shows it.
//!
//! The guest's kernel is the only witness of its own panic, and what it does next depends on
//! `panic=`: `panic=-1` resets at once (which looks like a clean reboot to the VMM), `panic=N`
//! resets after N seconds, `panic=0` spins forever. So cvm reads the console: the line
//! `Kernel panic - not syncing: REASON` is printed at KERN_EMERG, whatever `quiet` or
//! `loglevel=` say, before any of those. (A pvpanic device would need ACPI or a device tree,
//! which cvm's guests do not have.) The guest can print that line on purpose: it then only
//! fails its own session, which it could do anyway.
//!
//! cvm's VMM feeds its console through a [`PanicWatch`] and ends the VM as a panic; a session
//! on either engine reads its console log with [`find`].

use std::collections::VecDeque;

/// The line every Linux panic prints first.
const PANIC_LINE: &str = "Kernel panic - not syncing";
/// What Linux prints last when it will not reboot (`panic=0`): it spins after this.
const END_LINE: &str = "---[ end Kernel panic";
/// Lines of console kept for a report: the oops and call trace before the panic line.
const KEPT_LINES: usize = 40;
/// A console line is cut here, so a guest printing without newlines cannot grow cvm's memory.
const MAX_LINE: usize = 512;

/// A panic the guest's console showed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestPanic {
    /// The `Kernel panic - not syncing: ...` line.
    pub summary: String,
    /// The console lines up to it (at most [`KEPT_LINES`]), the oops and call trace among them.
    pub lines: Vec<String>,
}

impl std::fmt::Display for GuestPanic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the guest kernel panicked: {}", self.summary)
    }
}

/// What a console chunk showed.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    Nothing,
    /// The panic line: the kernel will reset, wait or spin, as `panic=` says.
    Panic,
    /// The panic's last line: the kernel spins from here on.
    End,
}

/// Reads a console stream line by line with bounded memory.
#[derive(Debug, Default)]
pub struct PanicWatch {
    lines: VecDeque<String>,
    partial: Vec<u8>,
    panic: Option<GuestPanic>,
}

impl PanicWatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next console bytes.
    pub fn feed(&mut self, bytes: &[u8]) -> Seen {
        let mut seen = Seen::Nothing;
        for &byte in bytes {
            if byte == b'\n' {
                let line = String::from_utf8_lossy(&self.partial).trim_end_matches('\r').to_string();
                self.partial.clear();
                match self.take_line(line) {
                    Seen::Nothing => {}
                    other => seen = other,
                }
            } else if self.partial.len() < MAX_LINE {
                self.partial.push(byte);
            }
        }
        seen
    }

    fn take_line(&mut self, line: String) -> Seen {
        let mut seen = Seen::Nothing;
        // The end line repeats the panic line's words: alone, it still tells of a panic.
        if self.panic.is_none() {
            if let Some(start) = line.find(PANIC_LINE) {
                let mut lines: Vec<String> = self.lines.iter().cloned().collect();
                lines.push(line.clone());
                self.panic = Some(GuestPanic { summary: line[start..].to_string(), lines });
                seen = Seen::Panic;
            }
        }
        if line.contains(END_LINE) {
            seen = Seen::End;
        }
        if self.lines.len() == KEPT_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
        seen
    }

    /// The panic seen so far, if any.
    pub fn panic(&self) -> Option<&GuestPanic> {
        self.panic.as_ref()
    }
}

/// The first panic in a console log.
pub fn find(console: &[u8]) -> Option<GuestPanic> {
    let mut watch = PanicWatch::new();
    watch.feed(console);
    watch.feed(b"\n"); // a last line without its newline
    watch.panic
}

#[cfg(test)]
mod tests {
    use super::*;

    const OOPS: &str = "[    0.412000] ExtINT not setup in hardware but reported by MP table\n\
        [    0.413000] BUG: kernel NULL pointer dereference, address: 0000000000000004\n\
        [    0.413100] #PF: supervisor read access in kernel mode\n\
        [    0.414000] Call Trace:\n\
        [    0.415000] Kernel panic - not syncing: Attempted to kill the idle task!\n";

    #[test]
    fn a_panic_is_found_with_the_lines_before_it() {
        let panic = find(OOPS.as_bytes()).expect("a panic");
        assert_eq!(panic.summary, "Kernel panic - not syncing: Attempted to kill the idle task!");
        assert_eq!(panic.lines.len(), 5);
        assert!(panic.lines[1].contains("NULL pointer dereference"));
        assert_eq!(panic.to_string(), "the guest kernel panicked: Kernel panic - not syncing: Attempted to kill the idle task!");
    }

    #[test]
    fn chunks_split_anywhere_give_the_same_report() {
        let whole = find(OOPS.as_bytes());
        for size in [1, 2, 3, 7, 64] {
            let mut watch = PanicWatch::new();
            let mut panics = 0;
            for chunk in OOPS.as_bytes().chunks(size) {
                if watch.feed(chunk) == Seen::Panic {
                    panics += 1;
                }
            }
            assert_eq!(panics, 1, "chunks of {size}");
            assert_eq!(watch.panic(), whole.as_ref(), "chunks of {size}");
        }
    }

    #[test]
    fn the_end_line_says_the_kernel_spins() {
        let mut watch = PanicWatch::new();
        assert_eq!(watch.feed(b"Kernel panic - not syncing: VFS: Unable to mount root fs\n"), Seen::Panic);
        assert_eq!(watch.feed(b"---[ end Kernel panic - not syncing: VFS: Unable to mount root fs ]---\r\n"), Seen::End);
        assert_eq!(watch.panic().unwrap().summary, "Kernel panic - not syncing: VFS: Unable to mount root fs");
        // An end line whose panic line was lost still ends the guest as a panic.
        let mut watch = PanicWatch::new();
        assert_eq!(watch.feed(b"---[ end Kernel panic - not syncing: x ]---\n"), Seen::End);
        assert!(watch.panic().is_some());
    }

    #[test]
    fn an_ordinary_boot_is_no_panic() {
        let log = "Linux version 6.12\nRun /init as init process\ncvm-agent: init reached, 2 cpus\nreboot: Restarting system\n";
        assert_eq!(find(log.as_bytes()), None);
        assert_eq!(find(b""), None);
    }

    #[test]
    fn a_flood_without_newlines_keeps_memory_bounded() {
        let mut watch = PanicWatch::new();
        for _ in 0..10_000 {
            watch.feed(&[b'x'; 1000]);
        }
        assert!(watch.partial.len() <= MAX_LINE);
        for _ in 0..10_000 {
            watch.feed(b"line\n");
        }
        assert!(watch.lines.len() <= KEPT_LINES);
        // A panic line longer than the cap is still recognised by its start.
        watch.feed(format!("Kernel panic - not syncing: {}\n", "y".repeat(4000)).as_bytes());
        assert!(watch.panic().is_some_and(|p| p.summary.len() <= MAX_LINE));
    }

    #[test]
    fn hostile_bytes_never_break_the_reader() {
        let mut watch = PanicWatch::new();
        watch.feed(&[0xff, 0xfe, b'\n', 0, 0, b'\r', b'\n']);
        assert!(watch.feed(b"\xffKernel panic - not syncing: \xc3(\n") == Seen::Panic);
        assert!(watch.panic().unwrap().summary.starts_with("Kernel panic - not syncing: "));
    }
}
