//! Block-level delta, the controller's side. After `Needed` the agent sends
//! the digests of the [`DELTA_BLOCK`]s of each needed chunk whose region on
//! the target held data; when such a chunk goes to that node directly (the
//! star, the chain's catch-up), the controller compares them with the
//! image's and sends a `Patch` of the blocks that differ instead of the
//! whole chunk, if few enough do. The agent verifies the patched chunk
//! whole before writing it.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use crate::engine::error::NodeError;
use crate::engine::source::{ChunkSource, FileChunk, SourceError, WireChunk};
use crate::fmt::human_bytes;
use crate::image::digest::{BlockDigest, DELTA_BLOCK, block_count, block_digests};
use crate::image::manifest::Manifest;
use crate::node::agent_link::{Rx, Tx};
use crate::proto::{self, Msg, ProtocolError, bitmap_len, set_bit};

/// A node's block digests, by chunk.
pub(super) type BlockMap = HashMap<usize, Vec<BlockDigest>>;

/// Read the `count` BlockDigests frames that follow `Needed`.
pub(super) async fn read_block_digests(
    m: &Manifest,
    needed: &[u8],
    count: u32,
    rx: &mut Rx,
) -> Result<BlockMap, NodeError> {
    let mut map = BlockMap::new();
    for _ in 0..count {
        match proto::read_msg(rx).await? {
            Msg::BlockDigests { index, digests } => {
                let c = index as usize;
                let fits = c < m.chunk_count()
                    && proto::bit(needed, c)
                    && digests.len() == block_count(m.chunk_len(c) as usize);
                if !fits || map.insert(c, digests).is_some() {
                    return Err(NodeError::Protocol(format!(
                        "agent sent block digests that do not fit chunk {index}"
                    )));
                }
            }
            Msg::Error { kind, message } => return Err(NodeError::Agent { kind, message }),
            other => {
                return Err(NodeError::Protocol(format!(
                    "agent answered {} where block digests were announced",
                    other.name()
                )));
            }
        }
    }
    Ok(map)
}

/// A patch is worth it when at most 3/4 of the chunk's bytes differ.
pub(super) fn worth_patching(differing: u64, chunk_len: u64) -> bool {
    differing > 0 && differing.saturating_mul(4) <= chunk_len.saturating_mul(3)
}

/// The bytes of the blocks of `ours` that differ from `theirs`.
fn differing_bytes(ours: &[BlockDigest], theirs: &[BlockDigest], len: usize) -> u64 {
    ours.iter()
        .zip(theirs)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(k, _)| (((k + 1) * DELTA_BLOCK).min(len) - k * DELTA_BLOCK) as u64)
        .sum()
}

/// One chunk on its way to one node.
pub(super) enum Outgoing {
    /// The chunk as every node gets it (shared, prepared once).
    Whole(Arc<WireChunk>),
    /// The chunk raw, spliced from the image file into the node's pipe.
    File(FileChunk),
    Patch(Box<Patch>),
}

pub(super) struct Patch {
    msg: Msg,
    /// Bytes on the wire (the frame's data).
    wire: u64,
    /// Image bytes it carries.
    raw: u64,
    /// Image bytes of the chunk it does not carry.
    spared: u64,
}

impl Outgoing {
    /// Bytes that leave the controller (compressed), for the bandwidth cap.
    pub(super) fn wire_len(&self) -> u64 {
        match self {
            Outgoing::Whole(chunk) => chunk.data.len() as u64,
            Outgoing::File(chunk) => chunk.len as u64,
            Outgoing::Patch(p) => p.wire,
        }
    }

    /// Image bytes it carries: what a node's `bytes_sent` counts.
    pub(super) fn raw_len(&self) -> u64 {
        match self {
            Outgoing::Whole(chunk) => chunk.raw_len,
            Outgoing::File(chunk) => chunk.len as u64,
            Outgoing::Patch(p) => p.raw,
        }
    }

    /// Bytes of the chunk the node already holds and will not write.
    pub(super) fn spared(&self) -> u64 {
        match self {
            Outgoing::Whole(_) | Outgoing::File(_) => 0,
            Outgoing::Patch(p) => p.spared,
        }
    }

