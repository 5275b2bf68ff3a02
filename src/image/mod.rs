//! Images: the repository, manifests, chunk digests and file helpers.

pub mod digest;
pub mod fileio;
pub mod manifest;
pub mod ndz;
pub mod repo;
