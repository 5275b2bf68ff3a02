//! Decoder for Emulab/Frisbee `.ndz` disk images, as written by `imagezip`.
//!
//! # Format
//!
//! An `.ndz` file is a sequence of fixed 1 MiB ([`CHUNK_SIZE`]) chunks, each of
//! which can be decoded on its own (that is what lets Frisbee multicast them in
//! any order). A chunk is laid out as:
//!
//! | bytes | content |
//! |---|---|
//! | `0 ..` | little-endian header (see below) |
//! | after the header | `regioncount` regions `{ u32 start; u32 size; }`, in 512-byte sectors |
//! | after the regions | `reloccount` relocations `{ u32 type, sector, sectoff, size; }` (v2+) |
//! | `0 .. regionsize` | the header area, always 4096 bytes ([`HEADER_AREA`]), zero padded |
//! | `regionsize .. regionsize + size` | one zlib stream: the regions' data, concatenated in region order |
//! | rest of the chunk | padding (ignored) |
//!
//! Header versions (the magic number doubles as the version):
//!
//! * v1 (`0x69696969`): `magic, size, blockindex, blocktotal, regionsize,
//!   regioncount` (24 bytes).
//! * v2 (`0x6969696a`) and v3 (`0x6969696b`, same layout, v3 only added LILO
//!   relocation types): v1 plus `firstsect, lastsect, reloccount` (36 bytes).
//!   `[firstsect, lastsect)` is the disk range the chunk describes, including
//!   free space before its first and after its last region.
//! * v4 (`0x6969696c`): v2 plus `u16 enc_cipher, u16 csum_type, u8 enc_iv[32],
//!   u8 checksum[256], u8 imageid[16]` (344 bytes). The checksum is a SHA-1 of
//!   the first `regionsize + size` bytes of the chunk, computed with the first 64
//!   bytes of the checksum field zeroed.
//!
//! Everything the image does not cover reads as zeros: that is what
//! `imageunzip` output looks like once extended with zeros to the disk size.
//!
//! # What this decoder accepts
//!
//! * All chunks must have the same version and `blockindex` equal to their
//!   position; a v1 `blocktotal`, when non-zero, must equal the number of
//!   chunks (v2+ no longer maintain it, so a v2+ file cut exactly on a chunk
//!   boundary cannot be told from a shorter image). The file length must be a
//!   whole number of chunks: a file ending inside a chunk is rejected.
//! * Regions must be non-empty, sorted and non-overlapping across the whole
//!   image (adjacent is fine).
//! * v4: encrypted chunks are rejected (no key handling here). Unsigned SHA-1
//!   checksums are verified by [`NdzImage::decode_chunk`]; signed ones cannot
//!   be checked without the signer's public key, so such chunks are decoded
//!   unverified (zlib's own Adler-32 still guards the data). All v4 chunks must
//!   carry the same image id.
//! * Relocations: this decoder produces the whole image at offset 0, like
//!   `imageunzip` writing to a file (no `-s slice`). In that mode BSD disklabel
//!   relocations (types 1, 2) are no-ops, as are `RELOC_NONE` (0) and
//!   `RELOC_GPTFIX` (7: imagezip already fixed the GPT in the data, and
//!   `imageunzip` ignores the entry); `RELOC_SHORTSECTOR` (6: a last sector
//!   shorter than 512 bytes) is applied by zeroing the sector's tail, which
//!   imagezip already zero-pads. LILO relocations (3-5, which add the target
//!   partition's offset to sector addresses) and unknown types are rejected by
//!   [`NdzImage::open`] with an error naming the chunk rather than risking
//!   wrong data. Every relocation must lie inside one of its chunk's regions.
//!
//! Every length read from the file is checked before it sizes an allocation or
//! an index: a corrupt or hostile file yields an [`NdzError`] naming the chunk,
//! never a panic, and decompression never allocates more than the region sizes
//! say (nor more than the data actually inflates to).

use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use flate2::{Decompress, FlushDecompress, Status};

/// Sector size used by every offset and length in the format.
pub const SECTOR: u64 = 512;
/// Size of one chunk in the file.
pub const CHUNK_SIZE: u64 = 1024 * 1024;
/// Size of the per-chunk header area (header, regions, relocations, padding).
pub const HEADER_AREA: u64 = 4096;

const MAGIC_V1: u32 = 0x6969_6969;
const MAGIC_V4: u32 = MAGIC_V1 + 3;

const HDR_V1_LEN: usize = 24;
const HDR_V2_LEN: usize = 36;
const HDR_V4_LEN: usize = 344;
const REGION_LEN: usize = 8;
const RELOC_LEN: usize = 16;

/// Offset and length of the part of the v4 checksum field that is zeroed
/// while the checksum is computed (`CSUM_MAX_LEN`).
const V4_CSUM_OFF: usize = 72;
const V4_CSUM_ZEROED: usize = 64;
const V4_IMAGEID_OFF: usize = 328;
const SHA1_LEN: usize = 20;

const CSUM_TYPE_MASK: u16 = 0x00ff;
const CSUM_SIGNED: u16 = 0x8000;
const CSUM_NONE: u16 = 0;
const CSUM_SHA1: u16 = 1;

const RELOC_NONE: u32 = 0;
const RELOC_FBSDDISKLABEL: u32 = 1;
const RELOC_OBSDDISKLABEL: u32 = 2;
const RELOC_SHORTSECTOR: u32 = 6;
const RELOC_GPTFIX: u32 = 7;

/// Deflate cannot expand data by more than about 1032:1; a chunk whose regions
/// claim more than this many bytes per compressed byte is rejected by `open`.
const MAX_INFLATE_RATIO: u64 = 1040;

/// Granularity of output buffer growth while inflating.
const GROW_STEP: usize = 256 * 1024;

/// An error while reading an `.ndz` image. `chunk` names the chunk at fault,
/// when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NdzError {
    /// Index of the chunk the error is about (0-based), if any.
    pub chunk: Option<usize>,
    /// What is wrong, in words.
    pub what: String,
}

impl NdzError {
    fn new(chunk: Option<usize>, what: impl Into<String>) -> Self {
        NdzError {
            chunk,
            what: what.into(),
        }
    }

    fn at(chunk: usize, what: impl Into<String>) -> Self {
        Self::new(Some(chunk), what)
    }
}

impl fmt::Display for NdzError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.chunk {
            Some(c) => write!(f, "chunk {c}: {}", self.what),
            None => f.write_str(&self.what),
        }
    }
}

impl std::error::Error for NdzError {}

/// A run of sectors that the image holds data for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// First sector.
    pub start: u32,
    /// Number of sectors (never 0 in an opened image).
    pub sectors: u32,
}

impl Region {
    /// Byte offset of the region on the disk.
    pub fn offset(&self) -> u64 {
        u64::from(self.start) * SECTOR
    }
    /// Length of the region in bytes.
    pub fn len(&self) -> u64 {
        u64::from(self.sectors) * SECTOR
    }
    /// Whether the region is empty (never true in an opened image).
    pub fn is_empty(&self) -> bool {
        self.sectors == 0
    }
    /// Byte offset just past the region.
    pub fn end(&self) -> u64 {
        self.offset() + self.len()
    }
}

