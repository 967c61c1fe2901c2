//! `spheredb sql`: a SQL shell over the PostgreSQL wire protocol of any node. Interactive
//! (history, statements over several lines, `\d`, `\dt`, `\timing`, `\q`) or scripted
//! (`-e SQL`, `-f FILE`), with results as aligned tables, CSV or JSON.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::ValueEnum;
use tokio_postgres::{NoTls, SimpleQueryMessage};

/// The SQL address `spheredb sql` connects to by default: the node's default.
pub const DEFAULT_SQL_HOST: &str = crate::cli::DEFAULT_SQL_LISTEN;
/// Lines of shell history kept in `~/.spheredb_sql_history`.
pub const MAX_HISTORY_LINES: usize = 1_000;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum SqlFormat {
    /// Aligned columns with a header, as psql prints them.
    Table,
    /// A header line, then one line per row.
    Csv,
    /// One JSON object per row.
    Json,
}

#[derive(Debug, clap::Args)]
pub struct SqlArgs {
    /// A node's SQL address (its --sql-listen).
    #[arg(long, env = "SPHEREDB_SQL_HOST", default_value = DEFAULT_SQL_HOST)]
    pub host: String,
    /// A PostgreSQL connection URL instead of --host, e.g.
    /// postgresql://spheredb@127.0.0.1:5433/spheredb.
    #[arg(long, env = "SPHEREDB_SQL_URL", conflicts_with = "host")]
    pub url: Option<String>,
    /// Run these statements and exit (repeatable; each may hold several statements).
    #[arg(short = 'e', long = "execute")]
    pub execute: Vec<String>,
    /// Run the statements of this file and exit.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "table")]
    pub format: SqlFormat,
}

/// One result of a statement: its rows, or a count of rows changed.
#[derive(Debug, PartialEq)]
pub enum SqlResult {
    Rows {
        columns: Vec<String>,
        rows: Vec<Vec<Option<String>>>,
    },
    Done(u64),
}

pub async fn run(args: SqlArgs) -> anyhow::Result<()> {
    let config = match &args.url {
        Some(url) => url.clone(),
        None => {
            let (host, port) = args
                .host
                .rsplit_once(':')
                .with_context(|| format!("--host {} is not HOST:PORT", args.host))?;
            format!("host={host} port={port} user=spheredb dbname=spheredb")
        }
    };
    let (client, connection) =
        tokio_postgres::connect(&config, NoTls)
            .await
            .with_context(|| {
                format!(
                    "cannot connect to {}; is a node serving SQL there (spheredb start \
                 --sql-listen)?",
                    args.url.as_deref().unwrap_or(&args.host)
                )
            })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("connection lost: {e}");
        }
    });
    let mut script = args.execute.join(";\n");
    if let Some(file) = &args.file {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        script.push_str(";\n");
        script.push_str(&text);
    }
    if !script.trim().trim_matches(';').trim().is_empty() {
        let results = execute(&client, &script).await?;
        print!("{}", render(&results, args.format));
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
        let results = execute(&client, &text).await?;
        print!("{}", render(&results, args.format));
        return Ok(());
    }
    shell(&client, args.format).await
}

/// Runs `sql` (one or more statements) and returns each statement's result.
pub async fn execute(client: &tokio_postgres::Client, sql: &str) -> anyhow::Result<Vec<SqlResult>> {
    let messages = client
        .simple_query(sql)
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db) => anyhow::anyhow!("ERROR: {} (SQLSTATE {})", db.message(), db.code().code()),
            None => anyhow::anyhow!("{e}"),
        })?;
    let mut results = Vec::new();
    let mut columns: Option<Vec<String>> = None;
    let mut rows = Vec::new();
    for m in messages {
        match m {
            SimpleQueryMessage::RowDescription(c) => {
                columns = Some(c.iter().map(|c| c.name().to_string()).collect());
            }
            SimpleQueryMessage::Row(row) => rows.push(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            SimpleQueryMessage::CommandComplete(n) => match columns.take() {
                Some(columns) => results.push(SqlResult::Rows {
                    columns,
                    rows: std::mem::take(&mut rows),
                }),
                None => results.push(SqlResult::Done(n)),
            },
            _ => {}
        }
    }
    Ok(results)
}

