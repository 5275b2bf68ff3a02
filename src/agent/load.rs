//! A load on the node: plan what the target lacks, receive, verify and
//! write chunks (relaying them when part of a chain), sync and stamp.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use std::os::unix::fs::FileTypeExt;

use crate::agent::delta::{
    Budget, DIGEST_BUDGET, HeldBlocks, apply_patch, held_blocks, send_needed,
};
use crate::agent::env::{AgentEnv, RECEIVE_QUEUE, WORKERS};
use crate::agent::error::{AgentError, closed_as, malformed};
use crate::agent::links::{Event, Events, Inbox, events};
use crate::agent::lock::{Mode, TargetLock};
use crate::agent::relay::Relay;
use crate::agent::replies::Replies;
use crate::agent::stamp::StampFile;
use crate::agent::successor::Frame;
use crate::agent::target::{LoadRequest, Target, TargetKind, open_load_target};
use crate::agent::writeback::Writeback;
use crate::image::digest::{chunk_digest, is_zero};
use crate::proto::{
    Codec, MAX_FRAME, Msg, ProtocolError, STREAM_PIECE, bit, bitmap_len, read_msg_sync, set_bit,
};

pub(super) fn load<R: Read + Send, W: Write>(
    input: &mut R,
    out: &mut Replies<W>,
    env: &AgentEnv,
    req: &LoadRequest,
) -> Result<(), AgentError> {
    let (_lock, target) = lock_and_open(env, req)?;
    let stamp = (target.kind == TargetKind::File).then(|| StampFile::new(env, &target));

    if let Some(stamp) = &stamp
        && !req.force
        && !req.verify
        && stamp.matches(&target, req)
    {
        out.reply(&Msg::Needed {
            up_to_date: true,
            bitmap: vec![],
            bytes_written: 0,
            block_digests: 0,
        })?;
        return match read_msg_sync(input) {
            Err(ProtocolError::Closed) => Ok(()),
            Ok(Msg::Finish) => out.reply(&Msg::Finished { bytes_written: 0 }),
            Ok(Msg::Error { message, .. }) => Err(AgentError::Peer(message)),
            Ok(other) => Err(malformed(format!(
                "expected Finish after an up-to-date reply, got {}",
                other.name()
            ))),
            Err(e) => Err(e.into()),
        };
    }

    // From here on the target changes: a partial load must never look stamped.
    if let Some(stamp) = &stamp {
        stamp.remove()?;
    }
    if target.kind == TargetKind::File && target.old_len < req.layout.size {
        target.file.set_len(req.layout.size).map_err(|e| {
            AgentError::Target(format!(
                "cannot extend {} to {} bytes: {e}",
                target.name, req.layout.size
            ))
        })?;
    }
    let (needed, zeroed, held) = plan(&target, req, &Budget::new(DIGEST_BUDGET))?;
    send_needed(out, &needed, zeroed, held)?;

    let (tx, rx) = events(RECEIVE_QUEUE);
    std::thread::scope(|s| {
        let control = tx.clone();
        s.spawn(move || forward_frames(input, control));
        let mut relay = Relay::new(s, tx);
        let writeback = Writeback::start(s, &target.file);
        let loading = Loading {
            target: &target,
            writeback: &writeback,
            req,
            outstanding: needed,
            bytes_written: zeroed,
            assembly: None,
            replay: None,
            mid_chunk: None,
            orphaned: None,
            end_owed: false,
        };
        let result = receive(rx, out, &mut relay, loading);
        // Close the listener, the relay links and the writeback requests:
        // their threads end before the scope waits for them.
        drop(relay);
        drop(writeback);
        match result {
            Ok(bytes_written) => {
                if let Some(stamp) = &stamp {
                    stamp.write(&target, req);
                }
                out.reply(&Msg::Finished { bytes_written })
            }
            Err(e) => {
                // Before the scope waits for the receiving thread: that thread
                // may be blocked until the controller, told, closes.
                out.report(&e);
                Err(e)
            }
        }
    })
}

/// Take the target's lock, then open it: one load at a time may write a
/// target, and only a load that wrote all of it stamps it. An existing
/// target is locked before it is opened (a block device's exclusive open
/// would otherwise answer "busy" for a run that holds it); a missing file
/// is created first.
fn lock_and_open(env: &AgentEnv, req: &LoadRequest) -> Result<(TargetLock, Target), AgentError> {
    let path = std::path::Path::new(&req.target);
    let lock = |env| TargetLock::take(env, path, Mode::Exclusive, &req.holder);
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() || meta.file_type().is_block_device() => {
            let lock = lock(env)?;
            Ok((lock, open_load_target(req)?))
        }
        _ => {
            let target = open_load_target(req)?;
            Ok((lock(env)?, target))
        }
    }
}

/// What a target lacks: the needed bitmap, the bytes written while
/// zeroing, and the block digests of needed chunks that held data.
pub(super) type Plan = (Vec<u8>, u64, Vec<HeldBlocks>);

