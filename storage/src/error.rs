//! Typed storage errors.

use std::io;

/// Errors raised by the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A record failed its checksum or could not be decoded. Never served as data.
    #[error("corruption in {what}: {detail}")]
    Corruption { what: String, detail: String },
    /// RocksDB returned an error.
    #[cfg(feature = "rocksdb")]
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// The data directory was written with another on-disk format version.
    #[error(
        "data directory {dir} has format version {found}, but this build reads format version \
         {supported} only; start this build with an empty data directory (and re-add the node \
         to its cluster), or run a build of format version {found}"
    )]
    IncompatibleFormat {
        dir: String,
        found: u32,
        supported: u32,
    },
    /// A file system operation failed.
    #[error("io: {0}")]
    Io(#[from] io::Error),
}

impl StorageError {
    /// Builds a `Corruption` error.
    pub fn corruption(what: impl Into<String>, detail: impl Into<String>) -> Self {
        StorageError::Corruption {
            what: what.into(),
            detail: detail.into(),
        }
    }

    /// True when the error is a detected corruption: a record's checksum, or RocksDB's own
    /// block checksums (most bit rot on disk surfaces there first).
    pub fn is_corruption(&self) -> bool {
        match self {
            StorageError::Corruption { .. } => true,
            #[cfg(feature = "rocksdb")]
            StorageError::Rocks(e) => e.kind() == rocksdb::ErrorKind::Corruption,
            _ => false,
        }
    }

    /// A RocksDB error as an `io::Error`; corruption keeps `InvalidData`.
    #[cfg(feature = "rocksdb")]
    pub fn rocks_io(e: rocksdb::Error) -> io::Error {
        io::Error::from(StorageError::Rocks(e))
    }
}

impl From<StorageError> for io::Error {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Io(e) => e,
            StorageError::Corruption { .. } | StorageError::IncompatibleFormat { .. } => {
                io::Error::new(io::ErrorKind::InvalidData, e.to_string())
            }
            #[cfg(feature = "rocksdb")]
            StorageError::Rocks(ref r) if r.kind() == rocksdb::ErrorKind::Corruption => {
                io::Error::new(io::ErrorKind::InvalidData, e.to_string())
            }
            #[cfg(feature = "rocksdb")]
            StorageError::Rocks(e) => io::Error::other(e.to_string()),
        }
    }
}
