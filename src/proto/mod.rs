//! The agent protocol, shared by the controller and `imaging agent`.
//!
//! A frame is `len: u32 LE` followed by `len` bytes: a one-byte tag and the
//! message body. Integers are little-endian; strings and byte strings are a
//! `u32` length and the bytes. Readers refuse a frame longer than
//! [`MAX_FRAME`] before allocating it, and decoding checks every length
//! against what is left, so garbage gives an error, never a panic.
//!
//! Load:  C→A Hello, A→C Hello, C→A LoadBegin, A→C Needed, A→C BlockDigests…
//!        (as many as Needed announces), C→A Chunk or Patch… (A→C Written
//!        after each), C→A Finish, A→C Finished.
//! Save:  C→A Hello, A→C Hello, C→A SaveBegin, A→C SaveInfo, A→C SaveChunk…, A→C SaveEnd;
//!        A→C Note (a line for the run's log) may come anywhere after SaveInfo.
//! Status: C→A Hello, A→C Hello, C→A StatusBegin, A→C StatusReport (the
//!        targets' stamps and file state, none of them read); then, for each
//!        target to verify, C→A VerifyBegin, A→C VerifyProgress…, A→C
//!        VerifyResult; the controller closes when done.
//! Clean:  C→A Hello, A→C Hello, C→A CleanBegin, A→C CleanReport.
//! Either side may send Error instead of its next message and then stop.
//!
//! Relay (a load's chain, after Needed): C→A RelayListen, A→C RelayPort;
//! C→A RelayConnect, A→C RelayLinked or RelayLost; C→head StreamChunk…,
//! each agent writing what it needs (A→C Written) and forwarding every
//! StreamChunk to its successor over TCP; StreamEnd travels the same way and
//! each agent answers it with Missing. Missing chunks then come as Chunk;
//! Finish ends the load as without a relay. While it forwards, an agent
//! sends A→C RelayStats now and then (how long it waited on its successor).
//! After a slow member is moved out, C→A Replay asks its predecessor to pass
//! the chunks it holds on again to its new successor, from its own target.

pub mod cursor;
mod load_begin;
pub mod pipes;
pub mod relay;
pub mod status;

pub use load_begin::LoadBegin;
pub use relay::RELAY_SECRET_LEN;

use std::io;

use cursor::{Cursor, Truncated};

use crate::image::digest::BlockDigest;
pub use crate::image::digest::DELTA_BLOCK;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const MAGIC: [u8; 8] = *b"IMAGING\0";
/// 2: SaveBegin carries `raw`; the agent sends Note during a save;
/// LoadBegin names the image and SaveInfo says what the target held.
/// 3: LoadBegin carries `verify` and `holder`, SaveBegin `holder`.
/// 4: Error carries its kind.
/// 5: StreamPiece (a relay chain forwards a chunk's pieces as they come).
/// 6: LoadBegin carries the controller's user and host (for the stamp);
/// StatusBegin, StatusReport, VerifyBegin, VerifyProgress, VerifyResult,
/// CleanBegin, CleanReport.
/// 8: VerifyResult carries the bitmap of the chunks that differ.
/// 9: RelayConnect carries `lossy` (and port 0 drops the successor);
/// RelayStats.
/// 10: block-level delta: Needed announces BlockDigests, Patch, the error
/// kind Stale.
/// 11: Replay.
pub const VERSION: u16 = 11;

/// What an `Error` frame is about, so the other side acts on it without
/// reading its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Anything not below (and kinds from a newer peer).
    Other = 0,
    /// Malformed or unexpected protocol input.
    Protocol = 1,
    /// The target cannot be used (refused, busy, missing, no space, I/O).
    Target = 2,
    /// Data that does not match the manifest.
    Verify = 3,
    /// The connection went away mid-request.
    Closed = 4,
    /// The relay listener or link failed.
    Relay = 5,
    /// A patch did not verify over what the target holds: the target
    /// changed since the agent checked it. A fresh attempt sorts it out.
    Stale = 6,
}

impl ErrorKind {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => ErrorKind::Protocol,
            2 => ErrorKind::Target,
            3 => ErrorKind::Verify,
            4 => ErrorKind::Closed,
            5 => ErrorKind::Relay,
            6 => ErrorKind::Stale,
            _ => ErrorKind::Other,
        }
    }
}
/// Largest frame either side accepts: the largest chunk plus headroom.
pub const MAX_FRAME: u32 = crate::image::MAX_CHUNK_SIZE + (1 << 20);

