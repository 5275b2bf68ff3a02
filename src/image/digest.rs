//! Chunk digests: xxh3-128, the one hash of the product.

/// Digest of one chunk's bytes.
pub type ChunkDigest = u128;

pub fn chunk_digest(data: &[u8]) -> ChunkDigest {
    xxhash_rust::xxh3::xxh3_128(data)
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
