//! Images: the repository, manifests, chunk digests and file helpers.

pub mod digest;
pub mod fileio;
pub mod import;
pub mod manifest;
pub mod ndz;
pub mod reader;
pub mod repo;