    /// Write it. A patch is flushed at once: it is small, and would
    /// otherwise wait in the link's buffer for the chunks after it.
    pub(super) async fn write(&self, w: &mut Tx) -> Result<(), ProtocolError> {
        match self {
            Outgoing::Whole(chunk) => {
                proto::write_chunk(w, chunk.index, chunk.codec, &chunk.data).await
            }
            Outgoing::File(chunk) => {
                let head = proto::chunk_head(chunk.index, proto::Codec::Raw, chunk.len);
                crate::node::splice::write_from_file(
                    w,
                    &head,
                    chunk.file(),
                    chunk.offset,
                    chunk.len,
                )
                .await?;
                Ok(())
            }
            Outgoing::Patch(p) => {
                proto::write_msg(w, &p.msg).await?;
                w.flush().await?;
                Ok(())
            }
        }
    }
}

/// Chunk `c` for a node that holds blocks with digests `theirs` (None:
/// unknown): a patch when few enough blocks differ, else the whole chunk.
pub(super) async fn outgoing(
    source: &Arc<ChunkSource>,
    c: usize,
    theirs: Option<Vec<BlockDigest>>,
) -> Result<Outgoing, SourceError> {
    if let Some(theirs) = theirs {
        let s = source.clone();
        let patch = tokio::task::spawn_blocking(move || make_patch(&s, c, &theirs))
            .await
            .map_err(|e| SourceError::Reader(e.to_string()))??;
        if let Some(patch) = patch {
            return Ok(Outgoing::Patch(Box::new(patch)));
        }
    }
    if source.may_splice(c) {
        let s = source.clone();
        let file = tokio::task::spawn_blocking(move || s.from_file(c))
            .await
            .map_err(|e| SourceError::Reader(e.to_string()))??;
        if let Some(chunk) = file {
            return Ok(Outgoing::File(chunk));
        }
    }
    Ok(Outgoing::Whole(source.get(c).await?))
}

/// An agent's report that chunk data failed verification, traced to the
/// image when it is the image that changed: a chunk spliced from the file
/// was never checked here ([`ChunkSource::from_file`]).
pub(super) async fn traced(source: &Arc<ChunkSource>, e: NodeError) -> NodeError {
    let NodeError::Agent {
        kind: proto::ErrorKind::Verify,
        message,
    } = &e
    else {
        return e;
    };
    let Some(c) = proto::failed_chunk(message).filter(|&c| c < source.manifest().digests.len())
    else {
        return e;
    };
    let s = source.clone();
    match tokio::task::spawn_blocking(move || s.raw(c)).await {
        Ok(Err(changed @ SourceError::Changed { .. })) => changed.into(),
        _ => e,
    }
}

fn make_patch(
    source: &ChunkSource,
    c: usize,
    theirs: &[BlockDigest],
) -> Result<Option<Patch>, SourceError> {
    let raw = source.raw(c)?;
    let ours = block_digests(&raw);
    if ours.len() != theirs.len() {
        return Ok(None);
    }
    let len = raw.len();
    if !worth_patching(differing_bytes(&ours, theirs, len), len as u64) {
        return Ok(None);
    }
    let mut blocks = vec![0u8; bitmap_len(ours.len())];
    let mut data = Vec::new();
    for (k, block) in raw.chunks(DELTA_BLOCK).enumerate() {
        if ours[k] != theirs[k] {
            set_bit(&mut blocks, k);
            data.extend_from_slice(block);
        }
    }
    let carried = data.len() as u64;
    let (codec, data) = source.pack(data);
    Ok(Some(Patch {
        wire: data.len() as u64,
        raw: carried,
        spared: len as u64 - carried,
        msg: Msg::Patch {
            // A chunk index of the manifest: it travels as a u32.
            index: c as u32,
            blocks,
            codec,
            data,
        },
    }))
}

/// The bytes of chunk `c` that differ from each of the copies whose block
/// digests are `theirs`, added up: what patching every one of those nodes
/// would send, against one whole chunk down a relay chain.
pub(super) fn differing_total(
    source: &ChunkSource,
    c: usize,
    theirs: &[Arc<BlockMap>],
) -> Result<u64, SourceError> {
    let raw = source.raw(c)?;
    let ours = block_digests(&raw);
    let mut total = 0;
    for map in theirs {
        match map.get(&c) {
            Some(t) if t.len() == ours.len() => total += differing_bytes(&ours, t, raw.len()),
            // Not patchable there: the chunk goes whole anyway.
            _ => return Ok(u64::MAX),
        }
    }
    Ok(total)
}

