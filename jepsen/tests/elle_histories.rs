//! The list-append checker on public histories with known answers (`testdata/elle`, see its
//! README), through the command line as a user runs it.

use std::path::Path;
use std::process::Command;

/// Runs `check --model list-append` on `file` under `consistency`; returns the exit code and
/// what it printed.
fn check(file: &str, consistency: &str) -> (i32, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/elle")
        .join(file);
    let out = Command::new(env!("CARGO_BIN_EXE_spheredb-jepsen"))
        .args([
            "check",
            "--model",
            "list-append",
            "--consistency",
            consistency,
        ])
        .arg(&path)
        .output()
        .expect("spheredb-jepsen runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn the_elle_paper_example_shows_read_skew() {
    for consistency in ["snapshot-isolation", "serializable"] {
        let (code, out) = check("paper-example.edn", consistency);
        assert_eq!(code, 1, "{consistency}: {out}");
        assert!(out.contains("\tillegal"), "{out}");
        assert!(out.contains("G-single: 1 (forbidden)"), "{out}");
    }
}

#[test]
fn elle_issue_30_is_write_skew_legal_only_under_snapshot_isolation() {
    let (code, out) = check("list-append-gh-30.edn", "serializable");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("G2-item: 1 (forbidden)"), "{out}");
    let (code, out) = check("list-append-gh-30.edn", "snapshot-isolation");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\tok"), "{out}");
    assert!(out.contains("G2-item: 1 (allowed)"), "{out}");
}

#[test]
fn elle_s_si_without_g_single_is_write_skew_only() {
    let (code, out) = check("si-without-g-single.edn", "snapshot-isolation");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("G2-item: 1 (allowed)"), "{out}");
    assert_eq!(
        out.lines()
            .filter(|l| l.contains("(allowed)") || l.contains("(forbidden)"))
            .count(),
        1,
        "{out}"
    );
    let (code, out) = check("si-without-g-single.edn", "serializable");
    assert_eq!(code, 1, "{out}");
}
