//! Snapshot files: their format, writing one with bounded memory, reading one back verified.
//!
//! A snapshot is a sequence of frames, each `kind:u8 len:u32le crc32:u32le payload`, the
//! checksum covering kind, length and payload:
//!
//! ```text
//! HEADER       postcard(SnapshotHeader): format version, Raft meta, span, merge state
//! SECTION      column family name            ┐ one section per column family,
//! PAIRS        (len:u32le key len:u32le value)* │ its pairs in blocks of about
//! ...                                       │ SNAPSHOT_BLOCK_SIZE_BYTES
//! SECTION_END  pair count:u64le             ┘
//! END          section count:u32le pair count:u64le
//! ```
//!
//! Writers, senders, receivers and installers hold at most one frame in memory, so a range
//! of any size can be re-replicated. A file without its `END` frame is truncated; any
//! checksum or count mismatch is corruption, reported before a single key is replaced.
//!
//! Owns: the byte format and temporary-file hygiene. Must not: touch the database or Raft.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use spheredb_storage::{mvcc, ColumnFamilyName, StorageError};

use crate::types::{MergeFreeze, RangeId, RangeSpan, RangeTimes, SnapshotMeta};

/// Version of the snapshot file format; a file of another version is refused by name.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 5;
const SNAPSHOT_MAGIC: &[u8; 8] = b"SPHSNAP\0";
/// Pairs are packed into frames of about this size (a single larger pair gets its own frame).
pub const SNAPSHOT_BLOCK_SIZE_BYTES: usize = 256 << 10;
/// Largest frame a reader accepts: one pair with the largest key and value the engine
/// stores fits with room to spare. A longer length field is corruption, not an allocation.
pub const MAX_SNAPSHOT_FRAME_BYTES: usize = 64 << 20;
/// Largest snapshot file a node accepts from a peer: a guard against a corrupt or hostile
/// stream, far above any range size the allocator lets grow (ranges split at 64 MiB).
pub const MAX_SNAPSHOT_SIZE_BYTES: u64 = 64 << 30;

const FRAME_HEADER_BYTES: usize = 9;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum FrameKind {
    Header = 1,
    Section = 2,
    Pairs = 3,
    SectionEnd = 4,
    End = 5,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<FrameKind> {
        Some(match b {
            1 => FrameKind::Header,
            2 => FrameKind::Section,
            3 => FrameKind::Pairs,
            4 => FrameKind::SectionEnd,
            5 => FrameKind::End,
            _ => return None,
        })
    }
}

/// A merge a range has applied: the right-hand range it took over, at the generation the
/// freeze named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedMerge {
    pub right: RangeId,
    pub left_generation: u64,
}

/// What a snapshot carries besides its pairs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub format_version: u32,
    pub meta: SnapshotMeta,
    pub span: Option<RangeSpan>,
    pub frozen: Option<MergeFreeze>,
    pub recent_merges: Vec<AppliedMerge>,
    /// The range's GC horizon and last commit.
    pub times: RangeTimes,
}

impl SnapshotHeader {
    /// True when the snapshot's range had taken over `freeze`'s right-hand range `right` at
    /// the generation that freeze names.
    pub fn merged(&self, right: RangeId, freeze: MergeFreeze) -> bool {
        self.recent_merges.contains(&AppliedMerge {
            right,
            left_generation: freeze.left_generation,
        })
    }
}

fn corrupt(detail: impl Into<String>) -> io::Error {
    io::Error::from(StorageError::corruption("snapshot", detail.into()))
}

