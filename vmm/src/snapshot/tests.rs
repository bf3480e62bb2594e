use super::*;
use crate::arch::x86_64::state::{CpuState, VmState};
use proptest::prelude::*;
use std::os::unix::fs::MetadataExt;

const RAM: u64 = 4 << 20;

fn snapshot(vcpus: usize) -> Snapshot {
    Snapshot {
        memory_bytes: RAM,
        vm: VmState::default(),
        vcpus: (0..vcpus).map(|_| CpuState::default()).collect(),
        serial: SerialConsoleState::default(),
        transports: Vec::new(),
        disks: Vec::new(),
        kernel_private: vec![(1 << 20, 2 << 20)],
    }
}

/// Guest RAM with a page of data at 0, a zero page written at 4 KiB, and data at 3 MiB.
fn ram() -> File {
    let (_mem, file) = crate::vstate::memory::create_guest_memory(RAM).unwrap();
    file.write_all_at(&[0xab; PAGE], 0).unwrap();
    file.write_all_at(&[0; PAGE], PAGE as u64).unwrap();
    file.write_all_at(b"at three MiB", 3 << 20).unwrap();
    file
}

/// Writes `snapshot` with [`ram`] and `disks` to `at`, as cvm writes what a VMM captured.
fn save(snapshot: &Snapshot, at: &Path, disks: &[PathBuf]) {
    write(at, &snapshot.encode().unwrap(), &ram(), snapshot.memory_bytes, disks).unwrap();
}

fn written() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().join("cache/snapshots/key");
    save(&snapshot(2), &at, &[]);
    (dir, at)
}

#[test]
fn a_snapshot_reads_back_as_written_with_its_memory_sparse() {
    let (_dir, at) = written();
    let (read, memory) = Snapshot::read(&at).unwrap();
    assert_eq!((read.vcpus.len(), read.memory_bytes, read.kernel_private), (2, RAM, vec![(1 << 20, 2 << 20)]));
    let mut page = vec![0u8; PAGE];
    memory.read_exact_at(&mut page, 0).unwrap();
    assert_eq!(page, vec![0xab; PAGE]);
    let mut text = [0u8; 12];
    memory.read_exact_at(&mut text, 3 << 20).unwrap();
    assert_eq!(&text, b"at three MiB");
    let meta = memory.metadata().unwrap();
    assert_eq!(meta.len(), RAM);
    assert_eq!(meta.blocks() * 512, 2 * PAGE as u64, "only the two pages of data take room");
    for file in [STATE_FILE, MEMORY_FILE] {
        assert_eq!(std::fs::metadata(at.join(file)).unwrap().mode() & 0o777, 0o600, "{file}");
    }
    assert_eq!(std::fs::metadata(&at).unwrap().mode() & 0o777, 0o700);
}

#[test]
fn a_new_snapshot_replaces_the_old_whole_and_leaves_no_scratch() {
    let (dir, at) = written();
    save(&snapshot(1), &at, &[]);
    assert_eq!(Snapshot::read(&at).unwrap().0.vcpus.len(), 1);
    let names: Vec<_> = std::fs::read_dir(at.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("key")]);
    drop(dir);
}

#[test]
fn writable_disks_are_kept_as_they_were_and_copied_back() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("scratch.img");
    std::fs::write(&disk, [b"superblock".as_slice(), &[0; 2 * PAGE], b"journal"].concat()).unwrap();
    let size = std::fs::metadata(&disk).unwrap().len();
    let at = dir.path().join("snapshot");
    save(&Snapshot { disks: vec![size], ..snapshot(1) }, &at, std::slice::from_ref(&disk));
    let (read, _) = Snapshot::read(&at).unwrap();

    let session_disk = dir.path().join("session.img");
    std::fs::write(&session_disk, vec![0xff; 3 * PAGE + 100]).unwrap(); // a bigger, dirty file
    read.restore_disks(&at, std::slice::from_ref(&session_disk)).unwrap();
    assert!(std::fs::read(&session_disk).unwrap() == std::fs::read(&disk).unwrap(), "the copy is the disk as it was");
    assert!(read.restore_disks(&at, &[]).is_err(), "another VM's disks");
}

#[test]
fn a_snapshot_of_another_machine_does_not_fit() {
    let config = VmConfig { vcpus: 2, memory_bytes: RAM, ..VmConfig::new("k") };
    assert!(snapshot(2).check_fits(&config).is_ok());
    assert!(snapshot(1).check_fits(&config).is_err());
    assert!(snapshot(2).check_fits(&VmConfig { memory_bytes: 2 * RAM, ..config }).is_err());
}

#[test]
fn memory_copies_skip_holes_and_keep_offsets() {
    let from = ram();
    let to = tempfile::tempfile().unwrap();
    let runs = copy_pages(&from, &to, RAM, false).unwrap();
    assert_eq!(runs, [(0, 2 * PAGE as u64), (3 << 20, (3 << 20) + PAGE as u64)], "the data runs of the memfd");
    to.set_len(RAM).unwrap();
    let mut all = vec![0u8; RAM as usize];
    to.read_exact_at(&mut all, 0).unwrap();
    let mut expected = vec![0u8; RAM as usize];
    from.read_exact_at(&mut expected, 0).unwrap();
    assert!(all == expected, "the copy differs");
    // Without skipping zero pages, the written zero page is copied; the holes never are.
    assert_eq!(to.metadata().unwrap().blocks() * 512, 3 * PAGE as u64);
}

/// One good snapshot, written once for the tests that read hostile copies of it.
fn good() -> &'static Path {
    static GOOD: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    &GOOD.get_or_init(written).1
}

fn state_bytes() -> Vec<u8> {
    std::fs::read(good().join(STATE_FILE)).unwrap()
}

/// Reads `state` as a snapshot's state file beside a link to a good memory file.
fn read_state(state: &[u8]) -> Result<Snapshot> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(STATE_FILE), state).unwrap();
    std::fs::hard_link(good().join(MEMORY_FILE), dir.path().join(MEMORY_FILE)).unwrap();
    Snapshot::read(dir.path()).map(|(snapshot, _)| snapshot)
}

#[test]
fn every_truncation_of_a_state_file_is_refused() {
    let good = state_bytes();
    assert!(read_state(&good).is_ok());
    for len in 0..good.len() {
        assert!(read_state(&good[..len]).is_err(), "cut at {len}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever is in the state file, reading it returns an error or a snapshot; it never
    /// panics or allocates what the file claims.
    #[test]
    fn hostile_state_files_are_refused_not_crashed_on(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        // A body with a good checksum but hostile contents: decoded or refused, never trusted
        // further than its decoding.
        let _ = read_state(&framed(&bytes));
        prop_assert!(read_state(&bytes).is_err() || bytes.starts_with(MAGIC));
    }

    #[test]
    fn any_flipped_bit_in_a_state_file_is_caught(bit in 0usize..8 * 1024) {
        let mut state = state_bytes();
        let bit = bit % (8 * state.len());
        state[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(read_state(&state).is_err());
    }
}
