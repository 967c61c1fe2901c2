//! `spheredb feed`: follows a sphere's changes and prints them, one line per change and per
//! checkpoint.

use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use spheredb_client::feed::{Change, Cursor, FeedItem};
use spheredb_client::{Client, ClientOptions};

use crate::cli::Format;
use crate::config;

/// What `spheredb feed` follows and how it prints.
#[derive(Debug, clap::Args)]
pub struct FeedArgs {
    /// Any node of the cluster.
    #[arg(long, env = "SPHEREDB_HOST", default_value = config::DEFAULT_LISTEN)]
    pub host: String,
    /// The sphere to follow (ignored with --since, whose cursor names it).
    #[arg(long, env = "SPHEREDB_SPHERE", default_value_t = 0)]
    pub sphere: u64,
    /// Resume from a cursor a checkpoint printed: the changes after it, on its span.
    #[arg(long)]
    pub since: Option<String>,
    /// Start after this oracle timestamp (`spheredb timestamp`) instead of now.
    #[arg(long, conflicts_with = "since")]
    pub since_ts: Option<u64>,
    /// Follow only keys at or above this one.
    #[arg(long, default_value = "", conflicts_with = "since")]
    pub start: String,
    /// Follow only keys below this one (empty: to the sphere's end).
    #[arg(long, default_value = "", conflicts_with = "since")]
    pub end: String,
    /// Print each key's value before the change too.
    #[arg(long)]
    pub prev_value: bool,
    /// Print whole transactions once a checkpoint passed them, instead of each change as it
    /// is read.
    #[arg(long)]
    pub grouped: bool,
    /// Stop after this many changes (0: follow until interrupted).
    #[arg(long, default_value_t = 0)]
    pub max_changes: u64,
    /// Stop after this many seconds (0: follow until interrupted).
    #[arg(long, default_value_t = 0)]
    pub duration_secs: u64,
    /// How often idle ranges checkpoint, in ms (0: the server's default).
    #[arg(long, default_value_t = 0)]
    pub resolve_interval_ms: u64,
    /// Print a checkpoint at most this often while nothing changes, in ms (one always
    /// follows printed changes).
    #[arg(long, default_value_t = 1_000)]
    pub checkpoint_every_ms: u64,
    /// `json`: one JSON object per line; keys and values as UTF-8 strings where they are,
    /// else base64 (`key_base64`, `value_base64`).
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

/// Runs `spheredb feed`.
pub async fn run(args: FeedArgs) -> anyhow::Result<()> {
    let host = args.host.clone();
    let client = Client::connect(&[host.as_str()], ClientOptions::default())
        .await
        .with_context(|| format!("connecting to {host} (is a node running there?)"))?;
    let mut feed = client
        .feed(args.sphere)
        .span(args.start.as_bytes(), args.end.as_bytes())
        .resolve_interval_ms(args.resolve_interval_ms);
    if let Some(text) = &args.since {
        feed = feed.since(&Cursor::parse(text)?);
    } else if let Some(ts) = args.since_ts {
        feed = feed.since_ts(ts);
    }
    if args.prev_value {
        feed = feed.with_prev_value();
    }
    if args.grouped {
        feed = feed.grouped();
    }
    let mut subscription = feed.subscribe().await.context("subscribing")?;
    let deadline = (args.duration_secs > 0)
        .then(|| tokio::time::Instant::now() + Duration::from_secs(args.duration_secs));
    let mut changes = 0u64;
    // Changes printed since the last checkpoint printed, and when that one was printed.
    let mut unconfirmed = false;
    let mut checkpoint_printed: Option<tokio::time::Instant> = None;
    let checkpoint_every = Duration::from_millis(args.checkpoint_every_ms);
    loop {
        let next = async {
            match deadline {
                Some(at) => tokio::time::timeout_at(at, subscription.next()).await.ok(),
                None => Some(subscription.next().await),
            }
        };
        let item = tokio::select! {
            item = next => item,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(Some(item)) = item else {
            return Ok(());
        };
        match item.context("following the feed (resume with --since and the last cursor)")? {
            FeedItem::Change(change) => {
                println!("{}", change_line(&change, args.format));
                changes += 1;
                unconfirmed = true;
            }
            FeedItem::Txn {
                commit_ts,
                changes: txn,
            } => {
                changes += txn.len() as u64;
                unconfirmed = true;
                println!("{}", txn_line(commit_ts, &txn, args.format));
            }
            FeedItem::Checkpoint(cursor) => {
                let due = checkpoint_printed.is_none_or(|at| at.elapsed() >= checkpoint_every);
                if unconfirmed || due {
                    println!("{}", checkpoint_line(&cursor, args.format));
                    unconfirmed = false;
                    checkpoint_printed = Some(tokio::time::Instant::now());
                }
            }
        }
        if args.max_changes > 0 && changes >= args.max_changes {
            return Ok(());
        }
    }
}

/// A JSON object's fields for `bytes`: `name` as a string when it is UTF-8, else
/// `name_base64`.
fn bytes_field(object: &mut serde_json::Map<String, serde_json::Value>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => object.insert(name.into(), text.into()),
        Err(_) => object.insert(
            format!("{name}_base64"),
            base64::engine::general_purpose::STANDARD
                .encode(bytes)
                .into(),
        ),
    };
}

fn change_json(change: &Change) -> serde_json::Map<String, serde_json::Value> {
    let mut object = serde_json::Map::new();
    bytes_field(&mut object, "key", &change.key);
    match &change.value {
        Some(value) => bytes_field(&mut object, "value", value),
        None => {
            object.insert("value".into(), serde_json::Value::Null);
            object.insert("deleted".into(), true.into());
        }
    }
    object.insert("ts".into(), change.commit_ts.into());
    if let Some(prev) = &change.prev_value {
        bytes_field(&mut object, "prev_value", prev);
    }
    object
}

fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn change_line(change: &Change, format: Format) -> String {
    match format {
        Format::Json => serde_json::Value::Object(change_json(change)).to_string(),
        Format::Text => {
            let what = match &change.value {
                Some(v) => format!("{} = {}", text_of(&change.key), text_of(v)),
                None => format!("{} deleted", text_of(&change.key)),
            };
            match &change.prev_value {
                Some(prev) => format!("{}  {what}  (was {})", change.commit_ts, text_of(prev)),
                None => format!("{}  {what}", change.commit_ts),
            }
        }
    }
}

fn txn_line(commit_ts: u64, changes: &[Change], format: Format) -> String {
    match format {
        Format::Json => serde_json::json!({
            "txn_ts": commit_ts,
            "changes": changes.iter().map(|c| serde_json::Value::Object(change_json(c))).collect::<Vec<_>>(),
        })
        .to_string(),
        Format::Text => {
            let lines: Vec<String> = changes.iter().map(|c| change_line(c, format)).collect();
            format!("transaction at {commit_ts}:\n  {}", lines.join("\n  "))
        }
    }
}

fn checkpoint_line(cursor: &Cursor, format: Format) -> String {
    match format {
        Format::Json => serde_json::json!({
            "resolved": cursor.resolved_ts(),
            "cursor": cursor.to_string(),
        })
        .to_string(),
        Format::Text => format!(
            "checkpoint: resolved {} (resume with --since {cursor})",
            cursor.resolved_ts()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_carry_text_as_text_and_other_bytes_as_base64() {
        let change = Change {
            key: b"post/1".to_vec(),
            value: Some(vec![0xff, 0x00]),
            commit_ts: 42,
            prev_value: None,
        };
        let line: serde_json::Value =
            serde_json::from_str(&change_line(&change, Format::Json)).unwrap();
        assert_eq!(line["key"], "post/1");
        assert_eq!(line["value_base64"], "/wA=");
        assert_eq!(line["ts"], 42);
        let deleted = Change {
            value: None,
            ..change
        };
        let line: serde_json::Value =
            serde_json::from_str(&change_line(&deleted, Format::Json)).unwrap();
        assert_eq!(line["deleted"], true);
        assert!(line["value"].is_null());
    }
}
