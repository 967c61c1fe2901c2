//! Reading history files into [`Event`]s: the supported formats, and the
//! errors that name the file and line that could not be understood.
//!
//! Events whose process is not an integer (Jepsen's `:nemesis`) are fault
//! injections, not client operations, and are skipped by every format.

pub mod edn;
pub mod jepsen_log;
pub mod jsonl;

use std::path::{Path, PathBuf};

use crate::history::Event;

/// Supported history file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Jepsen's log lines `INFO  jepsen.util - <process> :<type> :<f> <value>`.
    JepsenLog,
    /// Jepsen op maps in EDN, one after another or inside one list/vector.
    Edn,
    /// One JSON object per line.
    Jsonl,
}

/// A problem at a specific line of the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct SyntaxError {
    /// 1-based line number.
    pub line: usize,
    pub message: String,
}

impl SyntaxError {
    pub(crate) fn new(line: usize, message: impl Into<String>) -> Self {
        Self {
            line,
            message: message.into(),
        }
    }
}

/// Why a history file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Syntax { path: PathBuf, source: SyntaxError },
}

/// Parses history text in the given format.
pub fn parse_str(format: Format, text: &str) -> Result<Vec<Event>, SyntaxError> {
    match format {
        Format::JepsenLog => jepsen_log::parse(text),
        Format::Edn => edn::parse(text),
        Format::Jsonl => jsonl::parse(text),
    }
}

/// Reads and parses a history file.
pub fn load(format: Format, path: &Path) -> Result<Vec<Event>, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_str(format, &text).map_err(|source| LoadError::Syntax {
        path: path.to_path_buf(),
        source,
    })
}
