//! An Elle-style checker for list-append transaction histories: from what committed
//! transactions read, infer each key's version order and the write-write (ww),
//! write-read (wr) and read-write (rw, anti-dependency) edges between transactions, then look
//! for the cycles and the non-cyclic anomalies that snapshot isolation and serializability
//! forbid.
//!
//! A transaction is a list of micro-operations: `append k v` adds `v` to the end of the list
//! at `k`; `r k` reads the whole list. Every appended value is unique per key, so a read
//! names the exact writes it saw, in order, and the longest read of a key gives that key's
//! version order (every other read must be a prefix of it). That is what makes the graph
//! exact rather than guessed (Kingsbury & Alvaro, "Elle", VLDB 2020).
//!
//! Anomalies (Adya's names, as Elle reports them):
//! - **G0**: a cycle of ww edges only (dirty writes);
//! - **G1a**: a committed transaction read a value an aborted one appended;
//! - **G1b**: a committed transaction read a value that was not its writer's last append to
//!   the key (an intermediate state);
//! - **G1c**: a cycle of ww and wr edges with at least one wr (circular information flow);
//! - **G-single**: a cycle with exactly one rw edge (read skew);
//! - **G-nonadjacent**: a cycle with more rw edges, no two of them in a row (a long fork);
//! - **G2-item**: a cycle with two rw edges in a row (write skew);
//! - and what no history may show: a read that is not a prefix of the key's longest read
//!   (`incompatible-order`), a transaction reading its own append before making it
//!   (`future-read`), a value read twice (`duplicate-elements`), a value nobody
//!   appended (`garbage-read`), and a
//!   transaction whose read disagrees with its own earlier operations (`internal`).
//!
//! Snapshot isolation forbids all of them but G2-item; serializability forbids G2-item too.
//! Components decide both verdicts in linear time (see [`find_cycles`]); the cycle searches,
//! bounded per component, only find the evidence.
//!
//! Building the graph is linear in the history; the cycle searches are breadth-first
//! searches inside one strongly connected component, at most
//! [`MAX_CYCLE_SEARCHES_PER_COMPONENT`] per kind, stopping at the first cycle of each
//! anomaly per component; at most [`MAX_CYCLES_PER_ANOMALY`] are listed each.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;

use crate::history::{Event, EventType, Function, Value};

/// Cycles listed per anomaly; the count of components showing it is always complete.
pub const MAX_CYCLES_PER_ANOMALY: usize = 5;
/// Searches for a cycle of one kind in one strongly connected component, each a
/// breadth-first search inside the component. Verdicts do not depend on it: components
/// decide them; past it the anomaly is reported without a cycle.
pub const MAX_CYCLE_SEARCHES_PER_COMPONENT: usize = 64;
/// Non-cyclic anomalies listed per kind; the count is always complete.
pub const MAX_LISTED_PER_ANOMALY: usize = 10;

/// One micro-operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mop {
    Append {
        key: i64,
        elem: i64,
    },
    /// `elems` is what the read returned; `None` when it is unknown (a transaction that
    /// did not complete, or the invocation).
    Read {
        key: i64,
        elems: Option<Vec<i64>>,
    },
}

/// How a transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnStatus {
    Committed,
    /// Definitely did not take effect.
    Aborted,
    /// May or may not have taken effect.
    Unknown,
}

/// A transaction as the checker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Txn {
    pub process: i64,
    pub status: TxnStatus,
    pub mops: Vec<Mop>,
    /// Line of the completion (or the invocation when it never completed), for reports.
    pub line: usize,
}

/// What an anomaly is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Anomaly {
    G0,
    G1a,
    G1b,
    G1c,
    GSingle,
    GNonadjacent,
    G2Item,
    Internal,
    FutureRead,
    IncompatibleOrder,
    DuplicateElements,
    GarbageRead,
}

impl Anomaly {
    pub fn name(self) -> &'static str {
        match self {
            Self::G0 => "G0",
            Self::G1a => "G1a",
            Self::G1b => "G1b",
            Self::G1c => "G1c",
            Self::GSingle => "G-single",
            Self::GNonadjacent => "G-nonadjacent",
            Self::G2Item => "G2-item",
            Self::Internal => "internal",
            Self::FutureRead => "future-read",
            Self::IncompatibleOrder => "incompatible-order",
            Self::DuplicateElements => "duplicate-elements",
            Self::GarbageRead => "garbage-read",
        }
    }
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The consistency model a history is judged against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    SnapshotIsolation,
    Serializable,
}

impl Consistency {
    /// Whether a history showing `anomaly` violates this model.
    pub fn forbids(self, anomaly: Anomaly) -> bool {
        match self {
            // G2-item here is a cycle with two rw edges in a row; one without is reported
            // as G-nonadjacent.
            Self::SnapshotIsolation => anomaly != Anomaly::G2Item,
            Self::Serializable => true,
        }
    }
}

/// A dependency between two transactions, through one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EdgeKind {
    /// The source appended the version right before the target's.
    Ww,
    /// The target read the source's append.
    Wr,
    /// The source read a version the target's append overwrote.
    Rw,
}

impl EdgeKind {
    fn name(self) -> &'static str {
        match self {
            Self::Ww => "ww",
            Self::Wr => "wr",
            Self::Rw => "rw",
        }
    }
}

/// An edge `from -> to` of the dependency graph; `elem` is the value it goes through (the
/// target's append for ww and rw, the value read for wr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Edge {
    pub from: usize,
    pub to: usize,
    pub kind: EdgeKind,
    pub key: i64,
    pub elem: i64,
}

/// One anomaly found, with its evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub anomaly: Anomaly,
    /// For a cycle, its edges in order (the last one's target is the first one's source).
    pub cycle: Vec<Edge>,
    pub explanation: String,
}