/// Decide which chunks the target lacks, zeroing on the way the regions
/// that must read as zero and do not; keep the block digests of needed
/// chunks whose region held data, as far as `budget` allows.
pub(super) fn plan(
    target: &Target,
    req: &LoadRequest,
    budget: &Budget,
) -> Result<Plan, AgentError> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let outcomes: Vec<Result<Worked, AgentError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| s.spawn(|| plan_worker(target, req, budget, &next, &failed)))
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(AgentError::Target("a checking thread failed".into())))
            })
            .collect()
    });
    let mut bitmap = vec![0u8; bitmap_len(req.layout.chunks)];
    let mut zeroed = 0;
    let mut held = Vec::new();
    for outcome in outcomes {
        let (needed, bytes, blocks) = outcome?;
        for i in needed {
            set_bit(&mut bitmap, i);
        }
        zeroed += bytes;
        held.extend(blocks);
    }
    held.sort_unstable_by_key(|h| h.0);
    Ok((bitmap, zeroed, held))
}

/// One checking thread's share: needed chunks, bytes zeroed, block digests.
type Worked = (Vec<usize>, u64, Vec<HeldBlocks>);

pub(super) fn plan_worker(
    target: &Target,
    req: &LoadRequest,
    budget: &Budget,
    next: &AtomicUsize,
    failed: &AtomicBool,
) -> Result<Worked, AgentError> {
    let mut buf = Vec::new();
    let mut needed = Vec::new();
    let mut held = Vec::new();
    let mut zeroed = 0u64;
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= req.layout.chunks || failed.load(Ordering::Relaxed) {
            return Ok((needed, zeroed, held));
        }
        match check_chunk(target, req, i, &mut buf) {
            Ok(Check::Present) => {}
            Ok(Check::Needed) => {
                needed.push(i);
                if let Some(digests) = held_blocks(target, req, i, &buf, budget) {
                    held.push((i, digests));
                }
            }
            Ok(Check::Zeroed(bytes)) => zeroed += bytes,
            Err(e) => {
                failed.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
    }
}

pub(super) enum Check {
    /// The target already holds the chunk.
    Present,
    Needed,
    /// A zero chunk whose region held data and was zeroed now.
    Zeroed(u64),
}

pub(super) fn check_chunk(
    target: &Target,
    req: &LoadRequest,
    i: usize,
    buf: &mut Vec<u8>,
) -> Result<Check, AgentError> {
    let zero = bit(&req.zero, i);
    if req.force && !zero {
        return Ok(Check::Needed);
    }
    let matches = chunk_matches(target, req, i, buf)?;
    Ok(match (zero, matches) {
        (_, true) => Check::Present,
        (false, false) => Check::Needed,
        (true, false) => {
            let len = req.layout.chunk_len(i);
            buf.resize(len, 0);
            buf[..len].fill(0);
            target.zero_region(req.layout.offset(i), &buf[..len])?;
            Check::Zeroed(len as u64)
        }
    })
}

/// Whether the target's chunk `i` already holds the image's (reading it
/// into `buf` when need be): a zero chunk matches a hole or zeros, a data
/// chunk its digest in the manifest. The one compare that a load's check
/// and `status --verify` share. A data chunk past `old_len` never matches.
pub(super) fn chunk_matches(
    target: &Target,
    req: &LoadRequest,
    i: usize,
    buf: &mut Vec<u8>,
) -> Result<bool, AgentError> {
    let offset = req.layout.offset(i);
    let len = req.layout.chunk_len(i);
    if bit(&req.zero, i) {
        if target.is_hole(offset, len) {
            return Ok(true);
        }
        buf.resize(len, 0);
        target.read_at(&mut buf[..len], offset)?;
        return Ok(is_zero(&buf[..len]));
    }
    if offset + len as u64 > target.old_len
        // The image chunk has data: a hole cannot match it.
        || target.is_hole(offset, len)
    {
        return Ok(false);
    }
    buf.resize(len, 0);
    target.read_at(&mut buf[..len], offset)?;
    Ok(chunk_digest(&buf[..len]) == req.digests[i])
}

/// The receiving thread: the controller's frames into the queue until the
/// load's last one.
pub(super) fn forward_frames<R: Read>(input: &mut R, tx: Events) {
    loop {
        let msg = read_msg_sync(input);
        if let Ok(msg) = &msg {
            crate::agent::throttle::throttle_input(msg);
        }
        // After anything else the load ends: reading on would only wait for
        // a controller that waits for us.
        let more = matches!(
            msg,
            Ok(Msg::Chunk { .. }
                | Msg::Patch { .. }
                | Msg::StreamChunk { .. }
                | Msg::StreamPiece { .. }
                | Msg::StreamEnd
                | Msg::RelayListen { .. }
                | Msg::RelayConnect { .. }
                | Msg::Replay { .. })
        );
        if tx.send(Event::Control(msg)).is_err() || !more {
            return;
        }
    }
}

/// Where a StreamChunk from the controller came from, in RelayRefused.
pub(super) const FROM_CONTROLLER: &str = "controller";

/// Verify and write chunks, relay the stream, until Finish; sync. Returns
/// bytes written.
pub(super) fn receive<W: Write>(
    mut rx: Inbox,
    out: &mut Replies<W>,
    relay: &mut Relay<'_, '_>,
    mut load: Loading<'_>,
) -> Result<u64, AgentError> {
    let (target, req) = (load.target, load.req);
    let mut unpacker = Unpacker::new()?;
    loop {
        if let Some(stats) = relay.stats_due() {
            out.reply(&stats)?;
        }
        // A Replay waits for the successor it is for (the RelayConnect
        // before it links in the background).
        if relay.successor.is_some() && load.replay.is_some() && load.mid_chunk.is_none() {
            load.replay(out, relay)?;
        }
        if load.end_owed && !relay.linking && (relay.successor.is_none() || load.replay.is_none()) {
            load.end_owed = false;
            load.stream_end(out, relay)?;
        }
        let event = rx
            .recv()
            .ok_or(AgentError::Closed("before the load finished"))?;
        let msg = match event {
            Event::Control(msg) => msg.map_err(|e| closed_as(e, "before the load finished"))?,
            Event::Relayed { peer, conn, msg } => {
                if relay.takes_from(conn) {
                    load.relayed(out, relay, &mut unpacker, &peer, msg)?;
                }
                continue;
            }
            Event::Refused { peer, reason } => {
                out.reply(&Msg::RelayRefused { peer, reason })?;
                continue;
            }
            Event::Linked {
                attempt,
                addr,
                port,
                result,
            } => {
                if let Some(reply) = relay.linked(attempt, addr, port, result) {
                    out.reply(&reply)?;
                }
                // Linked in the middle of passing a chunk on: the rest of
                // it is of no use to the new successor (nor to anyone after
                // it), which has not had its start.
                if relay.successor.is_some() {
                    load.orphaned = load.mid_chunk;
                }
                continue;
            }
            Event::SuccessorGone { attempt, reason } => {
                if let Some(lost) = relay.successor_gone(attempt, reason) {
                    out.reply(&lost)?;
                }
                continue;
            }
        };
        match msg {
            Msg::Chunk { index, codec, data } => {
                let i = load.chunk_index(index).map_err(malformed)?;
                let bytes = unpacker.unpack(req, i, codec, &data)?;
                load.write(out, i, bytes)?;
            }
            Msg::Patch {
                index,
                blocks,
                codec,
                data,
            } => {
                let i = load.chunk_index(index).map_err(malformed)?;
                let Unpacker { decompressor, buf } = &mut unpacker;
                let bytes = apply_patch(target, req, decompressor, buf, i, &blocks, codec, &data)?;
                load.acknowledge(out, i, bytes)?;
            }
            Msg::StreamChunk { index, codec, data } => {
                let i = load.chunk_index(index).map_err(malformed)?;
                load.stream_chunk(out, relay, &mut unpacker, FROM_CONTROLLER, i, codec, &data)?;
            }
            Msg::StreamPiece {
                index,
                codec,
                offset,
                total,
                data,
            } => {
                let i = load.chunk_index(index).map_err(malformed)?;
                let piece = Piece {
                    i,
                    codec,
                    offset,
                    total,
                    data: &data,
                };
                load.stream_piece(out, relay, &mut unpacker, FROM_CONTROLLER, piece)?;
            }
            Msg::StreamEnd => load.stream_end(out, relay)?,
            Msg::RelayListen {
                secret,
                bind,
                port_min,
                port_max,
            } => {
                let port = relay.listen(&secret, &bind, port_min, port_max)?;
                out.reply(&Msg::RelayPort { port })?;
            }
            Msg::RelayConnect {
                secret,
                addr,
                port,
                lossy,
            } => relay.connect(&secret, addr, port, lossy)?,
            Msg::Replay { bitmap } => {
                if bitmap.len() != bitmap_len(req.layout.chunks) {
                    return Err(malformed(format!(
                        "Replay bitmap of {} bytes for {} chunks",
                        bitmap.len(),
                        req.layout.chunks
                    )));
                }
                load.replay = Some(bitmap);
            }
            Msg::Finish => {
                let layout = req.layout;
                let outstanding = &load.outstanding;
                if let Some(missing) = (0..layout.chunks).find(|&i| bit(outstanding, i)) {
                    let count = (0..layout.chunks).filter(|&i| bit(outstanding, i)).count();
                    return Err(malformed(format!(
                        "Finish before chunk {missing} was written ({count} needed chunks missing)"
                    )));
                }
                finish(target, req)?;
                return Ok(load.bytes_written);
            }
            Msg::Error { message, .. } => return Err(AgentError::Peer(message)),
            other => {
                return Err(malformed(format!(
                    "unexpected {} during a load",
                    other.name()
                )));
            }
        }
    }
}

/// A load between Needed and Finish.
pub(super) struct Loading<'a> {
    pub(super) target: &'a Target,
    /// Starts each written chunk on its way to the disk.
    pub(super) writeback: &'a Writeback,
    pub(super) req: &'a LoadRequest,
    /// Bit i set: chunk i is needed and not yet written.
    pub(super) outstanding: Vec<u8>,
    pub(super) bytes_written: u64,
    /// The pieces received so far of the chunk being streamed in pieces.
    pub(super) assembly: Option<Assembly>,
    /// Chunks to pass on again (Replay), once the successor is linked.
    pub(super) replay: Option<Vec<u8>>,
    /// The chunk whose pieces are being passed on, until its last one.
    pub(super) mid_chunk: Option<usize>,
    /// A chunk whose start the successor did not get (it was linked in the
    /// middle of it): its other pieces are not passed on.
    pub(super) orphaned: Option<usize>,
    /// The stream ended while a relink was under way: the end (and this
    /// node's Missing) waits for the link and for any Replay through it,
    /// or the nodes after this one would never hear of it.
    pub(super) end_owed: bool,
}