/// A relocation entry (v2+). See the module documentation for which are
/// supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloc {
    /// `RELOC_*` type.
    pub kind: u32,
    /// Sector the relocation applies to.
    pub sector: u32,
    /// Byte offset within that sector.
    pub sectoff: u32,
    /// Number of bytes affected.
    pub size: u32,
}

impl Reloc {
    fn offset(&self) -> u64 {
        u64::from(self.sector) * SECTOR + u64::from(self.sectoff)
    }
}

/// What a v4 chunk says about its checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    /// No checksum (v1-v3, or a v4 chunk written without one).
    None,
    /// Unsigned SHA-1: verified by [`NdzImage::decode_chunk`].
    Sha1([u8; SHA1_LEN]),
    /// Signed SHA-1: cannot be verified without the signer's key; not checked.
    SignedSha1,
}

/// The parsed header of one chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Offset of the chunk in the file.
    pub file_offset: u64,
    /// Header version (1 to 4).
    pub version: u32,
    /// Length of the zlib stream that follows the header area.
    pub compressed_len: u32,
    /// `[firstsect, lastsect)` for v2+ images.
    pub sector_range: Option<(u32, u32)>,
    /// The chunk's regions, sorted.
    pub regions: Vec<Region>,
    /// The chunk's relocations (all of a supported kind).
    pub relocs: Vec<Reloc>,
    /// The v4 checksum, if any.
    pub checksum: Checksum,
    /// Sum of the region lengths in bytes: the chunk's decompressed size.
    pub data_len: u64,
}

impl ChunkInfo {
    /// Byte offset of the first region.
    pub fn start(&self) -> u64 {
        self.regions.first().map_or(0, Region::offset)
    }
    /// Byte offset just past the last region.
    pub fn end(&self) -> u64 {
        self.regions.last().map_or(0, Region::end)
    }
}

/// A decoded chunk: `(byte offset on the disk, bytes)` per region, in order.
pub type ChunkData = Vec<(u64, Vec<u8>)>;

/// An opened, validated `.ndz` image.
///
/// `open` reads every chunk header; data is decompressed on demand, one chunk
/// at a time. The most recently decoded chunk is kept for [`NdzImage::read_at`].
#[derive(Debug)]
pub struct NdzImage {
    path: PathBuf,
    file: Mutex<File>,
    version: u32,
    size: u64,
    chunks: Vec<ChunkInfo>,
    cache: Option<(usize, ChunkData)>,
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn magic_version(magic: u32) -> Option<u32> {
    if (MAGIC_V1..=MAGIC_V4).contains(&magic) {
        Some(magic - MAGIC_V1 + 1)
    } else {
        None
    }
}

fn header_len(version: u32) -> usize {
    match version {
        1 => HDR_V1_LEN,
        2 | 3 => HDR_V2_LEN,
        _ => HDR_V4_LEN,
    }
}

/// Reads up to `buf.len()` bytes at `offset`; returns how many were read
/// (fewer only at end of file).
fn read_full_at(file: &Mutex<File>, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
    f.seek(SeekFrom::Start(offset))?;
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl NdzImage {
    /// Whether the file at `path` starts with an `.ndz` magic number (v1 to
    /// v4). Only the first 4 bytes are read.
    pub fn is_ndz(path: &Path) -> bool {
        let mut b = [0u8; 4];
        match File::open(path).and_then(|mut f| f.read_exact(&mut b)) {
            Ok(()) => magic_version(u32::from_le_bytes(b)).is_some(),
            Err(_) => false,
        }
    }

    /// Opens an image and reads and validates every chunk header, region list
    /// and relocation list (no decompression).
    ///
    /// Rejects, naming the chunk: bad magic, mixed versions, a `blockindex`
    /// out of place, a v1 `blocktotal` that disagrees with the file, a header
    /// area that is not 4096 bytes or cannot hold its tables, compressed data
    /// that does not fit the chunk, empty / unsorted / overlapping regions,
    /// `firstsect`/`lastsect` that do not enclose the regions, unsupported
    /// relocations, encryption or checksum types, v4 image id mismatches, and
    /// a file that ends inside a chunk.
    pub fn open(path: &Path) -> Result<NdzImage, NdzError> {
        let file =
            File::open(path).map_err(|e| NdzError::new(None, format!("cannot open: {e}")))?;
        let file_len = file
            .metadata()
            .map_err(|e| NdzError::new(None, format!("cannot stat: {e}")))?
            .len();
        if file_len == 0 {
            return Err(NdzError::new(None, "empty file: not an ndz image"));
        }
        let file = Mutex::new(file);
        // Chunks that start in the file (the last one may be cut short).
        let nchunks = file_len.div_ceil(CHUNK_SIZE);
        let nchunks = usize::try_from(nchunks)
            .map_err(|_| NdzError::new(None, "file too large for this platform"))?;

        let mut chunks: Vec<ChunkInfo> = Vec::new();
        let mut version = 0;
        let mut imageid: Option<[u8; 16]> = None;
        let mut prev_end = 0u64; // end of the previous region, bytes
        let mut area = vec![0u8; HEADER_AREA as usize];
        for index in 0..nchunks {
            let file_offset = index as u64 * CHUNK_SIZE;
            let got = read_full_at(&file, file_offset, &mut area)
                .map_err(|e| NdzError::at(index, format!("read failed: {e}")))?;
            let info = parse_chunk(index, file_offset, &area[..got], nchunks)?;
            // The whole chunk must be in the file.
            let avail = file_len - file_offset;
            if avail < CHUNK_SIZE {
                let needed = HEADER_AREA + u64::from(info.compressed_len);
                return Err(NdzError::at(
                    index,
                    format!(
                        "file truncated: it ends {avail} bytes into this chunk, \
                         a chunk is {CHUNK_SIZE} bytes{}",
                        if avail < needed {
                            format!(" and its compressed data ends at byte {needed}")
                        } else {
                            String::new()
                        }
                    ),
                ));
            }
            if index == 0 {
                version = info.version;
            } else if info.version != version {
                return Err(NdzError::at(
                    index,
                    format!(
                        "header version {} differs from chunk 0's version {version}",
                        info.version
                    ),
                ));
            }
            if info.version == 4 {
                let mut id = [0u8; 16];
                id.copy_from_slice(&area[V4_IMAGEID_OFF..V4_IMAGEID_OFF + 16]);
                match imageid {
                    None => imageid = Some(id),
                    Some(first) if first != id => {
                        return Err(NdzError::at(
                            index,
                            "image id differs from chunk 0's: chunk of another image",
                        ));
                    }
                    Some(_) => {}
                }
            }
            // Regions sorted and disjoint across chunks too.
            if info.start() < prev_end {
                return Err(NdzError::at(
                    index,
                    format!(
                        "first region starts at sector {} before the previous chunk's \
                         last region ends (sector {})",
                        info.start() / SECTOR,
                        prev_end / SECTOR
                    ),
                ));
            }
            prev_end = info.end();
            chunks.push(info);
        }

        let size = chunks
            .iter()
            .map(|c| {
                let last = c
                    .sector_range
                    .map_or(0, |(_, last)| u64::from(last) * SECTOR);
                c.end().max(last)
            })
            .max()
            .unwrap_or(0);

        Ok(NdzImage {
            path: path.to_path_buf(),
            file,
            version,
            size,
            chunks,
            cache: None,
        })
    }

    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Header version of the image (1 to 4).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Size in bytes of the disk (or partition) the image describes.
    ///
    /// This is the end of the last region, or, for v2+ images, the largest
    /// `lastsect` recorded by a chunk header if that is further (imagezip sets
    /// the last chunk's `lastsect` to the end of the imaged disk or partition,
    /// so trailing free space counts). v1 headers do not record free space
    /// after the data, so for them this is only the end of the last region and
    /// the real disk may be larger: the caller pads with zeros to its own
    /// idea of the disk size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// The parsed chunk headers.
    pub fn chunks(&self) -> &[ChunkInfo] {
        &self.chunks
    }

    /// Byte ranges `(offset, len)` that hold data, sorted, with adjacent
    /// regions merged. Everything else reads as zeros.
    pub fn covered(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for r in self.chunks.iter().flat_map(|c| c.regions.iter()) {
            match out.last_mut() {
                Some((off, len)) if *off + *len == r.offset() => *len += r.len(),
                _ => out.push((r.offset(), r.len())),
            }
        }
        out
    }

    /// Decompresses chunk `index` and returns its regions' data as
    /// `(byte offset, bytes)` pairs, in region order, relocations applied.
    ///
    /// Verifies an unsigned v4 SHA-1 checksum first. Errors name the chunk:
    /// corrupt zlib data, decompressed length different from the sum of the
    /// region sizes, bytes after the end of the zlib stream, checksum
    /// mismatch, read failures.
    pub fn decode_chunk(&self, index: usize) -> Result<ChunkData, NdzError> {
        let info = self.chunks.get(index).ok_or_else(|| {
            NdzError::new(
                None,
                format!(
                    "no chunk {index}: the image has {} chunks",
                    self.chunks.len()
                ),
            )
        })?;
        // Both lengths were validated by `open`: at most CHUNK_SIZE in total.
        let total = HEADER_AREA as usize + info.compressed_len as usize;
        let mut buf = vec![0u8; total];
        let got = read_full_at(&self.file, info.file_offset, &mut buf)
            .map_err(|e| NdzError::at(index, format!("read failed: {e}")))?;
        if got != total {
            return Err(NdzError::at(
                index,
                format!("file truncated since it was opened: read {got} of {total} bytes"),
            ));
        }
        if magic_version(le32(&buf, 0)) != Some(info.version) {
            return Err(NdzError::at(
                index,
                "header changed since the file was opened",
            ));
        }
        if let Checksum::Sha1(want) = info.checksum {
            let mut copy = buf.clone();
            copy[V4_CSUM_OFF..V4_CSUM_OFF + V4_CSUM_ZEROED].fill(0);
            let got = sha1(&copy);
            if got != want {
                return Err(NdzError::at(
                    index,
                    format!(
                        "SHA-1 checksum mismatch (header says {}, data hashes to {})",
                        hex(&want),
                        hex(&got)
                    ),
                ));
            }
        }
        let mut out = inflate_regions(index, info, &buf[HEADER_AREA as usize..])?;
        apply_relocs(info, &mut out);
        Ok(out)
    }

    /// Fills `buf` with the decoded disk bytes starting at byte `offset`:
    /// region data where the image has some, zeros elsewhere (including past
    /// [`size`](Self::size)).
    ///
    /// Only the chunks overlapping the request are decompressed; the last
    /// decoded chunk is kept, so sequential reads decode each chunk once.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NdzError> {
        buf.fill(0);
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| NdzError::new(None, "read range overflows"))?;
        if buf.is_empty() {
            return Ok(());
        }
        let first = self.chunks.partition_point(|c| c.end() <= offset);
        for index in first..self.chunks.len() {
            let info = &self.chunks[index];
            if info.start() >= end {
                break;
            }
            if !info
                .regions
                .iter()
                .any(|r| r.offset() < end && r.end() > offset)
            {
                continue;
            }
            if self.cache.as_ref().map(|(i, _)| *i) != Some(index) {
                self.cache = None;
                let data = self.decode_chunk(index)?;
                self.cache = Some((index, data));
            }
            let Some((_, data)) = self.cache.as_ref() else {
                continue;
            };
            for (roff, bytes) in data {
                let rend = roff + bytes.len() as u64;
                let lo = offset.max(*roff);
                let hi = end.min(rend);
                if lo < hi {
                    let src = &bytes[(lo - roff) as usize..(hi - roff) as usize];
                    buf[(lo - offset) as usize..(hi - offset) as usize].copy_from_slice(src);
                }
            }
        }
        Ok(())
    }
}

