use std::os::unix::fs::{symlink, PermissionsExt};

use super::*;

fn mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_private_dir_is_made_once_and_then_only_checked() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("cvm-1");
    create_private_dir(&base).unwrap();
    assert_eq!(std::fs::symlink_metadata(&base).unwrap().permissions().mode() & 0o777, 0o700);
    create_private_dir(&base).expect("an existing one of ours");
}

#[test]
fn a_link_a_file_or_an_open_directory_in_its_place_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Another user's trick: a link where the directory should be, to one that passes the checks.
    let real = dir.path().join("real");
    create_private_dir(&real).unwrap();
    let link = dir.path().join("cvm-link");
    symlink(&real, &link).unwrap();
    let e = create_private_dir(&link).unwrap_err().to_string();
    assert!(e.contains("not a directory but a link"), "{e}");
    let file = dir.path().join("cvm-file");
    std::fs::write(&file, "").unwrap();
    assert!(create_private_dir(&file).is_err());
    let open = dir.path().join("cvm-open");
    std::fs::create_dir(&open).unwrap();
    mode(&open, 0o755);
    let e = create_private_dir(&open).unwrap_err().to_string();
    assert!(e.contains("only you can use") && e.contains("mode 755"), "{e}");
}

#[test]
fn a_parent_others_can_write_must_be_sticky() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    mode(&shared, 0o777);
    let e = create_private_dir(&shared.join("cvm-1")).unwrap_err().to_string();
    assert!(e.contains("where another user could replace it"), "{e}");
    mode(&shared, 0o1777);
    create_private_dir(&shared.join("cvm-1")).expect("a sticky parent, as /tmp is");
}
