//! Checking whole histories: pairing events into operations, splitting them
//! into independent partitions (P-compositionality: a history is
//! linearizable iff each per-key sub-history is), running the search on each
//! under one shared time budget, and turning a failed search into a short
//! explanation.

pub mod bank;
pub mod changefeed;
pub mod linearizable;
pub mod list_append;
pub mod scan;
pub mod set_final;

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use linearizable::{candidates_after, search, Limits, SearchOp, SearchResult};

use crate::history::{pair_operations, Event, HistoryError, Operation, Value};
use crate::model::{CasRegister, Kv, Model, ModelError, ModelKind, SetModel};

/// Default time budget for one history.
pub const DEFAULT_TIME_LIMIT_MS: u64 = 60_000;

/// Default bound on the memory the search's memo may use per partition,
/// well inside the 24 GiB the project's machines have.
pub const DEFAULT_MAX_MEMO_BYTES: usize = 4 << 30;

/// Linearized operations shown before the point where the search got stuck.
const MAX_EXPLAINED_PREFIX_OPS: usize = 3;

/// Operations shown among those that could not be linearized next.
const MAX_EXPLAINED_BLOCKED_OPS: usize = 8;

/// Longest model state printed in an explanation, in characters.
const MAX_STATE_CHARS: usize = 200;

/// Budgets for one history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckOptions {
    /// Wall-clock budget for the whole history, all partitions together.
    pub time_limit_ms: u64,
    /// Estimated memory the memo of explored configurations may use per
    /// partition; past it the answer is `unknown`.
    pub max_memo_bytes: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            time_limit_ms: DEFAULT_TIME_LIMIT_MS,
            max_memo_bytes: DEFAULT_MAX_MEMO_BYTES,
        }
    }
}

/// Why the checker could not decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownReason {
    TimeLimit { time_limit_ms: u64 },
    MemoLimit { max_memo_bytes: usize },
}

impl fmt::Display for UnknownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TimeLimit { time_limit_ms } => {
                write!(f, "time limit of {time_limit_ms} ms reached")
            }
            Self::MemoLimit { max_memo_bytes } => write!(
                f,
                "search memo reached its limit of {} MiB",
                max_memo_bytes >> 20
            ),
        }
    }
}

/// The answer for one history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Illegal(Box<Explanation>),
    Unknown(UnknownReason),
}

impl Verdict {
    /// `ok`, `illegal` or `unknown`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Illegal(_) => "illegal",
            Self::Unknown(_) => "unknown",
        }
    }
}

/// Why a history is not linearizable: the longest partial linearization the
/// search found in the offending partition, and the operations of which one
/// had to come next but none could.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// Key of the partition, if the model partitions.
    pub partition: Option<Value>,
    pub partition_ops: usize,
    /// Length of the longest partial linearization found.
    pub linearized: usize,
    /// Its last few operations, in linearization order.
    pub prefix_tail: Vec<Operation>,
    /// Model state after it.
    pub state: String,
    /// The first operation left to complete: whatever comes next had to be
    /// invoked before its completion.
    pub first_to_complete: Option<Operation>,
    /// Operations that could come next, rejected ones first.
    pub blocked: Vec<BlockedOp>,
    /// Candidates not listed in `blocked`.
    pub blocked_omitted: usize,
}

/// An operation that could not be linearized next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockedOp {
    pub op: Operation,
    /// The model refuses it in the explanation's state; otherwise it fits
    /// there but no linearization of the remaining operations follows.
    pub rejected: bool,
}

impl Explanation {
    /// The explanation as lines of text, without indentation.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let scope = match &self.partition {
            Some(key) => format!("key {key}: "),
            None => String::new(),
        };
        lines.push(format!(
            "{scope}at most {} of {} operations linearize; model state after them: {}",
            self.linearized,
            self.partition_ops,
            truncate(&self.state, MAX_STATE_CHARS)
        ));
        let skipped = self.linearized - self.prefix_tail.len();
        for (i, op) in self.prefix_tail.iter().enumerate() {
            lines.push(format!("  #{} linearized: {op}", skipped + i + 1));
        }
        match self
            .first_to_complete
            .as_ref()
            .and_then(|op| op.complete_line)
        {
            Some(line) => lines.push(format!(
                "one of these must come next (each was invoked before line {line}, \
                 where the earliest remaining operation completed), but none can:"
            )),
            None => lines.push("one of these must come next, but none can:".into()),
        }
        for blocked in &self.blocked {
            let why = if blocked.rejected {
                "the model rejects it in this state"
            } else {
                "it fits, but no linearization of the remaining operations follows"
            };
            lines.push(format!("  {}: {why}", blocked.op));
        }
        if self.blocked_omitted > 0 {
            lines.push(format!("  ... and {} more", self.blocked_omitted));
        }
        lines
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.lines().join("\n"))
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