/// Parses and validates one chunk's header area (`area` holds what the file
/// has of its first 4096 bytes).
fn parse_chunk(
    index: usize,
    file_offset: u64,
    area: &[u8],
    nchunks: usize,
) -> Result<ChunkInfo, NdzError> {
    let err = |what: String| NdzError::at(index, what);
    if area.len() < 4 {
        return Err(err(format!(
            "file truncated: only {} bytes of this chunk are present",
            area.len()
        )));
    }
    let magic = le32(area, 0);
    let version = magic_version(magic).ok_or_else(|| {
        err(format!(
            "bad magic 0x{magic:08x} (not an ndz chunk; expected 0x{MAGIC_V1:08x}..=0x{MAGIC_V4:08x})"
        ))
    })?;
    let hlen = header_len(version);
    if area.len() < hlen {
        return Err(err(format!(
            "file truncated: only {} bytes of this chunk's {hlen}-byte header are present",
            area.len()
        )));
    }
    let size = le32(area, 4);
    let blockindex = le32(area, 8) as i32;
    let blocktotal = le32(area, 12) as i32;
    let regionsize = le32(area, 16) as i32;
    let regioncount = le32(area, 20) as i32;

    if i64::from(blockindex) != index as i64 {
        return Err(err(format!(
            "header says it is chunk {blockindex}, but it is chunk {index} of the file"
        )));
    }
    // Only v1 maintains blocktotal (v2 dropped it; imagezip then writes 0).
    if version == 1 && blocktotal != 0 && i64::from(blocktotal) != nchunks as i64 {
        return Err(err(format!(
            "header says the image has {blocktotal} chunks, the file holds {nchunks} \
             (truncated or padded file?)"
        )));
    }
    if i64::from(regionsize) != HEADER_AREA as i64 {
        return Err(err(format!(
            "header area size {regionsize} unsupported (imagezip always writes {HEADER_AREA})"
        )));
    }
    if size == 0 {
        return Err(err("compressed data length is 0".to_string()));
    }
    let max_data = CHUNK_SIZE - HEADER_AREA;
    if u64::from(size) > max_data {
        return Err(err(format!(
            "compressed data length {size} exceeds the {max_data} bytes a chunk can hold"
        )));
    }
    let (firstsect, lastsect, reloccount) = if version >= 2 {
        (le32(area, 24), le32(area, 28), le32(area, 32) as i32)
    } else {
        (0, 0, 0)
    };
    let room = HEADER_AREA as usize - hlen;
    if regioncount <= 0 || regioncount as usize > room / REGION_LEN {
        return Err(err(format!(
            "region count {regioncount} impossible (must be 1..={})",
            room / REGION_LEN
        )));
    }
    let nreg = regioncount as usize;
    let reloc_room = room - nreg * REGION_LEN;
    if reloccount < 0 || reloccount as usize > reloc_room / RELOC_LEN {
        return Err(err(format!(
            "relocation count {reloccount} impossible with {nreg} regions (must be 0..={})",
            reloc_room / RELOC_LEN
        )));
    }
    let nrel = reloccount as usize;
    let tables_end = hlen + nreg * REGION_LEN + nrel * RELOC_LEN;
    if area.len() < tables_end {
        return Err(err(format!(
            "file truncated inside this chunk's region list ({} of {tables_end} bytes)",
            area.len()
        )));
    }

    let mut regions = Vec::with_capacity(nreg);
    let mut prev_end = 0u64;
    let mut data_len = 0u64;
    for i in 0..nreg {
        let p = hlen + i * REGION_LEN;
        let r = Region {
            start: le32(area, p),
            sectors: le32(area, p + 4),
        };
        if r.sectors == 0 {
            return Err(err(format!(
                "region {i} is empty (start sector {})",
                r.start
            )));
        }
        if i > 0 && r.offset() < prev_end {
            return Err(err(format!(
                "region {i} (sector {}) starts before region {} ends (sector {}): \
                 regions unsorted or overlapping",
                r.start,
                i - 1,
                prev_end / SECTOR
            )));
        }
        prev_end = r.end();
        data_len += r.len();
        regions.push(r);
    }
    let limit = u64::from(size) * MAX_INFLATE_RATIO + 4096;
    if data_len > limit {
        return Err(err(format!(
            "regions claim {data_len} bytes of data, more than {size} compressed bytes \
             can inflate to"
        )));
    }
    let first_start = regions[0].start;
    let last_end_sect = prev_end / SECTOR;
    let sector_range = if version >= 2 {
        if firstsect > first_start || u64::from(lastsect) < last_end_sect {
            return Err(err(format!(
                "sector range [{firstsect}, {lastsect}) does not enclose its regions \
                 [{first_start}, {last_end_sect})"
            )));
        }
        Some((firstsect, lastsect))
    } else {
        None
    };

    let mut relocs = Vec::with_capacity(nrel);
    for i in 0..nrel {
        let p = hlen + nreg * REGION_LEN + i * RELOC_LEN;
        let r = Reloc {
            kind: le32(area, p),
            sector: le32(area, p + 4),
            sectoff: le32(area, p + 8),
            size: le32(area, p + 12),
        };
        match r.kind {
            RELOC_NONE | RELOC_FBSDDISKLABEL | RELOC_OBSDDISKLABEL | RELOC_GPTFIX => {}
            RELOC_SHORTSECTOR => {
                if r.sectoff != 0 || u64::from(r.size) >= SECTOR {
                    return Err(err(format!(
                        "relocation {i}: short-sector relocation with offset {} and size {} \
                         (must be 0 and < {SECTOR})",
                        r.sectoff, r.size
                    )));
                }
            }
            3..=5 => {
                return Err(err(format!(
                    "relocation {i}: LILO relocation (type {}) not supported",
                    r.kind
                )));
            }
            k => {
                return Err(err(format!("relocation {i}: unknown relocation type {k}")));
            }
        }
        let ro = r.offset();
        let rlen = if r.kind == RELOC_SHORTSECTOR {
            SECTOR
        } else {
            u64::from(r.size)
        };
        if !regions
            .iter()
            .any(|g| ro >= g.offset() && ro + rlen <= g.end())
        {
            return Err(err(format!(
                "relocation {i} (sector {}, offset {}, {} bytes) lies outside this chunk's regions",
                r.sector, r.sectoff, r.size
            )));
        }
        relocs.push(r);
    }

    let checksum = if version >= 4 {
        let cipher = le16(area, 36);
        let ctype = le16(area, 38);
        if cipher != 0 {
            return Err(err(format!(
                "chunk is encrypted (cipher {cipher}); decryption is not supported"
            )));
        }
        if ctype & !(CSUM_TYPE_MASK | CSUM_SIGNED) != 0 {
            return Err(err(format!(
                "checksum type 0x{ctype:04x} has unknown flags"
            )));
        }
        match (ctype & CSUM_TYPE_MASK, ctype & CSUM_SIGNED != 0) {
            (CSUM_NONE, _) => Checksum::None,
            (CSUM_SHA1, false) => {
                let mut s = [0u8; SHA1_LEN];
                s.copy_from_slice(&area[V4_CSUM_OFF..V4_CSUM_OFF + SHA1_LEN]);
                Checksum::Sha1(s)
            }
            (CSUM_SHA1, true) => Checksum::SignedSha1,
            (t, _) => return Err(err(format!("unsupported checksum type {t}"))),
        }
    } else {
        Checksum::None
    };

    Ok(ChunkInfo {
        file_offset,
        version,
        compressed_len: size,
        sector_range,
        regions,
        relocs,
        checksum,
        data_len,
    })
}

