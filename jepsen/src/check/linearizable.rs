//! The linearizability search for one partition of a history: Wing and
//! Gong's backtracking over the operations that could take effect next,
//! with Lowe's memoisation of the configurations (linearized operations,
//! model state) already explored.
//!
//! Definite operations become a call entry and a return entry, kept in one
//! list in time order. Walking the list from the front, every call entry
//! before the first return entry is an operation that may be linearized
//! next; that first return entry is the horizon: its operation had to be
//! linearized by then. Indeterminate operations (return time +infinity) sit
//! in a second list and are candidates when invoked before the horizon;
//! they are tried after the definite candidates. The search succeeds as soon
//! as every definite operation is linearized: the indeterminate ones left
//! can always be placed after everything else, or never take effect.
//!
//! The memo keys configurations by (definite operations linearized, model
//! state) and keeps, per key, the sets of indeterminate operations
//! linearized. A configuration is skipped when one with the same key and a
//! subset of its indeterminate operations was already explored: that one can
//! make every move this one can, since indeterminate operations never have
//! to be placed. Without this, every timed-out operation would double the
//! configurations to explore for the rest of the history.

use std::collections::hash_map::{Entry, HashMap};
use std::hash::Hash;
use std::time::Instant;

use super::UnknownReason;
use crate::model::Model;

/// How many search steps run between two looks at the clock; reading it on
/// every step would dominate the cost of cheap steps.
const DEADLINE_CHECK_INTERVAL_STEPS: u64 = 1024;

/// Per-key cost of the memo beyond the key and value themselves: hash-table
/// control bytes, load-factor slack and allocator headers.
const MEMO_SLOT_OVERHEAD_BYTES: usize = 48;

/// Marks the end of a list.
const NIL: usize = usize::MAX;

/// Node 0 of each list is a sentinel in front of every entry.
const HEAD: usize = 0;

/// One operation of the partition being searched.
#[derive(Debug)]
pub(crate) struct SearchOp<'a, O> {
    /// Time of the invocation.
    pub call: usize,
    /// Time of the completion; `None` is +infinity.
    pub ret: Option<usize>,
    pub op: &'a O,
}

/// When to give up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub deadline: Instant,
    pub time_limit_ms: u64,
    pub max_memo_bytes: usize,
}

#[derive(Debug)]
pub(crate) enum SearchResult<S> {
    Linearizable,
    Illegal(Witness<S>),
    Unknown(UnknownReason),
}

/// The longest partial linearization found before the search ran out of
/// options, for explaining an illegal history.
#[derive(Debug)]
pub(crate) struct Witness<S> {
    /// Indices of the linearized operations, in linearization order.
    pub prefix: Vec<usize>,
    /// Model state after `prefix`.
    pub state: S,
}

/// An operation that could have been linearized after the witness prefix.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub index: usize,
    /// Whether the model refuses it in the witness state (otherwise it fits
    /// but leads to a dead end).
    pub rejected: bool,
}

/// Fixed-size bitset of operations.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct OpSet(Box<[u64]>);

impl OpSet {
    fn new(len: usize) -> Self {
        Self(vec![0; len.div_ceil(64)].into_boxed_slice())
    }

    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn remove(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }

    fn contains(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    fn is_subset_of(&self, other: &Self) -> bool {
        self.0.iter().zip(other.0.iter()).all(|(a, b)| a & !b == 0)
    }

    fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.0)
    }
}

/// Doubly linked list over nodes `0..n` (node 0 the head sentinel) that
/// supports removal and re-insertion in LIFO order (dancing links).
struct Links {
    next: Vec<usize>,
    prev: Vec<usize>,
}

impl Links {
    fn chain(order: impl IntoIterator<Item = usize>, nodes: usize) -> Self {
        let mut next = vec![NIL; nodes];
        let mut prev = vec![NIL; nodes];
        let mut last = HEAD;
        for node in order {
            next[last] = node;
            prev[node] = last;
            last = node;
        }
        Self { next, prev }
    }

