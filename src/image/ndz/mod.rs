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
mod tests;