/// Numbers temporary snapshot files, so no two writers or receivers share one.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary file name for `range_id` in `dir`. Every such name contains
/// `.snap.tmp`, which is how start-up finds the leftovers of interrupted writers.
pub fn temp_path(dir: &Path, range_id: RangeId) -> PathBuf {
    dir.join(format!(
        "range-{range_id}.snap.tmp.{}",
        TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A temporary file, removed when the last handle goes unless it was published (renamed
/// into place) first.
#[derive(Debug)]
struct TempPath {
    path: PathBuf,
    published: AtomicBool,
}

impl TempPath {
    fn new(path: PathBuf) -> Arc<TempPath> {
        Arc::new(TempPath {
            path,
            published: AtomicBool::new(false),
        })
    }
}

/// Flushes and syncs a finished temporary file, then opens it verified.
fn close_verified(mut out: BufWriter<File>, temp: Arc<TempPath>) -> io::Result<SnapshotFile> {
    out.flush()?;
    out.get_ref().sync_all()?;
    drop(out);
    let file = File::open(&temp.path)?;
    SnapshotFile::verified(file, Some(temp))
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.published.load(Ordering::Acquire) {
            return;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // Start-up removes it (its name says it is temporary); nothing is lost.
            Err(e) => {
                tracing::warn!(path = %self.path.display(), "cannot remove a temporary snapshot file: {e}")
            }
        }
    }
}

/// A complete, verified snapshot file: the data openraft passes around for a snapshot.
/// Clones share one open file, read with positional reads, so a file renamed over or
/// unlinked meanwhile stays readable by every holder.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    file: Arc<File>,
    size_bytes: u64,
    header: Arc<SnapshotHeader>,
    /// Set while the file is a temporary one an install may publish.
    temp: Option<Arc<TempPath>>,
}

impl SnapshotFile {
    /// Opens the file at `path` and verifies every frame.
    pub fn open_verified(path: &Path) -> io::Result<SnapshotFile> {
        let file = File::open(path)?;
        SnapshotFile::verified(file, None)
    }

    fn verified(file: File, temp: Option<Arc<TempPath>>) -> io::Result<SnapshotFile> {
        let size_bytes = file.metadata()?.len();
        let file = Arc::new(file);
        let header = visit(&file, |_, _, _| Ok(()))?;
        Ok(SnapshotFile {
            file,
            size_bytes,
            header: Arc::new(header),
            temp,
        })
    }

    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    pub fn meta(&self) -> &SnapshotMeta {
        &self.header.meta
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Reads up to `len` bytes at `offset` (fewer at the end of the file).
    pub fn read_chunk(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let len = len.min(self.size_bytes.saturating_sub(offset) as usize);
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// Calls `f(column family, key, value)` for every pair, in file order, verifying every
    /// frame on the way; returns the header. A damaged file fails before `f` sees a pair
    /// of a damaged frame, but after it saw the pairs before it: verify first (every
    /// `SnapshotFile` was) when a partial visit matters.
    pub fn visit_pairs(
        &self,
        f: impl FnMut(&str, &[u8], &[u8]) -> io::Result<()>,
    ) -> io::Result<SnapshotHeader> {
        visit(&self.file, f)
    }

    /// Makes this file `dest`: a temporary file is renamed there, any other is copied
    /// through a temporary file. Synced, and the directory synced after the rename.
    pub fn publish(&self, dest: &Path) -> io::Result<()> {
        let dir = dest.parent().unwrap_or_else(|| Path::new("."));
        match &self.temp {
            // Every temporary snapshot file was synced when it was closed (`close_verified`).
            Some(temp) if !temp.published.load(Ordering::Acquire) => {
                std::fs::rename(&temp.path, dest)?;
                temp.published.store(true, Ordering::Release);
            }
            _ => {
                let tmp = temp_path(dir, self.header.span.as_ref().map_or(0, |s| s.range_id));
                let copied = (|| {
                    let mut out = File::create(&tmp)?;
                    io::copy(&mut PositionalReader::new(&self.file), &mut out)?;
                    out.sync_all()?;
                    std::fs::rename(&tmp, dest)
                })();
                if copied.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                copied?;
            }
        }
        File::open(dir)?.sync_all()
    }
}

/// Reads a shared file from the start with positional reads.
struct PositionalReader<'a> {
    file: &'a File,
    offset: u64,
}

impl<'a> PositionalReader<'a> {
    fn new(file: &'a File) -> PositionalReader<'a> {
        PositionalReader { file, offset: 0 }
    }
}

impl Read for PositionalReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

/// Reads the next frame into `payload`; `None` at a clean end of file.
fn read_frame(r: &mut impl Read, payload: &mut Vec<u8>) -> io::Result<Option<FrameKind>> {
    let mut head = [0u8; FRAME_HEADER_BYTES];
    let mut got = 0;
    while got < head.len() {
        let n = r.read(&mut head[got..])?;
        if n == 0 {
            return match got {
                0 => Ok(None),
                _ => Err(corrupt("truncated frame header")),
            };
        }
        got += n;
    }
    let kind = FrameKind::from_u8(head[0])
        .ok_or_else(|| corrupt(format!("unknown frame kind {}", head[0])))?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let crc = u32::from_le_bytes([head[5], head[6], head[7], head[8]]);
    if len > MAX_SNAPSHOT_FRAME_BYTES {
        return Err(corrupt(format!(
            "frame of {len} bytes exceeds {MAX_SNAPSHOT_FRAME_BYTES}"
        )));
    }
    payload.clear();
    payload.resize(len, 0);
    r.read_exact(payload).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => corrupt("truncated frame"),
        _ => e,
    })?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&head[..5]);
    hasher.update(payload);
    if hasher.finalize() != crc {
        return Err(corrupt("frame checksum mismatch"));
    }
    Ok(Some(kind))
}

fn le_u64(b: &[u8]) -> io::Result<u64> {
    let bytes: [u8; 8] = b.try_into().map_err(|_| corrupt("bad count field"))?;
    Ok(u64::from_le_bytes(bytes))
}

/// Splits one length-prefixed field off the front of `rest`.
fn take_field<'a>(rest: &mut &'a [u8]) -> io::Result<&'a [u8]> {
    if rest.len() < 4 {
        return Err(corrupt("truncated length"));
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    if rest.len() < 4 + len {
        return Err(corrupt("truncated pair"));
    }
    let (field, tail) = rest[4..].split_at(len);
    *rest = tail;
    Ok(field)
}

