//! Disk-space guard: refuse writes early, keep a ballast, recover by itself.
//!
//! A node whose disk fills up mid-append stops its Raft groups with `ENOSPC` and, before the
//! fail-stop rule, answered every write `OUTCOME_UNKNOWN` while looking healthy. This module
//! keeps it out of that state: while the data directory's file system has less than
//! `disk_reserve_bytes` free, the node refuses client writes *before proposing them*
//! (`RESOURCE_EXHAUSTED`, nothing written, safe to retry), so Raft's own writes (heartbeats,
//! votes, entries already proposed) and RocksDB's flushes and compactions still find room.
//! A ballast file of `ballast_size_bytes` is allocated while space is plentiful and deleted
//! when free space falls below half the reserve, giving the node room to compact and recover;
//! it is allocated again once free space is back above the reserve plus the ballast.
//! Writes are accepted again, without a restart, as soon as free space is over the reserve.
//!
//! Owns: the decision ([`decide`], pure) and the ballast file. Must not: delete data.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use spheredb_client::ClientError;
use tokio::sync::watch;

/// How often the node measures its free disk space.
pub const DISK_CHECK_INTERVAL_MS: u64 = 500;
/// Name of the ballast file in the data directory.
pub const BALLAST_FILE_NAME: &str = "ballast";

/// What the guard should do at a given amount of free space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskDecision {
    /// Client writes are accepted.
    pub accept_writes: bool,
    /// Change to the ballast file.
    pub ballast: BallastAction,
}

/// A change to the ballast file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BallastAction {
    Keep,
    /// Delete it: the node is short of space.
    Release,
    /// Allocate it: space is plentiful again.
    Allocate,
}

/// The guard's decision at `free_bytes` of free space (pure; see the module comment).
pub fn decide(
    free_bytes: u64,
    reserve_bytes: u64,
    ballast_size_bytes: u64,
    ballast_present: bool,
) -> DiskDecision {
    let ballast = if ballast_size_bytes == 0 {
        BallastAction::Keep
    } else if ballast_present && free_bytes < reserve_bytes / 2 {
        BallastAction::Release
    } else if !ballast_present && free_bytes > reserve_bytes.saturating_add(ballast_size_bytes) {
        BallastAction::Allocate
    } else {
        BallastAction::Keep
    };
    DiskDecision {
        accept_writes: free_bytes >= reserve_bytes,
        ballast,
    }
}

/// Free bytes available to this process on the file system holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` a valid out-pointer.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// Allocates `size_bytes` of real blocks (not a sparse file) at `path`.
fn allocate_ballast(path: &Path, size_bytes: u64) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let file = std::fs::File::create(path)?;
    // SAFETY: a valid open file descriptor and non-negative offsets.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, size_bytes as libc::off_t) };
    if rc != 0 {
        let _ = std::fs::remove_file(path);
        return Err(io::Error::from_raw_os_error(rc));
    }
    file.sync_all()
}

/// The node's disk-space guard.
#[derive(Debug)]
pub struct DiskGuard {
    data_dir: PathBuf,
    reserve_bytes: u64,
    ballast_size_bytes: u64,
    accept_writes: AtomicBool,
    last_free_bytes: AtomicU64,
}

impl DiskGuard {
    /// A guard over `data_dir`, measured once now.
    pub fn new(data_dir: &Path, reserve_bytes: u64, ballast_size_bytes: u64) -> DiskGuard {
        let guard = DiskGuard {
            data_dir: data_dir.to_path_buf(),
            reserve_bytes,
            ballast_size_bytes,
            accept_writes: AtomicBool::new(true),
            last_free_bytes: AtomicU64::new(u64::MAX),
        };
        guard.check();
        guard
    }

    fn ballast_path(&self) -> PathBuf {
        self.data_dir.join(BALLAST_FILE_NAME)
    }

