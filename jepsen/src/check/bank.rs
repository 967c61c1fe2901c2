//! The bank checker: transfers move money between accounts in transactions, so every
//! snapshot read of all balances must show the same total, and no balance below zero (a
//! transfer never takes more than the balance it read). A read that shows another total saw
//! half of a transfer, or two transfers that both spent the same money (a lost update);
//! both are what snapshot isolation forbids.

use crate::history::{Event, EventType, Function, Value};

/// Anomalies listed in a report; the count is always complete.
pub const MAX_LISTED_ANOMALIES: usize = 20;

/// What the bank checker found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BankReport {
    /// Successful reads of all balances checked.
    pub reads: usize,
    pub anomaly_count: usize,
    /// The first [`MAX_LISTED_ANOMALIES`] anomalies, each with its history line.
    pub anomalies: Vec<String>,
}

impl BankReport {
    fn found(&mut self, line: usize, what: String) {
        self.anomaly_count += 1;
        if self.anomalies.len() < MAX_LISTED_ANOMALIES {
            self.anomalies.push(format!("line {line}: {what}"));
        }
    }

    /// The report as lines for people.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = self.anomalies.clone();
        if self.anomaly_count > self.anomalies.len() {
            lines.push(format!(
                "... and {} more",
                self.anomaly_count - self.anomalies.len()
            ));
        }
        lines
    }
}

/// Checks every successful `:read` of a bank history: its value lists the balance of each of
/// `accounts` accounts (nil: no such account) and must sum to `total` with none negative.
pub fn check_bank(events: &[Event], accounts: usize, total: i64) -> BankReport {
    let mut report = BankReport::default();
    for event in events {
        if event.f != Function::Read || event.kind != EventType::Ok {
            continue;
        }
        report.reads += 1;
        let Value::List(balances) = &event.value else {
            report.found(
                event.line,
                format!("a read of the balances returned {}", event.value),
            );
            continue;
        };
        if balances.len() != accounts {
            report.found(
                event.line,
                format!(
                    "a read returned {} balances for {accounts} accounts",
                    balances.len()
                ),
            );
            continue;
        }
        let mut sum = 0i64;
        let mut whole = true;
        for (account, balance) in balances.iter().enumerate() {
            match balance {
                Value::Int(b) => {
                    if *b < 0 {
                        report.found(
                            event.line,
                            format!("account {account} has a negative balance {b}"),
                        );
                    }
                    sum = sum.saturating_add(*b);
                }
                Value::Nil => {
                    whole = false;
                    report.found(event.line, format!("account {account} is missing"));
                }
                other => {
                    whole = false;
                    report.found(
                        event.line,
                        format!("account {account} holds {other}, not a number"),
                    );
                }
            }
        }
        if whole && sum != total {
            report.found(
                event.line,
                format!(
                    "the balances [{}] total {sum}, not {total}",
                    balances
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{parse_str, Format};

    fn events(lines: &[&str]) -> Vec<Event> {
        parse_str(Format::Jsonl, &lines.join("\n")).unwrap()
    }

    #[test]
    fn reads_with_the_total_pass_and_others_are_anomalies() {
        let history = events(&[
            r#"{"process":0,"type":"invoke","f":"read","value":null}"#,
            r#"{"process":0,"type":"ok","f":"read","value":[60,40]}"#,
            r#"{"process":1,"type":"invoke","f":"transfer","value":[0,1,5]}"#,
            r#"{"process":1,"type":"ok","f":"transfer","value":[0,1,5]}"#,
            r#"{"process":0,"type":"invoke","f":"read","value":null}"#,
            r#"{"process":0,"type":"ok","f":"read","value":[55,40]}"#,
            r#"{"process":0,"type":"invoke","f":"read","value":null}"#,
            r#"{"process":0,"type":"ok","f":"read","value":[110,-10]}"#,
            r#"{"process":0,"type":"invoke","f":"read","value":null}"#,
            r#"{"process":0,"type":"ok","f":"read","value":[100,null]}"#,
            r#"{"process":0,"type":"invoke","f":"read","value":null}"#,
            r#"{"process":0,"type":"fail","f":"read","value":null}"#,
        ]);
        let report = check_bank(&history, 2, 100);
        assert_eq!(report.reads, 4);
        assert_eq!(report.anomaly_count, 3, "{:?}", report.anomalies);
        assert!(report.anomalies[0].contains("total 95"));
        assert!(report.anomalies[1].contains("negative balance -10"));
        assert!(report.anomalies[2].contains("account 1 is missing"));
        let clean = check_bank(&history[..4], 2, 100);
        assert_eq!(clean.anomaly_count, 0);
        assert_eq!(check_bank(&history[..2], 3, 100).anomaly_count, 1);
    }
}