/// What the check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub txns: usize,
    pub committed: usize,
    pub edges: usize,
    /// How many times each anomaly was found (cycles: per strongly connected component).
    pub counts: BTreeMap<Anomaly, usize>,
    /// The listed findings, bounded per anomaly.
    pub findings: Vec<Finding>,
}

impl Report {
    /// Whether the history is legal under `model`.
    pub fn valid_under(&self, model: Consistency) -> bool {
        self.counts.keys().all(|a| !model.forbids(*a))
    }

    fn found(&mut self, anomaly: Anomaly, cycle: Vec<Edge>, explanation: String) {
        let count = self.counts.entry(anomaly).or_default();
        *count += 1;
        let limit = if cycle.is_empty() {
            MAX_LISTED_PER_ANOMALY
        } else {
            MAX_CYCLES_PER_ANOMALY
        };
        if *count <= limit {
            self.findings.push(Finding {
                anomaly,
                cycle,
                explanation,
            });
        }
    }
}

/// The transactions of a history of `:txn` operations: each invocation paired with its
/// completion (`ok`: committed, with what its reads returned; `fail`: aborted; `info` or
/// none: unknown).
pub fn txns_from_events(events: &[Event]) -> Result<Vec<Txn>, String> {
    let mut pending: HashMap<i64, &Event> = HashMap::new();
    let mut txns = Vec::new();
    for event in events {
        if event.f != Function::Txn {
            return Err(format!(
                "line {}: a list-append history holds only :txn operations, not {}",
                event.line, event.f
            ));
        }
        if event.kind == EventType::Invoke {
            if let Some(earlier) = pending.insert(event.process, event) {
                return Err(format!(
                    "line {}: process {} invoked again while its operation at line {} was pending",
                    event.line, event.process, earlier.line
                ));
            }
            continue;
        }
        let Some(invoke) = pending.remove(&event.process) else {
            return Err(format!(
                "line {}: completion of process {} without an invocation",
                event.line, event.process
            ));
        };
        let (status, value, with_reads) = match event.kind {
            EventType::Ok => (TxnStatus::Committed, &event.value, true),
            EventType::Fail => (TxnStatus::Aborted, &invoke.value, false),
            _ => (TxnStatus::Unknown, &invoke.value, false),
        };
        txns.push(Txn {
            process: event.process,
            status,
            mops: mops_of(value, with_reads).map_err(|m| format!("line {}: {m}", event.line))?,
            line: event.line,
        });
    }
    let mut never_completed: Vec<&Event> = pending.into_values().collect();
    never_completed.sort_by_key(|e| e.line);
    for invoke in never_completed {
        txns.push(Txn {
            process: invoke.process,
            status: TxnStatus::Unknown,
            mops: mops_of(&invoke.value, false)
                .map_err(|m| format!("line {}: {m}", invoke.line))?,
            line: invoke.line,
        });
    }
    Ok(txns)
}

/// The micro-operations in a `:txn` value; reads keep their results when `with_reads`.
fn mops_of(value: &Value, with_reads: bool) -> Result<Vec<Mop>, String> {
    let Value::List(items) = value else {
        return Err(format!(
            "a :txn value is a list of micro-operations, not {value}"
        ));
    };
    items
        .iter()
        .map(|item| {
            let parts = match item {
                Value::List(parts) if parts.len() == 3 => parts,
                other => return Err(format!("micro-operation {other} is not [f key value]")),
            };
            let f = match &parts[0] {
                Value::Keyword(f) | Value::Str(f) => f.as_str(),
                other => return Err(format!("micro-operation function {other} is not a name")),
            };
            let Value::Int(key) = parts[1] else {
                return Err(format!(
                    "micro-operation key {} is not an integer",
                    parts[1]
                ));
            };
            match (f, &parts[2]) {
                ("append", Value::Int(elem)) => Ok(Mop::Append { key, elem: *elem }),
                // A completed read of a key nobody appended to returns nil: the empty list.
                ("r", Value::Nil) => Ok(Mop::Read {
                    key,
                    elems: with_reads.then(Vec::new),
                }),
                ("r", Value::List(elems)) => {
                    let elems = elems
                        .iter()
                        .map(|e| match e {
                            Value::Int(i) => Ok(*i),
                            other => {
                                Err(format!("read of key {key} holds {other}, not an integer"))
                            }
                        })
                        .collect::<Result<Vec<i64>, String>>()?;
                    Ok(Mop::Read {
                        key,
                        elems: with_reads.then_some(elems),
                    })
                }
                (f, v) => Err(format!(
                    "micro-operation [{f} {key} {v}]: expected [append k int] or [r k nil|list]"
                )),
            }
        })
        .collect()
}

/// Checks a list-append history. A value appended twice to one key is refused: the
/// reads could not tell the two appends apart, so the history cannot be checked.
pub fn check(txns: &[Txn]) -> Result<Report, String> {
    let mut report = Report {
        txns: txns.len(),
        committed: txns
            .iter()
            .filter(|t| t.status == TxnStatus::Committed)
            .count(),
        ..Report::default()
    };
    let writers = appends_by_value(txns)?;
    check_internal(txns, &mut report);
    let orders = version_orders(txns, &writers, &mut report);
    check_aborted_and_intermediate_reads(txns, &writers, &mut report);
    let edges = dependency_edges(txns, &writers, &orders);
    report.edges = edges.len();
    find_cycles(txns, &edges, &mut report);
    Ok(report)
}

/// Which transaction appended each `(key, value)`, with its position among that
/// transaction's appends to the key.
struct Writer {
    txn: usize,
    /// Whether this is the transaction's last append to the key.
    last_of_txn: bool,
}