/// How a chunk's bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Hello {
        magic: [u8; 8],
        version: u16,
        /// Free text: the sender's build (`imaging 0.1.0`).
        build: String,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
    LoadBegin(LoadBegin),
    Needed {
        up_to_date: bool,
        /// Bit i set: the agent needs chunk i's data.
        bitmap: Vec<u8>,
        /// Bytes the agent already wrote while checking (zeroing regions).
        bytes_written: u64,
        /// BlockDigests frames that follow, one per needed chunk whose
        /// region on the target held data (within the agent's memory bound).
        block_digests: u32,
    },
    /// The digests of a needed chunk's [`DELTA_BLOCK`]s as the target holds
    /// them: the controller may answer with a Patch instead of the Chunk.
    BlockDigests {
        index: u32,
        digests: Vec<BlockDigest>,
    },
    /// Chunk `index` as the blocks that differ from what the target holds:
    /// bit k of `blocks` set means block k is in `data` (the blocks in order,
    /// concatenated, then packed with `codec`). The agent lays them over its
    /// copy and writes them only if the whole chunk then verifies.
    Patch {
        index: u32,
        blocks: Vec<u8>,
        codec: Codec,
        data: Vec<u8>,
    },
    Chunk {
        index: u32,
        codec: Codec,
        data: Vec<u8>,
    },
    Written {
        index: u32,
        bytes_written: u64,
    },
    Finish,
    Finished {
        bytes_written: u64,
    },
    SaveBegin {
        target: String,
        chunk_size: u32,
        /// zstd level for the data; 0 = raw.
        level: i32,
        /// Read every block: no free-block analysis of the target.
        raw: bool,
        /// As in LoadBegin.
        holder: String,
    },
    SaveInfo {
        size: u64,
        /// What the target's stamp says was last loaded onto it. Optional
        /// on the wire: absent decodes as None.
        held: Option<HeldImage>,
    },
    SaveChunk {
        index: u32,
        digest: u128,
        zero: bool,
        codec: Codec,
        data: Vec<u8>,
    },
    SaveEnd,
    /// A line for the run's log (what the agent found on the target).
    Note {
        text: String,
    },
    /// Open the relay listener: `bind` is an IP address ("" = 0.0.0.0); the
    /// first free port of `port_min..=port_max` ((0, 0) = any free port).
    RelayListen {
        /// Exactly [`RELAY_SECRET_LEN`] bytes.
        secret: Vec<u8>,
        bind: String,
        port_min: u16,
        port_max: u16,
    },
    /// Reply to RelayListen: the port the listener took.
    RelayPort {
        port: u16,
    },
    /// Connect to the successor, replacing any previous one; port 0: drop
    /// the successor and forward to nobody (no reply).
    RelayConnect {
        /// Exactly [`RELAY_SECRET_LEN`] bytes.
        secret: Vec<u8>,
        addr: String,
        port: u16,
        /// The successor is slow (moved to the tail of the chain): never
        /// wait for it; a chunk it cannot take at once is skipped (it gets
        /// it directly after the stream).
        lossy: bool,
    },
    /// How long the agent waited on its successor so far (in writes that
    /// did not go through at once, counted while they wait), and how many
    /// bytes its successors took (acknowledged): the controller finds the
    /// member that holds the chain back from these.
    RelayStats {
        forwarded: u64,
        blocked_ms: u64,
    },
    /// To the predecessor of a member moved out of the chain: forward the
    /// chunks of `bitmap` that this node holds to the successor again, read
    /// back from its target (each verified first), between the stream's
    /// chunks; the others still come with the stream. The members after the
    /// moved one lack them.
    Replay {
        bitmap: Vec<u8>,
    },
    /// Reply to RelayConnect: connected and authenticated.
    RelayLinked {
        addr: String,
        port: u16,
    },
    /// A RelayConnect failed, or the successor link broke or stalled; the
    /// agent carries on without a successor.
    RelayLost {
        /// The successor (`addr:port`) the loss is about: after a relink, a
        /// late report about the old successor must not cut the new one.
        peer: String,
        reason: String,
    },
    /// An incoming relay connection failed authentication or misbehaved (or
    /// relayed a chunk that failed verification); the listener keeps going.
    RelayRefused {
        peer: String,
        reason: String,
    },
    /// A chunk to write if needed and to forward to the successor.
    StreamChunk {
        index: u32,
        codec: Codec,
        data: Vec<u8>,
    },
    /// The end of the stream: forwarded, then answered with Missing.
    StreamEnd,
    /// A piece of a chunk's wire data (`data` is bytes `offset..` of the
    /// `total` the chunk takes in `codec`): a relay forwards it as it
    /// arrives (cut-through) and writes the chunk once all of it came and
    /// verified. The controller streams chunks larger than [`STREAM_PIECE`]
    /// this way, so the chain's fill time does not grow with chunk size.
    StreamPiece {
        index: u32,
        codec: Codec,
        offset: u32,
        total: u32,
        data: Vec<u8>,
    },
    /// Bit i set: chunk i is needed and not yet verified and written.
    Missing {
        bitmap: Vec<u8>,
    },
    /// What each target holds, from its stamp and its metadata only. A
    /// target containing `{image}` is a pattern: every file of its
    /// directory that matches is reported.
    StatusBegin {
        targets: Vec<String>,
    },
    StatusReport(status::StatusReport),
    /// Read one target and compare it chunk by chunk with an image.
    VerifyBegin(status::VerifyBegin),
    /// Bytes of the target checked so far.
    VerifyProgress {
        bytes_checked: u64,
    },
    VerifyResult(status::VerifyResult),
    /// Remove the stamped image files of a target pattern's directory that
    /// are not kept.
    CleanBegin(status::CleanBegin),
    CleanReport(status::CleanReport),
}

