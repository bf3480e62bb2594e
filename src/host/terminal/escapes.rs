//! What of a guest's terminal output reaches the user's terminal.
//!
//! A guest program writes escape sequences to the host's terminal, and a few of them act
//! outside it: OSC 52 sets the clipboard (a command the user later pastes), others report
//! state back as if typed (the window title by `CSI 21 t`, DECRQSS by DCS), load fonts or
//! palettes, or start downloads (iTerm2's OSC 1337). [`EscapeFilter`] passes text, control
//! characters and CSI sequences (colours, cursor movement, modes) but for window operations,
//! and of OSC sequences only titles (0, 1, 2) and hyperlinks (8); DCS, APC, PM and SOS strings
//! are dropped whole. It keeps its state between writes, so a sequence split across frames is
//! judged whole. `--raw-terminal` turns it off.

use std::sync::atomic::{AtomicBool, Ordering};

const ESC: u8 = 0x1b;
const BEL: u8 = 0x07;
/// OSC numbers that pass: titles and hyperlinks.
const SAFE_OSC: &[&[u8]] = &[b"0", b"1", b"2", b"8"];
/// The longest CSI or OSC sequence held to be judged; a longer one is dropped.
const MAX_SEQUENCE: usize = 4096;

static RAW: AtomicBool = AtomicBool::new(false);

/// `--raw-terminal`: the guest's output reaches the terminal as it is.
pub fn set_raw_output(raw: bool) {
    RAW.store(raw, Ordering::Relaxed);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Text,
    /// After ESC.
    Escape,
    /// In `ESC [`, held until its final byte.
    Csi,
    /// In `ESC ]`, held until BEL or ST.
    Osc,
    /// ESC inside an OSC: ST, if `\` follows.
    OscEscape,
    /// In a DCS, APC, PM or SOS string, dropped until ST.
    Dropped,
    DroppedEscape,
    /// In an OSC too long to hold, dropped until BEL or ST.
    DroppedOsc,
    DroppedOscEscape,
}

/// A streaming filter of terminal output; see the module's notes.
pub struct EscapeFilter {
    state: State,
    held: Vec<u8>,
}

impl EscapeFilter {
    pub fn new() -> EscapeFilter {
        EscapeFilter { state: State::Text, held: Vec::new() }
    }

    /// A filter for output going to `fd`: one where it is a terminal and `--raw-terminal` was
    /// not given; none otherwise (a pipe or file gets the bytes exactly).
    pub fn for_fd(fd: std::os::fd::BorrowedFd<'_>) -> Option<EscapeFilter> {
        (!RAW.load(Ordering::Relaxed) && rustix::termios::isatty(fd)).then(EscapeFilter::new)
    }

    /// Appends to `out` what of `input` may reach the terminal.
    pub fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &byte in input {
            self.state = self.step(self.state, byte, out);
        }
    }

    fn step(&mut self, state: State, byte: u8, out: &mut Vec<u8>) -> State {
        match (state, byte) {
            (State::Text, ESC) => State::Escape,
            (State::Text, _) => {
                out.push(byte);
                State::Text
            }
            (State::Escape, b'[') => self.hold(&[ESC, b'['], State::Csi),
            (State::Escape, b']') => self.hold(&[ESC, b']'], State::Osc),
            (State::Escape, b'P' | b'_' | b'^' | b'X') => State::Dropped,
            // A lone ESC is never written: with what follows it could begin any sequence.
            (State::Escape, ESC) => State::Escape,
            (State::Escape, _) => {
                out.extend_from_slice(&[ESC, byte]);
                State::Text
            }
            // A sequence cut short by another: the first is dropped.
            (State::Csi, ESC) => State::Escape,
            (State::Csi, _) => {
                self.held.push(byte);
                if (0x40..=0x7e).contains(&byte) {
                    // `t`: window operations, the title report among them.
                    if byte != b't' {
                        out.extend_from_slice(&self.held);
                    }
                    State::Text
                } else if self.held.len() > MAX_SEQUENCE {
                    State::Text
                } else {
                    State::Csi
                }
            }
            (State::Osc, BEL) | (State::DroppedOsc, BEL) => {
                self.end_osc(state == State::Osc, &[BEL], out);
                State::Text
            }
            (State::Osc, ESC) => State::OscEscape,
            (State::Osc, _) if self.held.len() >= MAX_SEQUENCE => State::DroppedOsc,
            (State::Osc, _) => {
                self.held.push(byte);
                State::Osc
            }
            (State::OscEscape | State::DroppedOscEscape, b'\\') => {
                self.end_osc(state == State::OscEscape, &[ESC, b'\\'], out);
                State::Text
            }
            (State::Dropped | State::DroppedEscape, ESC) => State::DroppedEscape,
            (State::DroppedEscape, b'\\') => State::Text,
            (State::Dropped, _) => State::Dropped,
            (State::DroppedOsc | State::DroppedOscEscape, ESC) => State::DroppedOscEscape,
            (State::DroppedOsc, _) => State::DroppedOsc,
            // Any other ESC inside a string ends it unfinished (dropped, as terminals do) and
            // begins a sequence of its own.
            (State::OscEscape | State::DroppedEscape | State::DroppedOscEscape, _) => {
                self.held.clear();
                self.step(State::Escape, byte, out)
            }
        }
    }

    fn hold(&mut self, start: &[u8], state: State) -> State {
        self.held.clear();
        self.held.extend_from_slice(start);
        state
    }

    /// An OSC ended by `terminator`: passed when it was held whole and its number is a safe one.
    fn end_osc(&mut self, whole: bool, terminator: &[u8], out: &mut Vec<u8>) {
        let body = self.held.get(2..).unwrap_or_default();
        let number = body.split(|&b| b == b';').next().unwrap_or(b"");
        if whole && SAFE_OSC.contains(&number) {
            out.extend_from_slice(&self.held);
            out.extend_from_slice(terminator);
        }
        self.held.clear();
    }
}

