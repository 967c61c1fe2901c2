//! Runs the checker over every public history with a known answer in
//! `shared/histories` and requires agreement with each `expected.tsv`.

use std::path::{Path, PathBuf};

use spheredb_jepsen::check::{check_events, CheckOptions, Verdict};
use spheredb_jepsen::model::ModelKind;
use spheredb_jepsen::parse::{load, Format};

/// Folders with an `expected.tsv`, and how to read and check their files.
const DATASETS: &[(&str, Format, ModelKind)] = &[
    ("porcupine/etcd", Format::JepsenLog, ModelKind::CasRegister),
    ("porcupine/kv", Format::Edn, ModelKind::Kv),
];

/// How deep to look for `expected.tsv` files not listed in `DATASETS`.
const MAX_SEARCH_DEPTH: usize = 4;

/// Generous: every history finishes in well under a second.
const TIME_LIMIT_MS: u64 = 120_000;

/// The histories shipped in `jepsen/testdata/histories` (a copy of the public histories with
/// known answers, with their licence); `SPHEREDB_HISTORIES_DIR` points the test elsewhere.
fn histories_root() -> PathBuf {
    match std::env::var_os("SPHEREDB_HISTORIES_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/histories"),
    }
}

fn find_expected_files(dir: &Path, depth: usize, found: &mut Vec<PathBuf>) {
    if depth > MAX_SEARCH_DEPTH {
        return;
    }
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .path();
        if path.is_dir() {
            find_expected_files(&path, depth + 1, found);
        } else if path.file_name().is_some_and(|n| n == "expected.tsv") {
            found.push(path);
        }
    }
}

#[test]
fn agrees_with_every_expected_answer() {
    let root = histories_root();
    assert!(
        root.is_dir(),
        "the histories folder is missing: expected it at {} \
         (jepsen/testdata/histories, or set SPHEREDB_HISTORIES_DIR)",
        root.display()
    );

    let mut expected_files = Vec::new();
    find_expected_files(&root, 0, &mut expected_files);
    for file in &expected_files {
        let dir = file.parent().unwrap_or(&root);
        assert!(
            DATASETS.iter().any(|(name, _, _)| root.join(name) == dir),
            "{} has no entry in DATASETS: say which format and model its histories use",
            file.display()
        );
    }

    let options = CheckOptions {
        time_limit_ms: TIME_LIMIT_MS,
        ..CheckOptions::default()
    };
    let mut checked = 0;
    let mut disagreements = Vec::new();
    for &(name, format, model) in DATASETS {
        let dir = root.join(name);
        let tsv_path = dir.join("expected.tsv");
        let tsv = std::fs::read_to_string(&tsv_path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", tsv_path.display()));
        let mut rows = 0;
        for (index, row) in tsv.lines().enumerate() {
            if index == 0 || row.trim().is_empty() {
                continue;
            }
            let (file, answer) = row.split_once('\t').unwrap_or_else(|| {
                panic!(
                    "{}:{}: expected `file<TAB>true|false`",
                    tsv_path.display(),
                    index + 1
                )
            });
            let expect_linearizable = match answer.trim() {
                "true" => true,
                "false" => false,
                other => panic!(
                    "{}:{}: unexpected answer {other:?}",
                    tsv_path.display(),
                    index + 1
                ),
            };
            let path = dir.join(file);
            let events = load(format, &path).unwrap_or_else(|e| panic!("{e}"));
            let report = check_events(model, &events, &options)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let agrees = match report.verdict {
                Verdict::Ok => expect_linearizable,
                Verdict::Illegal(_) => !expect_linearizable,
                Verdict::Unknown(_) => false,
            };
            if !agrees {
                disagreements.push(format!(
                    "{}: expected linearizable={expect_linearizable}, got {}",
                    path.display(),
                    report.verdict.label()
                ));
            }
            rows += 1;
        }
        assert!(rows > 0, "{} lists no histories", tsv_path.display());
        checked += rows;
    }
    assert!(
        disagreements.is_empty(),
        "{} of {checked} histories disagree:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
    eprintln!("{checked} shared histories agree with their expected answers");
}
