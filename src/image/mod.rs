//! Images: the repository, manifests, chunk digests and file helpers.

pub mod digest;
pub mod fileio;
pub mod geometry;
pub mod import;
pub mod manage;
pub mod manifest;
pub mod ndz;
pub mod provenance;
pub mod reader;
pub mod repo;
pub mod sparse;

/// Smallest chunk size: the one limit the configuration, the wire and the
/// agent all check against.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest chunk size (frames are capped just above it).
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;

/// A chunk size is a power of two from [`MIN_CHUNK_SIZE`] to [`MAX_CHUNK_SIZE`].
pub fn chunk_size_ok(chunk_size: u32) -> bool {
    chunk_size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
}