impl Default for EscapeFilter {
    fn default() -> Self {
        EscapeFilter::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filtered(pieces: &[&[u8]]) -> Vec<u8> {
        let mut filter = EscapeFilter::new();
        let mut out = Vec::new();
        for piece in pieces {
            filter.filter(piece, &mut out);
        }
        out
    }

    #[test]
    fn text_colours_and_cursor_movement_pass() {
        let screen = b"plain \x1b[1;31mred\x1b[0m \x1b[2J\x1b[H\x1b[?25l\x1b[6n\r\n\ttab \xc3\xa9\x1b7\x1b8";
        assert_eq!(filtered(&[screen]), screen);
        let titled = b"\x1b]0;my title\x07\x1b]8;;https://example.com\x1b\\link\x1b]8;;\x1b\\";
        assert_eq!(filtered(&[titled]), titled);
    }

    #[test]
    fn sequences_that_act_outside_the_terminal_are_dropped_even_split() {
        let clipboard = b"a\x1b]52;c;Y3VybCBldmlsLnRlc3QgfCBzaA==\x07b";
        assert_eq!(filtered(&[clipboard]), b"ab");
        let pieces: Vec<&[u8]> = clipboard.chunks(1).collect();
        assert_eq!(filtered(&pieces), b"ab", "byte by byte");
        assert_eq!(filtered(&[b"a\x1b]52;c;eA==\x1b\\b"]), b"ab", "ended by ST");
        assert_eq!(filtered(&[b"a\x1b[21tb\x1b[8;1;1tc"]), b"abc", "title report, window resize");
        assert_eq!(filtered(&[b"a\x1bP$q\"p\x1b\\b"]), b"ab", "DECRQSS");
        assert_eq!(filtered(&[b"a\x1b]1337;File=name=eA==:eA==\x07b"]), b"ab", "iTerm2's file download");
        assert_eq!(filtered(&[b"a\x1b]4;1;rgb:00/00/00\x07\x1b]11;?\x07b"]), b"ab", "palette and colour queries");
        assert_eq!(filtered(&[b"a\x1b_app\x1b\\\x1b^pm\x1b\\\x1bXsos\x1b\\b"]), b"ab");
    }

    #[test]
    fn endless_or_broken_sequences_cannot_swallow_or_smuggle() {
        let mut endless = b"\x1b]52;c;".to_vec();
        endless.extend(std::iter::repeat_n(b'A', 3 * MAX_SEQUENCE));
        endless.extend_from_slice(b"\x07after");
        assert_eq!(filtered(&[&endless]), b"after");
        // An OSC cut short by another sequence: the OSC is gone, the CSI stays; an ESC alone
        // never reaches the terminal to join what follows.
        assert_eq!(filtered(&[b"\x1b]52;c;eA==\x1b[31mred"]), b"\x1b[31mred");
        assert_eq!(filtered(&[b"\x1b\x1b]52;c;eA==\x07", b"\x1b", b"\x1bX\x1b\\ok"]), b"ok");
        let long_csi = [&b"\x1b["[..], &vec![b'1'; MAX_SEQUENCE + 10], b"mX"].concat();
        let out = filtered(&[&long_csi]);
        assert!(!out.contains(&ESC) && out.ends_with(b"mX"), "{out:?}");
        assert_eq!(filtered(&[b"\x1bPq#0;2;0;0;0\x07still in the string\x1b\\after"]), b"after", "a DCS ends at ST only");
    }

    proptest::proptest! {
        /// Any output, in any pieces: the same as whole, and nothing that acts outside the
        /// terminal gets through.
        #[test]
        fn any_output_in_any_pieces(bytes in proptest::collection::vec(proptest::sample::select(b"\x1b]52;Pc\x07\\[21t0m8 ;a\x1bX".to_vec()), 0..200), split in 1usize..32) {
            let whole = filtered(&[&bytes]);
            let pieces: Vec<&[u8]> = bytes.chunks(split).collect();
            proptest::prop_assert_eq!(&filtered(&pieces), &whole);
            for bad in [&b"\x1b]52"[..], b"\x1bP", b"\x1bX", b"\x1b[21t"] {
                proptest::prop_assert!(!whole.windows(bad.len()).any(|w| w == bad), "{:?} in {:?}", bad, whole);
            }
        }
    }
}
