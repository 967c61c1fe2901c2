//! Sequential specifications the checker linearizes against. A model turns
//! each [`Operation`] into its own typed op once (rejecting operations it
//! does not support), names the partition an operation belongs to, and
//! steps a state through one op, refusing results the specification forbids.
//!
//! Indeterminate operations must be accepted in every state: they may have
//! taken effect with any result, and the checker relies on being able to
//! place them anywhere after their invocation.

pub mod kv;
pub mod register;
pub mod set;

use std::fmt;
use std::hash::Hash;

use crate::history::{Operation, Value};

pub use kv::Kv;
pub use register::CasRegister;
pub use set::SetModel;

/// A sequential specification.
pub trait Model {
    /// An operation in the form the model steps through. Equal ops must
    /// behave identically, which lets the search treat them as one.
    type Op: fmt::Debug + Eq + Hash;
    /// Model state; hashed for the search's memoisation.
    type State: Clone + Eq + Hash + fmt::Debug;

    /// Name used in messages, e.g. `cas-register`.
    fn name(&self) -> &'static str;

    fn init(&self) -> Self::State;

    /// Validates an operation and converts it to the model's own form.
    fn prepare(&self, op: &Operation) -> Result<Self::Op, ModelError>;

    /// Operations with different keys are checked independently
    /// (P-compositionality). `None` puts everything in one partition.
    fn partition_key(&self, _op: &Operation) -> Option<Value> {
        None
    }

    /// The state after `op`, or `None` if `op` cannot happen in `state`.
    fn step(&self, state: &Self::State, op: &Self::Op) -> Option<Self::State>;

    /// Heap memory a state owns beyond its inline size, to budget the
    /// search's memo.
    fn state_heap_bytes(&self, _state: &Self::State) -> usize {
        0
    }

    /// Human-readable state for explanations.
    fn describe_state(&self, state: &Self::State) -> String;
}

/// An operation the model cannot interpret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ModelError {
    /// Line of the operation's invocation.
    pub line: usize,
    pub message: String,
}

impl ModelError {
    pub(crate) fn new(op: &Operation, message: impl Into<String>) -> Self {
        Self {
            line: op.invoke_line,
            message: message.into(),
        }
    }

    pub(crate) fn unsupported(model: &str, op: &Operation, supported: &str) -> Self {
        Self::new(
            op,
            format!(
                "model {model} does not support {}; it supports {supported}",
                op.f
            ),
        )
    }
}

/// The models available by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    CasRegister,
    Kv,
    Set,
}
