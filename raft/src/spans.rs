//! The node's span registry: the one owner of "which local replica owns which keys".
//!
//! Every range on a node shares one data column family, so a replica owns keys only through
//! its span. **Invariant: no two ranges' claims on this node overlap** — a claim being a
//! range's owned span (its applied span, once it has one) or a placeholder for a snapshot
//! install in flight. The registry checks and changes claims under one lock, so the check
//! and the change are atomic; nothing else on the node decides ownership:
//!
//! - a replica opened from disk claims its applied span ([`SpanRegistry::open`]);
//! - a snapshot install first reserves its span ([`SpanRegistry::reserve`]; CockroachDB's
//!   placeholders), refused while any other range claims a key of it, and owns it once the
//!   install is written ([`SpanRegistry::commit_install`]);
//! - a split shrinks the parent and hands the right half to the child in one step, a merge
//!   hands the right range's span to the left one ([`SpanRegistry::after_apply`]);
//! - a destroyed replica's claim goes only after its keys are deleted
//!   ([`SpanRegistry::release`]).
//!
//! A replica frozen for a merge whose claim meets another range's claim is the right-hand
//! side of a merge already applied here (its left range, or a range that left range split
//! into since, covers its keys; a frozen range applies nothing, so its span is final): the
//! frozen replica's claim yields, whichever of the two opens first.
//!
//! Owns: claims. Must not: touch the database or Raft; callers do that around these calls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::types::{RangeId, RangeSpan};

/// A half-open key span `[start, end)`; an empty `end` is unbounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpan {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
}

impl KeySpan {
    fn of(span: &RangeSpan) -> KeySpan {
        KeySpan {
            start: span.start_key.clone(),
            end: span.end_key.clone(),
        }
    }

    fn overlaps(&self, other: &KeySpan) -> bool {
        spheredb_storage::keys::spans_overlap(&self.start, &self.end, &other.start, &other.end)
    }
}

/// A claim refused because another range on this node claims part of the span.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("range {range_id} cannot claim {span:?} on this node: range {other} claims part of it")]
pub struct SpanConflict {
    pub range_id: RangeId,
    pub span: KeySpan,
    /// The range whose claim is in the way.
    pub other: RangeId,
}

/// How a split or merge just applied moves keys between ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpanChange {
    /// The applying range split off `child`, whose replica on this node owns `span` now.
    SplitChild { child: RangeId, span: RangeSpan },
    /// The applying range took over `right`'s keys.
    MergedAway { right: RangeId },
}

#[derive(Debug, Default)]
struct Claim {
    owned: Option<KeySpan>,
    /// A snapshot install in flight, with the token of its reservation.
    placeholder: Option<(u64, KeySpan)>,
    /// The range this one is frozen into for a merge, if any.
    frozen_into: Option<RangeId>,
    /// A merge into another range is being applied: no install may reserve this span.
    sealed: bool,
}

impl Claim {
    fn spans(&self) -> impl Iterator<Item = &KeySpan> {
        self.owned
            .iter()
            .chain(self.placeholder.as_ref().map(|(_, s)| s))
    }
}

#[derive(Debug, Default)]
struct Claims {
    by_range: HashMap<RangeId, Claim>,
}

impl Claims {
    /// The first range other than `range_id` whose claim overlaps `span`.
    fn conflict(&self, range_id: RangeId, span: &KeySpan) -> Option<RangeId> {
        self.by_range.iter().find_map(|(id, claim)| {
            (*id != range_id && claim.spans().any(|s| s.overlaps(span))).then_some(*id)
        })
    }

    /// Asserts the invariant (debug builds): no two ranges' claims overlap. Sorts the spans
    /// by start and sweeps, so it stays cheap with thousands of ranges.
    fn check(&self) {
        if !cfg!(debug_assertions) {
            return;
        }
        let mut all: Vec<(&KeySpan, RangeId)> = self
            .by_range
            .iter()
            .flat_map(|(id, claim)| claim.spans().map(move |s| (s, *id)))
            .collect();
        all.sort_by(|a, b| a.0.start.cmp(&b.0.start));
        // The span reaching furthest so far, and whose it is.
        let mut furthest: Option<(&KeySpan, RangeId)> = None;
        for (span, id) in all {
            if let Some((reach, owner)) = furthest {
                assert!(
                    owner == id || !reach.overlaps(span),
                    "span registry: ranges {owner} and {id} both claim keys of {span:?}"
                );
                let further =
                    !reach.end.is_empty() && (span.end.is_empty() || span.end > reach.end);
                if !further {
                    continue;
                }
            }
            furthest = Some((span, id));
        }
    }
}