fn appends_by_value(txns: &[Txn]) -> Result<HashMap<(i64, i64), Writer>, String> {
    let mut writers: HashMap<(i64, i64), Writer> = HashMap::new();
    for (id, t) in txns.iter().enumerate() {
        let mut last_append: HashMap<i64, i64> = HashMap::new();
        for m in &t.mops {
            if let Mop::Append { key, elem } = m {
                last_append.insert(*key, *elem);
            }
        }
        for m in &t.mops {
            let Mop::Append { key, elem } = m else {
                continue;
            };
            if let Some(first) = writers.get(&(*key, *elem)) {
                return Err(format!(
                    "value {elem} is appended to key {key} by {} and by {}: list-append \
                     histories need every value unique per key (a client that retries an \
                     append must use a new value)",
                    describe(txns, first.txn),
                    describe(txns, id)
                ));
            }
            writers.insert(
                (*key, *elem),
                Writer {
                    txn: id,
                    last_of_txn: last_append.get(key) == Some(elem),
                },
            );
        }
    }
    Ok(writers)
}

/// A transaction's reads must agree with its own earlier reads and appends of the key.
fn check_internal(txns: &[Txn], report: &mut Report) {
    for (id, t) in txns.iter().enumerate() {
        if t.status != TxnStatus::Committed {
            continue;
        }
        // What the transaction knows of each key: a read's result plus its appends since;
        // for a key it has not read, only its own appends, which must end the list.
        let mut known: HashMap<i64, (bool, Vec<i64>)> = HashMap::new();
        for (i, m) in t.mops.iter().enumerate() {
            if let Mop::Read {
                key,
                elems: Some(elems),
            } = m
            {
                let later = t.mops[i + 1..].iter().find_map(|later| match later {
                    Mop::Append { key: k, elem } if k == key && elems.contains(elem) => Some(*elem),
                    _ => None,
                });
                if let Some(elem) = later {
                    report.found(
                        Anomaly::FutureRead,
                        Vec::new(),
                        format!(
                            "{} read {elem} in key {key} before appending it",
                            describe(txns, id)
                        ),
                    );
                }
            }
            match m {
                Mop::Append { key, elem } => known.entry(*key).or_default().1.push(*elem),
                Mop::Read {
                    key,
                    elems: Some(elems),
                } => {
                    if let Some((whole, expected)) = known.get(key) {
                        let consistent = if *whole {
                            elems == expected
                        } else {
                            elems.ends_with(expected)
                        };
                        if !consistent {
                            report.found(
                                Anomaly::Internal,
                                Vec::new(),
                                format!(
                                    "{} read key {key} as {elems:?}, but its own earlier operations \
                                     imply {}{expected:?}",
                                    describe(txns, id),
                                    if *whole { "" } else { "a list ending in " }
                                ),
                            );
                        }
                    }
                    known.insert(*key, (true, elems.clone()));
                }
                Mop::Read { elems: None, .. } => {}
            }
        }
    }
}

/// Each key's version order: its longest committed read, which every other committed read
/// must be a prefix of.
fn version_orders(
    txns: &[Txn],
    writers: &HashMap<(i64, i64), Writer>,
    report: &mut Report,
) -> HashMap<i64, Vec<i64>> {
    let mut longest: HashMap<i64, (usize, Vec<i64>)> = HashMap::new();
    for (id, t) in txns.iter().enumerate() {
        if t.status != TxnStatus::Committed {
            continue;
        }
        for m in &t.mops {
            let Mop::Read {
                key,
                elems: Some(elems),
            } = m
            else {
                continue;
            };
            let mut seen = HashSet::new();
            for e in elems {
                if !seen.insert(*e) {
                    report.found(
                        Anomaly::DuplicateElements,
                        Vec::new(),
                        format!(
                            "{} read key {key} as {elems:?}: {e} twice",
                            describe(txns, id)
                        ),
                    );
                }
                if !writers.contains_key(&(*key, *e)) {
                    report.found(
                        Anomaly::GarbageRead,
                        Vec::new(),
                        format!(
                            "{} read {e} in key {key}, which no transaction appended",
                            describe(txns, id)
                        ),
                    );
                }
            }
            let entry = longest.entry(*key).or_insert((id, Vec::new()));
            if elems.len() > entry.1.len() {
                *entry = (id, elems.clone());
            }
        }
    }
    for (id, t) in txns.iter().enumerate() {
        if t.status != TxnStatus::Committed {
            continue;
        }
        for m in &t.mops {
            let Mop::Read {
                key,
                elems: Some(elems),
            } = m
            else {
                continue;
            };
            let (by, order) = &longest[key];
            if !order.starts_with(elems) {
                report.found(
                    Anomaly::IncompatibleOrder,
                    Vec::new(),
                    format!(
                        "{} read key {key} as {elems:?}, not a prefix of {order:?} read by {}",
                        describe(txns, id),
                        describe(txns, *by)
                    ),
                );
            }
        }
    }
    longest
        .into_iter()
        .map(|(k, (_, order))| (k, order))
        .collect()
}

/// G1a: reading an aborted transaction's append; G1b: reading a state in which the writer
/// had appended to the key again later.
fn check_aborted_and_intermediate_reads(
    txns: &[Txn],
    writers: &HashMap<(i64, i64), Writer>,
    report: &mut Report,
) {
    for (id, t) in txns.iter().enumerate() {
        if t.status != TxnStatus::Committed {
            continue;
        }
        for m in &t.mops {
            let Mop::Read {
                key,
                elems: Some(elems),
            } = m
            else {
                continue;
            };
            for e in elems {
                let Some(w) = writers.get(&(*key, *e)) else {
                    continue;
                };
                if w.txn != id && txns[w.txn].status == TxnStatus::Aborted {
                    report.found(
                        Anomaly::G1a,
                        Vec::new(),
                        format!(
                            "{} read {e} in key {key}, appended by {}, which aborted",
                            describe(txns, id),
                            describe(txns, w.txn)
                        ),
                    );
                }
            }
            if let Some(last) = elems.last() {
                if let Some(w) = writers.get(&(*key, *last)) {
                    if w.txn != id && !w.last_of_txn {
                        report.found(
                            Anomaly::G1b,
                            Vec::new(),
                            format!(
                                "{} read key {key} ending in {last}, an intermediate append of {}",
                                describe(txns, id),
                                describe(txns, w.txn)
                            ),
                        );
                    }
                }
            }
        }
    }
}