/// Reads the magic and the header frame.
fn read_header(r: &mut impl Read) -> io::Result<SnapshotHeader> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)
        .map_err(|_| corrupt("shorter than its magic"))?;
    if &magic != SNAPSHOT_MAGIC {
        return Err(corrupt("bad magic (not a snapshot file of this format)"));
    }
    let mut payload = Vec::new();
    if read_frame(r, &mut payload)? != Some(FrameKind::Header) {
        return Err(corrupt("first frame is not the header"));
    }
    let header: SnapshotHeader =
        postcard::from_bytes(&payload).map_err(|e| corrupt(format!("undecodable header: {e}")))?;
    if header.format_version != SNAPSHOT_FORMAT_VERSION {
        return Err(corrupt(format!(
            "snapshot format version {}, this build reads version {SNAPSHOT_FORMAT_VERSION}",
            header.format_version
        )));
    }
    Ok(header)
}

/// The header of a snapshot from the first bytes of its file (the header frame is small and
/// comes first), so a receiver can decide about a snapshot before it takes in the rest. The
/// whole file is verified again once received.
pub fn header_of(prefix: &[u8]) -> io::Result<SnapshotHeader> {
    let mut r = prefix;
    read_header(&mut r)
}

/// Walks every frame of `file`, checking order, checksums, counts and the span of every
/// key, and hands each pair to `f`.
fn visit(
    file: &File,
    mut f: impl FnMut(&str, &[u8], &[u8]) -> io::Result<()>,
) -> io::Result<SnapshotHeader> {
    let mut r = BufReader::new(PositionalReader::new(file));
    let header = read_header(&mut r)?;
    let mut payload = Vec::new();
    let mut section: Option<(String, u64)> = None;
    let (mut sections, mut total) = (0u32, 0u64);
    loop {
        let kind =
            read_frame(&mut r, &mut payload)?.ok_or_else(|| corrupt("truncated: no end frame"))?;
        match (kind, &mut section) {
            (FrameKind::Section, None) => {
                let name = String::from_utf8(payload.clone())
                    .map_err(|_| corrupt("section name is not UTF-8"))?;
                // Only column families a snapshot carries (a range's data): a file naming
                // another is refused before an install replaces any key.
                if !ColumnFamilyName::from_name(&name)
                    .is_some_and(|cf| ColumnFamilyName::RANGE_DATA.contains(&cf))
                {
                    return Err(corrupt(format!("unknown section {name:?}")));
                }
                section = Some((name, 0));
            }
            (FrameKind::Pairs, Some((cf, count))) => {
                let mut rest = &payload[..];
                while !rest.is_empty() {
                    let key = take_field(&mut rest)?;
                    let value = take_field(&mut rest)?;
                    if let Some(span) = &header.span {
                        // A version key's span is its key's.
                        let versioned = ColumnFamilyName::from_name(cf)
                            .is_some_and(ColumnFamilyName::is_versioned);
                        let key = if versioned {
                            mvcc::split_version_key(key).map_err(io::Error::from)?.0
                        } else {
                            key
                        };
                        if !span.contains(key) {
                            return Err(corrupt("key outside the snapshot's span"));
                        }
                    }
                    f(cf, key, value)?;
                    *count += 1;
                }
            }
            (FrameKind::SectionEnd, Some((_, count))) => {
                if le_u64(&payload)? != *count {
                    return Err(corrupt("section pair count mismatch"));
                }
                total += *count;
                sections += 1;
                section = None;
            }
            (FrameKind::End, None) => {
                if payload.len() != 12
                    || u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]])
                        != sections
                    || le_u64(&payload[4..])? != total
                {
                    return Err(corrupt("end frame counts mismatch"));
                }
                if read_frame(&mut r, &mut payload)?.is_some() {
                    return Err(corrupt("frames after the end frame"));
                }
                return Ok(header);
            }
            (kind, _) => return Err(corrupt(format!("unexpected {kind:?} frame"))),
        }
    }
}

