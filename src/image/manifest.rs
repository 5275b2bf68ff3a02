//! Image manifests: per-chunk digests, which chunks are all zero, and the
//! image identity, built once and cached beside the image.
//!
//! The cache is kept beside the image as `.<image name>.manifest`; when that
//! directory is not writable, in the user cache dir under
//! `manifests/<xxh3-128 of the absolute image path>.manifest`. A cached
//! manifest is used only while the image's stamp (length, mtime with
//! nanoseconds, inode, device) is the one it was built from, so rewriting
//! the image, even in place, makes it stale. An `.ndz` is read decoded
//! (see [`crate::image::reader`]): its manifest describes the disk, and is
//! stamped with the `.ndz` file like any other.
//!
//! Cache file, integers little-endian:
//! `b"IMGMANI1"`, stamp (`len u64`, `mtime_secs i64`, `mtime_nsec u32`,
//! `inode u64`, `dev u64`), `chunk_size u64`, `size u64`, `count u64`,
//! `count` digests (`u128` each), `bitmap_len u64` and the zero bitmap,
//! `identity u128`, then an xxh3-64 of everything before it. Decoding checks
//! every length against what is left before allocating, the checksum, and
//! that the identity matches the content, so garbage is an error, never a
//! panic or a huge allocation.

use std::fs::{self, File, Metadata};
use std::io::{self};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use xxhash_rust::xxh3::{Xxh3, xxh3_64, xxh3_128};

use crate::image::digest::{ChunkDigest, chunk_digest, is_zero, zero_digest};
use crate::image::geometry::Geometry;
use crate::image::reader::ImageReader;
use crate::proto::cursor::Cursor;
use crate::proto::{bit, bitmap_len, set_bit};

/// Largest chunk size `build` accepts (its read buffers are this large):
/// the one limit of [`crate::image::geometry::MAX_CHUNK_SIZE`].
const MAX_CHUNK_SIZE: u64 = crate::image::geometry::MAX_CHUNK_SIZE as u64;

const IDENTITY_DOMAIN: &[u8] = b"imaging-manifest-v1";
const CACHE_MAGIC: &[u8; 8] = b"IMGMANI1";
/// Bytes each build thread reads before moving on to its next range: long
/// enough for readahead to stream, short enough to keep both threads busy
/// to the end.
const RANGE_BYTES: u64 = 32 << 20;
const BUILD_THREADS: usize = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub chunk_size: u64,
    pub size: u64,
    pub digests: Vec<ChunkDigest>,
    /// Bit `i` set: chunk `i` is all zeros.
    pub zero: Vec<u8>,
    pub identity: u128,
}

impl Manifest {
    /// Build by reading the image through [`ImageReader`] (an `.ndz` is
    /// decoded); chunks in holes, or outside an `.ndz`'s regions, are not read.
    pub fn build(path: &Path, chunk_size: u64) -> io::Result<Manifest> {
        if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("chunk size {chunk_size} is not between 1 and {MAX_CHUNK_SIZE}"),
            ));
        }
        let file = ImageReader::open(path).map_err(|e| in_file(path, e))?;
        let size = file.size().map_err(|e| in_file(path, e))?;
        let count = usize::try_from(Geometry::new(size, chunk_size).count()).map_err(|_| {
            in_file(
                path,
                io::Error::new(io::ErrorKind::InvalidInput, "too many chunks"),
            )
        })?;
        let has_data = chunks_with_data(&file, size, chunk_size, count);
        // A decoded image is read one chunk at a time anyway.
        let threads = if file.is_sequential() {
            1
        } else {
            BUILD_THREADS
        };

        let buf_len = chunk_size.min(size) as usize;
        let mut digests = vec![0u128; count];
        let mut zeros = vec![false; count];
        let per_range = (RANGE_BYTES / chunk_size).max(1) as usize;
        // Range `r` goes to thread `r % threads`.
        let mut work: Vec<Ranges> = (0..threads).map(|_| Vec::new()).collect();
        for (r, (d, z)) in digests
            .chunks_mut(per_range)
            .zip(zeros.chunks_mut(per_range))
            .enumerate()
        {
            work[r % threads].push((r * per_range, d, z));
        }

        let failed = AtomicBool::new(false);
        let job = Job {
            file: &file,
            path,
            chunk_size,
            size,
            has_data: &has_data,
            failed: &failed,
        };
        let results: Vec<io::Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = work
                .into_iter()
                .filter(|ranges| !ranges.is_empty())
                .map(|ranges| {
                    let job = &job;
                    s.spawn(move || job.run(ranges, buf_len))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(io::Error::other(format!(
                            "{}: a manifest build thread panicked",
                            path.display()
                        )))
                    })
                })
                .collect()
        });
        for r in results {
            r?;
        }

        let mut zero = vec![0u8; bitmap_len(count)];
        for (i, _) in zeros.iter().enumerate().filter(|(_, z)| **z) {
            set_bit(&mut zero, i);
        }
        Ok(Manifest::from_parts(chunk_size, size, digests, zero))
    }

    /// From known digests (e.g. a save that received them); computes the identity.
    pub fn from_parts(chunk_size: u64, size: u64, digests: Vec<u128>, zero: Vec<u8>) -> Manifest {
        let identity = identity_of(chunk_size, size, &digests, &zero);
        Manifest {
            chunk_size,
            size,
            digests,
            zero,
            identity,
        }
    }

    pub fn chunk_count(&self) -> usize {
        self.digests.len()
    }

    /// Bytes in chunk `i`: `chunk_size`, except for a shorter last chunk.
    pub fn chunk_len(&self, i: usize) -> u64 {
        self.geometry().len(i)
    }

    pub fn chunk_offset(&self, i: usize) -> u64 {
        self.geometry().offset(i)
    }

    pub fn geometry(&self) -> Geometry {
        Geometry::new(self.size, self.chunk_size)
    }

    pub fn is_zero_chunk(&self, i: usize) -> bool {
        bit(&self.zero, i)
    }

    /// Bytes in chunks that are not all zero.
    pub fn data_size(&self) -> u64 {
        (0..self.chunk_count())
            .filter(|&i| !self.is_zero_chunk(i))
            .map(|i| self.chunk_len(i))
            .sum()
    }

    /// The identity as 32 lowercase hex digits.
    pub fn identity_hex(&self) -> String {
        format!("{:032x}", self.identity)
    }
}