/// The ww, wr and rw edges among transactions that took effect (committed ones, and
/// unknown ones whose appends were read).
fn dependency_edges(
    txns: &[Txn],
    writers: &HashMap<(i64, i64), Writer>,
    orders: &HashMap<i64, Vec<i64>>,
) -> Vec<Edge> {
    let mut edges = HashSet::new();
    let writer_of = |key: i64, elem: i64| {
        writers
            .get(&(key, elem))
            .map(|w| w.txn)
            .filter(|t| txns[*t].status != TxnStatus::Aborted)
    };
    // Transactions that took effect: the committed ones, and those of unknown outcome
    // whose appends some read observed (a transaction takes effect whole or not at all).
    let mut took_effect: Vec<bool> = txns
        .iter()
        .map(|t| t.status == TxnStatus::Committed)
        .collect();
    for (key, order) in orders {
        for elem in order {
            if let Some(w) = writer_of(*key, *elem) {
                took_effect[w] = true;
            }
        }
    }
    // Committed appends no read observed: each comes after every observed version of its
    // key (else the longest read, which holds every version before its last, would show
    // it), in an order nobody saw. So they follow the key's last observed writer, and every
    // read of the whole observed order precedes them.
    let observed: HashSet<(i64, i64)> = orders
        .iter()
        .flat_map(|(key, order)| order.iter().map(move |elem| (*key, *elem)))
        .collect();
    let mut unobserved: HashMap<i64, Vec<(usize, i64)>> = HashMap::new();
    for (&(key, elem), w) in writers {
        if !observed.contains(&(key, elem)) && took_effect[w.txn] {
            unobserved.entry(key).or_default().push((w.txn, elem));
        }
    }
    for (key, later) in &unobserved {
        let last = orders.get(key).and_then(|o| o.last());
        if let Some(a) = last.and_then(|e| writer_of(*key, *e)) {
            for &(b, elem) in later {
                if a != b {
                    edges.insert(Edge {
                        from: a,
                        to: b,
                        kind: EdgeKind::Ww,
                        key: *key,
                        elem,
                    });
                }
            }
        }
    }
    // ww: consecutive versions of a key, between different transactions.
    for (key, order) in orders {
        for pair in order.windows(2) {
            if let (Some(a), Some(b)) = (writer_of(*key, pair[0]), writer_of(*key, pair[1])) {
                if a != b {
                    edges.insert(Edge {
                        from: a,
                        to: b,
                        kind: EdgeKind::Ww,
                        key: *key,
                        elem: pair[1],
                    });
                }
            }
        }
    }
    for (id, t) in txns.iter().enumerate() {
        if t.status != TxnStatus::Committed {
            continue;
        }
        // A transaction's read of a key after its own append to it says nothing about
        // others beyond what its first read of the key said.
        let mut read_keys = HashSet::new();
        let mut appended_keys = HashSet::new();
        for m in &t.mops {
            match m {
                Mop::Append { key, .. } => {
                    appended_keys.insert(*key);
                }
                Mop::Read {
                    key,
                    elems: Some(elems),
                } => {
                    if appended_keys.contains(key) || !read_keys.insert(*key) {
                        continue;
                    }
                    // wr: from the writer of the last value read.
                    if let Some(last) = elems.last() {
                        if let Some(w) = writer_of(*key, *last) {
                            if w != id {
                                edges.insert(Edge {
                                    from: w,
                                    to: id,
                                    kind: EdgeKind::Wr,
                                    key: *key,
                                    elem: *last,
                                });
                            }
                        }
                    }
                    // rw: to the writer of the version that followed the one read; after
                    // the whole observed order, to every unobserved append.
                    let Some(order) = orders.get(key).filter(|o| o.starts_with(elems)) else {
                        continue;
                    };
                    let next: Vec<(usize, i64)> = match order.get(elems.len()) {
                        Some(next) => writer_of(*key, *next)
                            .map(|w| (w, *next))
                            .into_iter()
                            .collect(),
                        None => unobserved.get(key).cloned().unwrap_or_default(),
                    };
                    for (w, elem) in next {
                        if w != id {
                            edges.insert(Edge {
                                from: id,
                                to: w,
                                kind: EdgeKind::Rw,
                                key: *key,
                                elem,
                            });
                        }
                    }
                }
                Mop::Read { elems: None, .. } => {}
            }
        }
    }
    let mut edges: Vec<Edge> = edges.into_iter().collect();
    edges.sort_by_key(|e| (e.from, e.to, e.kind, e.key, e.elem));
    edges
}