    fn unlink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    fn relink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = node;
        if n != NIL {
            self.prev[n] = node;
        }
    }
}

/// In the definite list, definite operation `d` owns node `1 + 2d` (call)
/// and `2 + 2d` (return); in the indeterminate list, operation `j` owns
/// node `1 + j`.
fn call_node(d: usize) -> usize {
    1 + 2 * d
}

fn return_node(d: usize) -> usize {
    2 + 2 * d
}

fn is_call(node: usize) -> bool {
    node % 2 == 1
}

fn definite_of(node: usize) -> usize {
    (node - 1) / 2
}

fn info_node(j: usize) -> usize {
    1 + j
}

/// An operation chosen to be linearized next, by its dense index among the
/// definite or the indeterminate operations.
#[derive(Debug, Clone, Copy)]
enum Choice {
    Definite(usize),
    Indeterminate(usize),
}

/// Where the walk over candidates stands: a node of one of the two lists.
#[derive(Debug, Clone, Copy)]
enum Cursor {
    Definite(usize),
    Indeterminate(usize),
}

struct Frame<S> {
    choice: Choice,
    state_before: S,
    /// Horizon of the configuration the choice was made in.
    horizon: usize,
}

/// Explored configurations: per (definite set, state), the minimal sets of
/// indeterminate operations seen with it.
struct Memo<S> {
    seen: HashMap<(OpSet, S), Vec<OpSet>>,
    bytes: usize,
}

impl<S: Clone + Eq + Hash> Memo<S> {
    /// Records a configuration; false if it is subsumed by one already seen.
    fn insert(
        &mut self,
        definite: &OpSet,
        info: &OpSet,
        state: &S,
        state_heap_bytes: usize,
    ) -> bool {
        let info_bytes = std::mem::size_of::<OpSet>() + info.heap_bytes();
        match self.seen.entry((definite.clone(), state.clone())) {
            Entry::Occupied(mut entry) => {
                let sets = entry.get_mut();
                if sets.iter().any(|seen| seen.is_subset_of(info)) {
                    return false;
                }
                // Sets the new one subsumes can no longer prune anything.
                sets.retain(|seen| !info.is_subset_of(seen));
                sets.push(info.clone());
                self.bytes += info_bytes;
            }
            Entry::Vacant(entry) => {
                entry.insert(vec![info.clone()]);
                self.bytes += std::mem::size_of::<((OpSet, S), Vec<OpSet>)>()
                    + MEMO_SLOT_OVERHEAD_BYTES
                    + definite.heap_bytes()
                    + state_heap_bytes
                    + info_bytes;
            }
        }
        true
    }
}

