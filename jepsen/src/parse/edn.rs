//! Jepsen's own history format: EDN op maps such as
//! `{:type :invoke, :f :cas, :value [1 2], :process 3, :time 123}`, either one
//! after another (one per line, as Jepsen and porcupine write them) or inside
//! a single top-level list or vector. `;` comments are allowed anywhere.
//!
//! Each op map is read by an EDN reader on its own, so errors carry the line
//! of the offending map even inside a wrapping vector.

use clojure_reader::edn::{self, Edn};
use clojure_reader::error::Code;

use super::SyntaxError;
use crate::history::{Event, EventType, Function, Value};

/// Longest wrapped history we accept; a guard against runaway input rather
/// than a limit real histories reach.
const MAX_EVENTS: usize = 50_000_000;

pub fn parse(text: &str) -> Result<Vec<Event>, SyntaxError> {
    let mut cursor = Cursor::new(text);
    let mut events = Vec::new();
    cursor.skip_blank();
    let open_line = cursor.line;
    let closer = match cursor.peek() {
        Some('[') => Some(']'),
        Some('(') => Some(')'),
        _ => None,
    };
    if closer.is_some() {
        cursor.advance_chars(1);
    }
    loop {
        cursor.skip_blank();
        match (cursor.peek(), closer) {
            (None, None) => break,
            (None, Some(close)) => {
                return Err(SyntaxError::new(
                    open_line,
                    format!("history opened here is never closed with `{close}`"),
                ))
            }
            (Some(c), Some(close)) if c == close => {
                cursor.advance_chars(1);
                cursor.skip_blank();
                if cursor.peek().is_some() {
                    return Err(SyntaxError::new(
                        cursor.line,
                        "unexpected content after the end of the history",
                    ));
                }
                break;
            }
            _ => {}
        }
        if events.len() >= MAX_EVENTS {
            return Err(SyntaxError::new(
                cursor.line,
                format!("more than {MAX_EVENTS} events"),
            ));
        }
        let line = cursor.line;
        let (form, remaining) = edn::read(cursor.rest()).map_err(|err| {
            // The end of the file is a useless place to point at; the form
            // that never closed is what needs fixing.
            if err.code == Code::UnexpectedEOF {
                return SyntaxError::new(line, "EDN form starting here is never closed");
            }
            let at = line + err.line.unwrap_or(1) - 1;
            let column = err
                .column
                .map(|c| format!(" at column {c}"))
                .unwrap_or_default();
            SyntaxError::new(at, format!("invalid EDN ({:?}){column}", err.code))
        })?;
        cursor.advance_to(text.len() - remaining.len());
        if let Some(event) = event_from_form(&form, line).map_err(|m| SyntaxError::new(line, m))? {
            events.push(event);
        }
    }
    Ok(events)
}

/// Reads a single EDN value, e.g. the value column of a Jepsen log line.
pub(crate) fn read_value(text: &str) -> Result<Value, String> {
    let form =
        edn::read_string(text).map_err(|err| format!("invalid EDN value: {:?}", err.code))?;
    to_value(&form)
}

/// Converts the EDN subset histories use into a [`Value`].
pub(crate) fn to_value(form: &Edn<'_>) -> Result<Value, String> {
    Ok(match form {
        Edn::Nil => Value::Nil,
        Edn::Bool(b) => Value::Bool(*b),
        Edn::Int(i) => Value::Int(*i),
        Edn::Str(s) => Value::Str(s.to_string()),
        Edn::Key(k) => Value::Keyword(k.to_string()),
        Edn::Vector(items) | Edn::List(items) => {
            Value::List(items.iter().map(to_value).collect::<Result<_, _>>()?)
        }
        Edn::Set(items) => Value::Set(items.iter().map(to_value).collect::<Result<_, _>>()?),
        other => return Err(format!("unsupported value {other}")),
    })
}

