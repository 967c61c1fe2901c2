//! Request limits shared by the client (early checks) and the server (enforcement).

use crate::ClientError;

/// Largest key accepted, in bytes.
pub const MAX_KEY_SIZE_BYTES: usize = 4 << 10;
/// Most timestamps one `GetTimestamps` call hands out (a batch never spans two
/// milliseconds of the oracle's 2^18 logical values).
pub const MAX_TIMESTAMPS_PER_CALL: u64 = 1 << 16;
/// Largest value accepted, in bytes.
pub const MAX_VALUE_SIZE_BYTES: usize = 8 << 20;
/// Largest total of keys and values in one batch, in bytes.
pub const MAX_BATCH_SIZE_BYTES: usize = 16 << 20;
/// Most operations in one batch.
pub const MAX_BATCH_OPS: usize = 10_000;
/// Largest gRPC message a KV server or client decodes: one full batch plus framing.
pub const MAX_GRPC_MESSAGE_SIZE_BYTES: usize = MAX_BATCH_SIZE_BYTES + (1 << 20);
/// Rows a scan returns when the request gives no limit.
pub const DEFAULT_SCAN_LIMIT: u32 = 1_000;
/// Most rows one scan request may return.
pub const MAX_SCAN_LIMIT: u32 = 100_000;
/// Most key and value bytes one scan response carries; the server stops after the pair that
/// crosses it (so one pair of the largest size always fits) and answers `more`. Well under
/// [`MAX_GRPC_MESSAGE_SIZE_BYTES`], which a response must never exceed.
pub const MAX_SCAN_RESPONSE_BYTES: usize = 4 << 20;

/// Ranges one `RangeList` page holds when the request gives no limit.
pub const DEFAULT_RANGE_LIST_PAGE_RANGES: u32 = 1_000;
/// Most ranges one `RangeList` page holds.
pub const MAX_RANGE_LIST_PAGE_RANGES: u32 = 10_000;
/// Most descriptor bytes one `RangeList` page carries (descriptors with the largest keys are
/// about 8 KiB); the server stops after the range that crosses it.
pub const MAX_RANGE_LIST_RESPONSE_BYTES: usize = 1 << 20;
/// Most pages the client reads for one range map: ten million ranges at the default size.
pub const MAX_RANGE_LIST_PAGES: usize = 10_000;
/// Most descriptor bytes one node heartbeat carries; the rest follow in later heartbeats.
pub const MAX_HEARTBEAT_DESCRIPTOR_BYTES: usize = 1 << 20;

/// Rejects an empty or oversized key.
pub fn check_key(key: &[u8]) -> Result<(), ClientError> {
    if key.is_empty() {
        return Err(ClientError::InvalidArgument("key is empty".into()));
    }
    if key.len() > MAX_KEY_SIZE_BYTES {
        return Err(ClientError::InvalidArgument(format!(
            "key of {} bytes is over the limit of {} bytes",
            key.len(),
            MAX_KEY_SIZE_BYTES
        )));
    }
    Ok(())
}

/// Rejects an oversized value.
pub fn check_value(value: &[u8]) -> Result<(), ClientError> {
    if value.len() > MAX_VALUE_SIZE_BYTES {
        return Err(ClientError::InvalidArgument(format!(
            "value of {} bytes is over the limit of {} bytes",
            value.len(),
            MAX_VALUE_SIZE_BYTES
        )));
    }
    Ok(())
}

/// Largest difference, in parts per million, between the rate of any node's clocks and real
/// time that the cluster is built to tolerate. Nothing depends on it yet: Raft's safety needs
/// no clock, and reads confirm leadership with a quorum round (docs/architecture.md). Leader
/// leases and timestamps, when they come, must be sized against it; the Jepsen tester's
/// `clock-rate` nemesis already runs node clocks anywhere within it. Far above real quartz
/// drift (tens of ppm).
pub const MAX_CLOCK_RATE_DRIFT_PPM: u64 = 20_000;