/// The image a target was last loaded with, from its stamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldImage {
    pub identity: u128,
    /// "" when the load that stamped it did not say.
    pub image: String,
}

impl Msg {
    pub fn hello() -> Msg {
        Msg::Hello {
            magic: MAGIC,
            version: VERSION,
            build: format!("imaging {}", env!("CARGO_PKG_VERSION")),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "Hello",
            Msg::Error { .. } => "Error",
            Msg::LoadBegin(_) => "LoadBegin",
            Msg::Needed { .. } => "Needed",
            Msg::BlockDigests { .. } => "BlockDigests",
            Msg::Patch { .. } => "Patch",
            Msg::Chunk { .. } => "Chunk",
            Msg::Written { .. } => "Written",
            Msg::Finish => "Finish",
            Msg::Finished { .. } => "Finished",
            Msg::SaveBegin { .. } => "SaveBegin",
            Msg::SaveInfo { .. } => "SaveInfo",
            Msg::SaveChunk { .. } => "SaveChunk",
            Msg::SaveEnd => "SaveEnd",
            Msg::Note { .. } => "Note",
            Msg::RelayListen { .. } => "RelayListen",
            Msg::RelayPort { .. } => "RelayPort",
            Msg::RelayConnect { .. } => "RelayConnect",
            Msg::RelayStats { .. } => "RelayStats",
            Msg::Replay { .. } => "Replay",
            Msg::RelayLinked { .. } => "RelayLinked",
            Msg::RelayLost { .. } => "RelayLost",
            Msg::RelayRefused { .. } => "RelayRefused",
            Msg::StreamChunk { .. } => "StreamChunk",
            Msg::StreamEnd => "StreamEnd",
            Msg::StreamPiece { .. } => "StreamPiece",
            Msg::Missing { .. } => "Missing",
            Msg::StatusBegin { .. } => "StatusBegin",
            Msg::StatusReport(_) => "StatusReport",
            Msg::VerifyBegin(_) => "VerifyBegin",
            Msg::VerifyProgress { .. } => "VerifyProgress",
            Msg::VerifyResult(_) => "VerifyResult",
            Msg::CleanBegin(_) => "CleanBegin",
            Msg::CleanReport(_) => "CleanReport",
        }
    }

    fn tag(&self) -> u8 {
        match self {
            Msg::Hello { .. } => 1,
            Msg::Error { .. } => 2,
            Msg::LoadBegin(_) => 10,
            Msg::Needed { .. } => 11,
            Msg::Chunk { .. } => 12,
            Msg::Written { .. } => 13,
            Msg::Finish => 14,
            Msg::Finished { .. } => 15,
            Msg::SaveBegin { .. } => 20,
            Msg::SaveInfo { .. } => 21,
            Msg::SaveChunk { .. } => 22,
            Msg::SaveEnd => 23,
            Msg::Note { .. } => 24,
            Msg::RelayListen { .. } => 30,
            Msg::RelayPort { .. } => 31,
            Msg::RelayConnect { .. } => 32,
            Msg::RelayLinked { .. } => 33,
            Msg::RelayLost { .. } => 34,
            Msg::RelayRefused { .. } => 35,
            Msg::StreamChunk { .. } => STREAM_CHUNK_TAG,
            Msg::StreamEnd => 37,
            Msg::StreamPiece { .. } => STREAM_PIECE_TAG,
            Msg::Missing { .. } => 38,
            Msg::RelayStats { .. } => 39,
            Msg::Replay { .. } => 40,
            Msg::StatusBegin { .. } => 50,
            Msg::StatusReport(_) => 51,
            Msg::VerifyBegin(_) => 52,
            Msg::VerifyProgress { .. } => 53,
            Msg::VerifyResult(_) => 54,
            Msg::CleanBegin(_) => 55,
            Msg::CleanReport(_) => 56,
            Msg::BlockDigests { .. } => 60,
            Msg::Patch { .. } => 61,
        }
    }

