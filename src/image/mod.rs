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

pub use geometry::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, chunk_size_ok};