/// Finds the cycles: in each strongly connected component, one of each anomaly it holds.
///
/// Verdicts come from components, in linear time; the searches only find evidence. A
/// component of the whole graph is a cycle serializability forbids. Snapshot isolation
/// forbids exactly the cycles in which no two rw edges follow each other (G0, G1c, G-single
/// and G-nonadjacent): under it a ww or wr edge `u -> v` means `u` committed before `v`
/// began (first committer wins), and an rw edge means `u` began before `v` committed, so
/// along such a cycle the times strictly rise back to where they started. They are the
/// cycles of the graph whose nodes are (transaction, whether the last edge was rw), where
/// an rw edge may not leave a node reached by one.
fn find_cycles(txns: &[Txn], edges: &[Edge], report: &mut Report) {
    let n = txns.len();
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, e) in edges.iter().enumerate() {
        out[e.from].push(i);
    }
    let component = strongly_connected_components(n, edges, &out);
    let si_cyclic = in_nonadjacent_cycles(n, edges);
    let mut by_component: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, e) in edges.iter().enumerate() {
        if component[e.from] == component[e.to] {
            by_component.entry(component[e.from]).or_default().push(i);
        }
    }
    for (c, inner) in &by_component {
        let within = |e: &Edge| component[e.from] == *c && component[e.to] == *c;
        // Cycles that start with an edge of `first_kind` and go on through edges `allowed`
        // keeps (given whether the edge before was rw) back to a state `closes` accepts
        // (whether the last edge was rw).
        let search_closing = |first_kind: EdgeKind,
                              allowed: &dyn Fn(&Edge, bool) -> bool,
                              closes: &dyn Fn(bool) -> bool| {
            inner
                .iter()
                .filter(|i| edges[**i].kind == first_kind)
                .take(MAX_CYCLE_SEARCHES_PER_COMPONENT)
                .find_map(|i| {
                    let allowed = |e: &Edge, last_rw: bool| within(e) && allowed(e, last_rw);
                    cycle_through(edges, &out, *i, &allowed, closes)
                })
        };
        let search = |first_kind: EdgeKind, allowed: &dyn Fn(&Edge, bool) -> bool| {
            search_closing(first_kind, allowed, &|_| true)
        };
        let g0 = search(EdgeKind::Ww, &|e, _| e.kind == EdgeKind::Ww);
        let g1c = search(EdgeKind::Wr, &|e, _| e.kind != EdgeKind::Rw);
        let g_single = search(EdgeKind::Rw, &|e, _| e.kind != EdgeKind::Rw);
        let found_si = g0.is_some() || g1c.is_some() || g_single.is_some();
        for (anomaly, cycle) in [
            (Anomaly::G0, g0),
            (Anomaly::G1c, g1c),
            (Anomaly::GSingle, g_single),
        ] {
            if let Some(cycle) = cycle {
                report.found(anomaly, cycle.clone(), describe_cycle(txns, &cycle));
            }
        }
        let members = component.iter().filter(|k| **k == *c).count();
        let exhausted = |what: &str| {
            format!(
                "{members} transactions form a cycle {what}, but the search budget \
                 ({MAX_CYCLE_SEARCHES_PER_COMPONENT} searches per kind) ran out before it \
                 isolated one"
            )
        };
        let component_si_cyclic = (0..n).any(|t| component[t] == *c && si_cyclic[t]);
        if component_si_cyclic && !found_si {
            let nonadjacent = |e: &Edge, last_rw: bool| !(last_rw && e.kind == EdgeKind::Rw);
            match search_closing(EdgeKind::Rw, &nonadjacent, &|last_rw| !last_rw) {
                Some(cycle) => report.found(
                    Anomaly::GNonadjacent,
                    cycle.clone(),
                    describe_cycle(txns, &cycle),
                ),
                None => report.found(
                    Anomaly::GNonadjacent,
                    Vec::new(),
                    exhausted("that snapshot isolation forbids"),
                ),
            }
        } else if !component_si_cyclic {
            match search(EdgeKind::Rw, &|_, _| true) {
                Some(cycle) => {
                    report.found(Anomaly::G2Item, cycle.clone(), describe_cycle(txns, &cycle))
                }
                None => report.found(Anomaly::G2Item, Vec::new(), exhausted("with rw edges")),
            }
        }
    }
}

/// Which transactions lie on a cycle in which no two rw edges follow each other: the
/// strongly connected components of the graph of (transaction, last edge was rw).
fn in_nonadjacent_cycles(n: usize, edges: &[Edge]) -> Vec<bool> {
    let state = |t: usize, last_rw: bool| 2 * t + usize::from(last_rw);
    let mut product = Vec::new();
    for e in edges {
        if e.kind == EdgeKind::Rw {
            product.push((state(e.from, false), state(e.to, true)));
        } else {
            for last_rw in [false, true] {
                product.push((state(e.from, last_rw), state(e.to, false)));
            }
        }
    }
    let product_edges: Vec<Edge> = product
        .iter()
        .map(|&(from, to)| Edge {
            from,
            to,
            kind: EdgeKind::Ww,
            key: 0,
            elem: 0,
        })
        .collect();
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); 2 * n];
    for (i, e) in product_edges.iter().enumerate() {
        out[e.from].push(i);
    }
    let component = strongly_connected_components(2 * n, &product_edges, &out);
    let mut size: HashMap<usize, usize> = HashMap::new();
    for c in &component {
        *size.entry(*c).or_default() += 1;
    }
    (0..n)
        .map(|t| size[&component[state(t, false)]] > 1 || size[&component[state(t, true)]] > 1)
        .collect()
}

/// A shortest closed walk that starts with edge `first` and returns to its source through
/// edges `allowed` keeps (given whether the edge before was rw), arriving by an edge that
/// `closes` accepts (given whether it is rw). Only a rule that depends on the edge before
/// can make the walk pass a transaction twice.
fn cycle_through(
    edges: &[Edge],
    out: &[Vec<usize>],
    first: usize,
    allowed: &dyn Fn(&Edge, bool) -> bool,
    closes: &dyn Fn(bool) -> bool,
) -> Option<Vec<Edge>> {
    let first_edge = edges[first];
    let start = (first_edge.to, first_edge.kind == EdgeKind::Rw);
    let goal = first_edge.from;
    // Each state reached: the state it was reached from, and by which edge.
    let mut came_by: HashMap<(usize, bool), ((usize, bool), usize)> = HashMap::new();
    let mut queue = VecDeque::from([start]);
    let mut visited = HashSet::from([start]);
    let mut reached = None;
    'search: while let Some(state) = queue.pop_front() {
        for &i in &out[state.0] {
            let e = &edges[i];
            if !allowed(e, state.1) {
                continue;
            }
            let next = (e.to, e.kind == EdgeKind::Rw);
            if !visited.insert(next) {
                continue;
            }
            came_by.insert(next, (state, i));
            if e.to == goal && closes(next.1) {
                reached = Some(next);
                break 'search;
            }
            queue.push_back(next);
        }
    }
    let mut state = reached?;
    let mut path = Vec::new();
    while state != start {
        let (previous, i) = came_by[&state];
        path.push(edges[i]);
        state = previous;
    }
    path.push(first_edge);
    path.reverse();
    Some(path)
}