fn event_from_form(form: &Edn<'_>, line: usize) -> Result<Option<Event>, String> {
    let map = match form {
        Edn::Map(map) => map,
        Edn::Tagged(_, inner) => match inner.as_ref() {
            Edn::Map(map) => map,
            _ => return Err(format!("expected an op map, found {form}")),
        },
        _ => return Err(format!("expected an op map, found {form}")),
    };
    let mut process = None;
    let mut kind = None;
    let mut f = None;
    let mut raw_value = None;
    let mut key = None;
    let mut time_ns = None;
    for (field, field_value) in map {
        let Edn::Key(name) = field else { continue };
        match name.as_ref() {
            "process" => process = Some(field_value),
            "type" => kind = Some(field_value),
            "f" => f = Some(field_value),
            // Converted once the op is known to be a client's: a nemesis's values can hold
            // maps, which histories of client operations never do.
            "value" => raw_value = Some(field_value),
            "key" => key = Some(to_value(field_value).map_err(|m| format!(":key: {m}"))?),
            "time" => match field_value {
                Edn::Int(t) if *t >= 0 => time_ns = Some(*t as u64),
                other => {
                    return Err(format!(
                        ":time must be a non-negative integer, found {other}"
                    ))
                }
            },
            _ => {}
        }
    }
    let process = match process {
        Some(Edn::Int(p)) => *p,
        // Nemesis and other non-client events have keyword processes.
        Some(_) => return Ok(None),
        None => return Err("op map has no :process".into()),
    };
    let value = match raw_value {
        Some(v) => to_value(v).map_err(|m| format!(":value: {m}"))?,
        None => Value::Nil,
    };
    let kind = match kind {
        Some(Edn::Key(name)) => EventType::from_name(name).ok_or_else(|| {
            format!("unknown :type :{name}; expected :invoke, :ok, :fail or :info")
        })?,
        Some(other) => return Err(format!(":type must be a keyword, found {other}")),
        None => return Err("op map has no :type".into()),
    };
    let f = match f {
        Some(Edn::Key(name)) => Function::from_name(name).ok_or_else(|| unknown_function(name))?,
        Some(other) => return Err(format!(":f must be a keyword, found {other}")),
        // Elle's list-append histories leave out `:f`: every op is a transaction.
        None => Function::Txn,
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

pub(crate) fn unknown_function(name: &str) -> String {
    format!("unsupported :f :{name}; expected one of read, write, cas, put, get, append, add, txn")
}

/// Position in the text, tracking the line for error messages.
struct Cursor<'a> {
    text: &'a str,
    offset: usize,
    line: usize,
}

impl<'a> Cursor<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text,
            offset: 0,
            line: 1,
        }
    }

    fn rest(&self) -> &'a str {
        &self.text[self.offset..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn advance_to(&mut self, offset: usize) {
        let skipped = &self.text[self.offset..offset];
        self.line += skipped.bytes().filter(|b| *b == b'\n').count();
        self.offset = offset;
    }

    fn advance_chars(&mut self, count: usize) {
        let width: usize = self.rest().chars().take(count).map(char::len_utf8).sum();
        self.advance_to(self.offset + width);
    }

    /// Skips whitespace, commas (whitespace in EDN) and `;` comments.
    fn skip_blank(&mut self) {
        while let Some(c) = self.peek() {
            if c.is_whitespace() || c == ',' {
                self.advance_chars(1);
            } else if c == ';' {
                let end = self
                    .rest()
                    .find('\n')
                    .map_or(self.text.len(), |i| self.offset + i);
                self.advance_to(end);
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_one_per_line() {
        let text = "; a comment\n\
            {:process 0, :type :invoke, :f :append, :key \"4\", :value \"x 0 1 y\"}\n\
            {:process 0, :type :ok, :f :append, :key \"4\", :value \"x 0 1 y\", :time 12}\n\
            {:process :nemesis, :type :info, :f :start, :value nil}\n";
        let events = parse(text).expect("valid");
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].line, 2);
        assert_eq!(events[0].key, Some(Value::Str("4".into())));
        assert_eq!(events[1].kind, EventType::Ok);
        assert_eq!(events[1].time_ns, Some(12));
    }

    #[test]
    fn parses_wrapped_vector_with_lines() {
        let text = "[{:type :invoke, :f :cas, :value [1 2], :process 3}\n\
            ; comment between ops\n\
            {:type :fail, :f :cas, :value [1 2], :process 3}]\n";
        let events = parse(text).expect("valid");
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].line, 3);
        assert_eq!(
            events[0].value,
            Value::List(vec![Value::Int(1), Value::Int(2)])
        );
        assert!(parse("({:type :invoke, :f :read, :process 0})").is_ok());
    }

    #[test]
    fn reports_line_of_bad_form() {
        let text =
            "{:process 0, :type :invoke, :f :read}\n\n{:process 0 :type :ok :f :read :value [1}\n";
        let err = parse(text).expect_err("unbalanced");
        assert_eq!(err.line, 3);
        let err =
            parse("{:process 0, :type :invoke, :f :read}\n{:process 0, :type :done, :f :read}")
                .expect_err("bad type");
        assert_eq!(err.line, 2);
        assert!(err.message.contains(":done"), "{}", err.message);
        let err = parse("[{:process 0, :type :invoke, :f :read}\n").expect_err("unclosed");
        assert_eq!(err.line, 1);
        let err = parse("{:process 0, :type :invoke, :f :commit}").expect_err("bad f");
        assert!(err.message.contains(":commit"), "{}", err.message);
    }
}