/// The node's span registry (see the module comment).
#[derive(Debug, Default)]
pub struct SpanRegistry {
    claims: Mutex<Claims>,
    next_token: AtomicU64,
}

/// A snapshot install's hold on its span; dropping it before the install commits gives the
/// span back.
#[derive(Debug)]
pub struct Reservation {
    registry: Arc<SpanRegistry>,
    range_id: RangeId,
    token: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut claims = self.registry.lock();
        if let Some(claim) = claims.by_range.get_mut(&self.range_id) {
            if claim
                .placeholder
                .as_ref()
                .is_some_and(|(t, _)| *t == self.token)
            {
                claim.placeholder = None;
            }
            if claim.owned.is_none() && claim.placeholder.is_none() {
                claims.by_range.remove(&self.range_id);
            }
        }
    }
}

impl SpanRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Claims> {
        self.claims.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a replica opened from disk with its applied `span` (none: an empty replica,
    /// which claims nothing until a snapshot). A frozen replica whose span meets another
    /// claim was merged already and claims nothing (the answer is then `false`); the claim
    /// of a frozen range yields to this one. Any other overlap is refused.
    pub fn open(
        &self,
        range_id: RangeId,
        span: Option<&RangeSpan>,
        frozen_into: Option<RangeId>,
    ) -> Result<bool, SpanConflict> {
        let Some(span) = span else {
            return Ok(true);
        };
        let key_span = KeySpan::of(span);
        let mut claims = self.lock();
        while let Some(other) = claims.conflict(range_id, &key_span) {
            let other_frozen = claims
                .by_range
                .get(&other)
                .is_some_and(|c| c.frozen_into.is_some());
            if frozen_into.is_some() {
                // Merged already: this replica's keys belong to `other` now.
                return Ok(false);
            }
            if other_frozen {
                claims.by_range.remove(&other);
                continue;
            }
            return Err(SpanConflict {
                range_id,
                span: key_span,
                other,
            });
        }
        let claim = claims.by_range.entry(range_id).or_default();
        claim.owned = Some(key_span);
        claim.frozen_into = frozen_into;
        claims.check();
        Ok(true)
    }

    /// True while a snapshot install of `range_id` holds a placeholder here.
    pub fn installing(&self, range_id: RangeId) -> bool {
        self.lock()
            .by_range
            .get(&range_id)
            .is_some_and(|c| c.placeholder.is_some())
    }

    /// Drops the placeholder of a failed install of `range_id` (one that was not made
    /// through a reservation, whose drop would clear it).
    pub fn abort_install(&self, range_id: RangeId) {
        let mut claims = self.lock();
        if let Some(claim) = claims.by_range.get_mut(&range_id) {
            claim.placeholder = None;
            if claim.owned.is_none() && !claim.sealed {
                claims.by_range.remove(&range_id);
            }
        }
    }

    /// Called by a range about to apply the merge of `right`: true when `right` has no
    /// snapshot install in flight here, and from then on none may start (an install would
    /// replace keys the merged range owns). False while one is in flight: the merge waits.
    pub fn seal_for_merge(&self, right: RangeId) -> bool {
        let mut claims = self.lock();
        // A replica not opened yet (the node is starting) is sealed too, by an empty claim:
        // it opens into the seal.
        let claim = claims.by_range.entry(right).or_default();
        if claim.placeholder.is_some() {
            return false;
        }
        claim.sealed = true;
        true
    }

    /// Reserves `span` for a snapshot install of `range_id`: refused while another range
    /// claims part of it, or while another install of `range_id` is in flight. The range's
    /// own current span does not count (an install replaces it).
    pub fn reserve(
        self: &Arc<Self>,
        range_id: RangeId,
        span: &RangeSpan,
    ) -> Result<Reservation, SpanConflict> {
        let key_span = KeySpan::of(span);
        let mut claims = self.lock();
        let in_flight = claims
            .by_range
            .get(&range_id)
            .is_some_and(|c| c.placeholder.is_some());
        if in_flight {
            return Err(SpanConflict {
                range_id,
                span: key_span,
                other: range_id,
            });
        }
        let token = self.place(&mut claims, range_id, key_span)?;
        Ok(Reservation {
            registry: self.clone(),
            range_id,
            token,
        })
    }

    /// Called by an install right before it writes `span`'s keys: the range must hold a
    /// reservation of exactly `span`, or the span must be free (then it is reserved now, for
    /// installs that do not come through the transport).
    pub fn begin_install(&self, range_id: RangeId, span: &RangeSpan) -> Result<(), SpanConflict> {
        let key_span = KeySpan::of(span);
        let mut claims = self.lock();
        let reserved = claims
            .by_range
            .get(&range_id)
            .and_then(|c| c.placeholder.as_ref())
            .is_some_and(|(_, s)| *s == key_span);
        if reserved {
            return Ok(());
        }
        self.place(&mut claims, range_id, key_span).map(|_| ())
    }

    /// Puts a placeholder for `range_id` over `key_span` unless another range claims part of
    /// it; returns the placeholder's token.
    fn place(
        &self,
        claims: &mut Claims,
        range_id: RangeId,
        key_span: KeySpan,
    ) -> Result<u64, SpanConflict> {
        let sealed = claims.by_range.get(&range_id).is_some_and(|c| c.sealed);
        if sealed {
            // Being merged into its left neighbour: its keys are about to change owner.
            return Err(SpanConflict {
                range_id,
                span: key_span,
                other: range_id,
            });
        }
        if let Some(other) = claims.conflict(range_id, &key_span) {
            return Err(SpanConflict {
                range_id,
                span: key_span,
                other,
            });
        }
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        claims.by_range.entry(range_id).or_default().placeholder = Some((token, key_span));
        claims.check();
        Ok(token)
    }

    /// Called once an install of `span` is written: the range owns `span` (and nothing else).
    pub fn commit_install(
        &self,
        range_id: RangeId,
        span: Option<&RangeSpan>,
        frozen_into: Option<RangeId>,
    ) {
        let mut claims = self.lock();
        match span {
            Some(span) => {
                let claim = claims.by_range.entry(range_id).or_default();
                claim.owned = Some(KeySpan::of(span));
                claim.placeholder = None;
                claim.frozen_into = frozen_into;
            }
            None => {
                claims.by_range.remove(&range_id);
            }
        }
        claims.check();
    }

    /// Called by a range's apply right after it wrote a batch: the range now owns its applied
    /// `span`, and `changes` (splits, merges) move keys to or from other ranges, all in one
    /// step. A range without a claim (merged away, or destroyed) gains none here.
    pub fn after_apply(
        &self,
        range_id: RangeId,
        span: Option<&RangeSpan>,
        frozen_into: Option<RangeId>,
        changes: &[SpanChange],
    ) {
        let mut claims = self.lock();
        if !claims.by_range.contains_key(&range_id) {
            return;
        }
        for change in changes {
            if let SpanChange::MergedAway { right } = change {
                claims.by_range.remove(right);
            }
        }
        let new_owned = span.map(KeySpan::of);
        let unchanged = changes.is_empty()
            && claims
                .by_range
                .get(&range_id)
                .is_some_and(|c| c.owned == new_owned && c.frozen_into == frozen_into);
        if unchanged {
            // The common case (plain writes): nothing to change or check.
            return;
        }
        if let Some(claim) = claims.by_range.get_mut(&range_id) {
            claim.owned = new_owned;
            claim.frozen_into = frozen_into;
        }
        for change in changes {
            if let SpanChange::SplitChild { child, span } = change {
                let claim = claims.by_range.entry(*child).or_default();
                claim.owned = Some(KeySpan::of(span));
            }
        }
        claims.check();
    }

    /// What `range_id` owns on this node (what destroying its replica may delete).
    pub fn owned(&self, range_id: RangeId) -> Option<KeySpan> {
        self.lock()
            .by_range
            .get(&range_id)
            .and_then(|c| c.owned.clone())
    }

    /// Drops `range_id`'s claim. Call only after its keys were deleted (or handed over).
    pub fn release(&self, range_id: RangeId) {
        self.lock().by_range.remove(&range_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(range_id: RangeId, start: &[u8], end: &[u8]) -> RangeSpan {
        RangeSpan {
            range_id,
            start_key: start.to_vec(),
            end_key: end.to_vec(),
            generation: 1,
            next_replica_id: 1,
        }
    }

    #[test]
    fn a_merge_waits_for_an_install_of_its_right_range_and_then_admits_none() {
        let spans = Arc::new(SpanRegistry::default());
        spans.open(3, Some(&span(3, b"m", b"z")), Some(2)).unwrap();
        let install = spans.reserve(3, &span(3, b"m", b"z")).unwrap();
        assert!(
            !spans.seal_for_merge(3),
            "sealed while an install is in flight"
        );
        drop(install);
        assert!(spans.seal_for_merge(3));
        assert!(spans.reserve(3, &span(3, b"m", b"z")).is_err());
        assert!(spans.begin_install(3, &span(3, b"m", b"z")).is_err());
        // A range whose replica has not opened yet has nothing to wait for, and opens sealed.
        assert!(spans.seal_for_merge(9));
        spans.open(9, Some(&span(9, b"0", b"1")), Some(2)).unwrap();
        assert!(spans.reserve(9, &span(9, b"0", b"1")).is_err());
    }

    #[test]
    fn overlapping_snapshot_installs_cannot_both_be_admitted() {
        let spans = Arc::new(SpanRegistry::default());
        // A pre-split snapshot of P = [a, z) and a snapshot of its right half R = [m, z)
        // reach an empty node together: only the first is admitted.
        let p = spans.reserve(2, &span(2, b"a", b"z")).unwrap();
        let err = spans.reserve(3, &span(3, b"m", b"z")).unwrap_err();
        assert_eq!(err.other, 2);
        // A second install of the same range waits for the first.
        assert!(spans.reserve(2, &span(2, b"a", b"z")).is_err());
        // Abandoned before it committed: the span is free again.
        drop(p);
        let r = spans.reserve(3, &span(3, b"m", b"z")).unwrap();
        spans.begin_install(3, &span(3, b"m", b"z")).unwrap();
        spans.commit_install(3, Some(&span(3, b"m", b"z")), None);
        drop(r);
        assert_eq!(spans.owned(3).unwrap().start, b"m".to_vec());
        assert_eq!(spans.reserve(2, &span(2, b"a", b"z")).unwrap_err().other, 3);
        // An install whose reservation was lost cannot write over another range's keys.
        assert_eq!(
            spans
                .begin_install(2, &span(2, b"a", b"z"))
                .unwrap_err()
                .other,
            3
        );
        spans.reserve(2, &span(2, b"a", b"m")).unwrap();
    }

    #[test]
    fn splits_and_merges_move_keys_in_one_step() {
        let spans = Arc::new(SpanRegistry::default());
        spans.open(2, Some(&span(2, b"a", b"z")), None).unwrap();
        spans.after_apply(
            2,
            Some(&span(2, b"a", b"m")),
            None,
            &[SpanChange::SplitChild {
                child: 3,
                span: span(3, b"m", b"z"),
            }],
        );
        // The child owns its half before its replica even starts: no snapshot of another
        // range can take it meanwhile.
        assert_eq!(spans.reserve(9, &span(9, b"p", b"q")).unwrap_err().other, 3);
        spans.open(3, Some(&span(3, b"m", b"z")), None).unwrap();
        // Merge back: 3 is frozen into 2, then 2 takes it over.
        spans.after_apply(3, Some(&span(3, b"m", b"z")), Some(2), &[]);
        spans.after_apply(
            2,
            Some(&span(2, b"a", b"z")),
            None,
            &[SpanChange::MergedAway { right: 3 }],
        );
        assert_eq!(spans.owned(3), None);
        // The merged-away replica applying anything later gains nothing back.
        spans.after_apply(3, Some(&span(3, b"m", b"z")), Some(2), &[]);
        assert_eq!(spans.owned(3), None);
        assert_eq!(spans.owned(2).unwrap().end, b"z".to_vec());
    }

    #[test]
    fn at_start_up_a_merged_right_range_yields_to_its_left_range_in_either_order() {
        for left_first in [true, false] {
            let spans = SpanRegistry::default();
            let left = span(2, b"a", b"z");
            let right = span(3, b"m", b"z");
            if left_first {
                spans.open(2, Some(&left), None).unwrap();
                spans.open(3, Some(&right), Some(2)).unwrap();
            } else {
                spans.open(3, Some(&right), Some(2)).unwrap();
                spans.open(2, Some(&left), None).unwrap();
            }
            assert_eq!(spans.owned(3), None);
            assert!(spans.owned(2).is_some());
            // The left range split again after the merge (child 5 holds [p, z)): the frozen
            // replica yields to the child too.
            let spans = SpanRegistry::default();
            spans.open(3, Some(&right), Some(2)).unwrap();
            spans.open(2, Some(&span(2, b"a", b"p")), None).unwrap();
            spans.open(5, Some(&span(5, b"p", b"z")), None).unwrap();
            assert_eq!(spans.owned(3), None);
            // Any other overlap at start-up is refused.
            assert_eq!(
                spans
                    .open(4, Some(&span(4, b"b", b"c")), None)
                    .unwrap_err()
                    .other,
                2
            );
        }
    }

    #[test]
    fn a_destroyed_replicas_span_is_free_only_once_released() {
        let spans = Arc::new(SpanRegistry::default());
        spans.open(2, Some(&span(2, b"a", b"m")), None).unwrap();
        assert!(spans.reserve(5, &span(5, b"a", b"c")).is_err());
        spans.release(2);
        spans.reserve(5, &span(5, b"a", b"c")).unwrap();
    }
}