fn identity_of(chunk_size: u64, size: u64, digests: &[u128], zero: &[u8]) -> u128 {
    let mut h = Xxh3::new();
    h.update(IDENTITY_DOMAIN);
    h.update(&chunk_size.to_le_bytes());
    h.update(&size.to_le_bytes());
    for d in digests {
        h.update(&d.to_le_bytes());
    }
    h.update(zero);
    h.digest128()
}

/// One thread's share of a build: `(first chunk, its digests, its zero flags)`.
type Ranges<'a> = Vec<(usize, &'a mut [u128], &'a mut [bool])>;

/// What every build thread shares.
struct Job<'a> {
    file: &'a ImageReader,
    path: &'a Path,
    chunk_size: u64,
    size: u64,
    has_data: &'a [bool],
    failed: &'a AtomicBool,
}

impl Job<'_> {
    /// Digest one thread's ranges.
    fn run(&self, ranges: Ranges, buf_len: usize) -> io::Result<()> {
        let mut buf = vec![0u8; buf_len];
        for (first, digests, zeros) in ranges {
            for (k, (digest, zero)) in digests.iter_mut().zip(zeros.iter_mut()).enumerate() {
                if self.failed.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let i = first + k;
                let geometry = Geometry::new(self.size, self.chunk_size);
                let (offset, len) = (geometry.offset(i), geometry.len(i) as usize);
                // Chunks of holes get this digest without being read.
                let zero_digest = zero_digest(len);
                if !self.has_data[i] {
                    (*digest, *zero) = (zero_digest, true);
                    continue;
                }
                let data = &mut buf[..len];
                if let Err(e) = self.file.read_exact_at(data, offset) {
                    self.failed.store(true, Ordering::Relaxed);
                    let what = if e.kind() == io::ErrorKind::UnexpectedEof {
                        "file shrank while reading".to_string()
                    } else {
                        e.to_string()
                    };
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "{}: reading at offset {offset}: {what}",
                            self.path.display()
                        ),
                    ));
                }
                *zero = is_zero(data);
                *digest = if *zero {
                    zero_digest
                } else {
                    chunk_digest(data)
                };
            }
        }
        Ok(())
    }
}

/// For each chunk, whether any of its bytes may be data (not in a hole).
fn chunks_with_data(file: &ImageReader, size: u64, chunk_size: u64, count: usize) -> Vec<bool> {
    match file.data_extents(size) {
        Some(extents) => {
            let mut has = vec![false; count];
            for (start, end) in extents {
                let end = end.min(size);
                if start >= end {
                    continue;
                }
                let first = (start / chunk_size) as usize;
                let last = ((end - 1) / chunk_size) as usize;
                for h in &mut has[first..=last.min(count - 1)] {
                    *h = true;
                }
            }
            has
        }
        None => vec![true; count],
    }
}