/// Formats results as `format` says.
pub fn render(results: &[SqlResult], format: SqlFormat) -> String {
    let mut out = String::new();
    for result in results {
        match result {
            SqlResult::Done(n) => {
                if format == SqlFormat::Table {
                    out.push_str(&format!("OK, {n} row{}\n", if *n == 1 { "" } else { "s" }));
                }
            }
            SqlResult::Rows { columns, rows } => match format {
                SqlFormat::Table => out.push_str(&table(columns, rows)),
                SqlFormat::Csv => {
                    out.push_str(&csv_line(columns.iter().map(|c| Some(c.as_str()))));
                    for row in rows {
                        out.push_str(&csv_line(row.iter().map(|v| v.as_deref())));
                    }
                }
                SqlFormat::Json => {
                    for row in rows {
                        let object: serde_json::Map<String, serde_json::Value> = columns
                            .iter()
                            .zip(row)
                            .map(|(c, v)| {
                                let value = match v {
                                    Some(v) => serde_json::Value::String(v.clone()),
                                    None => serde_json::Value::Null,
                                };
                                (c.clone(), value)
                            })
                            .collect();
                        out.push_str(&serde_json::Value::Object(object).to_string());
                        out.push('\n');
                    }
                }
            },
        }
    }
    out
}

/// psql's aligned format: a header, a rule, the rows, and their count.
fn table(columns: &[String], rows: &[Vec<Option<String>>]) -> String {
    let cell = |v: &Option<String>| v.clone().unwrap_or_default();
    let mut widths: Vec<usize> = columns.iter().map(|c| c.chars().count()).collect();
    for row in rows {
        for (i, v) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell(v).chars().count());
            }
        }
    }
    let line = |values: Vec<String>| {
        values
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!(" {v:<w$} "))
            .collect::<Vec<_>>()
            .join("|")
            .trim_end()
            .to_string()
            + "\n"
    };
    let mut out = line(columns.to_vec());
    out.push_str(
        &(widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("+")
            + "\n"),
    );
    for row in rows {
        out.push_str(&line(row.iter().map(cell).collect()));
    }
    out.push_str(&format!(
        "({} row{})\n",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    ));
    out
}

fn csv_line<'a>(values: impl Iterator<Item = Option<&'a str>>) -> String {
    let fields: Vec<String> = values
        .map(|v| match v {
            None => String::new(),
            Some(v) if v.contains([',', '"', '\n', '\r']) => {
                format!("\"{}\"", v.replace('"', "\"\""))
            }
            Some(v) => v.to_string(),
        })
        .collect();
    fields.join(",") + "\n"
}

/// What a backslash command asks for.
#[derive(Debug, PartialEq)]
enum Meta {
    Quit,
    Timing,
    Help,
    Sql(String),
    Unknown(String),
}

fn meta(command: &str) -> Meta {
    let mut words = command.split_whitespace();
    match (words.next(), words.next()) {
        (Some("\\q"), _) => Meta::Quit,
        (Some("\\timing"), _) => Meta::Timing,
        (Some("\\?"), _) => Meta::Help,
        (Some("\\dt"), _) | (Some("\\d"), None) => Meta::Sql(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' \
             ORDER BY table_name"
                .into(),
        ),
        (Some("\\d"), Some(table)) => Meta::Sql(format!(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns WHERE \
             table_schema = 'public' AND table_name = '{}' ORDER BY ordinal_position",
            table.replace('\'', "''")
        )),
        _ => Meta::Unknown(command.to_string()),
    }
}