    /// Measures free space, updates whether writes are accepted, and applies the ballast
    /// decision. A failed measurement keeps the last verdict (and is logged).
    pub fn check(&self) {
        let free = match free_bytes(&self.data_dir) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(dir = %self.data_dir.display(), "measuring free disk space: {e}");
                return;
            }
        };
        let ballast_path = self.ballast_path();
        let decision = decide(
            free,
            self.reserve_bytes,
            self.ballast_size_bytes,
            ballast_path.exists(),
        );
        match decision.ballast {
            BallastAction::Keep => {}
            BallastAction::Release => match std::fs::remove_file(&ballast_path) {
                Ok(()) => tracing::warn!(
                    free_bytes = free,
                    "disk nearly full: released the {} byte ballast file",
                    self.ballast_size_bytes
                ),
                Err(e) => tracing::error!("releasing the ballast file: {e}"),
            },
            BallastAction::Allocate => {
                if let Err(e) = allocate_ballast(&ballast_path, self.ballast_size_bytes) {
                    tracing::warn!("allocating the ballast file: {e}");
                }
            }
        }
        self.last_free_bytes.store(free, Ordering::Relaxed);
        let was = self
            .accept_writes
            .swap(decision.accept_writes, Ordering::Relaxed);
        if was != decision.accept_writes {
            if decision.accept_writes {
                tracing::info!(
                    free_bytes = free,
                    "free disk space is back: accepting writes"
                );
            } else {
                tracing::error!(
                    free_bytes = free,
                    reserve_bytes = self.reserve_bytes,
                    "free disk space under the reserve: refusing writes until space is freed"
                );
            }
        }
    }

    /// `Ok` while writes are accepted; else `RESOURCE_EXHAUSTED` saying what to do.
    pub fn check_write(&self) -> Result<(), ClientError> {
        if self.accept_writes.load(Ordering::Relaxed) {
            return Ok(());
        }
        Err(ClientError::ResourceExhausted(format!(
            "the node's disk has {} bytes free, under its reserve of {} bytes (--disk-reserve-bytes); \
             nothing was written: free space on {} and retry (writes resume by themselves)",
            self.last_free_bytes.load(Ordering::Relaxed),
            self.reserve_bytes,
            self.data_dir.display()
        )))
    }
}

/// Re-measures every [`DISK_CHECK_INTERVAL_MS`] until `stop`. The measurement is a syscall
/// and a file operation at most, so it runs on the blocking pool.
pub async fn disk_loop(guard: std::sync::Arc<DiskGuard>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(Duration::from_millis(DISK_CHECK_INTERVAL_MS)) => {}
        }
        let g = guard.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || g.check()).await {
            tracing::error!("disk check task failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn writes_stop_under_the_reserve_and_the_ballast_goes_and_comes_back() {
        // Plenty of space: accept, allocate the ballast if missing.
        assert_eq!(
            decide(1000 * MIB, 128 * MIB, 64 * MIB, false),
            DiskDecision {
                accept_writes: true,
                ballast: BallastAction::Allocate
            }
        );
        // Under the reserve: refuse, keep the ballast until under half the reserve.
        assert_eq!(
            decide(100 * MIB, 128 * MIB, 64 * MIB, true),
            DiskDecision {
                accept_writes: false,
                ballast: BallastAction::Keep
            }
        );
        assert_eq!(
            decide(10 * MIB, 128 * MIB, 64 * MIB, true),
            DiskDecision {
                accept_writes: false,
                ballast: BallastAction::Release
            }
        );
        // Released ballast is not allocated again until there is room for it above the
        // reserve (no flapping), but writes resume as soon as the reserve is free.
        assert_eq!(
            decide(150 * MIB, 128 * MIB, 64 * MIB, false),
            DiskDecision {
                accept_writes: true,
                ballast: BallastAction::Keep
            }
        );
        assert!(decide(0, 0, 0, false).accept_writes);
    }

    #[test]
    fn the_guard_refuses_writes_with_a_clear_error_when_the_reserve_is_not_free() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        let guard = DiskGuard::new(dir.path(), free.saturating_mul(2).max(1), 0);
        let err = guard.check_write().unwrap_err();
        assert!(
            matches!(&err, ClientError::ResourceExhausted(m) if m.contains("--disk-reserve-bytes")),
            "{err}"
        );
        let guard = DiskGuard::new(dir.path(), 0, 0);
        guard.check_write().unwrap();
    }
}
