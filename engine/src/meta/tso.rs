//! The timestamp oracle (TSO): strictly increasing hybrid timestamps handed out by the
//! meta-range leader, `physical_ms << LOGICAL_BITS | logical` (DESIGN.md, "Time").
//!
//! Invariant: every timestamp handed out is above every timestamp handed out before it,
//! across leader changes. Two things keep it:
//! - **A persisted limit.** A leader hands out only timestamps whose physical part is below
//!   the limit stored in the meta range, which it raises through Raft
//!   ([`Command::ReserveTimestamps`]) a window ahead of its clock (`--tso-reserve-window-ms`)
//!   before it gets there. A new leader's first reservation returns the limit its predecessors stored,
//!   and it starts at that limit: above everything they handed out.
//! - **Leadership confirmed after allocating.** A deposed leader that has not heard of its
//!   successor would hand out timestamps below the successor's. So a batch is allocated
//!   first and returned only once a quorum round that started after the allocation confirms
//!   this node still leads in the term its window belongs to (the term of the read log id
//!   the round returns); a new leader elected before that round would have failed it. The batch then precedes anything a later leader hands
//!   out.
//!
//! [`TsoWindow`] is the pure core (allocation, logical overflow, the limit), unit-tested
//! without a cluster; [`Tso`] is the shell that reserves through Raft and confirms
//! leadership. Clients batch their requests (`spheredb_client::Client::timestamp`), so one
//! call serves every caller waiting meanwhile.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::async_runtime::WatchReceiver;
use openraft::ReadPolicy;
pub use spheredb_client::limits::MAX_TIMESTAMPS_PER_CALL;
use spheredb_client::ClientError;
use spheredb_raft::network::Replica;
use spheredb_raft::{Command, CommandResponse};

use crate::errors::{internal, read_error, write_error};

/// Bits of a timestamp's logical part (262,144 timestamps per millisecond), and the
/// physical part (ms since the Unix epoch) of a timestamp.
pub use spheredb_storage::mvcc::{physical_ms, LOGICAL_BITS};
/// Timestamps one millisecond holds.
pub const TIMESTAMPS_PER_MS: u64 = 1 << LOGICAL_BITS;
/// Reservations one call may make before giving up (the second covers a clock behind the
/// stored limit; more means the leadership is changing under it).
pub const MAX_RESERVATIONS_PER_CALL: usize = 3;
/// How long a reservation or a leadership confirmation may take.
pub const TSO_RAFT_TIMEOUT_MS: u64 = 5_000;

/// The timestamp with physical part `physical_ms` and logical part `logical`.
pub fn compose(physical_ms: u64, logical: u64) -> u64 {
    debug_assert!(logical < TIMESTAMPS_PER_MS);
    physical_ms << LOGICAL_BITS | logical
}

/// A leader's allocation state in one term: the last timestamp handed out and the limit
/// reserved through Raft.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsoWindow {
    /// The Raft term of the leadership this window belongs to.
    pub term: u64,
    /// How far past the clock a reservation reaches; a new one is due when less than a
    /// third of it is left, so most calls find room without waiting for Raft.
    reserve_window_ms: u64,
    last_physical_ms: u64,
    /// Next free logical value at `last_physical_ms`.
    next_logical: u64,
    /// No timestamp at or above this physical part may be handed out.
    limit_ms: u64,
}

impl TsoWindow {
    /// The window of a leader of `term` whose first reservation found the stored limit
    /// `previous_ms` and raised it to `limit_ms`: it starts at `previous_ms`, above
    /// everything handed out before.
    pub fn new(term: u64, reserve_window_ms: u64, previous_ms: u64, limit_ms: u64) -> TsoWindow {
        TsoWindow {
            term,
            reserve_window_ms,
            last_physical_ms: previous_ms,
            next_logical: 0,
            limit_ms,
        }
    }

    /// Hands out `count` (1..=[`MAX_TIMESTAMPS_PER_CALL`]) consecutive timestamps at clock
    /// `now_ms` and returns the first, or `None` when the reserved limit does not reach
    /// them (reserve, then ask again). A clock behind the last timestamp does not matter:
    /// the physical part never goes back; a full millisecond moves on to the next.
    pub fn allocate(&mut self, now_ms: u64, count: u64) -> Option<u64> {
        debug_assert!((1..=MAX_TIMESTAMPS_PER_CALL).contains(&count));
        let mut physical = now_ms.max(self.last_physical_ms);
        let mut logical = if physical == self.last_physical_ms {
            self.next_logical
        } else {
            0
        };
        if logical + count > TIMESTAMPS_PER_MS {
            physical += 1;
            logical = 0;
        }
        if physical >= self.limit_ms {
            return None;
        }
        self.last_physical_ms = physical;
        self.next_logical = logical + count;
        Some(compose(physical, logical))
    }

