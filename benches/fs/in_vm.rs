//! `cvm bench fs --in-vm`: the workloads inside a Debian guest on each engine, on the project
//! share (cvm's backend), on virtiofsd serving the same directory to the same guest, and on
//! the guest's tmpfs; plus git and compile-like rows on a generated project.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cvm::guest::shares::{ExternalShare, HostUser, ShareRequest};
use cvm::session::{Session, SessionConfig};
use cvm_agent::fs_workloads::Workload;

use super::{FsBench, Row, Summary, Table, Virtiofsd, CVM, VIRTIOFSD};

/// The rows only `--in-vm` has: (key in the guest script's results, name, unit).
const GIT_ROWS: [(&str, &str, &str); 3] = [
    ("git-checkout", "git checkout of the project", "files/s"),
    ("git-status", "git status", "files/s"),
    ("compile", "compile-like: read all, write per package", "files/s"),
];
/// Where the guest sees virtiofsd's share of the same directory.
const REFERENCE_GUEST_PATH: &str = "/run/cvm/bench/virtiofsd";
/// What the guest script writes its results to, in the share.
const RESULTS: &str = "results";
/// The longest an in-VM run may take, per engine.
const DEADLINE: Duration = Duration::from_secs(3 * 3600);

/// The guest's side: copies the files to the guest's tmpfs, then runs every workload per round
/// per target, the targets in turn, appending `TARGET WORKLOAD RATE` lines to the results
/// file. Arguments: the share, virtiofsd's mount (or ""), the results file, the file's bytes,
/// random reads, files, rounds, the git project's files.
const GUEST_SCRIPT: &str = r#"set -eu
exec 1>&2
share=$1 reference=$2 out=$3 file=$4 random=$5 files=$6 rounds=$7 git_files=$8
local=/tmp/cvm-bench
mkdir -p "$local" && cp -a "$share/big" "$share/tree" "$local/"
targets=(tmpfs cvm) dirs=("$local" "$share")
if [ -n "$reference" ]; then targets+=(virtiofsd) dirs+=("$reference"); fi
now() { date +%s%N; }
# Each measurement starts with the guest's caches empty (the host's stay warm), so that it
# measures the server, and a server holds no more files open than one workload needs.
drop_caches() { sync; sudo -n sh -c 'echo 3 > /proc/sys/vm/drop_caches'; }
rate() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.3f\n", n / ((b - a) / 1e9) }'; }
for w in seq-read seq-write random-read create walk; do
  for r in $(seq "$rounds"); do
    for i in "${!targets[@]}"; do
      drop_caches
      echo "${targets[$i]} $w $(/init bench-fs "$w" "${dirs[$i]}" "$file" "$random" "$files" "$r$i")" >> "$out"
    done
  done
  echo "bench fs: in the guest: $w done"
done
git clone -q --no-checkout -b empty "$share/project" "$local/work-tmpfs"
git -C "$local/work-tmpfs" branch -q --no-track main origin/main
for r in $(seq "$rounds"); do
  for i in "${!targets[@]}"; do
    t=${targets[$i]} work="${dirs[$i]}/work-${targets[$i]}" objects="${dirs[$i]}/objects-$r-$i"
    drop_caches
    a=$(now); git -C "$work" checkout -q main; b=$(now)
    echo "$t git-checkout $(rate "$git_files" "$a" "$b")" >> "$out"
    a=$(now); git -C "$work" status --porcelain > /dev/null; b=$(now)
    echo "$t git-status $(rate "$git_files" "$a" "$b")" >> "$out"
    echo "$t compile $(/init bench-fs compile "$work/src" "$objects")" >> "$out"
    rm -rf "$objects"
    git -C "$work" checkout -q empty
  done
  echo "bench fs: in the guest: git checkout, git status and compile, round $r done"
done
"#;