    /// The frame body (tag and fields, without the length prefix).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![self.tag()];
        match self {
            Msg::Hello {
                magic,
                version,
                build,
            } => {
                b.extend_from_slice(magic);
                b.extend_from_slice(&version.to_le_bytes());
                put_bytes(&mut b, build.as_bytes());
            }
            Msg::Error { kind, message } => {
                b.push(*kind as u8);
                put_bytes(&mut b, message.as_bytes());
            }
            Msg::LoadBegin(begin) => put_load_begin(&mut b, begin),
            Msg::Needed {
                up_to_date,
                bitmap,
                bytes_written,
                block_digests,
            } => {
                b.push(*up_to_date as u8);
                put_bytes(&mut b, bitmap);
                b.extend_from_slice(&bytes_written.to_le_bytes());
                b.extend_from_slice(&block_digests.to_le_bytes());
            }
            Msg::BlockDigests { index, digests } => {
                b.extend_from_slice(&index.to_le_bytes());
                b.extend_from_slice(&(digests.len() as u32).to_le_bytes());
                for d in digests {
                    b.extend_from_slice(&d.to_le_bytes());
                }
            }
            Msg::Patch {
                index,
                blocks,
                codec,
                data,
            } => {
                b.extend_from_slice(&index.to_le_bytes());
                put_bytes(&mut b, blocks);
                b.push(*codec as u8);
                put_bytes(&mut b, data);
            }
            Msg::Chunk { index, codec, data } | Msg::StreamChunk { index, codec, data } => {
                b.extend_from_slice(&index.to_le_bytes());
                b.push(*codec as u8);
                put_bytes(&mut b, data);
            }
            Msg::StreamPiece {
                index,
                codec,
                offset,
                total,
                data,
            } => {
                b.extend_from_slice(&index.to_le_bytes());
                b.push(*codec as u8);
                b.extend_from_slice(&offset.to_le_bytes());
                b.extend_from_slice(&total.to_le_bytes());
                put_bytes(&mut b, data);
            }
            Msg::Written {
                index,
                bytes_written,
            } => {
                b.extend_from_slice(&index.to_le_bytes());
                b.extend_from_slice(&bytes_written.to_le_bytes());
            }
            Msg::Finish | Msg::SaveEnd | Msg::StreamEnd => {}
            Msg::Finished { bytes_written } => b.extend_from_slice(&bytes_written.to_le_bytes()),
            Msg::SaveBegin {
                target,
                chunk_size,
                level,
                raw,
                holder,
            } => {
                put_bytes(&mut b, target.as_bytes());
                b.extend_from_slice(&chunk_size.to_le_bytes());
                b.extend_from_slice(&level.to_le_bytes());
                b.push(*raw as u8);
                put_bytes(&mut b, holder.as_bytes());
            }
            Msg::Note { text } => put_bytes(&mut b, text.as_bytes()),
            Msg::SaveInfo { size, held } => {
                b.extend_from_slice(&size.to_le_bytes());
                match held {
                    None => b.push(0),
                    Some(h) => {
                        b.push(1);
                        b.extend_from_slice(&h.identity.to_le_bytes());
                        put_bytes(&mut b, h.image.as_bytes());
                    }
                }
            }
            Msg::SaveChunk {
                index,
                digest,
                zero,
                codec,
                data,
            } => {
                b.extend_from_slice(&index.to_le_bytes());
                b.extend_from_slice(&digest.to_le_bytes());
                b.push(*zero as u8);
                b.push(*codec as u8);
                put_bytes(&mut b, data);
            }
            Msg::RelayListen {
                secret,
                bind,
                port_min,
                port_max,
            } => {
                put_bytes(&mut b, secret);
                put_bytes(&mut b, bind.as_bytes());
                b.extend_from_slice(&port_min.to_le_bytes());
                b.extend_from_slice(&port_max.to_le_bytes());
            }
            Msg::RelayPort { port } => b.extend_from_slice(&port.to_le_bytes()),
            Msg::RelayConnect {
                secret,
                addr,
                port,
                lossy,
            } => {
                put_bytes(&mut b, secret);
                put_bytes(&mut b, addr.as_bytes());
                b.extend_from_slice(&port.to_le_bytes());
                b.push(u8::from(*lossy));
            }
            Msg::RelayStats {
                forwarded,
                blocked_ms,
            } => {
                b.extend_from_slice(&forwarded.to_le_bytes());
                b.extend_from_slice(&blocked_ms.to_le_bytes());
            }
            Msg::RelayLinked { addr, port } => {
                put_bytes(&mut b, addr.as_bytes());
                b.extend_from_slice(&port.to_le_bytes());
            }
            Msg::RelayLost { peer, reason } => {
                put_bytes(&mut b, peer.as_bytes());
                put_bytes(&mut b, reason.as_bytes());
            }
            Msg::RelayRefused { peer, reason } => {
                put_bytes(&mut b, peer.as_bytes());
                put_bytes(&mut b, reason.as_bytes());
            }
            Msg::Missing { bitmap } | Msg::Replay { bitmap } => put_bytes(&mut b, bitmap),
            Msg::StatusBegin { targets } => {
                b.extend_from_slice(&(targets.len() as u32).to_le_bytes());
                for t in targets {
                    put_bytes(&mut b, t.as_bytes());
                }
            }
            Msg::StatusReport(r) => r.encode(&mut b),
            Msg::VerifyBegin(v) => v.encode(&mut b),
            Msg::VerifyProgress { bytes_checked } => {
                b.extend_from_slice(&bytes_checked.to_le_bytes())
            }
            Msg::VerifyResult(r) => r.encode(&mut b),
            Msg::CleanBegin(c) => c.encode(&mut b),
            Msg::CleanReport(r) => r.encode(&mut b),
        }
        b
    }

    pub fn decode(body: &[u8]) -> Result<Msg, ProtocolError> {
        let mut r = Reader {
            cur: Cursor::new(body),
        };
        let tag = r.u8("tag")?;
        let msg = match tag {
            1 => {
                let magic: [u8; 8] = r.array("magic")?;
                Msg::Hello {
                    magic,
                    version: r.u16("version")?,
                    build: r.string("build")?,
                }
            }
            2 => Msg::Error {
                kind: ErrorKind::from_u8(r.u8("kind")?),
                message: r.string("message")?,
            },
            10 => Msg::LoadBegin(load_begin(&mut r)?),
            11 => Msg::Needed {
                up_to_date: r.bool("up_to_date")?,
                bitmap: r.bytes("bitmap")?,
                bytes_written: r.u64("bytes_written")?,
                block_digests: r.u32("block_digests")?,
            },
            60 => {
                let index = r.u32("index")?;
                let n = r.u32("block digest count")? as usize;
                if n > r.remaining() / 8 {
                    return Err(ProtocolError::Malformed(format!(
                        "BlockDigests announces {n} digests but the frame holds fewer"
                    )));
                }
                let mut digests = Vec::with_capacity(n);
                for _ in 0..n {
                    digests.push(r.u64("block digest")?);
                }
                Msg::BlockDigests { index, digests }
            }
            61 => Msg::Patch {
                index: r.u32("index")?,
                blocks: r.bytes("blocks")?,
                codec: r.codec()?,
                data: r.bytes("data")?,
            },
            12 => Msg::Chunk {
                index: r.u32("index")?,
                codec: r.codec()?,
                data: r.bytes("data")?,
            },
            13 => Msg::Written {
                index: r.u32("index")?,
                bytes_written: r.u64("bytes_written")?,
            },
            14 => Msg::Finish,
            15 => Msg::Finished {
                bytes_written: r.u64("bytes_written")?,
            },
            20 => Msg::SaveBegin {
                target: r.string("target")?,
                chunk_size: r.u32("chunk_size")?,
                level: r.i32("level")?,
                raw: r.bool("raw")?,
                holder: r.string("holder")?,
            },
            21 => Msg::SaveInfo {
                size: r.u64("size")?,
                held: if r.remaining() == 0 || !r.bool("held")? {
                    None
                } else {
                    Some(HeldImage {
                        identity: r.u128("held identity")?,
                        image: r.string("held image")?,
                    })
                },
            },
            22 => Msg::SaveChunk {
                index: r.u32("index")?,
                digest: r.u128("digest")?,
                zero: r.bool("zero")?,
                codec: r.codec()?,
                data: r.bytes("data")?,
            },
            23 => Msg::SaveEnd,
            24 => Msg::Note {
                text: r.string("text")?,
            },
            30 => Msg::RelayListen {
                secret: r.secret()?,
                bind: r.string("bind")?,
                port_min: r.u16("port_min")?,
                port_max: r.u16("port_max")?,
            },
            31 => Msg::RelayPort {
                port: r.u16("port")?,
            },
            32 => Msg::RelayConnect {
                secret: r.secret()?,
                addr: r.string("addr")?,
                port: r.u16("port")?,
                lossy: r.bool("lossy")?,
            },
            33 => Msg::RelayLinked {
                addr: r.string("addr")?,
                port: r.u16("port")?,
            },
            34 => Msg::RelayLost {
                peer: r.string("peer")?,
                reason: r.string("reason")?,
            },
            35 => Msg::RelayRefused {
                peer: r.string("peer")?,
                reason: r.string("reason")?,
            },
            STREAM_CHUNK_TAG => Msg::StreamChunk {
                index: r.u32("index")?,
                codec: r.codec()?,
                data: r.bytes("data")?,
            },
            37 => Msg::StreamEnd,
            STREAM_PIECE_TAG => Msg::StreamPiece {
                index: r.u32("index")?,
                codec: r.codec()?,
                offset: r.u32("offset")?,
                total: r.u32("total")?,
                data: r.bytes("data")?,
            },
            38 => Msg::Missing {
                bitmap: r.bytes("bitmap")?,
            },
            39 => Msg::RelayStats {
                forwarded: r.u64("forwarded")?,
                blocked_ms: r.u64("blocked_ms")?,
            },
            40 => Msg::Replay {
                bitmap: r.bytes("bitmap")?,
            },
            50 => {
                let n = r.u32("target count")? as usize;
                // Each takes at least its 4-byte length.
                if n > r.remaining() / 4 {
                    return Err(ProtocolError::Malformed(format!(
                        "StatusBegin announces {n} targets but the frame holds fewer"
                    )));
                }
                let mut targets = Vec::with_capacity(n);
                for _ in 0..n {
                    targets.push(r.string("target")?);
                }
                Msg::StatusBegin { targets }
            }
            51 => Msg::StatusReport(status::StatusReport::decode(&mut r.cur)?),
            52 => Msg::VerifyBegin(status::VerifyBegin::decode(&mut r.cur)?),
            53 => Msg::VerifyProgress {
                bytes_checked: r.u64("bytes_checked")?,
            },
            54 => Msg::VerifyResult(status::VerifyResult::decode(&mut r.cur)?),
            55 => Msg::CleanBegin(status::CleanBegin::decode(&mut r.cur)?),
            56 => Msg::CleanReport(status::CleanReport::decode(&mut r.cur)?),
            other => {
                return Err(ProtocolError::Malformed(format!(
                    "unknown message tag {other}"
                )));
            }
        };
        if r.remaining() != 0 {
            return Err(ProtocolError::Malformed(format!(
                "{} has {} unexpected trailing bytes",
                msg.name(),
                r.remaining()
            )));
        }
        Ok(msg)
    }
}