fn in_file(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// Cache

/// What identifies one version of an image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    mtime_secs: i64,
    mtime_nsec: u32,
    inode: u64,
    dev: u64,
}

impl FileStamp {
    fn of(meta: &Metadata) -> FileStamp {
        FileStamp {
            len: meta.len(),
            mtime_secs: meta.mtime(),
            mtime_nsec: meta.mtime_nsec().clamp(0, 999_999_999) as u32,
            inode: meta.ino(),
            dev: meta.dev(),
        }
    }

    fn of_path(path: &Path) -> io::Result<FileStamp> {
        fs::metadata(path)
            .map(|m| FileStamp::of(&m))
            .map_err(|e| in_file(path, e))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ManifestState {
    /// A cached manifest matches the image as it is now.
    Fresh,
    /// A cached manifest exists but the image changed (or it is unreadable).
    Stale,
    /// No cached manifest.
    Missing,
}

/// The image a manifest belongs to: a symlink is followed, so that a link
/// and its target share one manifest.
fn resolve(image: &Path) -> PathBuf {
    let is_link = fs::symlink_metadata(image).is_ok_and(|m| m.file_type().is_symlink());
    if is_link && let Ok(real) = fs::canonicalize(image) {
        return real;
    }
    std::path::absolute(image).unwrap_or_else(|_| image.to_path_buf())
}

/// Where the manifest of `image` is kept beside it: `.<name>.manifest`.
pub fn manifest_path(image: &Path) -> PathBuf {
    beside_path(&resolve(image))
}

fn beside_path(image: &Path) -> PathBuf {
    let name = image.file_name().unwrap_or(image.as_os_str());
    let mut hidden = std::ffi::OsString::from(".");
    hidden.push(name);
    hidden.push(".manifest");
    image.with_file_name(hidden)
}

/// The cache-dir location, for images whose directory is not writable.
fn fallback_path(image: &Path) -> Option<PathBuf> {
    let dirs = directories::ProjectDirs::from("", "", "imaging")?;
    let key = xxh3_128(image.as_os_str().as_encoded_bytes());
    Some(
        dirs.cache_dir()
            .join("manifests")
            .join(format!("{key:032x}.manifest")),
    )
}

/// Where a manifest of `image` may be, in the order they are tried.
fn locations(image: &Path) -> Vec<PathBuf> {
    let image = resolve(image);
    let mut places = vec![beside_path(&image)];
    places.extend(fallback_path(&image));
    places
}

/// State of the cached manifest, without building.
pub fn cached_state(image: &Path, chunk_size: u64) -> ManifestState {
    lookup(image, chunk_size).0
}

/// The cached manifest, only when it is fresh.
pub fn load_cached(image: &Path, chunk_size: u64) -> Option<Manifest> {
    lookup(image, chunk_size).1
}

/// State and, when fresh, the cached manifest, in one pass.
pub(crate) fn lookup(image: &Path, chunk_size: u64) -> (ManifestState, Option<Manifest>) {
    let places = locations(image);
    let Ok(stamp) = FileStamp::of_path(image) else {
        let any = places.iter().any(|p| p.exists());
        let state = if any {
            ManifestState::Stale
        } else {
            ManifestState::Missing
        };
        return (state, None);
    };
    lookup_in(&places, stamp, chunk_size)
}

fn lookup_in(
    places: &[PathBuf],
    stamp: FileStamp,
    chunk_size: u64,
) -> (ManifestState, Option<Manifest>) {
    let mut state = ManifestState::Missing;
    for place in places {
        match read_fresh(place, stamp, chunk_size) {
            Ok(Some(m)) => return (ManifestState::Fresh, Some(m)),
            Ok(None) => state = ManifestState::Stale,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) => {}
            Err(_) => state = ManifestState::Stale,
        }
    }
    (state, None)
}

/// The manifest cached at `place` if it was built from `stamp` with
/// `chunk_size`; `Ok(None)` if it exists but is for another version.
fn read_fresh(place: &Path, stamp: FileStamp, chunk_size: u64) -> io::Result<Option<Manifest>> {
    let mut file = File::open(place)?;
    if chunk_size == 0 {
        return Ok(None);
    }
    // The header says which image version and size the cache is for (the
    // image size is the file's, except for a decoded `.ndz`); the length of
    // such a cache file is known exactly, so a wrong one is stale without
    // reading it (and a huge one is never loaded).
    let mut head = [0u8; HEAD_LEN];
    if file.read_exact_at(&mut head, 0).is_err() {
        return Ok(None);
    }
    let Ok((stored, head_chunk_size, size)) = decode_head(&head) else {
        return Ok(None);
    };
    if stored != stamp || head_chunk_size != chunk_size {
        return Ok(None);
    }
    let expected = usize::try_from(Geometry::new(size, chunk_size).count())
        .ok()
        .and_then(cache_len);
    let actual = file.metadata()?.len();
    if expected != Some(actual) {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(actual as usize);
    io::Read::read_to_end(&mut file, &mut bytes)?;
    let (stored, manifest) = decode(&bytes).map_err(|e| in_file(place, e))?;
    if stored == stamp && manifest.chunk_size == chunk_size && manifest.size == size {
        Ok(Some(manifest))
    } else {
        Ok(None)
    }
}

/// Magic, stamp, chunk size and image size: what a cache file starts with.
const HEAD_LEN: usize = 8 + (8 + 8 + 4 + 8 + 8) + 8 + 8;

/// The stamp, chunk size and image size at the start of a cache file
/// (unverified: `decode` checks the whole file).
fn decode_head(head: &[u8]) -> io::Result<(FileStamp, u64, u64)> {
    let mut r = Cursor::new(head);
    if r.take(8, "magic")? != CACHE_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad manifest: not a manifest file",
        ));
    }
    let stamp = FileStamp {
        len: r.u64("manifest")?,
        mtime_secs: r.u64("manifest")? as i64,
        mtime_nsec: r.u32("manifest")?,
        inode: r.u64("manifest")?,
        dev: r.u64("manifest")?,
    };
    Ok((stamp, r.u64("manifest")?, r.u64("manifest")?))
}

