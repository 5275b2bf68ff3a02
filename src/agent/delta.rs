//! Block-level delta on the node. While checking the target, the agent
//! keeps the digests of the [`DELTA_BLOCK`]s of each needed chunk whose
//! region held data, and sends them after `Needed`; the controller may then
//! send a `Patch` (only the blocks that differ) instead of the chunk. The
//! agent lays the patch over what the target holds and writes the blocks
//! only if the whole chunk then verifies against the manifest: a target
//! that changed in between is an [`AgentError::Stale`], never a wrong write.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::agent::error::{AgentError, malformed};
use crate::agent::replies::Replies;
use crate::agent::target::{LoadRequest, Target};
use crate::image::digest::{BlockDigest, DELTA_BLOCK, block_count, block_digests, chunk_digest};
use crate::proto::{Codec, Msg, bit, bitmap_len};

/// At most this many bytes of block digests per load (8 bytes per 16 KiB
/// block: the needed chunks of 32 GiB of old data); needed chunks beyond
/// it come whole.
pub(super) const DIGEST_BUDGET: usize = 16 << 20;

/// A needed chunk and the digests of its blocks as the target holds them.
pub(super) type HeldBlocks = (usize, Vec<BlockDigest>);

/// The bytes of block digests a load may still keep, shared by the
/// checking threads.
pub(super) struct Budget {
    left: AtomicUsize,
}

impl Budget {
    pub(super) fn new(bytes: usize) -> Budget {
        Budget {
            left: AtomicUsize::new(bytes),
        }
    }

    fn take(&self, bytes: usize) -> bool {
        self.left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(bytes)
            })
            .is_ok()
    }
}

/// The block digests of needed chunk `i`, if its region held data and the
/// budget allows. `buf` is what `check_chunk` read: it reads a data chunk's
/// region unless the load is forced, the region lies beyond the target's
/// old length, or it is a hole — exactly the cases with no digests here.
pub(super) fn held_blocks(
    target: &Target,
    req: &LoadRequest,
    i: usize,
    buf: &[u8],
    budget: &Budget,
) -> Option<Vec<BlockDigest>> {
    let offset = req.layout.offset(i);
    let len = req.layout.chunk_len(i);
    if req.force
        || bit(&req.zero, i)
        || offset + len as u64 > target.old_len
        || buf.len() < len
        || target.is_hole(offset, len)
    {
        return None;
    }
    let bytes = block_count(len) * size_of::<BlockDigest>();
    budget.take(bytes).then(|| block_digests(&buf[..len]))
}

/// `Needed`, then one `BlockDigests` per chunk in `held`, in one flush.
pub(super) fn send_needed<W: Write>(
    out: &mut Replies<W>,
    needed: &[u8],
    zeroed: u64,
    held: Vec<HeldBlocks>,
) -> Result<(), AgentError> {
    let count = u32::try_from(held.len())
        .map_err(|_| AgentError::Target(format!("{} chunks with block digests", held.len())))?;
    let msg = Msg::Needed {
        up_to_date: false,
        bitmap: needed.to_vec(),
        bytes_written: zeroed,
        block_digests: count,
    };
    if held.is_empty() {
        return out.reply(&msg);
    }
    out.send(&msg)?;
    let last = held.len() - 1;
    for (k, (i, digests)) in held.into_iter().enumerate() {
        // i is a chunk index, which travels as a u32.
        let msg = Msg::BlockDigests {
            index: i as u32,
            digests,
        };
        if k == last {
            out.reply(&msg)?;
        } else {
            out.send(&msg)?;
        }
    }
    Ok(())
}

/// Apply a `Patch` to chunk `i`: the blocks of `blocks` from `data` over
/// what the target holds; write them if the chunk then verifies. Returns
/// the bytes written. `zstd` and `buf` unpack the data.
#[allow(clippy::too_many_arguments)]
pub(super) fn apply_patch(
    target: &Target,
    req: &LoadRequest,
    zstd: &mut zstd::bulk::Decompressor<'static>,
    buf: &mut Vec<u8>,
    i: usize,
    blocks: &[u8],
    codec: Codec,
    data: &[u8],
) -> Result<u64, AgentError> {
    let len = req.layout.chunk_len(i);
    let offset = req.layout.offset(i);
    let n = block_count(len);
    if blocks.len() != bitmap_len(n) || (n..blocks.len() * 8).any(|k| bit(blocks, k)) {
        return Err(malformed(format!(
            "Patch of chunk {i}: a block bitmap of {} bytes for {n} blocks",
            blocks.len()
        )));
    }
    let block = |k: usize| k * DELTA_BLOCK..((k + 1) * DELTA_BLOCK).min(len);
    let chosen: Vec<usize> = (0..n).filter(|&k| bit(blocks, k)).collect();
    let expected: usize = chosen.iter().map(|&k| block(k).len()).sum();
    let patch = unpack_patch(zstd, buf, i, codec, data, expected)?;

    let mut chunk = vec![0u8; len];
    target.read_at(&mut chunk, offset)?;
    let mut at = 0;
    for &k in &chosen {
        let range = block(k);
        let end = at + range.len();
        chunk[range].copy_from_slice(&patch[at..end]);
        at = end;
    }
    if chunk_digest(&chunk) != req.digests[i] {
        return Err(AgentError::Stale(format!(
            "chunk {i}: the patch does not verify over what {} holds (it changed since it was checked); nothing written",
            target.name
        )));
    }
    // Runs of patched blocks, each written at once.
    let mut k = 0;
    while k < chosen.len() {
        let first = chosen[k];
        let mut last = first;
        while k + 1 < chosen.len() && chosen[k + 1] == last + 1 {
            k += 1;
            last = chosen[k];
        }
        let run = block(first).start..block(last).end;
        target.write_data(&chunk[run.clone()], offset + run.start as u64)?;
        k += 1;
    }
    Ok(expected as u64)
}

/// A patch's data for chunk `i`: exactly `expected` bytes once unpacked.
fn unpack_patch<'a>(
    zstd: &mut zstd::bulk::Decompressor<'static>,
    buf: &'a mut Vec<u8>,
    i: usize,
    codec: Codec,
    data: &'a [u8],
    expected: usize,
) -> Result<&'a [u8], AgentError> {
    let bytes: &[u8] = match codec {
        Codec::Raw => data,
        Codec::Zstd => {
            buf.clear();
            buf.reserve_exact(expected);
            zstd.decompress_to_buffer(data, buf).map_err(|e| {
                AgentError::Verify(format!(
                    "patch of chunk {i} failed verification: cannot decompress: {e}"
                ))
            })?;
            buf
        }
    };
    if bytes.len() != expected {
        return Err(AgentError::Verify(format!(
            "patch of chunk {i} failed verification: {} bytes for blocks of {expected}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests;