/// Writes a snapshot file with bounded memory: one block of pairs at a time.
pub struct SnapshotWriter {
    out: BufWriter<File>,
    temp: Arc<TempPath>,
    block: Vec<u8>,
    section: Option<u64>,
    sections: u32,
    total: u64,
}

impl SnapshotWriter {
    /// Starts a temporary snapshot file of `range_id` in `dir`.
    pub fn create(dir: &Path, range_id: RangeId, header: &SnapshotHeader) -> io::Result<Self> {
        let temp = TempPath::new(temp_path(dir, range_id));
        let mut out = BufWriter::new(File::create(&temp.path)?);
        out.write_all(SNAPSHOT_MAGIC)?;
        let mut w = SnapshotWriter {
            out,
            temp,
            block: Vec::new(),
            section: None,
            sections: 0,
            total: 0,
        };
        let encoded = postcard::to_stdvec(header)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        w.frame(FrameKind::Header, &encoded)?;
        Ok(w)
    }

    fn frame(&mut self, kind: FrameKind, payload: &[u8]) -> io::Result<()> {
        if payload.len() > MAX_SNAPSHOT_FRAME_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "snapshot frame of {} bytes exceeds {MAX_SNAPSHOT_FRAME_BYTES}",
                    payload.len()
                ),
            ));
        }
        let len = (payload.len() as u32).to_le_bytes();
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&[kind as u8]);
        hasher.update(&len);
        hasher.update(payload);
        self.out.write_all(&[kind as u8])?;
        self.out.write_all(&len)?;
        self.out.write_all(&hasher.finalize().to_le_bytes())?;
        self.out.write_all(payload)
    }

    /// Starts the section of column family `cf`.
    pub fn begin_section(&mut self, cf: &str) -> io::Result<()> {
        if self.section.is_some() {
            return Err(io::Error::other("snapshot section already open"));
        }
        self.frame(FrameKind::Section, cf.as_bytes())?;
        self.section = Some(0);
        Ok(())
    }

    /// Adds a pair to the open section.
    pub fn pair(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        let Some(count) = &mut self.section else {
            return Err(io::Error::other("snapshot pair outside a section"));
        };
        *count += 1;
        if !self.block.is_empty()
            && self.block.len() + 8 + key.len() + value.len() > SNAPSHOT_BLOCK_SIZE_BYTES
        {
            self.flush_block()?;
        }
        self.block
            .extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.block.extend_from_slice(key);
        self.block
            .extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.block.extend_from_slice(value);
        Ok(())
    }

    fn flush_block(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let block = std::mem::take(&mut self.block);
        self.frame(FrameKind::Pairs, &block)?;
        self.block = block;
        self.block.clear();
        Ok(())
    }

    /// Closes the open section.
    pub fn end_section(&mut self) -> io::Result<()> {
        self.flush_block()?;
        let count = self
            .section
            .take()
            .ok_or_else(|| io::Error::other("no snapshot section open"))?;
        self.frame(FrameKind::SectionEnd, &count.to_le_bytes())?;
        self.sections += 1;
        self.total += count;
        Ok(())
    }

    /// Ends the file, syncs it and opens it verified. The file stays temporary until it is
    /// published.
    pub fn finish(mut self) -> io::Result<SnapshotFile> {
        if self.section.is_some() {
            self.end_section()?;
        }
        let mut end = self.sections.to_le_bytes().to_vec();
        end.extend_from_slice(&self.total.to_le_bytes());
        self.frame(FrameKind::End, &end)?;
        close_verified(self.out, self.temp)
    }
}