    /// The limit to reserve up to at clock `now_ms`, when less than a third of the window
    /// is left; `None` while enough is.
    pub fn reservation_due(&self, now_ms: u64) -> Option<u64> {
        let from = now_ms.max(self.last_physical_ms);
        (from + self.reserve_window_ms / 3 >= self.limit_ms)
            .then(|| self.reservation_target(now_ms))
    }

    /// A full window past the clock, or past the last timestamp when the clock is behind it.
    pub fn reservation_target(&self, now_ms: u64) -> u64 {
        now_ms.max(self.last_physical_ms) + self.reserve_window_ms
    }

    /// Takes a reservation that raised the stored limit to `limit_ms`.
    pub fn extend(&mut self, limit_ms: u64) {
        self.limit_ms = self.limit_ms.max(limit_ms);
    }
}

/// The oracle's clock: the wall clock, ms since the Unix epoch (shifted by the failpoint
/// `tso-clock-offset-ms`, which tests use to give one node a clock far from the others').
pub fn wall_clock_ms() -> u64 {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    now_ms.saturating_add_signed(injected_clock_offset_ms())
}

fn injected_clock_offset_ms() -> i64 {
    fail::fail_point!("tso-clock-offset-ms", |arg: Option<String>| {
        let arg = arg.unwrap_or_default();
        match arg.parse() {
            Ok(ms) => ms,
            Err(_) => panic!("failpoint tso-clock-offset-ms wants return(MS), got {arg:?}"),
        }
    });
    0
}

/// The oracle on this node: its window while it leads the meta range.
#[derive(Debug)]
pub struct Tso {
    /// How far past the clock reservations reach.
    reserve_window_ms: u64,
    /// Held across a reservation: callers meanwhile wait for it rather than reserve too (one
    /// caller about every two thirds of a window waits for that Raft write).
    window: tokio::sync::Mutex<Option<TsoWindow>>,
}

impl Tso {
    /// An oracle reserving `reserve_window_ms` past its clock (at least 3).
    pub fn new(reserve_window_ms: u64) -> Tso {
        Tso {
            reserve_window_ms: reserve_window_ms.max(3),
            window: tokio::sync::Mutex::new(None),
        }
    }

    /// Hands out `count` consecutive timestamps through `meta`, this node's leading meta
    /// replica; returns the first.
    pub async fn timestamps(&self, meta: &Replica, count: u64) -> Result<u64, ClientError> {
        if !(1..=MAX_TIMESTAMPS_PER_CALL).contains(&count) {
            return Err(ClientError::InvalidArgument(format!(
                "count must be 1..={MAX_TIMESTAMPS_PER_CALL}, not {count}"
            )));
        }
        let term = self.leading_term(meta)?;
        let first = {
            let mut window = self.window.lock().await;
            if window.as_ref().is_some_and(|w| w.term != term) {
                // Leadership was lost and regained: others may have handed out timestamps
                // since; start again from the stored limit.
                *window = None;
            }
            self.allocate(meta, &mut window, term, count).await?
        };
        self.confirm_leadership(meta, term).await?;
        Ok(first)
    }

    async fn allocate(
        &self,
        meta: &Replica,
        window: &mut Option<TsoWindow>,
        term: u64,
        count: u64,
    ) -> Result<u64, ClientError> {
        for _ in 0..MAX_RESERVATIONS_PER_CALL {
            let now_ms = wall_clock_ms();
            let until_ms = match window.as_mut() {
                None => now_ms + self.reserve_window_ms,
                Some(w) => match w.reservation_due(now_ms) {
                    None => match w.allocate(now_ms, count) {
                        Some(first) => return Ok(first),
                        None => w.reservation_target(now_ms),
                    },
                    Some(until_ms) => until_ms,
                },
            };
            let (previous_ms, limit_ms) = reserve(meta, until_ms).await?;
            match window.as_mut() {
                Some(w) => w.extend(limit_ms),
                None => {
                    *window = Some(TsoWindow::new(
                        term,
                        self.reserve_window_ms,
                        previous_ms,
                        limit_ms,
                    ))
                }
            }
            if let Some(first) = window.as_mut().and_then(|w| w.allocate(now_ms, count)) {
                return Ok(first);
            }
        }
        Err(ClientError::Unavailable(format!(
            "no timestamps after {MAX_RESERVATIONS_PER_CALL} reservations; retry"
        )))
    }

    /// The term this node leads the meta range in.
    fn leading_term(&self, meta: &Replica) -> Result<u64, ClientError> {
        let metrics = meta.raft.metrics().borrow_watched().clone();
        if !metrics.state.is_leader() {
            return Err(ClientError::Unavailable(
                "this node no longer leads the meta range; retry".into(),
            ));
        }
        Ok(metrics.current_term)
    }