/// Searches for a linearization of `ops` under `model`.
pub(crate) fn search<M: Model>(
    model: &M,
    ops: &[SearchOp<'_, M::Op>],
    limits: &Limits,
) -> SearchResult<M::State> {
    let definite: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].ret.is_some()).collect();
    let mut indeterminate: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].ret.is_none()).collect();
    indeterminate.sort_by_key(|&i| ops[i].call);

    // Indeterminate operations equal as model ops are interchangeable once
    // both are invoked, so only the earliest unlinearized one is tried.
    let mut latest_twin: HashMap<&M::Op, usize> = HashMap::new();
    let twin_before: Vec<Option<usize>> = indeterminate
        .iter()
        .enumerate()
        .map(|(j, &i)| latest_twin.insert(ops[i].op, j))
        .collect();

    let mut timed: Vec<(usize, usize)> = Vec::with_capacity(2 * definite.len());
    for (d, &i) in definite.iter().enumerate() {
        timed.push((ops[i].call, call_node(d)));
        timed.push((ops[i].ret.unwrap_or(usize::MAX), return_node(d)));
    }
    // Positions in a history are distinct; the node only breaks ties for
    // hand-built inputs, putting calls before returns.
    timed.sort_unstable();
    let mut definite_list =
        Links::chain(timed.iter().map(|&(_, node)| node), 1 + 2 * definite.len());
    let mut info_list = Links::chain(
        (0..indeterminate.len()).map(info_node),
        1 + indeterminate.len(),
    );

    let mut state = model.init();
    let mut done_definite = OpSet::new(definite.len());
    let mut done_info = OpSet::new(indeterminate.len());
    let mut stack: Vec<Frame<M::State>> = Vec::with_capacity(ops.len());
    let mut memo = Memo {
        seen: HashMap::new(),
        bytes: 0,
    };
    let root_heap_bytes = model.state_heap_bytes(&state);
    memo.insert(&done_definite, &done_info, &state, root_heap_bytes);
    let mut best = Witness {
        prefix: Vec::new(),
        state: state.clone(),
    };
    let global = |choice: Choice| match choice {
        Choice::Definite(d) => definite[d],
        Choice::Indeterminate(j) => indeterminate[j],
    };
    let mut definite_left = definite.len();
    let mut horizon = usize::MAX;
    let mut cursor = Cursor::Definite(definite_list.next[HEAD]);
    let mut steps: u64 = 0;
    loop {
        if definite_left == 0 {
            return SearchResult::Linearizable;
        }
        if steps % DEADLINE_CHECK_INTERVAL_STEPS == 0 && Instant::now() >= limits.deadline {
            return SearchResult::Unknown(UnknownReason::TimeLimit {
                time_limit_ms: limits.time_limit_ms,
            });
        }
        steps += 1;

        let choice = match cursor {
            Cursor::Definite(node) if node != NIL && is_call(node) => {
                Choice::Definite(definite_of(node))
            }
            Cursor::Definite(node) => {
                // Definite candidates exhausted: indeterminate operations
                // invoked before the first pending completion come next.
                horizon = match node {
                    NIL => usize::MAX,
                    _ => ops[definite[definite_of(node)]].ret.unwrap_or(usize::MAX),
                };
                cursor = Cursor::Indeterminate(info_list.next[HEAD]);
                continue;
            }
            Cursor::Indeterminate(node)
                if node != NIL && ops[indeterminate[node - 1]].call < horizon =>
            {
                let j = node - 1;
                if twin_before[j].is_some_and(|twin| !done_info.contains(twin)) {
                    cursor = Cursor::Indeterminate(info_list.next[node]);
                    continue;
                }
                Choice::Indeterminate(j)
            }
            Cursor::Indeterminate(_) => {
                // No candidate left here: undo the most recent choice.
                let Some(frame) = stack.pop() else {
                    return SearchResult::Illegal(best);
                };
                state = frame.state_before;
                horizon = frame.horizon;
                cursor = match frame.choice {
                    Choice::Definite(d) => {
                        definite_list.relink(return_node(d));
                        definite_list.relink(call_node(d));
                        done_definite.remove(d);
                        definite_left += 1;
                        Cursor::Definite(definite_list.next[call_node(d)])
                    }
                    Choice::Indeterminate(j) => {
                        info_list.relink(info_node(j));
                        done_info.remove(j);
                        Cursor::Indeterminate(info_list.next[info_node(j)])
                    }
                };
                continue;
            }
        };

        if let Some(next_state) = model.step(&state, ops[global(choice)].op) {
            if matches!(choice, Choice::Indeterminate(_)) && next_state == state {
                // Subsumed by the current configuration, which is in the
                // memo: no need to look it up.
                cursor = next_cursor(choice, &definite_list, &info_list);
                continue;
            }
            match choice {
                Choice::Definite(d) => done_definite.insert(d),
                Choice::Indeterminate(j) => done_info.insert(j),
            }
            if memo.bytes >= limits.max_memo_bytes {
                return SearchResult::Unknown(UnknownReason::MemoLimit {
                    max_memo_bytes: limits.max_memo_bytes,
                });
            }
            let heap_bytes = model.state_heap_bytes(&next_state);
            if memo.insert(&done_definite, &done_info, &next_state, heap_bytes) {
                let state_before = std::mem::replace(&mut state, next_state);
                stack.push(Frame {
                    choice,
                    state_before,
                    horizon,
                });
                match choice {
                    Choice::Definite(d) => {
                        definite_list.unlink(call_node(d));
                        definite_list.unlink(return_node(d));
                        definite_left -= 1;
                    }
                    Choice::Indeterminate(j) => info_list.unlink(info_node(j)),
                }
                if stack.len() > best.prefix.len() {
                    best.prefix = stack.iter().map(|f| global(f.choice)).collect();
                    best.state = state.clone();
                }
                cursor = Cursor::Definite(definite_list.next[HEAD]);
                continue;
            }
            match choice {
                Choice::Definite(d) => done_definite.remove(d),
                Choice::Indeterminate(j) => done_info.remove(j),
            }
        }
        cursor = next_cursor(choice, &definite_list, &info_list);
    }
}