/// The cached manifest if fresh, else built and cached. Failing to write the
/// cache is not an error: the manifest is still returned.
pub fn load_or_build(image: &Path, chunk_size: u64) -> io::Result<Manifest> {
    load_or_build_in(image, chunk_size, &locations(image))
}

fn load_or_build_in(image: &Path, chunk_size: u64, places: &[PathBuf]) -> io::Result<Manifest> {
    let mut before = FileStamp::of_path(image)?;
    if let (_, Some(m)) = lookup_in(places, before, chunk_size) {
        return Ok(m);
    }
    // A file that changes while it is read gives a manifest of no version
    // of it: read again, and give up if it keeps changing.
    for _ in 0..3 {
        let manifest = Manifest::build(image, chunk_size)?;
        let after = FileStamp::of_path(image)?;
        if after == before {
            let _ = write_cache(places, after, &manifest);
            return Ok(manifest);
        }
        before = after;
    }
    Err(io::Error::other(format!(
        "{}: the file kept changing while its manifest was built",
        image.display()
    )))
}

/// Write the manifest of `image` now (e.g. by a save that verified the file).
pub fn store(image: &Path, manifest: &Manifest) -> io::Result<()> {
    store_renamed(image, image, manifest)
}

/// Write the manifest for the image that `current` is about to be renamed
/// to, so that it is in place before the image appears under its final name.
/// The stamp is taken from `current`: a rename keeps length, mtime, inode
/// and device.
pub fn store_renamed(current: &Path, final_image: &Path, manifest: &Manifest) -> io::Result<()> {
    let stamp = FileStamp::of_path(current)?;
    if stamp.len != manifest.size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: is {} bytes, its manifest says {}",
                current.display(),
                stamp.len,
                manifest.size
            ),
        ));
    }
    write_cache(&locations(final_image), stamp, manifest).map(|_| ())
}

/// Write atomically to the first place that accepts it.
fn write_cache(places: &[PathBuf], stamp: FileStamp, manifest: &Manifest) -> io::Result<PathBuf> {
    let bytes = encode(stamp, manifest);
    let mut last = io::Error::other("no place to write a manifest");
    for place in places {
        match write_atomic(place, &bytes) {
            Ok(()) => return Ok(place.clone()),
            Err(e) => last = in_file(place, e),
        }
    }
    Err(last)
}

pub(crate) fn write_atomic(place: &Path, bytes: &[u8]) -> io::Result<()> {
    crate::image::fileio::replace_atomically(place, bytes, false)
}

/// Encoded size of a cache file for `count` chunks.
fn cache_len(count: usize) -> Option<u64> {
    let count = count as u64;
    let fixed = 8 + (8 + 8 + 4 + 8 + 8) + 8 + 8 + 8 + 8 + 16 + 8;
    count
        .checked_mul(16)?
        .checked_add(bitmap_len(usize::try_from(count).ok()?) as u64)?
        .checked_add(fixed)
}