/// What went out as patches to one node, for its log line.
#[derive(Default)]
pub(super) struct Tally {
    chunks: u64,
    sent: u64,
    of: u64,
}

impl Tally {
    pub(super) fn add(&mut self, out: &Outgoing) {
        if let Outgoing::Patch(p) = out {
            self.chunks += 1;
            self.sent += p.raw;
            self.of += p.raw + p.spared;
        }
    }

    /// Bytes of the patched chunks that the node already held.
    pub(super) fn spared(&self) -> u64 {
        self.of - self.sent
    }

    /// `12 chunks as block patches: 768 KiB of their 48 MiB`, or None.
    pub(super) fn line(&self) -> Option<String> {
        (self.chunks > 0).then(|| {
            format!(
                "{} chunk{} as block patches: {} of their {}",
                self.chunks,
                if self.chunks == 1 { "" } else { "s" },
                human_bytes(self.sent),
                human_bytes(self.of)
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::reader::ImageReader;

    fn source(dir: &tempfile::TempDir, data: &[u8], chunk: u64) -> Arc<ChunkSource> {
        let path = dir.path().join("img");
        std::fs::write(&path, data).unwrap();
        let manifest = Arc::new(Manifest::build(&path, chunk).unwrap());
        ChunkSource::new(
            ImageReader::open(&path).unwrap(),
            manifest,
            3,
            crate::engine::source::CACHE_BYTES,
        )
    }

    #[tokio::test]
    async fn few_differing_blocks_make_a_patch_many_the_whole_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 1 << 20];
        fastrand::Rng::with_seed(3).fill(&mut data);
        let src = source(&dir, &data, 1 << 20);
        let mut node = data.clone();
        node[5] ^= 1;
        node[3 * DELTA_BLOCK + 9] ^= 1;
        let theirs = block_digests(&node);

        let out = outgoing(&src, 0, Some(theirs.clone())).await.unwrap();
        let Outgoing::Patch(p) = &out else {
            panic!("expected a patch")
        };
        assert_eq!(out.raw_len(), 2 * DELTA_BLOCK as u64);
        assert_eq!(out.spared(), (1 << 20) - 2 * DELTA_BLOCK as u64);
        let Msg::Patch { index, blocks, .. } = &p.msg else {
            unreachable!()
        };
        let mut expected = vec![0u8; bitmap_len((1 << 20) / DELTA_BLOCK)];
        expected[0] = 0b1001;
        assert_eq!((*index, blocks.clone()), (0, expected));
        let mut tally = Tally::default();
        tally.add(&out);
        assert_eq!(
            tally.line().unwrap(),
            format!(
                "1 chunk as block patches: {} KiB of their 1.0 MiB",
                2 * DELTA_BLOCK / 1024
            )
        );

        // Thirteen sixteenths of the blocks differ: more than 3/4, the whole chunk.
        let mut far = data.clone();
        for k in 0..(1 << 20) / DELTA_BLOCK * 13 / 16 {
            far[k * DELTA_BLOCK] ^= 1;
        }
        let out = outgoing(&src, 0, Some(block_digests(&far))).await.unwrap();
        assert!(matches!(out, Outgoing::Whole(_) | Outgoing::File(_)));
        // No block differs (the chunk digest did, say by a collision): whole.
        let out = outgoing(&src, 0, Some(block_digests(&data))).await.unwrap();
        assert!(matches!(out, Outgoing::Whole(_) | Outgoing::File(_)));
        // Digests of another shape: whole.
        let out = outgoing(&src, 0, Some(vec![1, 2])).await.unwrap();
        assert!(matches!(out, Outgoing::Whole(_) | Outgoing::File(_)));
        assert_eq!(out.raw_len(), 1 << 20);

        let map = |d: Vec<BlockDigest>| Arc::new(BlockMap::from([(0, d)]));
        let total = differing_total(&src, 0, &[map(theirs.clone()), map(theirs)]).unwrap();
        assert_eq!(total, 4 * DELTA_BLOCK as u64);
        let total = differing_total(&src, 0, &[map(block_digests(&far)), Arc::default()]);
        assert_eq!(total.unwrap(), u64::MAX, "a node without digests");
    }
}