/// The candidate after `choice` in its list, `choice` not being linearized.
fn next_cursor(choice: Choice, definite_list: &Links, info_list: &Links) -> Cursor {
    match choice {
        Choice::Definite(d) => Cursor::Definite(definite_list.next[call_node(d)]),
        Choice::Indeterminate(j) => Cursor::Indeterminate(info_list.next[info_node(j)]),
    }
}

/// The operations that could come right after `witness.prefix`: those not
/// yet linearized that were invoked before the earliest completion among
/// the definite operations left. Also returns that earliest-completing
/// operation, which one of the candidates had to precede.
pub(crate) fn candidates_after<M: Model>(
    model: &M,
    ops: &[SearchOp<'_, M::Op>],
    witness: &Witness<M::State>,
) -> (Vec<Candidate>, Option<usize>) {
    let mut done = OpSet::new(ops.len());
    for &i in &witness.prefix {
        done.insert(i);
    }
    let first_to_return = (0..ops.len())
        .filter(|&i| !done.contains(i))
        .filter_map(|i| ops[i].ret.map(|ret| (ret, i)))
        .min()
        .map(|(_, i)| i);
    let horizon = first_to_return
        .and_then(|i| ops[i].ret)
        .unwrap_or(usize::MAX);
    let candidates = (0..ops.len())
        .filter(|&i| !done.contains(i) && ops[i].call < horizon)
        .map(|index| Candidate {
            index,
            rejected: model.step(&witness.state, ops[index].op).is_none(),
        })
        .collect();
    (candidates, first_to_return)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::history::Value;
    use crate::model::register::RegisterOp;
    use crate::model::CasRegister;

    fn limits(time_limit_ms: u64, max_memo_bytes: usize) -> Limits {
        Limits {
            deadline: Instant::now() + Duration::from_millis(time_limit_ms),
            time_limit_ms,
            max_memo_bytes,
        }
    }

    /// `writers` concurrent writes of distinct values, all completed, then a
    /// read of a value nobody wrote: illegal, but proving it means trying
    /// every order of the writes.
    fn impossible_read(writers: usize) -> Vec<(usize, Option<usize>, RegisterOp)> {
        let mut ops = Vec::new();
        for w in 0..writers {
            ops.push((
                w,
                Some(writers + w),
                RegisterOp::Write(Value::Int(w as i64)),
            ));
        }
        ops.push((
            2 * writers,
            Some(2 * writers + 1),
            RegisterOp::Read(Some(Value::Int(-1))),
        ));
        ops
    }

    fn run(ops: &[(usize, Option<usize>, RegisterOp)], limits: &Limits) -> SearchResult<Value> {
        let search_ops: Vec<SearchOp<'_, RegisterOp>> = ops
            .iter()
            .map(|(call, ret, op)| SearchOp {
                call: *call,
                ret: *ret,
                op,
            })
            .collect();
        search(&CasRegister, &search_ops, limits)
    }

    #[test]
    fn small_impossible_history_is_illegal() {
        let ops = impossible_read(4);
        let SearchResult::Illegal(witness) = run(&ops, &limits(60_000, 1_000_000)) else {
            panic!("expected illegal");
        };
        assert_eq!(witness.prefix.len(), 4);
    }

    #[test]
    fn time_limit_yields_unknown() {
        let ops = impossible_read(22);
        let started = Instant::now();
        let result = run(&ops, &limits(50, usize::MAX));
        assert!(
            matches!(
                result,
                SearchResult::Unknown(UnknownReason::TimeLimit { time_limit_ms: 50 })
            ),
            "{result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn memo_limit_yields_unknown() {
        let ops = impossible_read(22);
        let result = run(&ops, &limits(60_000, 100_000));
        assert!(
            matches!(
                result,
                SearchResult::Unknown(UnknownReason::MemoLimit {
                    max_memo_bytes: 100_000
                })
            ),
            "{result:?}"
        );
    }

    #[test]
    fn indeterminate_ops_need_not_be_placed() {
        // A write that never completed and a read that did not see it.
        let ops = [
            (0, None, RegisterOp::Write(Value::Int(1))),
            (1, Some(2), RegisterOp::Read(Some(Value::Nil))),
        ];
        assert!(matches!(
            run(&ops, &limits(60_000, 1000)),
            SearchResult::Linearizable
        ));
    }

    /// Small deterministic generator, so failures reproduce.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }

    /// Random register history: a few processes, each invoking then
    /// completing operations. Results mostly come from a register updated at
    /// completion time, with random wrong answers mixed in, so histories are
    /// often legal and often barely illegal.
    fn random_history(rng: &mut Lcg, max_ops: usize) -> Vec<crate::history::Event> {
        use crate::history::{Event, EventType, Function};
        let processes = 4;
        let mut pending: Vec<Option<(Function, Value)>> = vec![None; processes];
        let mut crashed = vec![false; processes];
        let mut register = Value::Nil;
        let mut events = Vec::new();
        let mut invoked = 0;
        let value = |rng: &mut Lcg| Value::Int(rng.below(3) as i64);
        while invoked < max_ops || pending.iter().any(Option::is_some) {
            let p = rng.below(processes as u64) as usize;
            if crashed[p] {
                if crashed.iter().all(|c| *c) {
                    break;
                }
                continue;
            }
            let (kind, f, v) = match pending[p].take() {
                None if invoked < max_ops => {
                    invoked += 1;
                    let (f, v) = match rng.below(3) {
                        0 => (Function::Read, Value::Nil),
                        1 => (Function::Write, value(rng)),
                        _ => (Function::Cas, Value::List(vec![value(rng), value(rng)])),
                    };
                    pending[p] = Some((f, v.clone()));
                    (EventType::Invoke, f, v)
                }
                None => continue,
                Some((f, v)) => {
                    let takes_effect = match rng.below(8) {
                        0 => {
                            crashed[p] = true;
                            rng.below(2) == 0
                        }
                        _ => true,
                    };
                    let wrong = rng.below(8) == 0;
                    let outcome = match (&f, &v) {
                        (Function::Read, _) if wrong => (EventType::Ok, value(rng)),
                        (Function::Read, _) => (EventType::Ok, register.clone()),
                        (Function::Write, _) => {
                            if takes_effect {
                                register = v.clone();
                            }
                            (EventType::Ok, v.clone())
                        }
                        (_, Value::List(pair)) => {
                            let applies = pair[0] == register;
                            if applies && takes_effect {
                                register = pair[1].clone();
                            }
                            match applies != wrong {
                                true => (EventType::Ok, v.clone()),
                                false => (EventType::Fail, v.clone()),
                            }
                        }
                        _ => (EventType::Fail, v.clone()),
                    };
                    match crashed[p] {
                        true => (EventType::Info, f, v),
                        false => (outcome.0, f, outcome.1),
                    }
                }
            };
            events.push(Event {
                process: p as i64,
                kind,
                f,
                key: None,
                value: v,
                time_ns: None,
                line: events.len() + 1,
            });
        }
        events
    }

    /// Tries every subset of the indeterminate operations in every order
    /// that respects real time.
    fn brute_force(ops: &[crate::history::Operation], prepared: &[RegisterOp]) -> bool {
        fn extend(
            ops: &[crate::history::Operation],
            prepared: &[RegisterOp],
            used: &mut Vec<bool>,
            state: &Value,
        ) -> bool {
            let definite_left = (0..ops.len()).any(|i| !used[i] && ops[i].ret.is_some());
            if !definite_left {
                return true;
            }
            for i in 0..ops.len() {
                if used[i] {
                    continue;
                }
                // Anything that returned before `i` was called must come first.
                let blocked = (0..ops.len())
                    .any(|j| !used[j] && j != i && ops[j].ret.is_some_and(|r| r < ops[i].call));
                if blocked {
                    continue;
                }
                if let Some(next) = CasRegister.step(state, &prepared[i]) {
                    used[i] = true;
                    let found = extend(ops, prepared, used, &next);
                    used[i] = false;
                    if found {
                        return true;
                    }
                }
            }
            false
        }
        extend(ops, prepared, &mut vec![false; ops.len()], &Value::Nil)
    }

    #[test]
    fn agrees_with_brute_force_on_random_histories() {
        const HISTORIES: usize = 3000;
        const MAX_OPS: usize = 8;
        let mut rng = Lcg(42);
        let (mut legal, mut illegal) = (0, 0);
        for _ in 0..HISTORIES {
            let events = random_history(&mut rng, MAX_OPS);
            let ops = crate::history::pair_operations(&events).expect("well-formed");
            let prepared: Vec<RegisterOp> = ops
                .iter()
                .map(|op| CasRegister.prepare(op).expect("register op"))
                .collect();
            let search_ops: Vec<SearchOp<'_, RegisterOp>> = ops
                .iter()
                .zip(&prepared)
                .map(|(o, op)| SearchOp {
                    call: o.call,
                    ret: o.ret,
                    op,
                })
                .collect();
            let expected = brute_force(&ops, &prepared);
            let got = match search(&CasRegister, &search_ops, &limits(60_000, 1_000_000)) {
                SearchResult::Linearizable => true,
                SearchResult::Illegal(_) => false,
                SearchResult::Unknown(reason) => panic!("{reason}"),
            };
            assert_eq!(got, expected, "disagreement on {events:#?}");
            if expected {
                legal += 1;
            } else {
                illegal += 1;
            }
        }
        // The generator must exercise both answers to mean anything.
        assert!(
            legal > 200 && illegal > 200,
            "{legal} legal, {illegal} illegal"
        );
    }

    #[test]
    fn candidates_name_the_blocked_read() {
        let ops = [
            (0, Some(1), RegisterOp::Write(Value::Int(1))),
            (2, Some(5), RegisterOp::Write(Value::Int(2))),
            (3, Some(4), RegisterOp::Read(Some(Value::Int(3)))),
        ];
        let search_ops: Vec<SearchOp<'_, RegisterOp>> = ops
            .iter()
            .map(|(call, ret, op)| SearchOp {
                call: *call,
                ret: *ret,
                op,
            })
            .collect();
        let SearchResult::Illegal(witness) =
            search(&CasRegister, &search_ops, &limits(60_000, 1000))
        else {
            panic!("expected illegal");
        };
        let (candidates, first) = candidates_after(&CasRegister, &search_ops, &witness);
        assert_eq!(first, Some(2));
        assert!(candidates.contains(&Candidate {
            index: 2,
            rejected: true
        }));
    }
}
