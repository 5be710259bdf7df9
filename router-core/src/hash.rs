//! A small, fast, non-cryptographic hasher (folded multiply, as in
//! foldhash/ahash, without a random seed) for maps whose keys callers cannot choose: session ids, and VM
//! names in a snapshot's index. Maps keyed by user-controlled data keep the
//! standard library's DoS-resistant hasher.

use std::hash::{BuildHasherDefault, Hasher};

const K: u64 = 0x9E37_79B9_7F4A_7C15;

/// Folded-multiply hasher: `h = fold(h ^ word, K)` per 8-byte word, where
/// `fold` XORs the high and low halves of the 128-bit product, so every input
/// bit reaches both the high bits (DashMap shards, hashbrown tags) and the
/// low bits (buckets).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FastHasher(u64);

/// Builds [`FastHasher`]s.
pub(crate) type FastBuild = BuildHasherDefault<FastHasher>;

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        let full = u128::from(self.0 ^ word) * u128::from(K);
        self.0 = (full as u64) ^ ((full >> 64) as u64);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::hash::BuildHasher;

    #[test]
    fn sequential_ids_spread_over_dashmap_shard_bits() {
        let b = FastBuild::default();
        let mut shards = HashSet::new();
        for id in 1..=64u64 {
            // DashMap picks the shard from the bits just below the top 7.
            shards.insert((b.hash_one(id) << 7) >> 59);
        }
        assert!(shards.len() >= 16, "only {} shards used", shards.len());
    }

    #[test]
    fn similar_names_hash_apart() {
        let b = FastBuild::default();
        let hashes: HashSet<u64> = (0..10_000)
            .map(|i| b.hash_one(format!("dsvm-{i:05}")))
            .collect();
        assert_eq!(hashes.len(), 10_000);
    }
}
