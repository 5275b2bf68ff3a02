//! Chunk geometry: how an image of `size` bytes splits into chunks.

/// Smallest chunk size: the one limit the configuration, the wire and the
/// agent all check against.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest chunk size (frames are capped just above it).
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;

/// A chunk size is a power of two from [`MIN_CHUNK_SIZE`] to [`MAX_CHUNK_SIZE`].
pub fn chunk_size_ok(chunk_size: u32) -> bool {
    chunk_size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
}

/// `size` bytes cut into chunks of `chunk_size`; the last may be shorter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub size: u64,
    pub chunk_size: u64,
}

impl Geometry {
    pub fn new(size: u64, chunk_size: u64) -> Geometry {
        Geometry { size, chunk_size }
    }

    /// How many chunks; `chunk_size` must not be zero.
    pub fn count(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }

    /// Byte offset of chunk `i`.
    pub fn offset(&self, i: usize) -> u64 {
        (i as u64).saturating_mul(self.chunk_size)
    }

    /// Bytes in chunk `i`: `chunk_size`, except for a shorter last chunk
    /// (and zero past the end).
    pub fn len(&self, i: usize) -> u64 {
        self.size
            .saturating_sub(self.offset(i))
            .min(self.chunk_size)
    }

    /// The chunk holding byte `offset`.
    pub fn chunk_of(&self, offset: u64) -> usize {
        (offset / self.chunk_size) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_chunk_is_short() {
        let g = Geometry::new(10, 4);
        assert_eq!(g.count(), 3);
        assert_eq!(
            (0..4).map(|i| (g.offset(i), g.len(i))).collect::<Vec<_>>(),
            vec![(0, 4), (4, 4), (8, 2), (12, 0)]
        );
        assert_eq!(g.chunk_of(9), 2);
        assert_eq!(Geometry::new(0, 4).count(), 0);
        assert_eq!(Geometry::new(8, 4).len(1), 4);
    }
}