/// A chunk arriving in [`Msg::StreamPiece`]s, in order.
pub(super) struct Assembly {
    i: usize,
    codec: Codec,
    total: u32,
    data: Vec<u8>,
}

/// One [`Msg::StreamPiece`], its index checked.
pub(super) struct Piece<'a> {
    pub(super) i: usize,
    pub(super) codec: Codec,
    pub(super) offset: u32,
    pub(super) total: u32,
    pub(super) data: &'a [u8],
}

impl Loading<'_> {
    pub(super) fn chunk_index(&self, index: u32) -> Result<usize, String> {
        let i = index as usize;
        if i < self.req.layout.chunks {
            Ok(i)
        } else {
            Err(format!(
                "chunk index {index} out of range: the image has {} chunks",
                self.req.layout.chunks
            ))
        }
    }

    /// Write chunk `i`'s verified data and acknowledge it.
    pub(super) fn write<W: Write>(
        &mut self,
        out: &mut Replies<W>,
        i: usize,
        bytes: &[u8],
    ) -> Result<(), AgentError> {
        let offset = self.req.layout.offset(i);
        self.target.write_data(bytes, offset)?;
        self.writeback.written(offset, bytes.len() as u64);
        self.acknowledge(out, i, bytes.len() as u64)
    }

    /// Chunk `i` is verified and written (`bytes` of it): acknowledge it.
    pub(super) fn acknowledge<W: Write>(
        &mut self,
        out: &mut Replies<W>,
        i: usize,
        bytes: u64,
    ) -> Result<(), AgentError> {
        self.bytes_written += bytes;
        if let Some(b) = self.outstanding.get_mut(i / 8) {
            *b &= !(1 << (i % 8));
        }
        out.reply(&Msg::Written {
            // i came from a u32.
            index: i as u32,
            bytes_written: self.bytes_written,
        })
    }

    /// A frame from a predecessor: only the stream travels there.
    pub(super) fn relayed<W: Write>(
        &mut self,
        out: &mut Replies<W>,
        relay: &mut Relay<'_, '_>,
        unpacker: &mut Unpacker,
        peer: &str,
        msg: Msg,
    ) -> Result<(), AgentError> {
        let refuse = |reason: String| Msg::RelayRefused {
            peer: peer.to_string(),
            reason,
        };
        match msg {
            Msg::StreamChunk { index, codec, data } => match self.chunk_index(index) {
                Ok(i) => self.stream_chunk(out, relay, unpacker, peer, i, codec, &data),
                Err(reason) => out.reply(&refuse(reason)),
            },
            Msg::StreamPiece {
                index,
                codec,
                offset,
                total,
                data,
            } => match self.chunk_index(index) {
                Ok(i) => {
                    let piece = Piece {
                        i,
                        codec,
                        offset,
                        total,
                        data: &data,
                    };
                    self.stream_piece(out, relay, unpacker, peer, piece)
                }
                Err(reason) => out.reply(&refuse(reason)),
            },
            Msg::StreamEnd => self.stream_end(out, relay),
            // The connection's reader lets nothing else through.
            other => out.reply(&refuse(format!(
                "unexpected {} on a relay connection",
                other.name()
            ))),
        }
    }

    /// Verify and write the chunk if this node needs it, forward it in any
    /// case. Data that fails verification is neither written nor forwarded:
    /// the controller hears of it and sends the chunk directly later.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn stream_chunk<W: Write>(
        &mut self,
        out: &mut Replies<W>,
        relay: &mut Relay<'_, '_>,
        unpacker: &mut Unpacker,
        source: &str,
        i: usize,
        codec: Codec,
        data: &[u8],
    ) -> Result<(), AgentError> {
        let bytes = if bit(&self.outstanding, i) {
            match unpacker.unpack(self.req, i, codec, data) {
                Ok(bytes) => Some(bytes),
                Err(AgentError::Verify(reason)) => {
                    return out.reply(&Msg::RelayRefused {
                        peer: source.to_string(),
                        reason,
                    });
                }
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        // Forward first: the successor's work overlaps with this write.
        // i came from a u32.
        let index = i as u32;
        let frame = Frame::Stream {
            index,
            codec,
            place: None,
            data,
        };
        relay.forward(out, frame)?;
        self.mid_chunk = None;
        match bytes {
            Some(bytes) => self.write(out, i, bytes),
            None => Ok(()),
        }
    }

    /// Cut-through: forward a piece at once, before its chunk is complete
    /// (each node verifies its own copy); keep it if this node needs the
    /// chunk, and write the chunk once its last piece came and it verifies.
    /// Pieces that do not follow on (a relink mid-chunk) drop the chunk:
    /// it stays missing and comes directly from the controller later.
    pub(super) fn stream_piece<W: Write>(
        &mut self,
        out: &mut Replies<W>,
        relay: &mut Relay<'_, '_>,
        unpacker: &mut Unpacker,
        source: &str,
        piece: Piece<'_>,
    ) -> Result<(), AgentError> {
        let Piece {
            i,
            codec,
            offset,
            total,
            data,
        } = piece;
        let refuse = |reason: String| Msg::RelayRefused {
            peer: source.to_string(),
            reason,
        };
        let end = u64::from(offset) + data.len() as u64;
        if end > u64::from(total) || total > MAX_FRAME {
            self.assembly = None;
            return out.reply(&refuse(format!(
                "piece of chunk {i} out of bounds: bytes {offset}..{end} of {total}"
            )));
        }
        // i came from a u32.
        let place = Some((offset, total));
        let frame = Frame::Stream {
            index: i as u32,
            codec,
            place,
            data,
        };
        if self.orphaned.is_some_and(|c| c != i || offset == 0) {
            self.orphaned = None;
        }
        if self.orphaned.is_none() {
            relay.forward(out, frame)?;
        }
        let last = end == u64::from(total);
        if last {
            self.orphaned = None;
        }
        self.mid_chunk = (!last).then_some(i);
        if !bit(&self.outstanding, i) {
            return Ok(());
        }
        if offset == 0 {
            self.assembly = Some(Assembly {
                i,
                codec,
                total,
                data: Vec::with_capacity(total as usize),
            });
        }
        let follows = self.assembly.as_ref().is_some_and(|a| {
            a.i == i && a.codec == codec && a.total == total && a.data.len() == offset as usize
        });
        let Some(assembly) = self.assembly.as_mut().filter(|_| follows) else {
            self.assembly = None;
            return Ok(());
        };
        assembly.data.extend_from_slice(data);
        if assembly.data.len() < total as usize {
            return Ok(());
        }
        let Some(whole) = self.assembly.take() else {
            return Ok(());
        };
        match unpacker.unpack(self.req, i, whole.codec, &whole.data) {
            Ok(bytes) => self.write(out, i, bytes),
            Err(AgentError::Verify(reason)) => out.reply(&refuse(reason)),
            Err(e) => Err(e),
        }
    }

    /// Forward chunk `i`'s verified data to the successor, whole, in
    /// pieces (so each member passes them on as they come, as with the
    /// controller's stream). Only between the stream's chunks: a piece of
    /// another chunk in the middle of one would break the successor's
    /// assembly.
    fn pass_on<W: Write>(
        &mut self,
        out: &mut Replies<W>,
        relay: &mut Relay<'_, '_>,
        i: usize,
        bytes: &[u8],
    ) -> Result<(), AgentError> {
        // i came from a u32, and a chunk's length fits one (MAX_FRAME).
        let total = bytes.len() as u32;
        for (k, data) in bytes.chunks(STREAM_PIECE).enumerate() {
            let frame = Frame::Stream {
                index: i as u32,
                codec: Codec::Raw,
                place: Some(((k * STREAM_PIECE) as u32, total)),
                data,
            };
            relay.forward(out, frame)?;
            if relay.successor.is_none() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Replay: the chunks asked for that this node holds go to the
    /// successor again, read back from the target and verified first (one
    /// that no longer verifies is left to the catch-up). It runs between
    /// the stream's chunks, so none is half assembled; the others are still
    /// to come with the stream.
    pub(super) fn replay<W: Write>(
        &mut self,
        out: &mut Replies<W>,
        relay: &mut Relay<'_, '_>,
    ) -> Result<(), AgentError> {
        let Some(bitmap) = self.replay.take() else {
            return Ok(());
        };
        let layout = self.req.layout;
        let mut buf = Vec::new();
        for i in (0..layout.chunks).filter(|&i| bit(&bitmap, i)) {
            if bit(&self.outstanding, i) {
                continue;
            }
            buf.resize(layout.chunk_len(i), 0);
            self.target.read_at(&mut buf, layout.offset(i))?;
            if chunk_digest(&buf) == self.req.digests[i] {
                self.pass_on(out, relay, i, &buf)?;
            }
        }
        Ok(())
    }

    /// Pass the end of the stream on, then tell the controller what is
    /// missing; while a relink is under way, both wait for it.
    pub(super) fn stream_end<W: Write>(
        &mut self,
        out: &mut Replies<W>,
        relay: &mut Relay<'_, '_>,
    ) -> Result<(), AgentError> {
        if relay.successor.is_none() && relay.linking {
            self.end_owed = true;
            return Ok(());
        }
        let missing = Msg::Missing {
            bitmap: self.outstanding.clone(),
        };
        // A lossy successor (a slow node at the tail) may take a while to
        // take the end: this node's own load does not wait for it.
        let lossy = relay.lossy();
        if lossy {
            out.reply(&missing)?;
        }
        relay.forward(out, Frame::End)?;
        if lossy { Ok(()) } else { out.reply(&missing) }
    }
}

/// Turns a chunk as it travels into its data, checked against the manifest.
pub(super) struct Unpacker {
    pub(super) decompressor: zstd::bulk::Decompressor<'static>,
    pub(super) buf: Vec<u8>,
}

impl Unpacker {
    pub(super) fn new() -> Result<Unpacker, AgentError> {
        Ok(Unpacker {
            decompressor: zstd::bulk::Decompressor::new()
                .map_err(|e| AgentError::Target(format!("cannot start zstd: {e}")))?,
            buf: Vec::new(),
        })
    }

    /// Chunk `i`'s data; any mismatch is `AgentError::Verify`.
    pub(super) fn unpack<'a>(
        &'a mut self,
        req: &LoadRequest,
        i: usize,
        codec: Codec,
        data: &'a [u8],
    ) -> Result<&'a [u8], AgentError> {
        let len = req.layout.chunk_len(i);
        let bytes: &[u8] = match codec {
            Codec::Raw => data,
            Codec::Zstd => {
                self.buf.clear();
                // The capacity bounds the output: at most a chunk (earlier
                // chunks were no larger), checked below.
                self.buf.reserve_exact(len);
                self.decompressor
                    .decompress_to_buffer(data, &mut self.buf)
                    .map_err(|e| {
                        AgentError::Verify(format!(
                            "{}: cannot decompress: {e}",
                            crate::proto::chunk_failed(i)
                        ))
                    })?;
                &self.buf
            }
        };
        if bytes.len() != len {
            return Err(AgentError::Verify(format!(
                "{}: {} bytes, expected {len}",
                crate::proto::chunk_failed(i),
                bytes.len()
            )));
        }
        if chunk_digest(bytes) != req.digests[i] {
            return Err(AgentError::Verify(crate::proto::chunk_failed(i)));
        }
        Ok(bytes)
    }
}

pub(super) fn finish(target: &Target, req: &LoadRequest) -> Result<(), AgentError> {
    if target.kind == TargetKind::File {
        let len = target
            .file
            .metadata()
            .map_err(|e| AgentError::Target(format!("cannot stat {}: {e}", target.name)))?
            .len();
        if len != req.layout.size {
            target.file.set_len(req.layout.size).map_err(|e| {
                AgentError::Target(format!(
                    "cannot truncate {} to {} bytes: {e}",
                    target.name, req.layout.size
                ))
            })?;
        }
    }
    target
        .file
        .sync_all()
        .map_err(|e| AgentError::Target(format!("cannot sync {}: {e}", target.name)))
}

#[cfg(test)]
mod tests {

    use std::fs::OpenOptions;
    use std::os::unix::fs::{FileExt, MetadataExt};
    use std::os::unix::net::UnixStream;

    use crate::agent::error::AgentError;
    use crate::agent::session::serve;

    use crate::agent::testkit::*;
    use crate::proto::{Codec, Msg, read_msg_sync, write_msg_sync};

    #[test]
    fn load_onto_missing_file_writes_image_with_holes() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rzzzzztzzzzzrzzzzzzzzzzzzzzzzz", 1000, 1);
        let data = image.data_chunks();
        assert_eq!(data, vec![0, 6, 12, 30]);

        let (result, replies) = run(&env, &image.load(&target, false, &data));
        result.unwrap();

        let (up_to_date, bitmap, zeroed) = needed(&replies);
        assert!(!up_to_date);
        assert_eq!(bits(&bitmap, image.layout().chunks), data);
        assert_eq!(zeroed, 0);
        let mut total = 0;
        for (reply, &i) in replies[2..].iter().zip(&data) {
            total += image.layout().chunk_len(i) as u64;
            assert_eq!(
                *reply,
                Msg::Written {
                    index: i as u32,
                    bytes_written: total
                }
            );
        }
        assert_eq!(replies.len(), 2 + data.len() + 1);
        assert_eq!(
            replies.last(),
            Some(&Msg::Finished {
                bytes_written: image.bytes_of(&data)
            })
        );

        let written = std::fs::read(&target).unwrap();
        assert_eq!(written.len(), image.data.len());
        assert!(written == image.data, "target bytes differ from the image");
        let meta = std::fs::metadata(&target).unwrap();
        assert!(
            meta.blocks() * 512 < meta.len() / 2,
            "zero chunks should be holes: {} blocks for {} bytes",
            meta.blocks(),
            meta.len()
        );
        assert_eq!(stamps(&env), 1);
    }

    #[test]
    fn zero_blocks_inside_chunks_become_holes_even_over_old_data() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        // Half of every chunk is zero 4 KiB blocks; the old file is all 0xff,
        // so a block left alone instead of zeroed would show.
        let image = Image::new("hhhhhhhh", 0, 3);
        std::fs::write(&target, vec![0xffu8; image.data.len()]).unwrap();
        let data = image.data_chunks();
        assert_eq!(data.len(), 8);

        let (result, _) = run(&env, &image.load(&target, false, &data));
        result.unwrap();

        assert!(std::fs::read(&target).unwrap() == image.data);
        let used = std::fs::metadata(&target).unwrap().blocks() * 512;
        let half = image.data.len() as u64 / 2;
        assert!(
            used >= half && used <= half + 64 * 1024,
            "{used} bytes allocated for {half} bytes of data"
        );
    }

    #[test]
    fn second_load_of_same_image_is_up_to_date() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rtzr", 333, 2);
        run(&env, &image.load(&target, false, &image.data_chunks()))
            .0
            .unwrap();

        // The controller may simply hang up…
        let (result, replies) = run(&env, &[image.begin(&target, false)]);
        result.unwrap();
        assert_eq!(replies.len(), 2);
        assert_eq!(needed(&replies), (true, vec![], 0));

        // …or finish.
        let (result, replies) = run(&env, &[image.begin(&target, false), Msg::Finish]);
        result.unwrap();
        assert_eq!(
            replies[1..],
            [
                Msg::Needed {
                    up_to_date: true,
                    bitmap: vec![],
                    bytes_written: 0,
                    block_digests: 0
                },
                Msg::Finished { bytes_written: 0 }
            ]
        );

        // Another image onto the same file is not up to date.
        let other = Image::new("rtzr", 333, 3);
        let (result, replies) = run(&env, &other.load(&target, false, &other.data_chunks()));
        result.unwrap();
        assert!(!needed(&replies).0);
        assert!(std::fs::read(&target).unwrap() == other.data);
    }

    #[test]
    fn changed_chunks_are_the_only_ones_needed() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rtrtrtrtrt", 4321, 4);
        run(&env, &image.load(&target, false, &image.data_chunks()))
            .0
            .unwrap();

        let file = OpenOptions::new().write(true).open(&target).unwrap();
        for i in [2, 5, 10] {
            file.write_all_at(b"changed", image.layout().offset(i) + 100)
                .unwrap();
        }
        drop(file);

        let (result, replies) = run(&env, &image.load(&target, false, &[2, 5, 10]));
        result.unwrap();
        let (up_to_date, bitmap, zeroed) = needed(&replies);
        assert!(!up_to_date);
        assert_eq!(bits(&bitmap, image.layout().chunks), vec![2, 5, 10]);
        assert_eq!(zeroed, 0);
        assert!(std::fs::read(&target).unwrap() == image.data);
    }

    #[test]
    fn larger_old_file_is_truncated_and_stray_data_zeroed() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rzrz", 100, 5);
        std::fs::write(&target, vec![0xaa; image.data.len() + 3 * CSU]).unwrap();

        let data = image.data_chunks();
        let (result, replies) = run(&env, &image.load(&target, false, &data));
        result.unwrap();
        let (_, bitmap, zeroed) = needed(&replies);
        assert_eq!(bits(&bitmap, image.layout().chunks), data);
        assert_eq!(zeroed, 2 * CS as u64, "chunks 1 and 3 held 0xaa");
        assert_eq!(
            replies.last(),
            Some(&Msg::Finished {
                bytes_written: zeroed + image.bytes_of(&data)
            })
        );
        let written = std::fs::read(&target).unwrap();
        assert_eq!(written.len(), image.data.len());
        assert!(written == image.data);
    }

    #[test]
    fn corrupt_chunk_fails_verification_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rrt", 0, 6);
        let old = vec![0x55; image.data.len()];
        std::fs::write(&target, &old).unwrap();

        let mut bad = image.chunk_data(1).to_vec();
        bad[17] ^= 1;
        let msgs = [
            image.begin(&target, false),
            Msg::Chunk {
                index: 1,
                codec: Codec::Raw,
                data: bad,
            },
            Msg::Finish,
        ];
        let (result, _) = run(&env, &msgs);
        let e = err_of(result);
        assert!(matches!(e, AgentError::Verify(_)), "{e:?}");
        assert_eq!(e.to_string(), "chunk 1 failed verification");
        assert_eq!(e.exit_code(), 3);
        assert!(std::fs::read(&target).unwrap() == old, "nothing written");
        assert_eq!(stamps(&env), 0);

        // Compressed data that expands to the wrong length.
        let short = zstd::bulk::compress(&image.chunk_data(2)[..1000], 3).unwrap();
        let msgs = [
            image.begin(&target, false),
            Msg::Chunk {
                index: 2,
                codec: Codec::Zstd,
                data: short,
            },
        ];
        let e = err_of(run(&env, &msgs).0);
        assert!(
            e.to_string().starts_with("chunk 2 failed verification"),
            "{e}"
        );
        // Compressed data that expands beyond a chunk.
        let long = zstd::bulk::compress(&vec![7u8; 3 * CSU], 3).unwrap();
        let msgs = [
            image.begin(&target, false),
            Msg::Chunk {
                index: 0,
                codec: Codec::Zstd,
                data: long,
            },
        ];
        let e = err_of(run(&env, &msgs).0);
        assert!(matches!(e, AgentError::Verify(_)), "{e:?}");
        assert!(std::fs::read(&target).unwrap() == old, "nothing written");
    }

    #[test]
    fn connection_lost_mid_load_leaves_no_stamp_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rtrtzrtrt", 999, 7);
        let data = image.data_chunks();

        let mut msgs = vec![image.begin(&target, false)];
        msgs.extend([0, 1, 2].map(|i| image.chunk(i)));
        let (result, replies) = run(&env, &msgs);
        let e = err_of(result);
        assert_eq!(e.to_string(), "connection closed before the load finished");
        assert_eq!(e.exit_code(), 3);
        assert_eq!(replies.len(), 2 + 3 + 1, "three Written, then Error");
        assert_eq!(stamps(&env), 0);

        let rest: Vec<usize> = data.iter().copied().filter(|&i| i > 2).collect();
        let (result, replies) = run(&env, &image.load(&target, false, &rest));
        result.unwrap();
        assert_eq!(bits(&needed(&replies).1, image.layout().chunks), rest);
        assert!(std::fs::read(&target).unwrap() == image.data);
        assert_eq!(stamps(&env), 1);
    }

    #[test]
    fn finish_before_needed_chunks_arrive_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rtr", 0, 8);
        let e = err_of(run(&env, &image.load(&target, false, &[0, 2])).0);
        assert!(e.to_string().contains("before chunk 1"), "{e}");
        assert_eq!(e.exit_code(), 2);
        assert_eq!(stamps(&env), 0);
    }

    #[test]
    fn force_needs_every_data_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rztzr", 10, 9);
        let data = image.data_chunks();
        run(&env, &image.load(&target, false, &data)).0.unwrap();

        let (result, replies) = run(&env, &image.load(&target, true, &data));
        result.unwrap();
        let (up_to_date, bitmap, _) = needed(&replies);
        assert!(!up_to_date);
        assert_eq!(bits(&bitmap, image.layout().chunks), data);
        assert_eq!(stamps(&env), 1);
    }

    #[test]
    fn empty_image_is_refused_and_the_target_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        std::fs::write(&target, b"old contents").unwrap();
        let image = Image::new("", 0, 10);
        let e = err_of(run(&env, &image.load(&target, false, &[])).0);
        assert!(e.to_string().contains("0 bytes"), "{e}");
        assert_eq!(e.exit_code(), 2);
        assert_eq!(std::fs::read(&target).unwrap(), b"old contents");
    }

    #[test]
    fn verify_error_reaches_a_controller_that_stays_connected() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("rr", 0, 11);
        let (mut controller, agent) = UnixStream::pair().unwrap();
        let agent_in = agent.try_clone().unwrap();
        std::thread::scope(|s| {
            let session = s.spawn(|| serve(agent_in, agent, &env));
            write_msg_sync(&mut controller, &Msg::hello()).unwrap();
            write_msg_sync(&mut controller, &image.begin(&target, false)).unwrap();
            assert_eq!(read_msg_sync(&mut controller).unwrap(), Msg::hello());
            assert!(matches!(
                read_msg_sync(&mut controller).unwrap(),
                Msg::Needed { .. }
            ));
            let bad = Msg::Chunk {
                index: 0,
                codec: Codec::Raw,
                data: image.chunk_data(1).to_vec(),
            };
            write_msg_sync(&mut controller, &bad).unwrap();
            // The agent answers before the controller closes anything.
            let reply = read_msg_sync(&mut controller).unwrap();
            assert_eq!(
                reply,
                Msg::Error {
                    kind: crate::proto::ErrorKind::Verify,
                    message: "chunk 0 failed verification".into()
                }
            );
            drop(controller);
            let e = err_of(session.join().unwrap());
            assert!(matches!(e, AgentError::Verify(_)));
        });
    }
}
