//! Linearizability checking and fault-injection testing for SphereDB.
//!
//! [`tester`] runs a real cluster under a workload and a nemesis and records a history;
//! the rest of the crate checks histories, the tester's or any Jepsen-style one.
//!
//! A history of client operations (invocations and their completions) is
//! read from a file ([`parse`]), paired into operations ([`history`]), and
//! checked against a sequential specification ([`model`]) by
//! [`check::check_events`], which answers ok, illegal (with an explanation)
//! or unknown (budget exhausted).
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use spheredb_jepsen::check::{check_events, CheckOptions, Verdict};
//! use spheredb_jepsen::model::ModelKind;
//! use spheredb_jepsen::parse::{parse_str, Format};
//!
//! let history = r#"
//! {:process 0, :type :invoke, :f :write, :value 1}
//! {:process 0, :type :ok, :f :write, :value 1}
//! {:process 1, :type :invoke, :f :read, :value nil}
//! {:process 1, :type :ok, :f :read, :value 1}
//! "#;
//! let events = parse_str(Format::Edn, history)?;
//! let report = check_events(ModelKind::CasRegister, &events, &CheckOptions::default())?;
//! assert_eq!(report.verdict, Verdict::Ok);
//! # Ok(())
//! # }
//! ```

pub mod check;
pub mod history;
pub mod model;
pub mod parse;
pub mod tester;
