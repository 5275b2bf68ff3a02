//! Chunk digests: xxh3-128, the one hash of the product.

use std::sync::Mutex;

/// Digest of one chunk's bytes.
pub type ChunkDigest = u128;

pub fn chunk_digest(data: &[u8]) -> ChunkDigest {
    xxhash_rust::xxh3::xxh3_128(data)
}

/// Digest of `len` zero bytes. An image has at most two chunk lengths (full
/// and last), so the few most recent answers are kept.
pub fn zero_digest(len: usize) -> ChunkDigest {
    static CACHE: Mutex<Vec<(usize, ChunkDigest)>> = Mutex::new(Vec::new());
    const KEEP: usize = 4;
    let cache = || CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, d)) = cache().iter().find(|(l, _)| *l == len) {
        return d;
    }
    let digest = chunk_digest(&vec![0u8; len]);
    let mut cache = cache();
    if cache.len() >= KEEP {
        cache.remove(0);
    }
    cache.push((len, digest));
    digest
}

/// True if every byte is zero. OR-folding 64-byte blocks vectorises well and
/// still stops early on data.
pub fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    for block in &mut blocks {
        if block.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_digest_matches_zero_bytes() {
        for len in [0, 1, 4096, 65536, 4096, 100, 7, 3, 1] {
            assert_eq!(zero_digest(len), chunk_digest(&vec![0u8; len]), "{len}");
        }
    }

    #[test]
    fn zero_detection_sees_any_set_byte() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        for at in [0, 63, 64, 4095, 4098] {
            v[at] = 1;
            assert!(!is_zero(&v), "byte {at}");
            v[at] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn digest_depends_on_every_byte() {
        let a = vec![7u8; 1000];
        let mut b = a.clone();
        b[999] = 8;
        assert_ne!(chunk_digest(&a), chunk_digest(&b));
        assert_eq!(chunk_digest(&a), chunk_digest(&a.clone()));
    }
}