/// Tarjan's algorithm, iteratively; returns each node's component number.
fn strongly_connected_components(n: usize, edges: &[Edge], out: &[Vec<usize>]) -> Vec<usize> {
    const UNSEEN: usize = usize::MAX;
    let mut index = vec![UNSEEN; n];
    let mut low = vec![0; n];
    let mut on_stack = vec![false; n];
    let mut stack = Vec::new();
    let mut component = vec![UNSEEN; n];
    let mut next_index = 0;
    let mut components = 0;
    for root in 0..n {
        if index[root] != UNSEEN {
            continue;
        }
        // (node, position in its out-edges)
        let mut work = vec![(root, 0usize)];
        while let Some(&mut (node, ref mut pos)) = work.last_mut() {
            if *pos == 0 && index[node] == UNSEEN {
                index[node] = next_index;
                low[node] = next_index;
                next_index += 1;
                stack.push(node);
                on_stack[node] = true;
            }
            if let Some(&i) = out[node].get(*pos) {
                *pos += 1;
                let to = edges[i].to;
                if index[to] == UNSEEN {
                    work.push((to, 0));
                } else if on_stack[to] {
                    low[node] = low[node].min(index[to]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[node]);
            }
            if low[node] == index[node] {
                while let Some(member) = stack.pop() {
                    on_stack[member] = false;
                    component[member] = components;
                    if member == node {
                        break;
                    }
                }
                components += 1;
            }
        }
    }
    component
}

fn describe(txns: &[Txn], id: usize) -> String {
    format!(
        "T{id} (process {}, line {})",
        txns[id].process, txns[id].line
    )
}

fn describe_cycle(txns: &[Txn], cycle: &[Edge]) -> String {
    let mut s = String::new();
    for e in cycle {
        s.push_str(&format!(
            "{} -{} key {} value {}-> ",
            describe(txns, e.from),
            e.kind.name(),
            e.key,
            e.elem
        ));
    }
    if let Some(first) = cycle.first() {
        s.push_str(&describe(txns, first.from));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(key: i64, elem: i64) -> Mop {
        Mop::Append { key, elem }
    }

    fn r(key: i64, elems: &[i64]) -> Mop {
        Mop::Read {
            key,
            elems: Some(elems.to_vec()),
        }
    }

    fn ok(mops: Vec<Mop>) -> Txn {
        Txn {
            process: 0,
            status: TxnStatus::Committed,
            mops,
            line: 0,
        }
    }

    fn with(status: TxnStatus, mops: Vec<Mop>) -> Txn {
        Txn { status, ..ok(mops) }
    }

    fn anomalies(txns: &[Txn]) -> Vec<Anomaly> {
        check(txns).unwrap().counts.into_keys().collect()
    }

    #[test]
    fn a_serial_history_is_legal_under_both_models() {
        let h = vec![
            ok(vec![a(1, 1), a(2, 1)]),
            ok(vec![r(1, &[1]), a(1, 2)]),
            ok(vec![r(1, &[1, 2]), r(2, &[1])]),
        ];
        let report = check(&h).unwrap();
        assert!(report.counts.is_empty(), "{report:?}");
        assert!(report.valid_under(Consistency::Serializable));
    }

    #[test]
    fn a_write_cycle_is_g0() {
        // T0 appended before T1 on key 1, after it on key 2.
        let h = vec![
            ok(vec![a(1, 1), a(2, 2)]),
            ok(vec![a(1, 2), a(2, 1)]),
            ok(vec![r(1, &[1, 2]), r(2, &[1, 2])]),
        ];
        assert!(anomalies(&h).contains(&Anomaly::G0));
        assert!(!check(&h)
            .unwrap()
            .valid_under(Consistency::SnapshotIsolation));
    }

    #[test]
    fn reading_an_aborted_append_is_g1a() {
        let h = vec![
            with(TxnStatus::Aborted, vec![a(1, 1)]),
            ok(vec![r(1, &[1])]),
        ];
        assert_eq!(anomalies(&h), vec![Anomaly::G1a]);
    }

    #[test]
    fn reading_an_intermediate_append_is_g1b() {
        let h = vec![ok(vec![a(1, 1), a(1, 2)]), ok(vec![r(1, &[1])])];
        assert!(anomalies(&h).contains(&Anomaly::G1b));
    }

    #[test]
    fn circular_information_flow_is_g1c() {
        // Each read the other's append.
        let h = vec![ok(vec![a(1, 1), r(2, &[1])]), ok(vec![a(2, 1), r(1, &[1])])];
        assert!(anomalies(&h).contains(&Anomaly::G1c));
    }

    #[test]
    fn read_skew_is_g_single_and_illegal_under_si() {
        // T2 sees T1's append to key 2 but not its append to key 1.
        let h = vec![ok(vec![a(1, 1), a(2, 1)]), ok(vec![r(1, &[]), r(2, &[1])])];
        let report = check(&h).unwrap();
        assert_eq!(
            report.counts.keys().copied().collect::<Vec<_>>(),
            vec![Anomaly::GSingle]
        );
        assert!(!report.valid_under(Consistency::SnapshotIsolation));
        assert_eq!(report.findings[0].cycle.len(), 2);
    }

    #[test]
    fn write_skew_is_g2_item_legal_under_si_only() {
        // Each read the key the other appended to, before the other's append.
        let h = vec![
            ok(vec![r(1, &[]), a(2, 1)]),
            ok(vec![r(2, &[]), a(1, 1)]),
            ok(vec![r(1, &[1]), r(2, &[1])]),
        ];
        let report = check(&h).unwrap();
        assert_eq!(
            report.counts.keys().copied().collect::<Vec<_>>(),
            vec![Anomaly::G2Item]
        );
        assert!(report.valid_under(Consistency::SnapshotIsolation));
        assert!(!report.valid_under(Consistency::Serializable));
    }

    #[test]
    fn a_long_fork_is_g_nonadjacent_and_illegal_under_si() {
        // T0 and T2 each see one of T1's and T3's appends and not the other's.
        let h = vec![
            ok(vec![r(1, &[]), r(4, &[1])]),
            ok(vec![a(1, 1), a(2, 1)]),
            ok(vec![r(2, &[1]), r(3, &[])]),
            ok(vec![a(3, 1), a(4, 1)]),
        ];
        let report = check(&h).unwrap();
        assert_eq!(
            report.counts.keys().copied().collect::<Vec<_>>(),
            vec![Anomaly::GNonadjacent],
            "{report:?}"
        );
        assert_eq!(report.findings[0].cycle.len(), 4);
        assert!(!report.valid_under(Consistency::SnapshotIsolation));
    }

    #[test]
    fn a_value_appended_twice_cannot_be_checked() {
        let h = vec![
            ok(vec![a(1, 5)]),
            with(TxnStatus::Aborted, vec![a(1, 5)]),
            ok(vec![r(1, &[5])]),
        ];
        let err = check(&h).unwrap_err();
        assert!(err.contains("unique per key"), "{err}");
    }

    #[test]
    fn non_cyclic_impossibilities_are_reported() {
        let h = vec![
            ok(vec![a(1, 1), a(1, 2)]),
            ok(vec![r(1, &[1, 2])]),
            ok(vec![r(1, &[2])]),
            ok(vec![r(2, &[7, 7])]),
            ok(vec![a(3, 1), r(3, &[])]),
        ];
        let found = anomalies(&h);
        for expected in [
            Anomaly::IncompatibleOrder,
            Anomaly::DuplicateElements,
            Anomaly::GarbageRead,
            Anomaly::Internal,
        ] {
            assert!(
                found.contains(&expected),
                "{expected} missing from {found:?}"
            );
        }
    }

    #[test]
    fn reading_an_own_append_before_making_it_is_a_future_read() {
        let h = vec![ok(vec![r(1, &[1]), a(1, 1)]), ok(vec![r(1, &[1])])];
        assert_eq!(anomalies(&h), vec![Anomaly::FutureRead]);
    }

    #[test]
    fn unknown_transactions_count_only_when_read() {
        // An unknown append that was read took effect: the read skew is still G-single.
        let h = vec![
            with(TxnStatus::Unknown, vec![a(1, 1), a(2, 1)]),
            ok(vec![r(1, &[]), r(2, &[1])]),
            with(TxnStatus::Unknown, vec![a(3, 1)]),
        ];
        assert_eq!(anomalies(&h), vec![Anomaly::GSingle]);
    }

    /// Whether `accept` holds for some order of the committed transactions together with
    /// some subset of those of unknown outcome (aborted ones never take part).
    fn any_execution(h: &[Txn], accept: &dyn Fn(&[usize]) -> bool) -> bool {
        fn permute(
            chosen: &[usize],
            order: &mut Vec<usize>,
            used: &mut [bool],
            accept: &dyn Fn(&[usize]) -> bool,
        ) -> bool {
            if order.len() == chosen.len() {
                return accept(order);
            }
            for (i, &t) in chosen.iter().enumerate() {
                if !used[i] {
                    used[i] = true;
                    order.push(t);
                    if permute(chosen, order, used, accept) {
                        return true;
                    }
                    order.pop();
                    used[i] = false;
                }
            }
            false
        }
        let unknown: Vec<usize> = (0..h.len())
            .filter(|t| h[*t].status == TxnStatus::Unknown)
            .collect();
        (0..1u32 << unknown.len()).any(|subset| {
            let chosen: Vec<usize> = (0..h.len())
                .filter(|t| match h[*t].status {
                    TxnStatus::Committed => true,
                    TxnStatus::Aborted => false,
                    TxnStatus::Unknown => {
                        let bit = unknown.iter().position(|u| u == t).unwrap_or(0);
                        subset & (1 << bit) != 0
                    }
                })
                .collect();
            permute(
                &chosen,
                &mut Vec::new(),
                &mut vec![false; chosen.len()],
                accept,
            )
        })
    }

    /// Runs `t`'s operations on `state`; whether every read returned what `state` held.
    fn run(t: &Txn, state: &mut HashMap<i64, Vec<i64>>) -> bool {
        t.mops.iter().all(|m| match m {
            Mop::Append { key, elem } => {
                state.entry(*key).or_default().push(*elem);
                true
            }
            Mop::Read { key, elems } => {
                let now = state.get(key).cloned().unwrap_or_default();
                elems.as_ref().is_none_or(|e| *e == now)
            }
        })
    }

    /// Whether some serial order of the committed transactions, and of any subset of those
    /// of unknown outcome, produces every read (aborted ones never run).
    fn brute_force_serializable(h: &[Txn]) -> bool {
        any_execution(h, &|order| {
            let mut state = HashMap::new();
            order.iter().all(|&t| run(&h[t], &mut state))
        })
    }

    /// Whether the committed transactions, and any subset of those of unknown outcome, can
    /// be given start and commit points (each start before its own commit) such that every
    /// read sees exactly the appends committed before its transaction started, then its own
    /// earlier appends, and no two transactions that append to one key overlap (first
    /// committer wins): snapshot isolation by brute force.
    fn brute_force_snapshot_isolation(h: &[Txn]) -> bool {
        let keys_appended = |t: usize| -> HashSet<i64> {
            h[t].mops
                .iter()
                .filter_map(|m| match m {
                    Mop::Append { key, .. } => Some(*key),
                    _ => None,
                })
                .collect()
        };
        // Whether `t`'s reads are what it sees on the snapshot of the first `m` commits.
        let reads_match = |commits: &[usize], t: usize, m: usize| {
            let mut state: HashMap<i64, Vec<i64>> = HashMap::new();
            for &c in &commits[..m] {
                for op in &h[c].mops {
                    if let Mop::Append { key, elem } = op {
                        state.entry(*key).or_default().push(*elem);
                    }
                }
            }
            run(&h[t], &mut state)
        };
        any_execution(h, &|commits| {
            // Each transaction's snapshot holds the first m commits, m at most its own
            // position, and at least past every earlier one appending to a key it appends
            // to.
            commits.iter().enumerate().all(|(pos, &t)| {
                let lower = commits[..pos]
                    .iter()
                    .enumerate()
                    .filter(|(_, &i)| !keys_appended(t).is_disjoint(&keys_appended(i)))
                    .map(|(p, _)| p + 1)
                    .max()
                    .unwrap_or(0);
                (lower..=pos).any(|m| reads_match(commits, t, m))
            })
        })
    }

    /// Up to four transactions over two keys, some aborted and some of unknown outcome, run
    /// in a random serial order (the aborted ones not at all, the unknown ones or not); each
    /// committed read returns what that order gives, or now and then another prefix of the
    /// key's final list (which may make the history unserializable), rarely with an aborted
    /// append after it. Reads of transactions not committed are unknown. Half the time a
    /// last transaction reads every key whole, so that every append is observed; otherwise
    /// some are not, and their order is left to inference.
    fn random_history(rng: &mut impl rand::Rng) -> (Vec<Txn>, bool) {
        let n = rng.random_range(2..=4);
        let mut next_elem = [1i64; 2];
        let mut h: Vec<Txn> = (0..n)
            .map(|_| {
                let mops = (0..rng.random_range(1..=3))
                    .map(|_| {
                        let k = rng.random_range(0..2usize);
                        if rng.random_bool(0.5) {
                            next_elem[k] += 1;
                            a(k as i64, next_elem[k] - 1)
                        } else {
                            Mop::Read {
                                key: k as i64,
                                elems: None,
                            }
                        }
                    })
                    .collect();
                let status = match rng.random_range(0..10) {
                    0 => TxnStatus::Aborted,
                    1 => TxnStatus::Unknown,
                    _ => TxnStatus::Committed,
                };
                with(status, mops)
            })
            .collect();
        let mut order: Vec<usize> = (0..n)
            .filter(|t| match h[*t].status {
                TxnStatus::Committed => true,
                TxnStatus::Aborted => false,
                TxnStatus::Unknown => rng.random_bool(0.5),
            })
            .collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut state: HashMap<i64, Vec<i64>> = HashMap::new();
        let mut reads = Vec::new();
        for &t in &order {
            for (i, m) in h[t].mops.iter().enumerate() {
                match m {
                    Mop::Append { key, elem } => state.entry(*key).or_default().push(*elem),
                    Mop::Read { key, .. } => {
                        if h[t].status == TxnStatus::Committed {
                            reads.push((t, i, *key, state.get(key).cloned().unwrap_or_default()))
                        }
                    }
                }
            }
        }
        let aborted: Vec<(i64, i64)> = h
            .iter()
            .filter(|t| t.status == TxnStatus::Aborted)
            .flat_map(|t| t.mops.iter())
            .filter_map(|m| match m {
                Mop::Append { key, elem } => Some((*key, *elem)),
                _ => None,
            })
            .collect();
        for (t, i, key, seen) in reads {
            let final_list = state.get(&key).cloned().unwrap_or_default();
            let elems = if rng.random_bool(0.7) {
                seen
            } else {
                let mut elems = final_list[..rng.random_range(0..=final_list.len())].to_vec();
                if let Some((_, e)) = aborted.iter().find(|(k, _)| *k == key) {
                    if rng.random_bool(0.2) {
                        elems.push(*e);
                    }
                }
                elems
            };
            h[t].mops[i] = Mop::Read {
                key,
                elems: Some(elems),
            };
        }
        let read_whole = rng.random_bool(0.5);
        if read_whole {
            h.push(ok((0..2)
                .map(|k| r(k, &state.get(&k).cloned().unwrap_or_default()))
                .collect()));
        }
        (h, read_whole)
    }

    #[test]
    fn verdicts_agree_with_brute_force_serializability_and_snapshot_isolation() {
        use rand::SeedableRng;
        let (mut serializable, mut not, mut aborted_reads, mut si_only) = (0, 0, 0, 0);
        for seed in 0..3_000u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let (h, read_whole) = random_history(&mut rng);
            let report = check(&h).unwrap();
            let serial = brute_force_serializable(&h);
            assert_eq!(
                report.valid_under(Consistency::Serializable),
                serial,
                "seed {seed}: history {h:#?}\nreport {report:#?}"
            );
            aborted_reads += usize::from(report.counts.contains_key(&Anomaly::G1a));
            // Under snapshot isolation, two appends to one key that no read observed must
            // still not overlap, in whichever order they came; the graph has no edge for
            // an order nobody saw, so without a last read of every key the checker may
            // miss such a violation (as Elle does), but never invents one.
            let si = brute_force_snapshot_isolation(&h);
            let legal_si = report.valid_under(Consistency::SnapshotIsolation);
            assert!(
                legal_si == si || (!read_whole && legal_si),
                "seed {seed}: snapshot isolation; history {h:#?}\nreport {report:#?}"
            );
            si_only += usize::from(si && !serial);
            if serial {
                serializable += 1;
            } else {
                not += 1;
            }
        }
        // The generator makes both kinds, so both directions were exercised, and reads of
        // aborted appends among them.
        assert!(
            serializable > 300 && not > 300 && aborted_reads > 30 && si_only > 5,
            "{serializable} serializable, {not} not, {aborted_reads} with aborted reads, \
             {si_only} legal under snapshot isolation only"
        );
    }
}