/// What checking a history found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub verdict: Verdict,
    /// Operations checked, after dropping failed ones and unknown reads.
    pub operations: usize,
    pub partitions: usize,
    pub elapsed: Duration,
}

/// A history the checker cannot interpret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Checks a parsed history against a model chosen by name.
pub fn check_events(
    kind: ModelKind,
    events: &[Event],
    options: &CheckOptions,
) -> Result<CheckReport, CheckError> {
    let ops = pair_operations(events)?;
    let report = match kind {
        ModelKind::CasRegister => check_operations(&CasRegister, &ops, options)?,
        ModelKind::Kv => check_operations(&Kv, &ops, options)?,
        ModelKind::Set => check_operations(&SetModel, &ops, options)?,
    };
    Ok(report)
}

/// Checks paired operations against `model`.
pub fn check_operations<M: Model>(
    model: &M,
    ops: &[Operation],
    options: &CheckOptions,
) -> Result<CheckReport, ModelError> {
    let started = Instant::now();
    let limits = Limits {
        deadline: started + Duration::from_millis(options.time_limit_ms),
        time_limit_ms: options.time_limit_ms,
        max_memo_bytes: options.max_memo_bytes,
    };
    // Validate everything first, so a bad operation is reported even when
    // an earlier partition turns out illegal.
    let prepared: Vec<M::Op> = ops
        .iter()
        .map(|op| model.prepare(op))
        .collect::<Result<_, _>>()?;
    let mut partitions: BTreeMap<Option<Value>, Vec<usize>> = BTreeMap::new();
    for (i, op) in ops.iter().enumerate() {
        partitions
            .entry(model.partition_key(op))
            .or_default()
            .push(i);
    }
    let partition_count = partitions.len();
    // Small partitions first: a violation there is found before a hard
    // partition uses up the shared budget.
    let mut ordered: Vec<(Option<Value>, Vec<usize>)> = partitions.into_iter().collect();
    ordered.sort_by_key(|(_, members)| members.len());

    let mut verdict = Verdict::Ok;
    for (key, members) in ordered {
        let search_ops: Vec<SearchOp<'_, M::Op>> = members
            .iter()
            .map(|&i| SearchOp {
                call: ops[i].call,
                ret: ops[i].ret,
                op: &prepared[i],
            })
            .collect();
        match search(model, &search_ops, &limits) {
            SearchResult::Linearizable => {}
            SearchResult::Unknown(reason) => {
                if verdict == Verdict::Ok {
                    verdict = Verdict::Unknown(reason);
                }
            }
            SearchResult::Illegal(witness) => {
                let (candidates, first) = candidates_after(model, &search_ops, &witness);
                let mut blocked: Vec<BlockedOp> = candidates
                    .iter()
                    .map(|c| BlockedOp {
                        op: ops[members[c.index]].clone(),
                        rejected: c.rejected,
                    })
                    .collect();
                // Stable sort: rejected first, then by invocation.
                blocked.sort_by_key(|b| !b.rejected);
                let blocked_omitted = blocked.len().saturating_sub(MAX_EXPLAINED_BLOCKED_OPS);
                blocked.truncate(MAX_EXPLAINED_BLOCKED_OPS);
                let tail_start = witness
                    .prefix
                    .len()
                    .saturating_sub(MAX_EXPLAINED_PREFIX_OPS);
                let explanation = Explanation {
                    partition: key,
                    partition_ops: members.len(),
                    linearized: witness.prefix.len(),
                    prefix_tail: witness.prefix[tail_start..]
                        .iter()
                        .map(|&i| ops[members[i]].clone())
                        .collect(),
                    state: model.describe_state(&witness.state),
                    first_to_complete: first.map(|i| ops[members[i]].clone()),
                    blocked,
                    blocked_omitted,
                };
                verdict = Verdict::Illegal(Box::new(explanation));
                break;
            }
        }
    }
    Ok(CheckReport {
        verdict,
        operations: ops.len(),
        partitions: partition_count,
        elapsed: started.elapsed(),
    })
}