/// A git project of `files` small source files in directories of 100 under `src/`, committed
/// on `main`, with an `empty` branch to check it out from; and its clones, not checked out,
/// that the guest works in on each share (`work-cvm`, `work-virtiofsd`): the guest cannot
/// make a `.git` in a share of cvm's.
fn make_git_project(share: &Path, files: usize) -> Result<()> {
    let dir = &share.join("project");
    eprintln!("bench fs: making a git project of {files} files in {}", dir.display());
    for i in 0..files {
        let package = dir.join(format!("src/p{}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&package)?;
        }
        let body: String = (0..24).map(|line| format!("int f{i}_{line}(int x) {{ return x * {line} + {i}; }}\n")).collect();
        std::fs::write(package.join(format!("m{i}.c")), body)?;
    }
    let git = |args: &[&str]| -> Result<String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=cvm bench", "-c", "user.email=bench@cvm.invalid", "-c", "commit.gpgsign=false"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("cannot run git, which --in-vm needs for its project")?;
        if !out.status.success() {
            bail!("git {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    git(&["init", "-q", "-b", "main"])?;
    git(&["add", "-A"])?;
    git(&["commit", "-q", "-m", "project"])?;
    // One pack: a checkout then opens one file for the objects, not one per file.
    git(&["repack", "-adq"])?;
    let empty_tree = git(&["mktree"])?;
    let empty = git(&["commit-tree", &empty_tree, "-m", "empty"])?;
    git(&["branch", "empty", &empty])?;
    for target in ["cvm", "virtiofsd"] {
        let clone = format!("../work-{target}");
        git(&["clone", "-q", "--no-checkout", "-b", "empty", ".", &clone])?;
        // Its own `main`, so that checking it out writes no tracking configuration (which the
        // share's git guard keeps read-only).
        git(&["-C", &clone, "branch", "-q", "--no-track", "main", "origin/main"])?;
    }
    Ok(())
}

/// The most files of the share the guest holds at once in one workload (each one an open file
/// in the server): the tree and its directories, the files created, or the git project
/// checked out, with room for the rest.
pub(super) fn open_files(args: &FsBench) -> u64 {
    let tree = args.tree + args.tree / 500;
    let git = args.git_files + args.git_files / 100;
    tree.max(git).max(args.files) as u64 + 1000
}

/// Guest memory: room for the tmpfs copies, the git project's clones and the page cache of
/// both shares.
fn memory(args: &FsBench) -> u64 {
    let bytes = (1 << 30) + 3 * args.size + args.git_files as u64 * 16 * 1024;
    bytes.div_ceil(1 << 20) << 20
}

pub(super) fn run(args: &FsBench, host: &crate::bench::HostFacts, work: &Path, share: &Path) -> Result<Vec<Table>> {
    let engines = crate::bench::engines_or_every_one_here(&args.engines, "bench fs");
    let kernel = cvm::project::images::kernel(args.kernel.clone())?;
    let image = cvm::project::images::image("debian")?;
    make_git_project(share, args.git_files)?;
    let user = HostUser::current()?.guest();
    let mut tables = Vec::new();
    for engine in engines {
        let label = crate::bench::engine_label(engine, host);
        eprintln!("bench fs: in a guest on {label}");
        let _ = std::fs::remove_file(share.join(RESULTS));
        let reference_socket = work.join("virtiofsd.sock");
        let _ = std::fs::remove_file(&reference_socket);
        let reference = Virtiofsd::start(&args.virtiofsd, &reference_socket, share, Some((user.uid, user.gid)))?;
        let external = reference
            .iter()
            .map(|_| ExternalShare { socket: reference_socket.clone(), tag: "virtiofsd".into(), guest_path: REFERENCE_GUEST_PATH.into() })
            .collect();
        let config = SessionConfig {
            debug: tracing::enabled!(tracing::Level::INFO),
            shares: ShareRequest { project: Some(share.to_path_buf()), external, ..ShareRequest::default() },
            egress: cvm::network::egress::EgressPolicy { mode: cvm::network::egress::NetworkMode::None, ..Default::default() },
            ..SessionConfig::new(engine, kernel.clone(), image.clone(), 2, memory(args))
        };
        let session = Session::start(&config, None).with_context(|| format!("cannot start the guest on {label}"))?;
        let reference_path = if reference.is_some() { REFERENCE_GUEST_PATH } else { "" };
        let argv: Vec<String> = vec![
            "bash".into(),
            "-c".into(),
            GUEST_SCRIPT.into(),
            "bench-fs".into(),
            share.display().to_string(),
            reference_path.into(),
            share.join(RESULTS).display().to_string(),
            args.size.to_string(),
            args.random_reads.to_string(),
            args.files.to_string(),
            args.rounds.to_string(),
            args.git_files.to_string(),
        ];
        let mut exec = cvm_agent::protocol::Exec { argv: argv.into_iter().map(String::into_bytes).collect(), ..Default::default() };
        session.prepare(&mut exec);
        let outcome = session.exec(exec, Some(Instant::now() + DEADLINE));
        let ended = session.shutdown();
        drop(reference);
        match outcome? {
            cvm::session::exec::Outcome::Exited(status) if status.shell_code() == 0 => {}
            other => {
                bail!("the workloads failed in the guest on {label}: {other:?}{}", ended.map(|e| format!(" ({e})")).unwrap_or_default())
            }
        }
        let results = std::fs::read_to_string(share.join(RESULTS)).context("the guest wrote no results")?;
        tables.push(table(args, host, &label, &results)?);
    }
    Ok(tables)
}

/// The guest script's `TARGET WORKLOAD RATE` lines as a table of medians and ranges.
fn table(args: &FsBench, host: &crate::bench::HostFacts, label: &str, results: &str) -> Result<Table> {
    let mut samples: std::collections::BTreeMap<(&str, &str), Vec<f64>> = Default::default();
    for line in results.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next().and_then(|v| v.parse::<f64>().ok()), words.next()) {
            (Some(target), Some(workload), Some(rate), None) => samples.entry((target, workload)).or_default().push(rate),
            _ => bail!("unexpected line from the guest: {line:?}"),
        }
    }
    let targets: Vec<(&str, &str)> = [("tmpfs", "guest tmpfs"), ("cvm", CVM), ("virtiofsd", VIRTIOFSD)]
        .into_iter()
        .filter(|(key, _)| samples.keys().any(|(t, _)| t == key))
        .collect();
    let keys = Workload::ALL.iter().map(|w| (w.key(), w.name(), w.unit())).chain(GIT_ROWS);
    let mut rows = Vec::new();
    for (key, name, unit) in keys {
        let mut results = Vec::new();
        for (target, _) in &targets {
            let values = samples.remove(&(*target, key)).with_context(|| format!("no {key} results for {target} from the guest"))?;
            results.push(Summary::of(values));
        }
        rows.push(Row { workload: name.to_string(), unit: unit.to_string(), results });
    }
    let title = format!(
        "cvm bench fs --in-vm on {host}, guest on {label}: {} MiB file, {} random reads, {} files, {}-file tree, {}-file git project, median of {} rounds",
        args.size >> 20,
        args.random_reads,
        args.files,
        args.tree,
        args.git_files,
        args.rounds
    );
    Ok(Table { title, columns: targets.iter().map(|(_, name)| name.to_string()).collect(), rows })
}

#[cfg(test)]
mod tests {
    use super::super::tests::args;
    use super::*;

    #[test]
    fn the_guests_results_become_medians_per_target_in_a_fixed_order() {
        let args = args(&["--in-vm", "--rounds", "3"]);
        let mut results = String::new();
        // Targets in the guest's order differ from the table's; three rounds each.
        for (target, base) in [("virtiofsd", 10.0), ("cvm", 20.0), ("tmpfs", 40.0)] {
            for key in Workload::ALL.iter().map(|w| w.key()).chain(GIT_ROWS.iter().map(|r| r.0)) {
                for round in [3.0, 1.0, 2.0] {
                    results.push_str(&format!("{target} {key} {}\n", base * round));
                }
            }
        }
        let host = crate::bench::HostFacts::read();
        let table = table(&args, &host, "QEMU under TCG (guest CPU emulated)", &results).unwrap();
        assert_eq!(table.columns, ["guest tmpfs", CVM, VIRTIOFSD]);
        assert_eq!(table.rows.len(), Workload::ALL.len() + GIT_ROWS.len());
        assert!(table.title.contains("QEMU under TCG") && table.title.contains("median of 3 rounds"), "{}", table.title);
        for row in &table.rows {
            assert_eq!(row.medians(), [80.0, 40.0, 20.0], "{}", row.workload);
            assert_eq!(
                row.results.iter().map(|r| r.range).collect::<Vec<_>>(),
                [1.0, 1.0, 1.0],
                "fastest 3x, slowest 1x the base, median 2x"
            );
            assert_eq!(table.ratios(&row.medians()), (0.5, Some(2.0)));
        }
        assert_eq!(table.rows[5].workload, "git checkout of the project");
        let json = table.to_json();
        assert_eq!(json["rows"][0]["round_ranges"][CVM], 1.0, "{json}");
    }

    #[test]
    fn without_virtiofsd_the_table_has_no_reference_column() {
        let args = args(&["--in-vm", "--rounds", "1"]);
        let results: String = ["tmpfs", "cvm"]
            .iter()
            .flat_map(|t| Workload::ALL.iter().map(|w| w.key()).chain(GIT_ROWS.iter().map(|r| r.0)).map(move |k| format!("{t} {k} 1.5\n")))
            .collect();
        let table = table(&args, &crate::bench::HostFacts::read(), "x", &results).unwrap();
        assert_eq!(table.columns, ["guest tmpfs", CVM]);
        assert_eq!(table.ratios(&table.rows[0].medians()), (1.0, None));
        assert_eq!(table.rows[0].results[1], Summary { median: 1.5, range: 0.0 }, "one round has no range");
        let json = table.to_json();
        assert!(json["rows"][0]["cvm_over_virtiofsd"].is_null() && json["rows"][0]["cvm_over_guest_tmpfs"] == 1.0, "{json}");
    }

    #[test]
    fn a_bad_or_missing_result_from_the_guest_is_an_error() {
        let args = args(&["--in-vm"]);
        let host = crate::bench::HostFacts::read();
        for bad in ["cvm seq-read fast\n", "cvm seq-read 1 2\n", "cvm\n", "cvm seq-read 1\n"] {
            assert!(table(&args, &host, "x", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_guest_gets_room_for_the_files_and_a_server_holds_one_workloads_files() {
        assert!(memory(&args(&["--in-vm", "--size", "1G"])) >= 4 << 30);
        assert_eq!(open_files(&args(&["--in-vm", "--tree", "1000", "--git-files", "5000", "--files", "10"])), 5050 + 1000);
        assert_eq!(open_files(&args(&["--in-vm", "--tree", "50000", "--git-files", "500"])), 50100 + 1000);
    }
}