/// Inflates `input` (exactly the chunk's compressed bytes) into one buffer per
/// region. Buffers grow only as data is actually produced and never beyond
/// the region's length.
fn inflate_regions(index: usize, info: &ChunkInfo, input: &[u8]) -> Result<ChunkData, NdzError> {
    let err = |what: String| NdzError::at(index, what);
    let corrupt = |e: flate2::DecompressError| err(format!("zlib data corrupt ({e})"));
    let mut z = Decompress::new(true);
    let mut out = Vec::with_capacity(info.regions.len());
    let mut produced_total = 0u64;
    for region in &info.regions {
        let want = usize::try_from(region.len())
            .map_err(|_| err("region too large for this platform".to_string()))?;
        let mut v: Vec<u8> = Vec::new();
        let mut filled = 0usize;
        while filled < want {
            if filled == v.len() {
                let grow = (want - filled).min(GROW_STEP.max(filled));
                v.try_reserve_exact(grow)
                    .map_err(|_| err(format!("cannot allocate {grow} bytes")))?;
                v.resize(filled + grow, 0);
            }
            let in_pos = z.total_in() as usize;
            let before_out = z.total_out();
            let status = z
                .decompress(&input[in_pos..], &mut v[filled..], FlushDecompress::None)
                .map_err(corrupt)?;
            let produced = (z.total_out() - before_out) as usize;
            let consumed = z.total_in() as usize - in_pos;
            filled += produced;
            produced_total += produced as u64;
            if filled < want && (status == Status::StreamEnd || (produced == 0 && consumed == 0)) {
                return Err(err(format!(
                    "decompressed length {produced_total} is less than the {} bytes \
                     its regions need{}",
                    info.data_len,
                    if status == Status::StreamEnd {
                        " (zlib stream ended early)"
                    } else {
                        " (compressed data ends before the zlib stream does)"
                    }
                )));
            }
        }
        v.truncate(filled);
        out.push((region.offset(), v));
    }
    // All regions are full: the stream must end here, with no more output.
    let mut scratch = [0u8; 64];
    loop {
        let in_pos = z.total_in() as usize;
        let before_out = z.total_out();
        let status = z
            .decompress(&input[in_pos..], &mut scratch, FlushDecompress::None)
            .map_err(corrupt)?;
        let produced = z.total_out() - before_out;
        let consumed = z.total_in() as usize - in_pos;
        if produced > 0 {
            return Err(err(format!(
                "decompressed length exceeds the {} bytes its regions hold",
                info.data_len
            )));
        }
        if status == Status::StreamEnd {
            break;
        }
        if consumed == 0 {
            return Err(err(
                "compressed data ends before the zlib stream does".to_string()
            ));
        }
    }
    let used = z.total_in();
    if used != input.len() as u64 {
        return Err(err(format!(
            "{} bytes of trailing garbage after the zlib stream (header says {} compressed \
             bytes, stream is {used})",
            input.len() as u64 - used,
            input.len()
        )));
    }
    Ok(out)
}

