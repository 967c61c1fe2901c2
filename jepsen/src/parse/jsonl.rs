//! One JSON object per line:
//! `{"process":0,"type":"invoke","f":"cas","key":"k","value":[1,2],"time":123}`.
//! `type` is one of `invoke`, `ok`, `fail`, `info`; `key`, `value` and `time`
//! (nanoseconds) are optional. Blank lines are skipped.

use serde_json::Value as Json;

use super::edn::unknown_function;
use super::SyntaxError;
use crate::history::{Event, EventType, Function, Value};

/// Deepest nesting of arrays accepted in a value; histories use two levels.
const MAX_VALUE_DEPTH: usize = 64;

pub fn parse(text: &str) -> Result<Vec<Event>, SyntaxError> {
    let mut events = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let json: Json = serde_json::from_str(raw)
            .map_err(|e| SyntaxError::new(line, format!("invalid JSON: {e}")))?;
        if let Some(event) = event_from_json(&json, line).map_err(|m| SyntaxError::new(line, m))? {
            events.push(event);
        }
    }
    Ok(events)
}

fn event_from_json(json: &Json, line: usize) -> Result<Option<Event>, String> {
    let Json::Object(map) = json else {
        return Err("expected a JSON object".into());
    };
    let process = match map.get("process") {
        Some(Json::Number(n)) => n
            .as_i64()
            .ok_or_else(|| format!("\"process\" must be an integer, found {n}"))?,
        // A named process such as "nemesis" is not a client.
        Some(Json::String(_)) => return Ok(None),
        Some(other) => return Err(format!("\"process\" must be an integer, found {other}")),
        None => return Err("missing \"process\"".into()),
    };
    let kind = match map.get("type") {
        Some(Json::String(name)) => EventType::from_name(name).ok_or_else(|| {
            format!("unknown \"type\" {name:?}; expected invoke, ok, fail or info")
        })?,
        Some(other) => return Err(format!("\"type\" must be a string, found {other}")),
        None => return Err("missing \"type\"".into()),
    };
    let f = match map.get("f") {
        Some(Json::String(name)) => {
            Function::from_name(name).ok_or_else(|| unknown_function(name))?
        }
        Some(other) => return Err(format!("\"f\" must be a string, found {other}")),
        // Elle's list-append histories leave out `f`: every op is a transaction.
        None => Function::Txn,
    };
    let value = match map.get("value") {
        Some(v) => to_value(v, 0).map_err(|m| format!("\"value\": {m}"))?,
        None => Value::Nil,
    };
    let key = match map.get("key") {
        Some(Json::Null) | None => None,
        Some(k) => Some(to_value(k, 0).map_err(|m| format!("\"key\": {m}"))?),
    };
    let time_ns = match map.get("time") {
        Some(Json::Number(n)) => Some(
            n.as_u64()
                .ok_or_else(|| format!("\"time\" must be a non-negative integer, found {n}"))?,
        ),
        Some(Json::Null) | None => None,
        Some(other) => return Err(format!("\"time\" must be an integer, found {other}")),
    };
    Ok(Some(Event {
        process,
        kind,
        f,
        key,
        value,
        time_ns,
        line,
    }))
}

fn to_value(json: &Json, depth: usize) -> Result<Value, String> {
    if depth > MAX_VALUE_DEPTH {
        return Err(format!("nested deeper than {MAX_VALUE_DEPTH} levels"));
    }
    Ok(match json {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => Value::Int(
            n.as_i64()
                .ok_or_else(|| format!("only integers are supported, found {n}"))?,
        ),
        Json::String(s) => Value::Str(s.clone()),
        Json::Array(items) => Value::List(
            items
                .iter()
                .map(|item| to_value(item, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        Json::Object(_) => return Err("objects are not supported as values".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines() {
        let text = r#"{"process":0,"type":"invoke","f":"cas","key":"k","value":[1,2],"time":10}

{"process":0,"type":"ok","f":"cas","key":"k","value":[1,2],"time":20}
{"process":"nemesis","type":"info","f":"start"}
"#;
        let events = parse(text).expect("valid");
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].line, 3);
        assert_eq!(events[0].key, Some(Value::Str("k".into())));
        assert_eq!(events[1].time_ns, Some(20));
    }

    #[test]
    fn reports_errors_with_line() {
        let err = parse("{\"process\":0,\"type\":\"invoke\",\"f\":\"read\"}\n{\"process\":0,")
            .expect_err("truncated");
        assert_eq!(err.line, 2);
        let err = parse("{\"process\":0,\"type\":\"invoke\",\"f\":\"commit\"}").expect_err("bad f");
        assert!(err.message.contains("commit"));
        let err = parse("{\"type\":\"invoke\",\"f\":\"read\"}").expect_err("no process");
        assert!(err.message.contains("process"));
    }
}
