//! Workload mixes (kv0, kv95, YCSB A/B/C/F) and key choice (uniform or zipfian).

use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Distribution, Zipf};

/// Size of every generated key in bytes, as in YCSB.
pub const KEY_SIZE_BYTES: usize = 16;
/// Zipfian skew, YCSB's default constant.
pub const ZIPF_EXPONENT: f64 = 0.99;

/// A workload: the share of reads and of read-modify-writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Workload {
    /// 100 % writes.
    Kv0,
    /// 95 % reads, 5 % writes.
    Kv95,
    /// YCSB A: 50 % reads, 50 % updates.
    YcsbA,
    /// YCSB B: 95 % reads, 5 % updates.
    YcsbB,
    /// YCSB C: 100 % reads.
    YcsbC,
    /// YCSB F: 50 % reads, 50 % read-modify-writes.
    YcsbF,
}

/// One operation to issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    ReadModifyWrite,
}

impl Workload {
    /// Percentages of (reads, writes, read-modify-writes).
    fn mix(self) -> (u32, u32, u32) {
        match self {
            Workload::Kv0 => (0, 100, 0),
            Workload::Kv95 | Workload::YcsbB => (95, 5, 0),
            Workload::YcsbA => (50, 50, 0),
            Workload::YcsbC => (100, 0, 0),
            Workload::YcsbF => (50, 0, 50),
        }
    }

    /// Draws the next operation.
    pub fn next_op(self, rng: &mut StdRng) -> OpKind {
        let (reads, writes, _) = self.mix();
        let roll = rng.random_range(0..100);
        if roll < reads {
            OpKind::Read
        } else if roll < reads + writes {
            OpKind::Write
        } else {
            OpKind::ReadModifyWrite
        }
    }
}

/// How keys are drawn from the key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum KeyDistribution {
    Uniform,
    Zipfian,
}

/// Draws key indexes in `0..key_count`.
pub struct KeyChooser {
    key_count: u64,
    zipf: Option<Zipf<f64>>,
}

impl KeyChooser {
    /// A chooser over `key_count` keys.
    pub fn new(key_count: u64, distribution: KeyDistribution) -> anyhow::Result<Self> {
        anyhow::ensure!(key_count > 0, "--keys must be at least 1");
        let zipf = match distribution {
            KeyDistribution::Uniform => None,
            KeyDistribution::Zipfian => Some(Zipf::new(key_count as f64, ZIPF_EXPONENT)?),
        };
        Ok(KeyChooser { key_count, zipf })
    }

    /// The next key index. Zipfian ranks are scattered over the key space (as YCSB's
    /// "scrambled zipfian" does) so hot keys are not neighbours.
    pub fn next(&self, rng: &mut StdRng) -> u64 {
        match &self.zipf {
            None => rng.random_range(0..self.key_count),
            Some(z) => {
                let rank = (z.sample(rng) as u64).saturating_sub(1);
                rank.wrapping_mul(0x9E37_79B9_7F4A_7C15) % self.key_count
            }
        }
    }
}

/// The `KEY_SIZE_BYTES`-byte key of index `i`.
pub fn key(i: u64) -> Vec<u8> {
    let k = format!("user{i:012}").into_bytes();
    debug_assert_eq!(k.len(), KEY_SIZE_BYTES);
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn keys_are_sixteen_bytes_and_ordered() {
        assert_eq!(key(0).len(), KEY_SIZE_BYTES);
        assert_eq!(key(999_999_999_999).len(), KEY_SIZE_BYTES);
        assert!(key(1) < key(2));
    }

    #[test]
    fn mixes_match_their_definitions() {
        let mut rng = StdRng::seed_from_u64(1);
        let reads = (0..10_000)
            .filter(|_| Workload::Kv95.next_op(&mut rng) == OpKind::Read)
            .count();
        assert!((9_300..9_700).contains(&reads), "{reads}");
        assert!((0..1000).all(|_| Workload::Kv0.next_op(&mut rng) == OpKind::Write));
    }

    #[test]
    fn zipfian_keys_stay_in_range_and_are_skewed() {
        let mut rng = StdRng::seed_from_u64(2);
        let c = KeyChooser::new(1000, KeyDistribution::Zipfian).unwrap();
        let mut counts = vec![0u32; 1000];
        for _ in 0..20_000 {
            counts[c.next(&mut rng) as usize] += 1;
        }
        let max = *counts.iter().max().unwrap();
        assert!(max > 1000, "hottest key drew only {max} of 20000");
    }
}
