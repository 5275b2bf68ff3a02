//! `LoadBegin`: what a load asks of the agent, as one struct, so that the
//! controller, the agent and the tests name its fields once (its encoding
//! is with the other messages').

/// A load's request: the target, the image's manifest and how to load it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadBegin {
    pub target: String,
    pub size: u64,
    pub chunk_size: u32,
    pub identity: u128,
    /// Rewrite everything: no stamp shortcut, every chunk needed.
    pub force: bool,
    /// Write to a block device even if it is mounted.
    pub force_mounted: bool,
    /// Ignore the stamp: check every chunk's digest (zero chunks too).
    pub verify: bool,
    /// Who asks, for the target's lock record: controller host, pid and
    /// command line.
    pub holder: String,
    pub digests: Vec<u128>,
    /// Bit i set: chunk i of the image is all zeros (never sent).
    pub zero: Vec<u8>,
    /// The image's file name, recorded in the target's stamp (provenance
    /// of later saves). Optional on the wire: absent decodes as "".
    pub image: String,
    /// The controller's user and host, recorded in the stamp. Optional
    /// on the wire, after `image`: absent decodes as "".
    pub user: String,
    pub host: String,
}