const STREAM_CHUNK_TAG: u8 = 36;
const STREAM_PIECE_TAG: u8 = 45;

/// The size of the pieces a chunk is streamed in down a relay chain: each
/// hop adds about one piece's transfer time, not one chunk's.
pub const STREAM_PIECE: usize = 256 << 10;

fn put_load_begin(b: &mut Vec<u8>, begin: &LoadBegin) {
    put_bytes(b, begin.target.as_bytes());
    b.extend_from_slice(&begin.size.to_le_bytes());
    b.extend_from_slice(&begin.chunk_size.to_le_bytes());
    b.extend_from_slice(&begin.identity.to_le_bytes());
    b.push(begin.force as u8);
    b.push(begin.force_mounted as u8);
    b.push(begin.verify as u8);
    put_bytes(b, begin.holder.as_bytes());
    b.extend_from_slice(&(begin.digests.len() as u32).to_le_bytes());
    for d in &begin.digests {
        b.extend_from_slice(&d.to_le_bytes());
    }
    put_bytes(b, &begin.zero);
    put_bytes(b, begin.image.as_bytes());
    put_bytes(b, begin.user.as_bytes());
    put_bytes(b, begin.host.as_bytes());
}

fn load_begin(r: &mut Reader<'_>) -> Result<LoadBegin, ProtocolError> {
    let target = r.string("target")?;
    let size = r.u64("size")?;
    let chunk_size = r.u32("chunk_size")?;
    let identity = r.u128("identity")?;
    let force = r.bool("force")?;
    let force_mounted = r.bool("force_mounted")?;
    let verify = r.bool("verify")?;
    let holder = r.string("holder")?;
    let n = r.u32("digest count")? as usize;
    if n > r.remaining() / 16 {
        return Err(ProtocolError::Malformed(format!(
            "LoadBegin announces {n} digests but the frame holds fewer"
        )));
    }
    let mut digests = Vec::with_capacity(n);
    for _ in 0..n {
        digests.push(r.u128("digest")?);
    }
    Ok(LoadBegin {
        target,
        size,
        chunk_size,
        identity,
        force,
        force_mounted,
        verify,
        holder,
        digests,
        zero: r.bytes("zero bitmap")?,
        image: r.optional_string("image")?,
        user: r.optional_string("user")?,
        host: r.optional_string("host")?,
    })
}

