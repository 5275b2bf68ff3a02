//! Images: the repository, manifests, chunk digests and file helpers.

pub mod digest;
pub mod fileio;
pub mod manage;
pub mod manifest;
pub mod provenance;
pub mod repo;
