//! How many VM exits a guest caused, and of which kinds: KVM's own per-vCPU counters (its
//! binary statistics, Linux 5.14 and later). Every exit costs a round trip through the host
//! (20-26 us on a PVM host, far more nested), so the boot path's exit count is the figure
//! `cvm bench boot` drives down.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};

/// `KVM_GET_STATS_FD`, `_IO(KVMIO, 0xce)`: kvm-ioctls has no wrapper for it.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae_ce;
const HEADER_LEN: usize = 24;
const DESC_LEN: usize = 16;
const STATS_TYPE_MASK: u32 = 0xf;
const STATS_TYPE_CUMULATIVE: u32 = 0;
/// The most of a stats file cvm reads: the kernel's is a few KiB.
const MAX_STATS_BYTES: u64 = 1 << 20;

/// Exit counters by KVM's name (`exits`, `io_exits`, `mmio_exits`, `halt_exits`, ...).
pub type ExitCounts = BTreeMap<String, u64>;

/// The exit counters of the vCPU behind `vcpu_fd`; empty where KVM has no binary statistics.
pub fn read(vcpu_fd: &impl AsRawFd) -> ExitCounts {
    let Some(file) = open(vcpu_fd) else { return ExitCounts::new() };
    let mut bytes = Vec::new();
    if file.take(MAX_STATS_BYTES).read_to_end(&mut bytes).is_err() {
        return ExitCounts::new();
    }
    parse(&bytes).unwrap_or_default()
}

/// The vCPU's binary statistics file, or None where KVM has none.
fn open(vcpu_fd: &impl AsRawFd) -> Option<File> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
    let fd = unsafe { libc::ioctl(vcpu_fd.as_raw_fd(), KVM_GET_STATS_FD as _, 0) };
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    (fd >= 0).then(|| unsafe { File::from_raw_fd(fd) })
}

/// Reads the exit counters out of a whole binary statistics file.
pub fn parse(bytes: &[u8]) -> Option<ExitCounts> {
    let counters = statistics(bytes)?.into_iter().filter(|s| {
        let is_exit_count = s.name.ends_with("exits") || s.name == "insn_emulation" || s.name == "hypercalls";
        s.kind == STATS_TYPE_CUMULATIVE && is_exit_count
    });
    counters.map(|s| Some((s.name, u64_at(bytes, s.at)?))).collect()
}

/// One single-value statistic of a binary statistics file: its name, kind (cumulative,
/// instant, peak) and where its value lies in the file.
struct Statistic {
    name: String,
    kind: u32,
    at: usize,
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// The single-value statistics a file describes: a header, descriptors (each followed by its
/// name), and the data they point into. Anything out of bounds is None.
fn statistics(bytes: &[u8]) -> Option<Vec<Statistic>> {
    if bytes.len() < HEADER_LEN {
        return None;
    }
    let name_size = u32_at(bytes, 4)? as usize;
    let count = u32_at(bytes, 8)? as usize;
    let desc_offset = u32_at(bytes, 16)? as usize;
    let data_offset = u32_at(bytes, 20)? as usize;
    let mut found = Vec::new();
    for i in 0..count.min(4096) {
        let at = desc_offset.checked_add(i.checked_mul(DESC_LEN.checked_add(name_size)?)?)?;
        let flags = u32_at(bytes, at)?;
        let size = u16::from_le_bytes(bytes.get(at + 6..at + 8)?.try_into().ok()?);
        let offset = u32_at(bytes, at + 8)? as usize;
        let name = bytes.get(at + DESC_LEN..at.checked_add(DESC_LEN)?.checked_add(name_size)?)?;
        let name = String::from_utf8_lossy(name.split(|&b| b == 0).next()?).into_owned();
        if size == 1 {
            found.push(Statistic { name, kind: flags & STATS_TYPE_MASK, at: data_offset.checked_add(offset)? });
        }
    }
    Some(found)
}

/// What tells a halted vCPU apart without stopping it: whether it is blocked in KVM now, and
/// how many HLTs it has run. The same count while blocked on two looks means one halt all
/// along (`halt_wakeup` is no help: KVM counts wake-ups that leave the vCPU halted).
pub(crate) struct HaltStats {
    file: File,
    /// Where `blocking` and `halt_exits` lie, and the bytes that span them.
    at: [usize; 2],
    span: std::ops::Range<usize>,
}

/// A look at a vCPU through [`HaltStats`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HaltState {
    pub blocking: bool,
    /// HLTs so far: unchanged means the same halt as before.
    pub halts: u64,
}