fn put_bytes(b: &mut Vec<u8>, data: &[u8]) {
    b.extend_from_slice(&(data.len() as u32).to_le_bytes());
    b.extend_from_slice(data);
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes refused (the limit is {MAX_FRAME})")]
    TooLarge(u32),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("the peer speaks protocol version {0}, this build speaks {VERSION}")]
    Version(u16),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// The shared [`Cursor`] plus the wire's own field kinds.
struct Reader<'a> {
    cur: Cursor<'a>,
}

impl<'a> std::ops::Deref for Reader<'a> {
    type Target = Cursor<'a>;
    fn deref(&self) -> &Cursor<'a> {
        &self.cur
    }
}

impl std::ops::DerefMut for Reader<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.cur
    }
}

impl From<status::Malformed> for ProtocolError {
    fn from(m: status::Malformed) -> ProtocolError {
        ProtocolError::Malformed(m.0)
    }
}

impl From<Truncated> for ProtocolError {
    fn from(t: Truncated) -> ProtocolError {
        ProtocolError::Malformed(t.to_string())
    }
}

impl Reader<'_> {
    fn bool(&mut self, what: &str) -> Result<bool, ProtocolError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(ProtocolError::Malformed(format!(
                "{what} is {v}, not 0 or 1"
            ))),
        }
    }
    fn bytes(&mut self, what: &str) -> Result<Vec<u8>, ProtocolError> {
        let n = self.u32(what)? as usize;
        Ok(self.take(n, what)?.to_vec())
    }
    fn string(&mut self, what: &str) -> Result<String, ProtocolError> {
        String::from_utf8(self.bytes(what)?)
            .map_err(|_| ProtocolError::Malformed(format!("{what} is not UTF-8")))
    }
    /// A trailing string a peer of an older version leaves out: "".
    fn optional_string(&mut self, what: &str) -> Result<String, ProtocolError> {
        if self.remaining() == 0 {
            Ok(String::new())
        } else {
            self.string(what)
        }
    }
    fn secret(&mut self) -> Result<Vec<u8>, ProtocolError> {
        let secret = self.bytes("secret")?;
        if secret.len() != RELAY_SECRET_LEN {
            return Err(ProtocolError::Malformed(format!(
                "the relay secret has {} bytes, not {RELAY_SECRET_LEN}",
                secret.len()
            )));
        }
        Ok(secret)
    }
    fn codec(&mut self) -> Result<Codec, ProtocolError> {
        match self.u8("codec")? {
            0 => Ok(Codec::Raw),
            1 => Ok(Codec::Zstd),
            v => Err(ProtocolError::Malformed(format!("unknown codec {v}"))),
        }
    }
}