/// Applies the (validated) relocations of a chunk to its decoded regions.
fn apply_relocs(info: &ChunkInfo, data: &mut [(u64, Vec<u8>)]) {
    for r in &info.relocs {
        if r.kind != RELOC_SHORTSECTOR {
            // NONE, BSD disklabels, GPT fix: no-ops when writing a whole image.
            continue;
        }
        // Bytes past `size` in that sector are not part of the image: zero.
        let from = r.offset() + u64::from(r.size);
        let to = r.offset() + SECTOR;
        for (off, bytes) in data.iter_mut() {
            let end = *off + bytes.len() as u64;
            if from >= *off && to <= end {
                bytes[(from - *off) as usize..(to - *off) as usize].fill(0);
            }
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-1 (FIPS 180-1), for v4 chunk checksums.
fn sha1(data: &[u8]) -> [u8; SHA1_LEN] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let bit_len = (data.len() as u64).wrapping_mul(8);
    let mut tail = Vec::with_capacity(128);
    let full = data.len() - data.len() % 64;
    tail.extend_from_slice(&data[full..]);
    tail.push(0x80);
    while tail.len() % 64 != 56 {
        tail.push(0);
    }
    tail.extend_from_slice(&bit_len.to_be_bytes());
    for block in data[..full].chunks_exact(64).chain(tail.chunks_exact(64)) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (hv, v) in h.iter_mut().zip([a, b, c, d, e]) {
            *hv = hv.wrapping_add(v);
        }
    }
    let mut out = [0u8; SHA1_LEN];
    for (i, v) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const FIXTURES: [&str; 3] = ["ext4-v3", "ext4-raw", "ext4-v1"];

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/ndz")
            .join(name)
    }

    fn fixture_size(name: &str) -> u64 {
        std::fs::read_to_string(fixture(&format!("{name}.size")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn fixture_sha(name: &str) -> String {
        let s = std::fs::read_to_string(fixture(&format!("{name}.raw.sha256"))).unwrap();
        s.split_whitespace().next().unwrap().to_lowercase()
    }

    /// A scratch file removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(bytes: &[u8]) -> Scratch {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "ndz-test-{}-{}.ndz",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&p, bytes).unwrap();
            Scratch(p)
        }
        fn patch(&self, offset: u64, bytes: &[u8]) {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.0)
                .unwrap();
            f.seek(SeekFrom::Start(offset)).unwrap();
            f.write_all(bytes).unwrap();
        }
        fn set_len(&self, len: u64) {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.0)
                .unwrap();
            f.set_len(len).unwrap();
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// The whole disk, decoded chunk by chunk into a zero-filled buffer.
    fn decode_all(img: &NdzImage, disk_size: u64) -> Vec<u8> {
        let mut disk = vec![0u8; disk_size as usize];
        for i in 0..img.chunk_count() {
            for (off, bytes) in img.decode_chunk(i).unwrap() {
                let off = off as usize;
                disk[off..off + bytes.len()].copy_from_slice(&bytes);
            }
        }
        disk
    }

    fn sha256_hex(b: &[u8]) -> String {
        Sha256::digest(b)
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect()
    }

    #[test]
    fn fixtures_decode_to_reference_sha256() {
        for name in FIXTURES {
            let img = NdzImage::open(&fixture(&format!("{name}.ndz"))).unwrap();
            let disk_size = fixture_size(name);
            assert!(img.size() <= disk_size, "{name}");
            let expect = match name {
                "ext4-v3" => (3, 3, disk_size),
                "ext4-raw" => (3, 4, disk_size),
                _ => (1, 3, 33082 * SECTOR),
            };
            assert_eq!(
                (img.version(), img.chunk_count(), img.size()),
                expect,
                "{name}"
            );
            let disk = decode_all(&img, disk_size);
            assert_eq!(sha256_hex(&disk), fixture_sha(name), "{name}");
        }
    }

    #[test]
    fn sniffing_and_covered() {
        for name in FIXTURES {
            assert!(NdzImage::is_ndz(&fixture(&format!("{name}.ndz"))));
        }
        assert!(!NdzImage::is_ndz(&fixture("README.md")));
        assert!(!NdzImage::is_ndz(&fixture("no-such-file.ndz")));
        let err = NdzImage::open(&fixture("README.md")).unwrap_err();
        assert_eq!(err.chunk, Some(0));
        assert!(err.to_string().starts_with("chunk 0: bad magic"), "{err}");

        let raw = NdzImage::open(&fixture("ext4-raw.ndz")).unwrap();
        assert_eq!(raw.covered(), vec![(0, 32768 * SECTOR)]);
        let v3 = NdzImage::open(&fixture("ext4-v3.ndz")).unwrap();
        let cov = v3.covered();
        assert_eq!(cov[0], (0, 6314 * SECTOR));
        // chunk 0's last region and chunk 1's first are adjacent: merged.
        assert_eq!(cov[1], (18434 * SECTOR, (2275 + 905) * SECTOR));
        let total: u64 = cov.iter().map(|c| c.1).sum();
        let data: u64 = v3.chunks().iter().map(|c| c.data_len).sum();
        assert_eq!(total, data);
        assert!(cov.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0));
    }

    #[test]
    fn read_at_matches_decoded_disk() {
        let name = "ext4-v3";
        let disk_size = fixture_size(name);
        let mut img = NdzImage::open(&fixture(&format!("{name}.ndz"))).unwrap();
        let disk = decode_all(&img, disk_size);
        let boundary = img.chunks()[1].start();
        let gap = img.chunks()[0].regions[0].end();
        let cases: [(u64, usize); 8] = [
            (0, 4096),
            (boundary - 1000, 3000),            // across chunk 0 -> 1
            (gap + 512, 8192),                  // uncovered, between regions
            (gap - 100, 300),                   // region end into a gap
            (img.chunks()[2].end() - 10, 5000), // end of data into tail zeros
            (disk_size - 700, 700),             // last bytes of the disk
            (7, 3 * 1024 * 1024),               // spans all three chunks, unaligned
            (disk_size + 4096, 100),            // past the end: zeros
        ];
        for (off, len) in cases {
            let mut buf = vec![0xAAu8; len];
            img.read_at(off, &mut buf).unwrap();
            let lo = (off as usize).min(disk.len());
            let hi = (off as usize + len).min(disk.len());
            assert_eq!(&buf[..hi - lo], &disk[lo..hi], "read at {off}+{len}");
            assert!(buf[hi - lo..].iter().all(|&b| b == 0));
        }
        // Sequential reads in odd-sized blocks reproduce the whole disk.
        let mut seq = vec![0u8; disk.len()];
        let mut off = 0usize;
        while off < seq.len() {
            let n = 777_777.min(seq.len() - off);
            img.read_at(off as u64, &mut seq[off..off + n]).unwrap();
            off += n;
        }
        assert!(seq == disk);
        let mut empty = [0u8; 0];
        img.read_at(u64::MAX, &mut empty).unwrap();
        assert!(img.read_at(u64::MAX, &mut [0u8; 2]).is_err());
    }

    #[test]
    fn bit_flip_in_compressed_data_names_the_chunk() {
        let bytes = std::fs::read(fixture("ext4-v3.ndz")).unwrap();
        let img = NdzImage::open(&fixture("ext4-v3.ndz")).unwrap();
        let at = CHUNK_SIZE + HEADER_AREA + u64::from(img.chunks()[1].compressed_len) / 2;
        let mut bad = bytes.clone();
        bad[at as usize] ^= 0x10;
        let f = Scratch::new(&bad);
        let mut img = NdzImage::open(&f.0).unwrap();
        assert!(img.decode_chunk(0).is_ok());
        let err = img.decode_chunk(1).unwrap_err();
        assert_eq!(err.chunk, Some(1), "{err}");
        assert!(err.to_string().starts_with("chunk 1: "), "{err}");
        let start = img.chunks()[1].start();
        let err = img.read_at(start, &mut [0u8; 4096]).unwrap_err();
        assert_eq!(err.chunk, Some(1), "{err}");
    }

    #[test]
    fn truncation_names_the_chunk() {
        let bytes = std::fs::read(fixture("ext4-v3.ndz")).unwrap();
        for (cut, chunk) in [
            (CHUNK_SIZE + 500_000, 1),
            (2 * CHUNK_SIZE + 10, 2),
            (2 * CHUNK_SIZE + 100_000, 2), // data complete, padding missing
            (3, 0),
        ] {
            let f = Scratch::new(&bytes[..cut as usize]);
            let err = NdzImage::open(&f.0).unwrap_err();
            assert_eq!(err.chunk, Some(chunk), "cut at {cut}: {err}");
            assert!(err.what.contains("truncated"), "cut at {cut}: {err}");
        }
        // A v1 image records its chunk count, so a cut on a chunk boundary shows.
        let v1 = std::fs::read(fixture("ext4-v1.ndz")).unwrap();
        let f = Scratch::new(&v1[..2 * CHUNK_SIZE as usize]);
        let err = NdzImage::open(&f.0).unwrap_err();
        assert!(err.what.contains("3 chunks"), "{err}");
        let f = Scratch::new(&[]);
        assert!(NdzImage::open(&f.0).is_err());
    }

    /// Checks one possibly-corrupt image: opening and decoding either fail
    /// with an error naming a chunk, or succeed.
    fn exercise(path: &Path, chunk: usize, original: Option<&[(u64, Vec<u8>)]>) {
        match NdzImage::open(path) {
            Err(e) => assert!(e.chunk.is_some(), "{e}"),
            Ok(img) => {
                if chunk < img.chunk_count() {
                    match img.decode_chunk(chunk) {
                        Err(e) => assert_eq!(e.chunk, Some(chunk), "{e}"),
                        Ok(data) => {
                            if let Some(orig) = original {
                                assert!(data == orig, "wrong data decoded from chunk {chunk}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Mutates and truncates a fixture at many positions: every outcome must
    /// be an error naming a chunk, or a success (with the original data when
    /// only compressed bytes were touched). `thorough` also decodes after
    /// header mutations (slow in debug builds).
    fn fuzz_fixture(name: &str, thorough: bool) {
        let path = fixture(&format!("{name}.ndz"));
        let bytes = std::fs::read(&path).unwrap();
        let img = NdzImage::open(&path).unwrap();
        let hlen = header_len(img.version()) as u64;
        let f = Scratch::new(&bytes);
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for (c, info) in img.chunks().iter().enumerate() {
            let base = c as u64 * CHUNK_SIZE;
            // Every header and region-table byte (and a few after), three ways.
            let table = hlen + 8 * info.regions.len() as u64 + 8;
            for pos in 0..table {
                let orig = bytes[(base + pos) as usize];
                for x in [0x01u8, 0x80, 0xFF] {
                    f.patch(base + pos, &[orig ^ x]);
                    // Decode after changes to the bytes that describe the
                    // data (size, regions).
                    let decode = thorough && x == 0x80 && ((4..8).contains(&pos) || pos >= hlen);
                    exercise(&f.0, if decode { c } else { usize::MAX }, None);
                }
                f.patch(base + pos, &[orig]);
            }
            // Random garbage over the whole header area.
            for _ in 0..30 {
                let mut junk = vec![0u8; HEADER_AREA as usize];
                for b in junk.iter_mut() {
                    *b = rand() as u8;
                }
                // Keep a valid magic half of the time to get past the sniff.
                if rand() & 1 == 0 {
                    junk[..4].copy_from_slice(&bytes[base as usize..base as usize + 4]);
                }
                f.patch(base, &junk);
                exercise(&f.0, usize::MAX, None);
            }
            f.patch(base, &bytes[base as usize..(base + HEADER_AREA) as usize]);
            // Bit flips in the compressed data: an error naming the chunk, or
            // (flip in bits zlib ignores) exactly the original data.
            let original = img.decode_chunk(c).unwrap();
            let flips = if thorough { 8 } else { 2 };
            for k in 0..flips {
                let pos = base + HEADER_AREA + k * u64::from(info.compressed_len) / flips + k;
                let orig = bytes[pos as usize];
                f.patch(pos, &[orig ^ (1 << (rand() % 8))]);
                exercise(&f.0, c, Some(&original));
                f.patch(pos, &[orig]);
            }
        }
        // Truncations, longest first. Only a cut on a chunk boundary of an
        // image that does not record its chunk count (v2+, or blocktotal 0)
        // can pass.
        let len = bytes.len() as u64;
        let records_total = img.version() == 1 && le32(&bytes, 12) != 0;
        let mut cuts: Vec<u64> = (0..len / 65536).map(|k| k * 65536 + 13).collect();
        cuts.extend([0, 1, 4, 24, 35, 36, 4095, 4096, 4097, len - 1]);
        cuts.extend((1..len / CHUNK_SIZE).flat_map(|k| {
            let b = k * CHUNK_SIZE;
            [b - 1, b, b + 1, b + hlen, b + HEADER_AREA + 100]
        }));
        cuts.sort_unstable_by(|a, b| b.cmp(a));
        cuts.dedup();
        for cut in cuts {
            f.set_len(cut);
            let may_pass = cut > 0 && cut % CHUNK_SIZE == 0 && !records_total;
            match NdzImage::open(&f.0) {
                Ok(img) => {
                    assert!(may_pass, "{name} cut at {cut} accepted");
                    assert_eq!(img.chunk_count() as u64, cut / CHUNK_SIZE);
                }
                Err(e) => {
                    assert!(!may_pass, "{name} cut at {cut}: {e}");
                    assert!(e.chunk.is_some() || cut == 0, "{e}");
                }
            }
        }
    }

    #[test]
    fn fuzz_v3_fixture() {
        fuzz_fixture("ext4-v3", true);
    }

    #[test]
    fn fuzz_raw_and_v1_fixtures() {
        fuzz_fixture("ext4-raw", false);
        fuzz_fixture("ext4-v1", false);
    }

    // ---- synthetic images ----

    /// Deterministic, mildly compressible disk content.
    fn pattern(off: u64) -> u8 {
        let x = off / 16;
        (x.wrapping_mul(0x9E37_79B9) >> 7) as u8 & 0x3F
    }

    struct Spec {
        regions: Vec<(u32, u32)>,
        relocs: Vec<[u32; 4]>,
        range: Option<(u32, u32)>,
        /// Replace the zlib stream (None: compress the pattern).
        stream: Option<Vec<u8>>,
    }

    fn spec(regions: &[(u32, u32)]) -> Spec {
        Spec {
            regions: regions.to_vec(),
            relocs: Vec::new(),
            range: None,
            stream: None,
        }
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn region_data(regions: &[(u32, u32)]) -> Vec<u8> {
        let mut data = Vec::new();
        for &(s, n) in regions {
            let off = u64::from(s) * SECTOR;
            data.extend((off..off + u64::from(n) * SECTOR).map(pattern));
        }
        data
    }

    /// Builds an image; `v4` gives (cipher, csum_type, imageid byte) per chunk.
    fn build(version: u32, chunks: &[Spec], v4: &dyn Fn(usize) -> (u16, u16, u8)) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let stream = c
                .stream
                .clone()
                .unwrap_or_else(|| zlib(&region_data(&c.regions)));
            let mut chunk = vec![0u8; CHUNK_SIZE as usize];
            let put = |chunk: &mut Vec<u8>, off: usize, v: u32| {
                chunk[off..off + 4].copy_from_slice(&v.to_le_bytes())
            };
            put(&mut chunk, 0, MAGIC_V1 + version - 1);
            put(&mut chunk, 4, stream.len() as u32);
            put(&mut chunk, 8, i as u32);
            put(&mut chunk, 12, chunks.len() as u32);
            put(&mut chunk, 16, HEADER_AREA as u32);
            put(&mut chunk, 20, c.regions.len() as u32);
            let hlen = header_len(version);
            if version >= 2 {
                let first = c.regions[0].0;
                let last = c.regions.last().map_or(0, |r| r.0 + r.1);
                let (fs, ls) = c.range.unwrap_or((first, last));
                put(&mut chunk, 24, fs);
                put(&mut chunk, 28, ls);
                put(&mut chunk, 32, c.relocs.len() as u32);
            }
            let mut p = hlen;
            for &(s, n) in &c.regions {
                put(&mut chunk, p, s);
                put(&mut chunk, p + 4, n);
                p += 8;
            }
            for r in &c.relocs {
                for (k, v) in r.iter().enumerate() {
                    put(&mut chunk, p + 4 * k, *v);
                }
                p += 16;
            }
            let d = HEADER_AREA as usize;
            chunk[d..d + stream.len()].copy_from_slice(&stream);
            if version >= 4 {
                let (cipher, ctype, id) = v4(i);
                chunk[36..38].copy_from_slice(&cipher.to_le_bytes());
                chunk[38..40].copy_from_slice(&ctype.to_le_bytes());
                chunk[V4_IMAGEID_OFF..V4_IMAGEID_OFF + 16].fill(id);
                if ctype & CSUM_TYPE_MASK == CSUM_SHA1 {
                    let sum = sha1(&chunk[..d + stream.len()]);
                    chunk[V4_CSUM_OFF..V4_CSUM_OFF + SHA1_LEN].copy_from_slice(&sum);
                }
            }
            out.extend_from_slice(&chunk);
        }
        out
    }

    fn plain(_: usize) -> (u16, u16, u8) {
        (0, CSUM_SHA1, 7)
    }

    fn open_err(bytes: &[u8]) -> NdzError {
        let f = Scratch::new(bytes);
        NdzImage::open(&f.0).unwrap_err()
    }

    fn check_pattern(img: &mut NdzImage) {
        let cov = img.covered();
        let mut buf = vec![0u8; img.size() as usize + 1000];
        img.read_at(0, &mut buf).unwrap();
        for (i, b) in buf.iter().enumerate() {
            let i = i as u64;
            let inside = cov.iter().any(|&(o, l)| i >= o && i < o + l);
            assert_eq!(*b, if inside { pattern(i) } else { 0 }, "byte {i}");
        }
    }

    #[test]
    fn sha1_known_answers() {
        let cases: [(&[u8], &str); 3] = [
            (b"", "da39a3ee5e6b4b0d3255bfef95601890afd80709"),
            (b"abc", "a9993e364706816aba3e25717850c26c9cd0d89d"),
            (
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
                "84983e441c3bd26ebaae4aa1f95129e5e54670f1",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(hex(&sha1(input)), want);
        }
        assert_eq!(
            hex(&sha1(&vec![b'a'; 1_000_000])),
            "34aa973cd4c4daa4f61eeb2bdbad27316534016f"
        );
    }

    #[test]
    fn v2_and_v4_synthetic_images() {
        // v2: lastsect beyond the data sets size().
        let mut c0 = spec(&[(0, 8), (100, 3)]);
        c0.range = Some((0, 200));
        let c1 = spec(&[(200, 5), (300, 1)]);
        let mut c2 = spec(&[(301, 2)]);
        c2.range = Some((301, 1000));
        let bytes = build(2, &[c0, c1, c2], &plain);
        let f = Scratch::new(&bytes);
        let mut img = NdzImage::open(&f.0).unwrap();
        assert_eq!((img.version(), img.size()), (2, 1000 * SECTOR));
        assert_eq!(img.covered()[2], (200 * SECTOR, 5 * SECTOR));
        assert_eq!(img.covered()[3], (300 * SECTOR, 3 * SECTOR));
        check_pattern(&mut img);

        // v4 with SHA-1 checksums: verified.
        let chunks = [spec(&[(0, 64), (80, 16)]), spec(&[(100, 40)])];
        let bytes = build(4, &chunks, &plain);
        let f = Scratch::new(&bytes);
        let mut img = NdzImage::open(&f.0).unwrap();
        assert!(matches!(img.chunks()[1].checksum, Checksum::Sha1(_)));
        check_pattern(&mut img);
        // A flipped data bit is caught by the checksum, naming the chunk.
        let pos = CHUNK_SIZE + HEADER_AREA + 20;
        f.patch(pos, &[bytes[pos as usize] ^ 4]);
        let img = NdzImage::open(&f.0).unwrap();
        let err = img.decode_chunk(1).unwrap_err();
        assert_eq!(err.chunk, Some(1));
        assert!(err.what.contains("SHA-1"), "{err}");
        assert!(img.decode_chunk(0).is_ok());

        // Signed checksums can't be checked: decoded unverified.
        let bytes = build(4, &chunks, &|_| (0, CSUM_SHA1 | CSUM_SIGNED, 7));
        let f = Scratch::new(&bytes);
        let mut img = NdzImage::open(&f.0).unwrap();
        assert_eq!(img.chunks()[0].checksum, Checksum::SignedSha1);
        check_pattern(&mut img);

        // No checksum at all.
        let bytes = build(4, &chunks, &|_| (0, CSUM_NONE, 7));
        let f = Scratch::new(&bytes);
        check_pattern(&mut NdzImage::open(&f.0).unwrap());

        let err = open_err(&build(4, &chunks, &|i| (i as u16, CSUM_SHA1, 7)));
        assert_eq!(err.chunk, Some(1));
        assert!(err.what.contains("encrypted"), "{err}");
        let err = open_err(&build(4, &chunks, &|i| (0, CSUM_SHA1, i as u8)));
        assert_eq!(err.chunk, Some(1));
        assert!(err.what.contains("image id"), "{err}");
        let err = open_err(&build(4, &chunks, &|_| (0, 2, 7)));
        assert!(err.what.contains("checksum type"), "{err}");
    }

    #[test]
    fn relocations() {
        let mut c = spec(&[(0, 4), (10, 2)]);
        c.relocs = vec![
            [RELOC_NONE, 1, 0, 16],
            [RELOC_FBSDDISKLABEL, 10, 0, 276],
            [RELOC_SHORTSECTOR, 11, 0, 100],
            [RELOC_GPTFIX, 0, 0, 1024],
        ];
        let f = Scratch::new(&build(3, &[c], &plain));
        let mut img = NdzImage::open(&f.0).unwrap();
        let mut buf = vec![0u8; 12 * SECTOR as usize];
        img.read_at(0, &mut buf).unwrap();
        for (i, b) in buf.iter().enumerate() {
            let i = i as u64;
            let data = i < 4 * SECTOR || (10 * SECTOR..11 * SECTOR + 100).contains(&i);
            assert_eq!(*b, if data { pattern(i) } else { 0 }, "byte {i}");
        }
        for (reloc, what) in [
            ([3u32, 1, 0, 5], "LILO"),
            ([99, 1, 0, 5], "unknown relocation type 99"),
            ([RELOC_SHORTSECTOR, 1, 4, 5], "short-sector"),
            ([RELOC_NONE, 5, 0, 5], "outside"),
            ([RELOC_NONE, 3, 500, 100], "outside"),
        ] {
            let mut c = spec(&[(0, 4), (10, 2)]);
            c.relocs = vec![reloc];
            let err = open_err(&build(3, &[c], &plain));
            assert_eq!(err.chunk, Some(0));
            assert!(err.what.contains(what), "{err}");
        }
    }

    #[test]
    fn bad_region_lists_and_streams() {
        let cases: Vec<(Vec<Spec>, usize, &str)> = vec![
            (vec![spec(&[(10, 4), (12, 4)])], 0, "overlapping"),
            (vec![spec(&[(10, 4), (2, 4)])], 0, "unsorted"),
            (vec![spec(&[(10, 0)])], 0, "empty"),
            (vec![spec(&[(0, 8)]), spec(&[(4, 8)])], 1, "previous chunk"),
            (
                vec![Spec {
                    range: Some((5, 8)),
                    ..spec(&[(0, 8)])
                }],
                0,
                "enclose",
            ),
            (
                vec![Spec {
                    stream: Some(zlib(&[0u8; 1000])),
                    ..spec(&[(0, u32::MAX)])
                }],
                0,
                "inflate to",
            ),
        ];
        for (chunks, chunk, what) in cases {
            let err = open_err(&build(3, &chunks, &plain));
            assert_eq!(err.chunk, Some(chunk), "{err}");
            assert!(err.what.contains(what), "{what}: {err}");
        }

        let decode_err = |s: Spec| {
            let f = Scratch::new(&build(3, &[spec(&[(0, 1)]), s], &plain));
            let img = NdzImage::open(&f.0).unwrap();
            let e = img.decode_chunk(1).unwrap_err();
            assert_eq!(e.chunk, Some(1), "{e}");
            e.what
        };
        let regions = [(8u32, 16u32)];
        let data = region_data(&regions);
        // Stream shorter than the regions.
        let w = decode_err(Spec {
            stream: Some(zlib(&data[..data.len() - 512])),
            ..spec(&regions)
        });
        assert!(w.contains("less than"), "{w}");
        // Stream longer than the regions.
        let mut more = data.clone();
        more.extend_from_slice(&[1u8; 512]);
        let w = decode_err(Spec {
            stream: Some(zlib(&more)),
            ..spec(&regions)
        });
        assert!(w.contains("exceeds"), "{w}");
        // Bytes after the end of the stream.
        let mut s = zlib(&data);
        s.extend_from_slice(b"junk");
        let w = decode_err(Spec {
            stream: Some(s),
            ..spec(&regions)
        });
        assert!(w.contains("trailing garbage"), "{w}");
        // Stream cut short.
        let s = zlib(&data);
        let w = decode_err(Spec {
            stream: Some(s[..s.len() / 2].to_vec()),
            ..spec(&regions)
        });
        assert!(w.contains("less than"), "{w}");
        // Not zlib at all.
        let w = decode_err(Spec {
            stream: Some(vec![0x55; 100]),
            ..spec(&regions)
        });
        assert!(w.contains("zlib data corrupt"), "{w}");
        // A zip bomb within the ratio limit only gets what it inflates to.
        let bomb = zlib(&vec![0u8; 4 << 20]);
        let w = decode_err(Spec {
            stream: Some(bomb),
            ..spec(&[(8, 32768)])
        });
        assert!(w.contains("4194304 is less than the 16777216"), "{w}");
        // Out-of-range chunk index.
        let f = Scratch::new(&build(3, &[spec(&[(0, 1)])], &plain));
        let img = NdzImage::open(&f.0).unwrap();
        assert_eq!(img.decode_chunk(5).unwrap_err().chunk, None);
    }

    #[test]
    fn header_field_checks() {
        let good = build(1, &[spec(&[(0, 8)]), spec(&[(8, 8)])], &plain);
        let f = Scratch::new(&good);
        let mut img = NdzImage::open(&f.0).unwrap();
        assert_eq!((img.version(), img.size()), (1, 16 * SECTOR));
        check_pattern(&mut img);
        for (off, value, what) in [
            (CHUNK_SIZE + 8, 0u32, "header says it is chunk 0"),
            (CHUNK_SIZE + 12, 5, "5 chunks"),
            (16, 8192, "header area size"),
            (4, 0, "length is 0"),
            (4, CHUNK_SIZE as u32, "exceeds"),
            (20, 0, "region count 0"),
            (20, 1000, "region count 1000"),
        ] {
            let mut bad = good.clone();
            bad[off as usize..off as usize + 4].copy_from_slice(&value.to_le_bytes());
            let err = open_err(&bad);
            assert!(err.chunk.is_some(), "{err}");
            assert!(err.what.contains(what), "{what}: {err}");
        }
        let mut bad = build(2, &[spec(&[(0, 8)]), spec(&[(8, 8)])], &plain);
        bad[CHUNK_SIZE as usize] += 1;
        let err = open_err(&bad);
        assert_eq!(err.chunk, Some(1));
        assert!(err.what.contains("version 3 differs"), "{err}");
        let mut bad = build(2, &[spec(&[(0, 8)])], &plain);
        bad[32..36].copy_from_slice(&600u32.to_le_bytes());
        assert!(open_err(&bad).what.contains("relocation count 600"));
        let e = NdzError::new(None, "x");
        assert_eq!(e.to_string(), "x");
    }
}
