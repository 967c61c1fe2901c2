//! Checksummed record framing.
//!
//! Every record SphereDB writes to disk is framed as `crc32(payload): u32 LE || payload`.
//! [`decode`] verifies the checksum and returns a typed corruption error on mismatch, so a
//! flipped bit is never served as data.

use crate::StorageError;

/// Size of the checksum header in bytes.
pub const CHECKSUM_SIZE_BYTES: usize = 4;

/// Frames `payload` with its crc32.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHECKSUM_SIZE_BYTES + payload.len());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Verifies a framed record and returns its payload. `what` names the record in errors.
pub fn decode<'a>(what: &str, framed: &'a [u8]) -> Result<&'a [u8], StorageError> {
    if framed.len() < CHECKSUM_SIZE_BYTES {
        return Err(StorageError::corruption(
            what,
            format!(
                "record of {} bytes is shorter than its checksum",
                framed.len()
            ),
        ));
    }
    let (head, payload) = framed.split_at(CHECKSUM_SIZE_BYTES);
    let stored = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let actual = crc32fast::hash(payload);
    if stored != actual {
        return Err(StorageError::corruption(
            what,
            format!("checksum mismatch: stored {stored:#010x}, computed {actual:#010x}"),
        ));
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let framed = encode(b"hello");
        assert_eq!(decode("t", &framed).unwrap(), b"hello");
        assert_eq!(decode("t", &encode(b"")).unwrap(), b"");
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let framed = encode(b"sphere data");
        for byte in 0..framed.len() {
            for bit in 0..8 {
                let mut bad = framed.clone();
                bad[byte] ^= 1 << bit;
                let err = decode("t", &bad).unwrap_err();
                assert!(err.is_corruption(), "flip at {byte}:{bit} not detected");
            }
        }
    }

    #[test]
    fn truncated_record_is_corruption() {
        assert!(decode("t", &[1, 2]).unwrap_err().is_corruption());
    }
}