/// Receives a snapshot streamed by a peer into a temporary file, one chunk at a time.
pub struct SnapshotReceiver {
    out: BufWriter<File>,
    temp: Arc<TempPath>,
    size_bytes: u64,
}

impl SnapshotReceiver {
    pub fn create(dir: &Path, range_id: RangeId) -> io::Result<SnapshotReceiver> {
        let path = temp_path(dir, range_id);
        let out = BufWriter::new(File::create(&path)?);
        Ok(SnapshotReceiver {
            out,
            temp: TempPath::new(path),
            size_bytes: 0,
        })
    }

    /// Appends a chunk; refuses a stream larger than [`MAX_SNAPSHOT_SIZE_BYTES`].
    pub fn chunk(&mut self, data: &[u8]) -> io::Result<()> {
        self.size_bytes += data.len() as u64;
        if self.size_bytes > MAX_SNAPSHOT_SIZE_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("snapshot exceeds {MAX_SNAPSHOT_SIZE_BYTES} bytes"),
            ));
        }
        self.out.write_all(data)
    }

    /// Syncs the file and verifies it whole.
    pub fn finish(self) -> io::Result<SnapshotFile> {
        close_verified(self.out, self.temp)
    }
}

/// Removes the temporary files of snapshot writers and receivers a crash interrupted. Call
/// before any replica of the node starts.
pub fn remove_temp_files(snapshot_dir: &Path) -> io::Result<usize> {
    let entries = match std::fs::read_dir(snapshot_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_string_lossy().contains(".snap.tmp") {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::range_origin_log_id;
    use crate::types::StoredMembership;

    fn header(index: u64) -> SnapshotHeader {
        let mut log_id = range_origin_log_id();
        log_id.index = index;
        SnapshotHeader {
            format_version: SNAPSHOT_FORMAT_VERSION,
            meta: SnapshotMeta {
                last_log_id: Some(log_id),
                last_membership: StoredMembership::default(),
            },
            span: Some(RangeSpan {
                range_id: 2,
                start_key: b"a".to_vec(),
                end_key: b"z".to_vec(),
                generation: 1,
                next_replica_id: 2,
            }),
            frozen: None,
            recent_merges: Vec::new(),
            times: RangeTimes::default(),
        }
    }

    fn write(dir: &Path, pairs: &[(Vec<u8>, Vec<u8>)]) -> SnapshotFile {
        let mut w = SnapshotWriter::create(dir, 2, &header(7)).unwrap();
        w.begin_section(ColumnFamilyName::System.as_str()).unwrap();
        for (k, v) in pairs {
            w.pair(k, v).unwrap();
        }
        w.end_section().unwrap();
        w.finish().unwrap()
    }

    fn pairs(n: usize, value_bytes: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        (0..n)
            .map(|i| (format!("k{i:06}").into_bytes(), vec![i as u8; value_bytes]))
            .collect()
    }

    fn read_all(file: &SnapshotFile) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        file.visit_pairs(|cf, k, v| {
            assert_eq!(cf, ColumnFamilyName::System.as_str());
            out.push((k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn pairs_come_back_in_order_through_many_blocks_and_one_oversized_pair() {
        let dir = tempfile::tempdir().unwrap();
        // About 40 blocks of pairs, then one pair larger than a block.
        let mut written = pairs(10_000, 1_000);
        written.push((b"k~".to_vec(), vec![9; 3 * SNAPSHOT_BLOCK_SIZE_BYTES]));
        let file = write(dir.path(), &written);
        assert!(file.size_bytes() > 13 * SNAPSHOT_BLOCK_SIZE_BYTES as u64);
        assert_eq!(file.meta().last_log_id.map(|l| l.index), Some(7));
        assert_eq!(read_all(&file), written);
    }

    #[test]
    fn any_flipped_byte_or_truncation_is_corruption_before_use() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), &pairs(5_000, 100));
        let dest = dir.path().join("range-2.snap");
        file.publish(&dest).unwrap();
        let good = std::fs::read(&dest).unwrap();
        let damaged = dir.path().join("damaged");
        for at in [3, 12, good.len() / 3, good.len() / 2, good.len() - 5] {
            let mut bytes = good.clone();
            bytes[at] ^= 0x20;
            std::fs::write(&damaged, &bytes).unwrap();
            let err = SnapshotFile::open_verified(&damaged).unwrap_err();
            assert_eq!(
                err.kind(),
                io::ErrorKind::InvalidData,
                "flip at {at}: {err}"
            );
        }
        for len in [0, 8, 20, good.len() / 2, good.len() - 1] {
            std::fs::write(&damaged, &good[..len]).unwrap();
            assert!(
                SnapshotFile::open_verified(&damaged).is_err(),
                "cut at {len}"
            );
        }
        // A whole frame dropped from the middle keeps every checksum valid: the counts
        // catch it. Frames: header, section, pairs, pairs, ...
        let mut starts = Vec::new();
        let mut at = SNAPSHOT_MAGIC.len();
        while at < good.len() {
            starts.push(at);
            let len = u32::from_le_bytes(good[at + 1..at + 5].try_into().unwrap()) as usize;
            at += FRAME_HEADER_BYTES + len;
        }
        assert!(starts.len() > 5);
        let mut bytes = good[..starts[2]].to_vec();
        bytes.extend_from_slice(&good[starts[3]..]);
        std::fs::write(&damaged, &bytes).unwrap();
        let err = SnapshotFile::open_verified(&damaged).unwrap_err();
        assert!(err.to_string().contains("count mismatch"), "{err}");
        let reopened = SnapshotFile::open_verified(&dest).unwrap();
        assert_eq!(read_all(&reopened).len(), 5_000);
    }

    #[test]
    fn a_section_of_an_unknown_column_family_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SnapshotWriter::create(dir.path(), 2, &header(7)).unwrap();
        w.begin_section(ColumnFamilyName::RaftLog.as_str()).unwrap();
        w.pair(b"b", b"v").unwrap();
        let err = w.finish().unwrap_err();
        assert!(err.to_string().contains("unknown section"), "{err}");
    }

    #[test]
    fn a_key_outside_the_span_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SnapshotWriter::create(dir.path(), 2, &header(7)).unwrap();
        w.begin_section(ColumnFamilyName::System.as_str()).unwrap();
        w.pair(b"zz", b"v").unwrap();
        assert!(w.finish().is_err());
    }

    #[test]
    fn an_unpublished_temporary_file_is_removed_with_its_last_handle() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), &pairs(10, 10));
        let copy = file.clone();
        drop(file);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Still readable while held, even once renamed over or unlinked.
        drop(copy);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let published = write(dir.path(), &pairs(10, 10));
        published.publish(&dir.path().join("range-2.snap")).unwrap();
        drop(published);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["range-2.snap".to_string()]);
    }

    #[test]
    fn a_received_stream_is_verified_whole_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), &pairs(2_000, 300));
        let mut rx = SnapshotReceiver::create(dir.path(), 2).unwrap();
        let mut offset = 0;
        while offset < file.size_bytes() {
            let chunk = file.read_chunk(offset, 4096).unwrap();
            offset += chunk.len() as u64;
            rx.chunk(&chunk).unwrap();
        }
        let got = rx.finish().unwrap();
        assert_eq!(read_all(&got), read_all(&file));
        // The header can be read from the first chunk alone, before the rest arrives.
        let header = header_of(&file.read_chunk(0, 4096).unwrap()).unwrap();
        assert_eq!(header.span, file.header().span);
        assert_eq!(header.meta.last_log_id, file.meta().last_log_id);
        assert!(header_of(&file.read_chunk(0, 12).unwrap()).is_err());
        // A stream cut short fails verification.
        let mut rx = SnapshotReceiver::create(dir.path(), 2).unwrap();
        rx.chunk(&file.read_chunk(0, 5_000).unwrap()).unwrap();
        assert!(rx.finish().is_err());
    }
}