fn encode(stamp: FileStamp, m: &Manifest) -> Vec<u8> {
    let mut b = Vec::with_capacity(cache_len(m.digests.len()).unwrap_or(0) as usize);
    b.extend_from_slice(CACHE_MAGIC);
    b.extend_from_slice(&stamp.len.to_le_bytes());
    b.extend_from_slice(&stamp.mtime_secs.to_le_bytes());
    b.extend_from_slice(&stamp.mtime_nsec.to_le_bytes());
    b.extend_from_slice(&stamp.inode.to_le_bytes());
    b.extend_from_slice(&stamp.dev.to_le_bytes());
    b.extend_from_slice(&m.chunk_size.to_le_bytes());
    b.extend_from_slice(&m.size.to_le_bytes());
    b.extend_from_slice(&(m.digests.len() as u64).to_le_bytes());
    for d in &m.digests {
        b.extend_from_slice(&d.to_le_bytes());
    }
    b.extend_from_slice(&(m.zero.len() as u64).to_le_bytes());
    b.extend_from_slice(&m.zero);
    b.extend_from_slice(&m.identity.to_le_bytes());
    let sum = xxh3_64(&b);
    b.extend_from_slice(&sum.to_le_bytes());
    b
}

fn decode(bytes: &[u8]) -> io::Result<(FileStamp, Manifest)> {
    let bad =
        |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("bad manifest: {what}"));
    let split = bytes.len().checked_sub(8).ok_or_else(|| bad("too short"))?;
    let (body, sum) = bytes.split_at(split);
    let mut r = Cursor::new(body);
    if r.take(8, "magic").map_err(|_| bad("too short"))? != CACHE_MAGIC {
        return Err(bad("not a manifest file"));
    }
    if u64::from_le_bytes(sum.try_into().map_err(|_| bad("checksum"))?) != xxh3_64(body) {
        return Err(bad("checksum mismatch"));
    }
    let stamp = FileStamp {
        len: r.u64("manifest")?,
        mtime_secs: r.u64("manifest")? as i64,
        mtime_nsec: r.u32("manifest")?,
        inode: r.u64("manifest")?,
        dev: r.u64("manifest")?,
    };
    let chunk_size = r.u64("manifest")?;
    let size = r.u64("manifest")?;
    let count = r.u64("manifest")?;
    if chunk_size == 0 {
        return Err(bad("chunk size 0"));
    }
    if count != Geometry::new(size, chunk_size).count() {
        return Err(bad("chunk count does not match size"));
    }
    let count = usize::try_from(count).map_err(|_| bad("chunk count"))?;
    let digest_bytes = r.take(
        count.checked_mul(16).ok_or_else(|| bad("chunk count"))?,
        "manifest digests",
    )?;
    let digests: Vec<u128> = digest_bytes
        .chunks_exact(16)
        .map(|c| {
            let mut a = [0u8; 16];
            a.copy_from_slice(c);
            u128::from_le_bytes(a)
        })
        .collect();
    let zero_len = r.u64("manifest")?;
    if zero_len != bitmap_len(count) as u64 {
        return Err(bad("zero bitmap length does not match chunk count"));
    }
    let zero = r.take(zero_len as usize, "manifest")?.to_vec();
    if (count..zero.len() * 8).any(|i| bit(&zero, i)) {
        return Err(bad("zero bitmap has bits past the last chunk"));
    }
    let identity = r.u128("manifest")?;
    if r.remaining() != 0 {
        return Err(bad("trailing bytes"));
    }
    let manifest = Manifest::from_parts(chunk_size, size, digests, zero);
    if manifest.identity != identity {
        return Err(bad("identity does not match content"));
    }
    Ok((stamp, manifest))
}