    /// Confirms with a quorum round, started now, that this node still leads in `term`.
    async fn confirm_leadership(&self, meta: &Replica, term: u64) -> Result<(), ClientError> {
        if skip_leadership_confirmation() {
            // Deliberately broken (failpoint `tso-skip-leadership-confirm`): a leader cut off
            // from the others keeps handing out timestamps from its window, below those of
            // the successor elected meanwhile.
            return Ok(());
        }
        let confirm = meta.raft.ensure_linearizable(ReadPolicy::ReadIndex);
        let read_log_id =
            match tokio::time::timeout(Duration::from_millis(TSO_RAFT_TIMEOUT_MS), confirm).await {
                Err(_) => {
                    return Err(ClientError::Unavailable(format!(
                    "could not confirm the meta range's leadership within {TSO_RAFT_TIMEOUT_MS} ms"
                )))
                }
                Ok(Err(e)) => return Err(read_error(e)),
                Ok(Ok(read_log_id)) => read_log_id,
            };
        // The read log id is the confirming leader's own first entry or later: its term is
        // the term this node was confirmed to lead in.
        if read_log_id.log_id().committed_leader_id().term != term {
            return Err(ClientError::Unavailable(
                "the meta range changed leaders while handing out timestamps; retry".into(),
            ));
        }
        Ok(())
    }
}

/// Whether the failpoint `tso-skip-leadership-confirm` is active (never without the
/// `failpoints` feature and a FAILPOINTS or test configuration naming it).
fn skip_leadership_confirmation() -> bool {
    fail::fail_point!("tso-skip-leadership-confirm", |_| true);
    false
}

/// Raises the stored limit to `until_ms`; returns it before and after.
async fn reserve(meta: &Replica, until_ms: u64) -> Result<(u64, u64), ClientError> {
    let write = meta
        .raft
        .client_write(Command::ReserveTimestamps { until_ms });
    match tokio::time::timeout(Duration::from_millis(TSO_RAFT_TIMEOUT_MS), write).await {
        Err(_) => Err(ClientError::Unavailable(format!(
            "timestamp reservation not committed within {TSO_RAFT_TIMEOUT_MS} ms"
        ))),
        Ok(Err(e)) => Err(write_error(e)),
        Ok(Ok(resp)) => match resp.data {
            CommandResponse::TimestampsReserved {
                previous_ms,
                limit_ms,
            } => Ok((previous_ms, limit_ms)),
            other => Err(internal(format!(
                "unexpected answer to a timestamp reservation: {other:?}"
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const W: u64 = crate::config::DEFAULT_TSO_RESERVE_WINDOW_MS;

    #[test]
    fn a_new_leader_starts_above_the_limit_its_predecessors_stored() {
        let mut old = TsoWindow::new(1, W, 0, 10_000);
        let last_old = old.allocate(9_999, 5).unwrap();
        // The new leader's clock is behind; it still starts at the stored limit.
        let mut new = TsoWindow::new(2, W, 10_000, 13_000);
        let first_new = new.allocate(5_000, 1).unwrap();
        assert!(first_new > last_old + 4);
        assert_eq!(physical_ms(first_new), 10_000);
    }

    #[test]
    fn a_full_millisecond_moves_on_to_the_next() {
        let mut w = TsoWindow::new(1, W, 100, 200);
        let a = w.allocate(100, MAX_TIMESTAMPS_PER_CALL).unwrap();
        assert_eq!(a, compose(100, 0));
        for _ in 1..TIMESTAMPS_PER_MS / MAX_TIMESTAMPS_PER_CALL {
            w.allocate(100, MAX_TIMESTAMPS_PER_CALL).unwrap();
        }
        // Millisecond 100 is used up; the clock has not moved.
        assert_eq!(w.allocate(100, 1), Some(compose(101, 0)));
    }

    #[test]
    fn nothing_is_handed_out_at_or_past_the_limit() {
        let mut w = TsoWindow::new(1, W, 0, 1_000);
        assert_eq!(w.allocate(1_000, 1), None);
        assert_eq!(w.reservation_due(500), Some(500 + W));
        assert_eq!(w.reservation_due(0), Some(W));
        w.extend(5_000);
        assert_eq!(w.reservation_due(500), None);
        assert!(w.allocate(1_000, 1).is_some());
        // A limit is never lowered.
        w.extend(10);
        assert!(w.allocate(1_500, 1).is_some());
    }

    proptest! {
        #[test]
        fn timestamps_strictly_increase_whatever_the_clock_does(
            steps in proptest::collection::vec((0u64..5_000, 1u64..=MAX_TIMESTAMPS_PER_CALL), 1..200)
        ) {
            let mut w = TsoWindow::new(1, W, 1_000, 1_000);
            let mut last: Option<u64> = None;
            for (clock_ms, count) in steps {
                let first = match w.allocate(clock_ms, count) {
                    Some(first) => first,
                    None => {
                        let until = w.reservation_due(clock_ms).unwrap_or(w.reservation_target(clock_ms));
                        w.extend(until);
                        w.allocate(clock_ms, count).expect("a fresh reservation leaves room")
                    }
                };
                if let Some(l) = last {
                    prop_assert!(first > l, "{first} after {l}");
                }
                prop_assert!(physical_ms(first + count - 1) == physical_ms(first));
                last = Some(first + count - 1);
            }
        }
    }
}
