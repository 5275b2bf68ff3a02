//! Chunk digests: xxh3-128, the one hash of the product.

use std::sync::Mutex;

/// Digest of one chunk's bytes.
pub type ChunkDigest = u128;

pub fn chunk_digest(data: &[u8]) -> ChunkDigest {
    xxhash_rust::xxh3::xxh3_128(data)
}

/// [`chunk_digest`] of a whole file, read a piece at a time (positioned
/// reads: the file's offset is left alone), and the file's size.
pub fn file_digest(file: &std::fs::File) -> std::io::Result<(ChunkDigest, u64)> {
    use std::os::unix::fs::FileExt;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read_at(&mut buf, size)?;
        if n == 0 {
            return Ok((hasher.digest128(), size));
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
}

/// The block of a chunk's delta: when a chunk differs on a node, the
/// controller and the agent compare digests of its blocks of this size (at
/// fixed offsets: disk images do not shift) and only the blocks that differ
/// travel. The last block of a chunk may be shorter. 16 KiB: 20 scattered
/// small changes cost 320 KiB on the wire, less than rsync sends for them
/// (64 KiB blocks cost 1.25 MiB, and a reload on a 100 Mbit/s link 1.12× the
/// time of rsync's).
pub const DELTA_BLOCK: usize = 16 << 10;

/// Digest of one delta block: xxh3-64 (a block that collides still fails
/// its chunk's xxh3-128 check, so it is never written wrong).
pub type BlockDigest = u64;

/// The digests of `data`'s [`DELTA_BLOCK`]s, in order.
pub fn block_digests(data: &[u8]) -> Vec<BlockDigest> {
    data.chunks(DELTA_BLOCK)
        .map(xxhash_rust::xxh3::xxh3_64)
        .collect()
}

/// Delta blocks in a chunk of `len` bytes.
pub fn block_count(len: usize) -> usize {
    len.div_ceil(DELTA_BLOCK)
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
    fn a_file_digest_is_the_chunk_digest_of_its_bytes() {
        use std::io::Write;
        let data: Vec<u8> = (0..3_000_001u32).map(|i| (i % 241) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        assert_eq!(
            file_digest(&file).unwrap(),
            (chunk_digest(&data), data.len() as u64)
        );
    }

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
    fn block_digests_cover_every_block_and_tell_them_apart() {
        let mut data = vec![5u8; 3 * DELTA_BLOCK + 10];
        let d = block_digests(&data);
        assert_eq!(d.len(), 4);
        assert_eq!(block_count(data.len()), 4);
        assert_eq!(d[0], d[1]);
        assert_ne!(d[2], d[3], "the short last block is digested alone");
        data[DELTA_BLOCK + 7] = 6;
        let e = block_digests(&data);
        assert_eq!((d[0], d[2], d[3]), (e[0], e[2], e[3]));
        assert_ne!(d[1], e[1]);
        assert!(block_digests(&[]).is_empty());
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