/// Bounds-checked reading of the cache body.
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::{Duration, SystemTime};

    const CS: u64 = 64 << 10;

    fn naive(data: &[u8], cs: usize) -> (Vec<u128>, Vec<bool>) {
        data.chunks(cs)
            .map(|c| (chunk_digest(c), c.iter().all(|&b| b == 0)))
            .unzip()
    }

    fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..n).map(|_| rng.u8(..)).collect()
    }

    /// A sparse file: `len` bytes, random data written only at `regions`,
    /// explicit zeros at `zero_regions`, holes elsewhere. Returns its content.
    fn sparse_file(
        path: &Path,
        len: usize,
        regions: &[(usize, usize)],
        zero_regions: &[(usize, usize)],
    ) -> Vec<u8> {
        let f = File::create(path).unwrap();
        f.set_len(len as u64).unwrap();
        let mut content = vec![0u8; len];
        for (k, &(at, n)) in regions.iter().enumerate() {
            let data = random_bytes(n, k as u64 + 1);
            f.write_all_at(&data, at as u64).unwrap();
            content[at..at + n].copy_from_slice(&data);
        }
        for &(at, n) in zero_regions {
            f.write_all_at(&vec![0u8; n], at as u64).unwrap();
        }
        content
    }

    fn check_against_naive(path: &Path, content: &[u8], cs: u64) -> Manifest {
        let m = Manifest::build(path, cs).unwrap();
        let (digests, zeros) = naive(content, cs as usize);
        assert_eq!(m.size, content.len() as u64);
        assert_eq!(m.chunk_count(), digests.len());
        assert_eq!(m.digests, digests, "digests differ from a per-chunk hash");
        for (i, z) in zeros.iter().enumerate() {
            assert_eq!(m.is_zero_chunk(i), *z, "zero bit of chunk {i}");
        }
        let data: u64 = content
            .chunks(cs as usize)
            .filter(|c| c.iter().any(|&b| b != 0))
            .map(|c| c.len() as u64)
            .sum();
        assert_eq!(m.data_size(), data);
        m
    }

    /// Make sure a rewrite is seen even on filesystems with coarse mtimes.
    fn bump_mtime(path: &Path) {
        let f = fs::OpenOptions::new().write(true).open(path).unwrap();
        let old = f.metadata().unwrap().modified().unwrap();
        f.set_modified(old + Duration::from_secs(7)).unwrap();
    }

    #[test]
    fn digests_and_zero_map_match_a_naive_reading_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        // Data, explicit zeros, holes, data crossing chunk borders, and a
        // size that is not a multiple of the chunk size.
        let len = 40 * CS as usize + 12345;
        let content = sparse_file(
            &path,
            len,
            &[
                (0, 3 * CS as usize),
                (5 * CS as usize + 100, 200),
                (9 * CS as usize - 10, 20),
                (39 * CS as usize, CS as usize + 12345),
            ],
            &[(12 * CS as usize, 4 * CS as usize)],
        );
        let m = check_against_naive(&path, &content, CS);
        assert!(m.is_zero_chunk(3) && m.is_zero_chunk(12) && m.is_zero_chunk(20));
        assert!(!m.is_zero_chunk(5) && !m.is_zero_chunk(8) && !m.is_zero_chunk(40));
        assert_eq!(m.chunk_len(40), 12345);
        assert_eq!(m.chunk_offset(40), 40 * CS);
        // Many ranges per thread, and odd chunk sizes.
        check_against_naive(&path, &content, 4096);
        check_against_naive(&path, &content, 1000);
        check_against_naive(&path, &content, len as u64 + 5);
    }

    #[test]
    fn a_fully_sparse_file_is_all_zero_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holes.img");
        let content = sparse_file(&path, 10 * CS as usize + 1, &[], &[]);
        let m = check_against_naive(&path, &content, CS);
        assert!((0..m.chunk_count()).all(|i| m.is_zero_chunk(i)));
        assert_eq!(m.data_size(), 0);
        assert_eq!(m.chunk_len(10), 1);
    }

    #[test]
    fn chunks_entirely_in_holes_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holes.img");
        sparse_file(&path, 8 * CS as usize, &[(2 * CS as usize + 5, 10)], &[]);
        let file = ImageReader::open(&path).unwrap();
        let has = chunks_with_data(&file, 8 * CS, CS, 8);
        // Filesystems without hole reporting call everything data.
        if has.iter().any(|h| !h) {
            assert_eq!(has, [false, false, true, false, false, false, false, false]);
        }
    }

    #[test]
    fn an_empty_file_has_no_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.img");
        File::create(&path).unwrap();
        let m = Manifest::build(&path, CS).unwrap();
        assert_eq!(m.chunk_count(), 0);
        assert!(m.zero.is_empty());
        assert_eq!(m.data_size(), 0);
        assert_eq!(m.identity_hex().len(), 32);
        // Distinct from an empty file at another chunk size.
        assert_ne!(m.identity, Manifest::build(&path, 4096).unwrap().identity);
    }

    #[test]
    fn identity_is_stable_and_changes_with_any_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.img");
        let mut content = random_bytes(5 * CS as usize + 7, 9);
        content[CS as usize..2 * CS as usize].fill(0);
        fs::write(&path, &content).unwrap();
        let m1 = Manifest::build(&path, CS).unwrap();
        assert_eq!(m1, Manifest::build(&path, CS).unwrap());
        assert_eq!(
            m1.identity,
            Manifest::from_parts(CS, m1.size, m1.digests.clone(), m1.zero.clone()).identity
        );
        for at in [0, CS as usize + 3, content.len() - 1] {
            let mut changed = content.clone();
            changed[at] ^= 1;
            fs::write(&path, &changed).unwrap();
            let m2 = Manifest::build(&path, CS).unwrap();
            assert_ne!(m1.identity, m2.identity, "byte {at}");
            assert_ne!(m1.identity_hex(), m2.identity_hex());
        }
        // A trailing zero byte changes the size, hence the identity.
        content.push(0);
        fs::write(&path, &content).unwrap();
        assert_ne!(m1.identity, Manifest::build(&path, CS).unwrap().identity);
    }

    #[test]
    fn build_refuses_a_zero_chunk_size_and_names_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.img");
        let e = Manifest::build(&missing, CS).unwrap_err();
        assert!(e.to_string().contains("nope.img"), "{e}");
        File::create(dir.path().join("x")).unwrap();
        assert!(Manifest::build(&dir.path().join("x"), 0).is_err());
    }

    #[test]
    fn cache_round_trip_then_stale_after_a_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let content = random_bytes(3 * CS as usize + 10, 3);
        fs::write(&path, &content).unwrap();
        assert_eq!(cached_state(&path, CS), ManifestState::Missing);
        assert_eq!(load_cached(&path, CS), None);

        let built = load_or_build(&path, CS).unwrap();
        assert_eq!(manifest_path(&path), dir.path().join(".disk.img.manifest"));
        assert!(manifest_path(&path).is_file());
        assert_eq!(cached_state(&path, CS), ManifestState::Fresh);
        assert_eq!(load_cached(&path, CS), Some(built.clone()));
        assert_eq!(load_or_build(&path, CS).unwrap(), built);
        // Another chunk size is another manifest.
        assert_eq!(cached_state(&path, 4096), ManifestState::Stale);
        assert_eq!(load_cached(&path, 4096), None);

        // Rewrite one byte in place: same length, inode and device.
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[content[CS as usize + 1] ^ 0xff], CS + 1)
            .unwrap();
        drop(f);
        bump_mtime(&path);
        assert_eq!(cached_state(&path, CS), ManifestState::Stale);
        assert_eq!(load_cached(&path, CS), None);
        let rebuilt = load_or_build(&path, CS).unwrap();
        assert_ne!(rebuilt.digests[1], built.digests[1]);
        assert_eq!(rebuilt.digests[0], built.digests[0]);
        assert_ne!(rebuilt.identity, built.identity);
        assert_eq!(cached_state(&path, CS), ManifestState::Fresh);
    }

    #[test]
    fn mtime_nanoseconds_alone_make_a_manifest_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        fs::write(&path, b"some bytes").unwrap();
        let f = File::options().write(true).open(&path).unwrap();
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 100);
        f.set_modified(t).unwrap();
        load_or_build(&path, CS).unwrap();
        assert_eq!(cached_state(&path, CS), ManifestState::Fresh);
        f.set_modified(t + Duration::from_nanos(1)).unwrap();
        assert_eq!(cached_state(&path, CS), ManifestState::Stale);
    }

    #[test]
    fn a_corrupted_cache_is_ignored_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        fs::write(&path, random_bytes(2 * CS as usize + 1, 5)).unwrap();
        let good = load_or_build(&path, CS).unwrap();
        let cache = manifest_path(&path);
        let original = fs::read(&cache).unwrap();

        let mut damaged: Vec<Vec<u8>> = Vec::new();
        for at in [0, 9, 50, 70, original.len() / 2, original.len() - 1] {
            let mut d = original.clone();
            d[at] ^= 0x10;
            damaged.push(d);
        }
        damaged.push(original[..original.len() - 1].to_vec());
        damaged.push(original[..20].to_vec());
        damaged.push(Vec::new());
        let mut longer = original.clone();
        longer.push(0);
        damaged.push(longer);
        for d in damaged {
            fs::write(&cache, &d).unwrap();
            assert_eq!(cached_state(&path, CS), ManifestState::Stale);
            assert_eq!(load_cached(&path, CS), None);
            assert_eq!(load_or_build(&path, CS).unwrap(), good);
            assert_eq!(fs::read(&cache).unwrap(), original, "rewritten");
        }
    }

    #[test]
    fn decode_reports_each_kind_of_damage() {
        let m = Manifest::from_parts(10, 25, vec![1, 2, 3], vec![0b010]);
        let stamp = FileStamp {
            len: 25,
            mtime_secs: -3,
            mtime_nsec: 5,
            inode: 7,
            dev: 8,
        };
        let bytes = encode(stamp, &m);
        assert_eq!(bytes.len() as u64, cache_len(3).unwrap());
        assert_eq!(decode(&bytes).unwrap(), (stamp, m.clone()));
        // Consistent checksum but a wrong identity.
        let mut forged = m.clone();
        forged.identity ^= 1;
        let e = decode(&encode(stamp, &forged)).unwrap_err();
        assert!(e.to_string().contains("identity"), "{e}");
        // Consistent checksum but a count that does not match the size.
        let short = Manifest::from_parts(10, 25, vec![1, 2], vec![0]);
        let e = decode(&encode(stamp, &short)).unwrap_err();
        assert!(e.to_string().contains("count"), "{e}");
        // A bit past the last chunk.
        let stray = Manifest::from_parts(10, 25, vec![1, 2, 3], vec![0b1000]);
        assert!(decode(&encode(stamp, &stray)).is_err());
    }

    #[test]
    fn cache_falls_back_when_beside_is_not_writable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        fs::write(&path, random_bytes(CS as usize, 6)).unwrap();
        // A regular file as the directory stands for one we cannot write
        // (tests may run as root, who can write anywhere).
        let fs_file = dir.path().join("file");
        fs::write(&fs_file, b"").unwrap();
        let unwritable = fs_file.join(".disk.img.manifest");
        let fallback = dir.path().join("cache/manifests/k.manifest");
        let places = [unwritable.clone(), fallback.clone()];
        let m = load_or_build_in(&path, CS, &places).unwrap();
        assert!(!unwritable.exists());
        assert!(fallback.is_file());
        let stamp = FileStamp::of_path(&path).unwrap();
        assert_eq!(
            lookup_in(&places, stamp, CS),
            (ManifestState::Fresh, Some(m.clone()))
        );
        // Nowhere writable: still a manifest.
        let nowhere = [fs_file.join("a"), fs_file.join("b")];
        assert_eq!(load_or_build_in(&path, CS, &nowhere).unwrap(), m);
        assert_eq!(lookup_in(&nowhere, stamp, CS).0, ManifestState::Missing);
    }

    #[test]
    fn store_writes_a_fresh_manifest_that_survives_the_final_rename() {
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join(".saved.img.partial");
        let final_image = dir.path().join("saved.img");
        fs::write(&partial, random_bytes(CS as usize * 2, 8)).unwrap();
        let m = Manifest::build(&partial, CS).unwrap();
        store_renamed(&partial, &final_image, &m).unwrap();
        assert!(dir.path().join(".saved.img.manifest").is_file());
        fs::rename(&partial, &final_image).unwrap();
        assert_eq!(cached_state(&final_image, CS), ManifestState::Fresh);
        assert_eq!(load_cached(&final_image, CS), Some(m.clone()));

        // store refuses a manifest of another size.
        let other = Manifest::from_parts(CS, 5, vec![0], vec![0]);
        assert!(store(&final_image, &other).is_err());
        store(&final_image, &m).unwrap();
        assert_eq!(cached_state(&final_image, CS), ManifestState::Fresh);
    }

    #[test]
    fn a_symlink_shares_its_targets_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("ubuntu.img");
        fs::write(&real, b"data").unwrap();
        let link = dir.path().join("default.img");
        std::os::unix::fs::symlink("ubuntu.img", &link).unwrap();
        load_or_build(&link, CS).unwrap();
        assert_eq!(cached_state(&real, CS), ManifestState::Fresh);
        assert_eq!(manifest_path(&link), manifest_path(&real));
    }

    proptest! {
        #[test]
        fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn decoding_damaged_caches_never_panics(
            at in 0usize..200, x in 1u8..=255, cut in 0usize..200, count in 0usize..5,
        ) {
            let m = Manifest::from_parts(7, count as u64 * 7, vec![9; count], vec![0; bitmap_len(count)]);
            let stamp = FileStamp { len: 1, mtime_secs: 2, mtime_nsec: 3, inode: 4, dev: 5 };
            let mut bytes = encode(stamp, &m);
            let at = at % bytes.len();
            bytes[at] ^= x;
            prop_assert!(decode(&bytes).is_err());
            let _ = decode(&bytes[..cut.min(bytes.len())]);
        }
    }
}