const HELP: &str = "\\d [TABLE]  list tables, or a table's columns
\\dt         list tables
\\timing     show how long each statement takes (toggle)
\\q          quit
Statements end with ';' and may span lines.
";

/// The interactive shell.
async fn shell(client: &tokio_postgres::Client, format: SqlFormat) -> anyhow::Result<()> {
    let mut editor = rustyline::DefaultEditor::with_config(
        rustyline::Config::builder()
            .max_history_size(MAX_HISTORY_LINES)?
            .auto_add_history(false)
            .build(),
    )?;
    let history = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".spheredb_sql_history"));
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    println!("spheredb sql: statements end with ';', \\? for help, \\q to quit");
    let mut timing = false;
    let mut buffer = String::new();
    loop {
        let prompt = if buffer.is_empty() {
            "spheredb=> "
        } else {
            "spheredb-> "
        };
        let line = match editor.readline(prompt) {
            Ok(line) => line,
            Err(rustyline::error::ReadlineError::Interrupted) => {
                buffer.clear();
                continue;
            }
            Err(rustyline::error::ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let trimmed = line.trim();
        if buffer.is_empty() && trimmed.starts_with('\\') {
            let _ = editor.add_history_entry(trimmed);
            match meta(trimmed) {
                Meta::Quit => break,
                Meta::Timing => {
                    timing = !timing;
                    println!("Timing is {}.", if timing { "on" } else { "off" });
                }
                Meta::Help => print!("{HELP}"),
                Meta::Unknown(c) => println!("unknown command {c}; \\? lists the commands"),
                Meta::Sql(sql) => run_and_print(client, &sql, format, timing).await,
            }
            continue;
        }
        if !buffer.is_empty() {
            buffer.push('\n');
        }
        buffer.push_str(&line);
        if !trimmed.ends_with(';') {
            continue;
        }
        let sql = std::mem::take(&mut buffer);
        let _ = editor.add_history_entry(sql.as_str());
        run_and_print(client, &sql, format, timing).await;
    }
    if let Some(h) = &history {
        if let Err(e) = editor.save_history(h) {
            eprintln!("history not saved to {}: {e}", h.display());
        }
    }
    Ok(())
}

async fn run_and_print(
    client: &tokio_postgres::Client,
    sql: &str,
    format: SqlFormat,
    timing: bool,
) {
    let started = Instant::now();
    match execute(client, sql).await {
        Ok(results) => print!("{}", render(&results, format)),
        Err(e) => eprintln!("{e}"),
    }
    if timing {
        println!("Time: {:.3} ms", started.elapsed().as_secs_f64() * 1e3);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_render_as_tables_csv_and_json() {
        let results = vec![
            SqlResult::Rows {
                columns: vec!["id".into(), "body".into()],
                rows: vec![
                    vec![Some("1".into()), Some("a, \"b\"".into())],
                    vec![Some("22".into()), None],
                ],
            },
            SqlResult::Done(3),
        ];
        assert_eq!(
            render(&results, SqlFormat::Table),
            " id | body\n----+--------\n 1  | a, \"b\"\n 22 |\n(2 rows)\nOK, 3 rows\n"
        );
        assert_eq!(
            render(&results, SqlFormat::Csv),
            "id,body\n1,\"a, \"\"b\"\"\"\n22,\n"
        );
        assert_eq!(
            render(&results, SqlFormat::Json),
            "{\"body\":\"a, \\\"b\\\"\",\"id\":\"1\"}\n{\"body\":null,\"id\":\"22\"}\n"
        );
    }

    #[test]
    fn backslash_commands_map_to_queries() {
        assert_eq!(meta("\\q"), Meta::Quit);
        assert!(matches!(meta("\\d posts"), Meta::Sql(s) if s.contains("'posts'")));
        assert!(matches!(meta("\\dt"), Meta::Sql(s) if s.contains("information_schema.tables")));
        assert!(matches!(meta("\\x"), Meta::Unknown(_)));
    }
}
