//! Jepsen's console log format, as in the porcupine etcd test data:
//! `INFO  jepsen.util - <process> <TAB>:<type> <TAB>:<f> <TAB><value>`.
//! Older logs separate the columns with spaces instead of tabs; both work.
//!
//! Lines without the `jepsen.util - ` marker are other log output and are
//! skipped, but a file in which no line has it is rejected: it is almost
//! certainly in another format.

use super::edn::{read_value, unknown_function};
use super::SyntaxError;
use crate::history::{Event, EventType, Function, Value};

const MARKER: &str = "jepsen.util - ";

pub fn parse(text: &str) -> Result<Vec<Event>, SyntaxError> {
    let mut events = Vec::new();
    let mut saw_event_line = false;
    let mut first_content_line = None;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        first_content_line.get_or_insert(line);
        let Some(at) = raw.find(MARKER) else { continue };
        saw_event_line = true;
        if let Some(event) = parse_event(&raw[at + MARKER.len()..], line)? {
            events.push(event);
        }
    }
    if let (false, Some(line)) = (saw_event_line, first_content_line) {
        return Err(SyntaxError::new(
            line,
            "no Jepsen log events found (expected lines like \
             `INFO  jepsen.util - 0\t:invoke\t:read\tnil`)",
        ));
    }
    Ok(events)
}

fn parse_event(body: &str, line: usize) -> Result<Option<Event>, SyntaxError> {
    let err = |message: String| SyntaxError::new(line, message);
    let (process, rest) = split_token(body);
    let process: i64 = match process.parse() {
        Ok(p) => p,
        // `:nemesis` and other non-client processes.
        Err(_) if process.starts_with(':') => return Ok(None),
        Err(_) => return Err(err(format!("expected a process number, found {process:?}"))),
    };
    let (kind, rest) = split_token(rest);
    let kind = kind
        .strip_prefix(':')
        .and_then(EventType::from_name)
        .ok_or_else(|| {
            err(format!(
                "expected :invoke, :ok, :fail or :info, found {kind:?}"
            ))
        })?;
    let (f, rest) = split_token(rest);
    let f = match f.strip_prefix(':') {
        Some(name) => Function::from_name(name).ok_or_else(|| err(unknown_function(name)))?,
        None => return Err(err(format!("expected an :f keyword, found {f:?}"))),
    };
    let value_text = rest.trim();
    let value = if value_text.is_empty() {
        Value::Nil
    } else {
        read_value(value_text).map_err(|m| err(format!("{m} in {value_text:?}")))?
    };
    Ok(Some(Event {
        process,
        kind,
        f,
        key: None,
        value,
        time_ns: None,
        line,
    }))
}

/// Splits off the first whitespace-separated token.
fn split_token(text: &str) -> (&str, &str) {
    let text = text.trim_start();
    match text.find(char::is_whitespace) {
        Some(end) => (&text[..end], &text[end..]),
        None => (text, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tabs_and_spaces() {
        let text = "INFO  jepsen.util - 2\t:invoke\t:cas\t[3 0]\n\
            some other log line\n\
            INFO  jepsen.util - 2 :ok :cas [3 0]\n\
            INFO  jepsen.util - 4\t:info\t:write\t:timed-out\n\
            INFO  jepsen.util - :nemesis\t:info\t:start\tnil\n";
        let events = parse(text).expect("valid");
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].f, Function::Cas);
        assert_eq!(
            events[1].value,
            Value::List(vec![Value::Int(3), Value::Int(0)])
        );
        assert_eq!(events[1].line, 3);
        assert_eq!(events[2].value, Value::Keyword("timed-out".into()));
    }

    #[test]
    fn reports_errors_with_line() {
        let err = parse(
            "INFO  jepsen.util - 0\t:invoke\t:read\tnil\nINFO  jepsen.util - 0\t:okay\t:read\t1\n",
        )
        .expect_err("bad type");
        assert_eq!(err.line, 2);
        let err = parse("{:process 0, :type :invoke, :f :read}\n").expect_err("not a log");
        assert_eq!(err.line, 1);
        let err = parse("INFO  jepsen.util - 0\t:ok\t:read\t[1\n").expect_err("bad value");
        assert_eq!(err.line, 1);
    }
}