/// Read one frame. A clean end of stream before a frame starts is `Closed`.
pub async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> Result<Msg, ProtocolError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.map_err(length_error)?;
    let len = body_len(len)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .await
        .map_err(|e| body_error(e, len))?;
    Msg::decode(&body)
}

pub async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, msg: &Msg) -> Result<(), ProtocolError> {
    w.write_all(&frame(msg)).await?;
    Ok(())
}

/// `Chunk`'s tag.
const CHUNK_TAG: u8 = 12;

/// For the messages whose data ends the frame: the bytes after the tag up
/// to and including the data's length.
fn data_head(tag: u8) -> Option<usize> {
    match tag {
        // index, codec, data length
        CHUNK_TAG | STREAM_CHUNK_TAG => Some(4 + 1 + 4),
        // index, codec, offset, total, data length
        STREAM_PIECE_TAG => Some(4 + 1 + 4 + 4 + 4),
        _ => None,
    }
}

/// [`read_msg`] for blocking readers (the agent), with the same framing,
/// limits and errors. A frame whose data ends it (a chunk, a piece of one)
/// is read without copying the data: the head is read and decoded first,
/// then the data straight into a buffer of its own, neither zeroed first
/// nor copied out of a body afterwards. At hundreds of MB/s on two cores,
/// each pass over the data is CPU an SSH cipher on the same cores does not
/// get.
pub fn read_msg_sync<R: io::Read>(r: &mut R) -> Result<Msg, ProtocolError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(length_error)?;
    let len = body_len(len)?;
    let mut tag = [0u8];
    r.read_exact(&mut tag).map_err(|e| body_error(e, len))?;
    let Some(head) = data_head(tag[0]).filter(|&h| len > h) else {
        let mut body = vec![0u8; len];
        body[0] = tag[0];
        r.read_exact(&mut body[1..])
            .map_err(|e| body_error(e, len))?;
        return Msg::decode(&body);
    };
    let mut h = vec![0u8; 1 + head];
    h[0] = tag[0];
    r.read_exact(&mut h[1..]).map_err(|e| body_error(e, len))?;
    let n_at = h.len() - 4;
    let n = u32::from_le_bytes(h[n_at..].try_into().expect("4 bytes")) as usize;
    // The head as a message with no data; the data is put in below.
    h[n_at..].fill(0);
    let mut msg = Msg::decode(&h)?;
    // What decoding the whole body would say of a length that is not the rest.
    let rest = len - h.len();
    if n > rest {
        return Err(Truncated {
            what: "data".into(),
            need: n,
            left: rest,
        }
        .into());
    }
    if n < rest {
        return Err(ProtocolError::Malformed(format!(
            "{} has {} unexpected trailing bytes",
            msg.name(),
            rest - n
        )));
    }
    let mut data = Vec::with_capacity(n);
    io::Read::read_to_end(&mut io::Read::take(&mut *r, n as u64), &mut data)
        .map_err(|e| body_error(e, len))?;
    if data.len() != n {
        return Err(body_error(io::ErrorKind::UnexpectedEof.into(), len));
    }
    match &mut msg {
        Msg::Chunk { data: d, .. }
        | Msg::StreamChunk { data: d, .. }
        | Msg::StreamPiece { data: d, .. } => *d = data,
        other => {
            return Err(ProtocolError::Malformed(format!(
                "tag {} decoded as {}",
                tag[0],
                other.name()
            )));
        }
    }
    Ok(msg)
}

/// [`write_msg`] for blocking writers (the agent).
pub fn write_msg_sync<W: io::Write>(w: &mut W, msg: &Msg) -> Result<(), ProtocolError> {
    w.write_all(&frame(msg))?;
    Ok(())
}

/// The length prefix and the body, in one buffer so a frame is one write.
fn frame(msg: &Msg) -> Vec<u8> {
    let body = msg.encode();
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Check a length prefix before anything is allocated for the body.
fn body_len(len: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge(len));
    }
    if len == 0 {
        return Err(ProtocolError::Malformed("empty frame".into()));
    }
    Ok(len as usize)
}

/// The stream ending inside the length prefix is a clean close.
fn length_error(e: io::Error) -> ProtocolError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ProtocolError::Closed
    } else {
        e.into()
    }
}

fn body_error(e: io::Error, len: usize) -> ProtocolError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ProtocolError::Malformed(format!("truncated frame: announced {len} bytes"))
    } else {
        e.into()
    }
}

/// Write a `Chunk` frame straight from borrowed data, exactly as
/// `write_msg(&Msg::Chunk { .. })` would, without copying the data into a
/// message first (a chunk is shared by every node that takes it).
pub async fn write_chunk<W: AsyncWrite + Unpin>(
    w: &mut W,
    index: u32,
    codec: Codec,
    data: &[u8],
) -> Result<(), ProtocolError> {
    w.write_all(&chunk_head(index, codec, data.len())).await?;
    w.write_all(data).await?;
    Ok(())
}

/// The agent's words for chunk `i`'s data not matching the manifest; the
/// controller reads the index back with [`failed_chunk`].
pub fn chunk_failed(i: usize) -> String {
    format!("chunk {i} failed verification")
}

