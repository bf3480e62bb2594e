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
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
    let fd = unsafe { libc::ioctl(vcpu_fd.as_raw_fd(), KVM_GET_STATS_FD as _, 0) };
    if fd < 0 {
        return ExitCounts::new();
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    let mut bytes = Vec::new();
    if file.take(MAX_STATS_BYTES).read_to_end(&mut bytes).is_err() {
        return ExitCounts::new();
    }
    parse(&bytes).unwrap_or_default()
}

/// Reads the exit counters out of a whole binary statistics file: a header, descriptors
/// (each followed by its name), and the data they point into. Anything out of bounds is None.
pub fn parse(bytes: &[u8]) -> Option<ExitCounts> {
    let u32_at = |at: usize| -> Option<u32> { Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?)) };
    let u64_at = |at: usize| -> Option<u64> { Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?)) };
    if bytes.len() < HEADER_LEN {
        return None;
    }
    let name_size = u32_at(4)? as usize;
    let count = u32_at(8)? as usize;
    let desc_offset = u32_at(16)? as usize;
    let data_offset = u32_at(20)? as usize;
    let mut counts = ExitCounts::new();
    for i in 0..count.min(4096) {
        let at = desc_offset.checked_add(i.checked_mul(DESC_LEN.checked_add(name_size)?)?)?;
        let flags = u32_at(at)?;
        let size = u16::from_le_bytes(bytes.get(at + 6..at + 8)?.try_into().ok()?);
        let offset = u32_at(at + 8)? as usize;
        let name = bytes.get(at + DESC_LEN..at + DESC_LEN + name_size)?;
        let name = String::from_utf8_lossy(name.split(|&b| b == 0).next()?).into_owned();
        let is_exit_count = name.ends_with("exits") || name == "insn_emulation" || name == "hypercalls";
        if flags & STATS_TYPE_MASK == STATS_TYPE_CUMULATIVE && size == 1 && is_exit_count {
            counts.insert(name, u64_at(data_offset.checked_add(offset)?)?);
        }
    }
    Some(counts)
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
        let file = stats_file(&[("exits", 0, 1234), ("io_exits", 0, 40), ("mmio_exits", 0, 7), ("halt_poll_success_ns", 0, 99), ("preemption_reported", 1, 5)]);
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