impl HaltStats {
    /// None where KVM keeps no such statistics (before Linux 5.16, `blocking`).
    pub(crate) fn open(vcpu_fd: &impl AsRawFd) -> Option<HaltStats> {
        let file = open(vcpu_fd)?;
        let mut bytes = Vec::new();
        (&file).take(MAX_STATS_BYTES).read_to_end(&mut bytes).ok()?;
        let stats = statistics(&bytes)?;
        let find = |name: &str| stats.iter().find(|s| s.name == name).map(|s| s.at);
        let at = [find("blocking")?, find("halt_exits")?];
        let span = *at.iter().min()?..at.iter().max()? + 8;
        Some(HaltStats { file, at, span })
    }

    pub(crate) fn read(&self) -> Option<HaltState> {
        let mut bytes = vec![0u8; self.span.len()];
        std::os::unix::fs::FileExt::read_exact_at(&self.file, &mut bytes, self.span.start as u64).ok()?;
        let [blocking, halts] = self.at.map(|at| u64_at(&bytes, at - self.span.start));
        Some(HaltState { blocking: blocking? != 0, halts: halts? })
    }
}

/// Adds `more` into `total`, counter by counter.
pub fn add(total: &mut ExitCounts, more: ExitCounts) {
    for (name, n) in more {
        *total.entry(name).or_default() += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A statistics file as KVM lays it out, with these (name, flags, value) counters.
    fn stats_file(stats: &[(&str, u32, u64)]) -> Vec<u8> {
        let name_size = 48usize;
        let desc_offset = HEADER_LEN + 16; // after the header and an id string
        let data_offset = desc_offset + stats.len() * (DESC_LEN + name_size);
        let mut out = Vec::new();
        for v in [0u32, name_size as u32, stats.len() as u32, HEADER_LEN as u32, desc_offset as u32, data_offset as u32] {
            out.extend(v.to_le_bytes());
        }
        out.extend([b'v'; 16]);
        for (i, (name, flags, _)) in stats.iter().enumerate() {
            out.extend(flags.to_le_bytes());
            out.extend(0i16.to_le_bytes()); // exponent
            out.extend(1u16.to_le_bytes()); // size: one u64
            out.extend(((i * 8) as u32).to_le_bytes());
            out.extend(0u32.to_le_bytes()); // bucket size
            let mut field = name.as_bytes().to_vec();
            field.resize(name_size, 0);
            out.extend(field);
        }
        for (_, _, value) in stats {
            out.extend(value.to_le_bytes());
        }
        out
    }

    #[test]
    fn exit_counters_are_read_and_other_statistics_left_out() {
        let file = stats_file(&[
            ("exits", 0, 1234),
            ("io_exits", 0, 40),
            ("mmio_exits", 0, 7),
            ("halt_poll_success_ns", 0, 99),
            ("preemption_reported", 1, 5),
        ]);
        let counts = parse(&file).unwrap();
        assert_eq!(counts, ExitCounts::from([("exits".into(), 1234), ("io_exits".into(), 40), ("mmio_exits".into(), 7)]));
    }

    #[test]
    fn truncated_or_hostile_files_give_nothing_rather_than_a_crash() {
        let file = stats_file(&[("exits", 0, 1), ("io_exits", 0, 2)]);
        for len in 0..file.len() {
            let _ = parse(&file[..len]);
        }
        let mut huge = file.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes()); // descriptor count
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes()); // name size
        assert!(parse(&huge).is_none());
        assert!(parse(&[]).is_none());
    }

    #[test]
    fn counts_add_up_across_vcpus() {
        let mut total = ExitCounts::from([("exits".into(), 10)]);
        add(&mut total, ExitCounts::from([("exits".into(), 5), ("io_exits".into(), 2)]));
        assert_eq!(total, ExitCounts::from([("exits".into(), 15), ("io_exits".into(), 2)]));
    }
}
