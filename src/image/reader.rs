//! Reading an image's bytes whatever its format: a raw file is read as it
//! is; a Frisbee `.ndz` is decoded, so what is read is the disk it
//! describes. The manifest build and the chunk source of a load both read
//! through an [`ImageReader`], so they always agree on the bytes.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use crate::image::ndz::{self, NdzImage};
use crate::image::sparse;

/// What a file holds, as far as loading it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Loaded byte for byte.
    Raw,
    /// A qcow2 file: loaded byte for byte too (it is a file for a
    /// hypervisor), only labelled.
    Qcow2,
    /// A Frisbee/imagezip image of this header version: decoded.
    Ndz(u32),
}

impl Format {
    /// The format of the file at `path`, from its first bytes (and its name:
    /// a file named `*.ndz` is taken as one, so that a damaged one is
    /// reported as such rather than loaded raw).
    pub fn sniff(path: &Path) -> io::Result<Format> {
        let mut head = [0u8; 24];
        let mut file = File::open(path)?;
        let mut got = 0;
        while got < head.len() {
            match file.read(&mut head[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let head = &head[..got];
        if let Some(version) = ndz_version(head) {
            return Ok(Format::Ndz(version));
        }
        let named_ndz = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("ndz"));
        if named_ndz {
            // The version is unknown: `NdzImage::open` will say what is wrong.
            return Ok(Format::Ndz(0));
        }
        if head.starts_with(b"QFI\xfb") {
            return Ok(Format::Qcow2);
        }
        Ok(Format::Raw)
    }

    /// `raw`, `qcow2`, `ndz v3`.
    pub fn label(&self) -> String {
        match self {
            Format::Raw => "raw".into(),
            Format::Qcow2 => "qcow2".into(),
            Format::Ndz(0) => "ndz".into(),
            Format::Ndz(v) => format!("ndz v{v}"),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

/// The header version if `head` starts like the first chunk of an `.ndz`:
/// a v1-v4 magic, block index 0 and a 4096-byte header area. Checking more
/// than the magic keeps a raw disk that happens to start with `iiii` raw.
fn ndz_version(head: &[u8]) -> Option<u32> {
    let le32 = |off: usize| -> Option<u32> {
        let b = head.get(off..off + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let version = le32(0)?.checked_sub(0x6969_6969).map(|v| v + 1)?;
    let plausible =
        (1..=4).contains(&version) && le32(8)? == 0 && u64::from(le32(16)?) == ndz::HEADER_AREA;
    plausible.then_some(version)
}

/// An opened image, read as the disk it describes.
#[derive(Debug)]
pub enum ImageReader {
    Raw { file: File, format: Format },
    Ndz(Mutex<NdzImage>),
}

impl ImageReader {
    /// Open `path`, decoding it if it is an `.ndz` (all its chunk headers are
    /// read and checked now; data is decoded as it is read). A damaged
    /// `.ndz` is an `InvalidData` error naming the chunk.
    pub fn open(path: &Path) -> io::Result<ImageReader> {
        match Format::sniff(path)? {
            Format::Ndz(_) => NdzImage::open(path)
                .map(|img| ImageReader::Ndz(Mutex::new(img)))
                .map_err(ndz_error),
            format => Ok(ImageReader::Raw {
                file: File::open(path)?,
                format,
            }),
        }
    }

    pub fn format(&self) -> Format {
        match self {
            ImageReader::Raw { format, .. } => *format,
            ImageReader::Ndz(img) => Format::Ndz(lock(img).version()),
        }
    }

    /// Bytes in the image: the file's size, or the size of the disk an
    /// `.ndz` describes.
    pub fn size(&self) -> io::Result<u64> {
        match self {
            ImageReader::Raw { file, .. } => sparse::file_size(file),
            ImageReader::Ndz(img) => Ok(lock(img).size()),
        }
    }

    /// The file itself, when its bytes are the image's bytes (not an `.ndz`).
    pub fn raw_file(&self) -> Option<&File> {
        match self {
            ImageReader::Raw { file, .. } => Some(file),
            ImageReader::Ndz(_) => None,
        }
    }

    /// Fill `buf` from `offset`. Reading past the end is an
    /// `UnexpectedEof` error, as for a file.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            ImageReader::Raw { file, .. } => file.read_exact_at(buf, offset),
            ImageReader::Ndz(img) => {
                let mut img = lock(img);
                let end = offset.checked_add(buf.len() as u64);
                if end.is_none_or(|end| end > img.size()) {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("read past the end of the image ({} bytes)", img.size()),
                    ));
                }
                img.read_at(offset, buf).map_err(ndz_error)
            }
        }
    }

    /// Byte ranges `[start, end)` that may hold data; everything else reads
    /// as zeros. `None`: unknown, read everything. For a raw file these are
    /// its data extents (holes skipped), for an `.ndz` the regions it covers.
    pub fn data_extents(&self, size: u64) -> Option<Vec<(u64, u64)>> {
        match self {
            ImageReader::Raw { file, .. } => sparse::data_extents(file, size),
            ImageReader::Ndz(img) => Some(
                lock(img)
                    .covered()
                    .into_iter()
                    .map(|(off, len)| (off, off + len))
                    .collect(),
            ),
        }
    }

    /// True when reads are served one at a time (an `.ndz` decodes under a
    /// lock, keeping its last chunk): reading in parallel gains nothing.
    pub fn is_sequential(&self) -> bool {
        matches!(self, ImageReader::Ndz(_))
    }
}

fn lock(img: &Mutex<NdzImage>) -> std::sync::MutexGuard<'_, NdzImage> {
    img.lock().unwrap_or_else(|p| p.into_inner())
}

fn ndz_error(e: ndz::NdzError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/ndz")
            .join(name)
    }

    #[test]
    fn ndz_reads_as_the_decoded_disk_in_any_order() {
        for name in ["ext4-v3", "ext4-raw", "ext4-v1"] {
            let path = fixture(&format!("{name}.ndz"));
            let reader = ImageReader::open(&path).unwrap();
            let img = NdzImage::open(&path).unwrap();
            assert_eq!(reader.format(), Format::Ndz(img.version()));
            let size = reader.size().unwrap();
            assert_eq!(size, img.size());
            // The decoded disk, chunk by chunk, zeros between regions.
            let mut want = vec![0u8; size as usize];
            for i in 0..img.chunk_count() {
                for (off, bytes) in img.decode_chunk(i).unwrap() {
                    want[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes);
                }
            }
            // Pieces of odd sizes, back to front, so chunks are decoded again.
            let piece = 1_000_003usize;
            let mut got = vec![0u8; size as usize];
            let starts: Vec<usize> = (0..want.len()).step_by(piece).collect();
            for &start in starts.iter().rev() {
                let end = (start + piece).min(want.len());
                reader
                    .read_exact_at(&mut got[start..end], start as u64)
                    .unwrap();
            }
            assert!(
                got == want,
                "{name}: reader differs from the decoded chunks"
            );
            // Outside the extents, only zeros.
            let extents = reader.data_extents(size).unwrap();
            let mut at = 0;
            for (start, end) in extents.iter().copied().chain([(size, size)]) {
                assert!(want[at as usize..start as usize].iter().all(|&b| b == 0));
                at = end;
            }
            let mut past = [0u8; 1];
            let e = reader.read_exact_at(&mut past, size).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        }
    }

    #[test]
    fn formats_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.img");
        let text = b"iiii just text that starts like an ndz magic";
        std::fs::write(&raw, text).unwrap();
        assert_eq!(Format::sniff(&raw).unwrap(), Format::Raw);
        let reader = ImageReader::open(&raw).unwrap();
        assert_eq!(reader.size().unwrap(), text.len() as u64);
        let mut back = vec![0u8; text.len()];
        reader.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, text);
        let qcow = dir.path().join("base.qcow2");
        std::fs::write(&qcow, b"QFI\xfb\0\0\0\x03rest").unwrap();
        assert_eq!(Format::sniff(&qcow).unwrap().label(), "qcow2");
        assert_eq!(
            Format::sniff(&fixture("ext4-v1.ndz")).unwrap().label(),
            "ndz v1"
        );
        // Named .ndz but damaged from the first byte: an error, not raw.
        let bad = dir.path().join("bad.ndz");
        std::fs::write(&bad, vec![0u8; 4096]).unwrap();
        let e = ImageReader::open(&bad).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("chunk 0"), "{e}");
    }
}
