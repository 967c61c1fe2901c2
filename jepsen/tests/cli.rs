//! The command-line interface: output lines, exit codes, error messages.

use std::path::PathBuf;
use std::process::{Command, Output};

const OK_HISTORY: &str = "\
{:process 0, :type :invoke, :f :write, :value 1}
{:process 0, :type :ok, :f :write, :value 1}
{:process 1, :type :invoke, :f :read, :value nil}
{:process 1, :type :ok, :f :read, :value 1}
";

const ILLEGAL_HISTORY: &str = "\
{:process 0, :type :invoke, :f :write, :value 1}
{:process 0, :type :ok, :f :write, :value 1}
{:process 1, :type :invoke, :f :read, :value nil}
{:process 1, :type :ok, :f :read, :value 2}
";

/// A history file in a per-test temporary directory.
fn write_history(test: &str, name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spheredb-jepsen-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write history");
    path
}

fn run(args: &[&str], files: &[&PathBuf]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spheredb-jepsen"))
        .args(args)
        .args(files)
        .output()
        .expect("run spheredb-jepsen")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn ok_history_exits_zero() {
    let ok = write_history("ok", "ok.edn", OK_HISTORY);
    let output = run(&["check", "--model", "cas-register"], &[&ok]);
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(stdout(&output), format!("{}\tok\n", ok.display()));
}

#[test]
fn illegal_history_exits_one_with_explanation() {
    let ok = write_history("illegal", "ok.edn", OK_HISTORY);
    let bad = write_history("illegal", "bad.edn", ILLEGAL_HISTORY);
    let output = run(
        &["check", "--model", "cas-register", "--format", "edn"],
        &[&ok, &bad],
    );
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    assert!(
        text.contains(&format!("{}\tillegal\n", bad.display())),
        "{text}"
    );
    assert!(
        text.contains("    process 1 :read => 2 (lines 3-4): the model rejects it"),
        "{text}"
    );
}

#[test]
fn unknown_exits_two_and_illegal_wins() {
    let ok = write_history("unknown", "ok.edn", OK_HISTORY);
    let bad = write_history("unknown", "bad.edn", ILLEGAL_HISTORY);
    let args = ["check", "--model", "cas-register", "--time-limit-secs", "0"];
    let output = run(&args, &[&ok]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stdout(&output).contains("\tunknown\n"));
    // With no time at all, the illegal file is unknown too; give it time.
    let output = run(&["check", "--model", "cas-register"], &[&bad, &ok]);
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn parse_error_names_path_and_line() {
    let broken = write_history(
        "broken",
        "broken.edn",
        "{:process 0, :type :invoke, :f :read}\n{:process 0 :type\n",
    );
    let ok = write_history("broken", "ok.edn", OK_HISTORY);
    let output = run(&["check", "--model", "cas-register"], &[&broken, &ok]);
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{}: line 2:", broken.display())),
        "{stderr}"
    );
    let text = stdout(&output);
    assert!(
        text.contains(&format!("{}\terror\n", broken.display())),
        "{text}"
    );
    assert!(text.contains(&format!("{}\tok\n", ok.display())), "{text}");
}

#[test]
fn missing_file_is_an_error() {
    let missing = std::env::temp_dir().join("spheredb-jepsen-no-such-file.edn");
    let output = run(&["check", "--model", "kv"], &[&missing]);
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot read"), "{stderr}");
}

#[test]
fn usage_errors_exit_three_and_help_exits_zero() {
    let output = run(&["check", "--model", "bogus", "x"], &[]);
    assert_eq!(output.status.code(), Some(3));
    let output = run(&["check", "--help"], &[]);
    assert_eq!(output.status.code(), Some(0));
    let help = stdout(&output);
    assert!(
        help.contains("cas-register") && help.contains("jepsen-log"),
        "{help}"
    );
    assert!(help.contains("Exit status"), "{help}");
}