/// The chunk a message of [`chunk_failed`]'s (perhaps with more after it)
/// names.
pub fn failed_chunk(message: &str) -> Option<usize> {
    let rest = message.strip_prefix("chunk ")?;
    let (index, rest) = rest.split_once(' ')?;
    rest.starts_with("failed verification")
        .then(|| index.parse().ok())
        .flatten()
}

/// The bytes of a `Chunk` frame before its `len` bytes of data: the frame
/// a writer completes with the data from elsewhere (spliced from a file).
pub fn chunk_head(index: u32, codec: Codec, len: usize) -> Vec<u8> {
    let body_len = 1 + 4 + 1 + 4 + len;
    let mut head = Vec::with_capacity(4 + 10);
    head.extend_from_slice(&(body_len as u32).to_le_bytes());
    head.push(CHUNK_TAG);
    head.extend_from_slice(&index.to_le_bytes());
    head.push(codec as u8);
    head.extend_from_slice(&(len as u32).to_le_bytes());
    head
}

/// Where a streamed frame's data sits in its chunk: `None` for a whole
/// chunk (`StreamChunk`), else `(offset, total)` (`StreamPiece`).
pub type PiecePlace = Option<(u32, u32)>;

/// The length prefix and the fields of a `StreamChunk` or `StreamPiece`
/// frame before its data.
fn stream_head(
    index: u32,
    codec: Codec,
    piece: PiecePlace,
    len: usize,
) -> Result<Vec<u8>, ProtocolError> {
    let fields = if piece.is_some() { 8 } else { 0 };
    let body_len = 1 + 4 + 1 + fields + 4 + len;
    let too_large = || ProtocolError::TooLarge(u32::try_from(body_len).unwrap_or(u32::MAX));
    let body_len = u32::try_from(body_len).map_err(|_| too_large())?;
    if body_len > MAX_FRAME {
        return Err(too_large());
    }
    let mut head = Vec::with_capacity(22);
    head.extend_from_slice(&body_len.to_le_bytes());
    head.push(if piece.is_some() {
        STREAM_PIECE_TAG
    } else {
        STREAM_CHUNK_TAG
    });
    head.extend_from_slice(&index.to_le_bytes());
    head.push(codec as u8);
    if let Some((offset, total)) = piece {
        head.extend_from_slice(&offset.to_le_bytes());
        head.extend_from_slice(&total.to_le_bytes());
    }
    // At most MAX_FRAME: fits.
    head.extend_from_slice(&(len as u32).to_le_bytes());
    Ok(head)
}

/// [`write_chunk`] for `StreamChunk`: the frame `write_msg(&Msg::StreamChunk
/// { .. })` would write, from borrowed data.
pub async fn write_stream_chunk<W: AsyncWrite + Unpin>(
    w: &mut W,
    index: u32,
    codec: Codec,
    piece: PiecePlace,
    data: &[u8],
) -> Result<(), ProtocolError> {
    let head = stream_head(index, codec, piece, data.len())?;
    w.write_all(&head).await?;
    w.write_all(data).await?;
    Ok(())
}

/// [`write_stream_chunk`] for blocking writers (an agent forwarding to its
/// successor): one vectored write where the writer takes it, no copy.
pub fn write_stream_chunk_sync<W: io::Write>(
    w: &mut W,
    index: u32,
    codec: Codec,
    piece: PiecePlace,
    data: &[u8],
) -> Result<(), ProtocolError> {
    let head = stream_head(index, codec, piece, data.len())?;
    let (mut head, mut data): (&[u8], &[u8]) = (&head, data);
    while !head.is_empty() || !data.is_empty() {
        let written = if head.is_empty() {
            w.write(data)
        } else {
            w.write_vectored(&[io::IoSlice::new(head), io::IoSlice::new(data)])
        };
        match written {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
            Ok(n) => {
                let from_head = n.min(head.len());
                head = &head[from_head..];
                data = data.get(n - from_head..).unwrap_or_default();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Check a peer's Hello.
pub fn check_hello(msg: &Msg) -> Result<(), ProtocolError> {
    match msg {
        Msg::Hello { magic, version, .. } if *magic == MAGIC => {
            if *version == VERSION {
                Ok(())
            } else {
                Err(ProtocolError::Version(*version))
            }
        }
        Msg::Hello { .. } => Err(ProtocolError::Malformed("bad magic in Hello".into())),
        Msg::Error { message, .. } => {
            Err(ProtocolError::Malformed(format!("peer error: {message}")))
        }
        other => Err(ProtocolError::Malformed(format!(
            "expected Hello, got {}",
            other.name()
        ))),
    }
}

/// Bit `i` of a bitmap.
pub fn bit(bitmap: &[u8], i: usize) -> bool {
    bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

pub fn set_bit(bitmap: &mut [u8], i: usize) {
    if let Some(b) = bitmap.get_mut(i / 8) {
        *b |= 1 << (i % 8);
    }
}

pub fn bitmap_len(chunks: usize) -> usize {
    chunks.div_ceil(8)
}

#[cfg(test)]
mod tests;
