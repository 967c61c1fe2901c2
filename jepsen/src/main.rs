//! Command-line entry point: `spheredb-jepsen check` reads history files,
//! checks each one, prints one result line per file and sets the exit code.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use spheredb_jepsen::check::{check_events, CheckOptions, CheckReport, Verdict};
use spheredb_jepsen::model::ModelKind;
use spheredb_jepsen::parse::{load, Format};

/// Every history is linearizable.
const EXIT_OK: u8 = 0;
/// At least one history is not linearizable.
const EXIT_ILLEGAL: u8 = 1;
/// No history is illegal, but at least one could not be decided within its
/// time or memory budget.
const EXIT_UNKNOWN: u8 = 2;
/// No history is illegal, but a file could not be read or parsed, or the
/// command line was wrong.
const EXIT_ERROR: u8 = 3;

/// Text shared by the top-level and `check` help.
macro_rules! exit_codes_help {
    () => {
        "\
Exit status:
  0  every history is linearizable (ok)
  1  at least one history is not linearizable (illegal)
  2  no history is illegal, but at least one is unknown (budget exhausted)
  3  no history is illegal, but a file could not be read or parsed,
     or the command line is invalid"
    };
}

const EXIT_CODES_HELP: &str = exit_codes_help!();

const CHECK_HELP: &str = concat!(
    "\
Examples:
  spheredb-jepsen check --model cas-register --format jepsen-log etcd_*.log
  spheredb-jepsen check --model kv --format edn history.edn
  spheredb-jepsen check --model set --format jsonl --time-limit-secs 300 run.jsonl

",
    exit_codes_help!()
);

#[derive(Debug, Parser)]
#[command(
    name = "spheredb-jepsen",
    version,
    about = "Linearizability checker for Jepsen-style histories",
    after_help = EXIT_CODES_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check history files for linearizability.
    ///
    /// Prints one line per file, `<path><TAB><ok|illegal|unknown|error>`. An
    /// illegal history is followed by indented lines explaining where the
    /// search got stuck; an unknown one by the budget that ran out.
    #[command(after_help = CHECK_HELP)]
    Check(CheckArgs),
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// Sequential specification to check against.
    #[arg(long, value_enum)]
    model: ModelArg,

    /// Format of the history files.
    #[arg(long, value_enum, default_value_t = FormatArg::Edn)]
    format: FormatArg,

    /// Time budget per history, in seconds; past it the answer is `unknown`.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    time_limit_secs: u64,

    /// Memory the search may use per partition, in MiB; past it the answer
    /// is `unknown`.
    #[arg(long, value_name = "MIB", default_value_t = 4096)]
    memory_limit_mib: usize,

    /// Also print, per file, the number of operations and partitions checked
    /// and the time taken.
    #[arg(short, long)]
    verbose: bool,

    /// History files to check.
    #[arg(value_name = "FILE", required = true)]
    files: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModelArg {
    /// One register, initially nil: read, write, cas [from to].
    CasRegister,
    /// String key-value store, partitioned by key: put, get, append.
    Kv,
    /// Grow-only set: add, and read of all elements.
    Set,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    /// Jepsen console log: `INFO  jepsen.util - <process> :<type> :<f> <value>`.
    JepsenLog,
    /// EDN op maps, e.g. `{:process 0, :type :invoke, :f :read, :value nil}`.
    Edn,
    /// One JSON object per line, e.g. `{"process":0,"type":"ok","f":"read","value":1}`.
    Jsonl,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // --help and --version are not errors.
            let code = if err.use_stderr() {
                EXIT_ERROR
            } else {
                EXIT_OK
            };
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
    let Command::Check(args) = cli.command;
    match run_check(&args) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("spheredb-jepsen: cannot write output: {err}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn run_check(args: &CheckArgs) -> io::Result<u8> {
    let model = match args.model {
        ModelArg::CasRegister => ModelKind::CasRegister,
        ModelArg::Kv => ModelKind::Kv,
        ModelArg::Set => ModelKind::Set,
    };
    let format = match args.format {
        FormatArg::JepsenLog => Format::JepsenLog,
        FormatArg::Edn => Format::Edn,
        FormatArg::Jsonl => Format::Jsonl,
    };
    let options = CheckOptions {
        time_limit_ms: args.time_limit_secs.saturating_mul(1000),
        max_memo_bytes: args.memory_limit_mib.saturating_mul(1 << 20),
    };
    let (mut any_illegal, mut any_unknown, mut any_error) = (false, false, false);
    let mut out = io::stdout().lock();
    for path in &args.files {
        let shown = path.display();
        let checked = load(format, path)
            .map_err(|e| e.to_string())
            .and_then(|events| {
                check_events(model, &events, &options).map_err(|e| format!("{shown}: {e}"))
            });
        let report: CheckReport = match checked {
            Ok(report) => report,
            Err(message) => {
                any_error = true;
                writeln!(out, "{shown}\terror")?;
                out.flush()?;
                eprintln!("spheredb-jepsen: {message}");
                continue;
            }
        };
        writeln!(out, "{shown}\t{}", report.verdict.label())?;
        match &report.verdict {
            Verdict::Ok => {}
            Verdict::Illegal(explanation) => {
                any_illegal = true;
                for line in explanation.lines() {
                    writeln!(out, "    {line}")?;
                }
            }
            Verdict::Unknown(reason) => {
                any_unknown = true;
                writeln!(out, "    {reason}")?;
            }
        }
        if args.verbose {
            writeln!(
                out,
                "    {} operations in {} partitions, checked in {} ms",
                report.operations,
                report.partitions,
                report.elapsed.as_millis()
            )?;
        }
        out.flush()?;
    }
    Ok(if any_illegal {
        EXIT_ILLEGAL
    } else if any_error {
        EXIT_ERROR
    } else if any_unknown {
        EXIT_UNKNOWN
    } else {
        EXIT_OK
    })
}
