//! The sending side of a load: each image chunk is read, checked against
//! the manifest and compressed once, then shared by every node that needs
//! it (a small cache of recent chunks), and a shared bandwidth cap.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::image::manifest::Manifest;
use crate::image::reader::ImageReader;
use crate::proto::Codec;

/// One chunk as it travels.
#[derive(Debug)]
pub struct WireChunk {
    pub index: u32,
    pub codec: Codec,
    pub data: Vec<u8>,
    /// Image bytes it carries (before compression).
    pub raw_len: u64,
}

/// Why a chunk cannot be sent: the node's load fails with the matching
/// [`NodeError`](crate::engine::error::NodeError) (see its `From`).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The chunk read no longer matches the manifest's digest: the image
    /// file was changed after its manifest was built.
    #[error("the image changed while loading (chunk {index} no longer matches its manifest)")]
    Changed { index: usize },
    /// Reading the chunk from the image failed.
    #[error("reading image chunk {index}: {error}")]
    Read {
        index: usize,
        #[source]
        error: std::io::Error,
    },
    /// The blocking task that reads the chunk did not finish (it panicked).
    #[error("chunk reader failed: {0}")]
    Reader(String),
}

/// Memory kept for chunks already prepared, whatever the image size: for
/// the whole run, shared by its images ([`cache_share`]).
pub const CACHE_BYTES: u64 = 128 << 20;

/// Each image's part of [`CACHE_BYTES`] in a run of `images` images, which
/// load at the same time: four base images pushed to hypervisors keep
/// 128 MiB of chunks in all, not 512 MiB.
pub fn cache_share(images: usize) -> u64 {
    CACHE_BYTES / images.max(1) as u64
}

/// A raw chunk that goes from the image file straight into a node's pipe
/// ([`crate::node::splice`]), never through the controller's memory; the
/// node still checks it against the manifest.
pub struct FileChunk {
    pub index: u32,
    pub offset: u64,
    pub len: usize,
    file: Arc<ImageReader>,
}

impl FileChunk {
    pub fn file(&self) -> &std::fs::File {
        self.file
            .raw_file()
            .expect("a FileChunk is only made of a raw image")
    }
}

type Slot = Arc<OnceCell<Arc<WireChunk>>>;

pub struct ChunkSource {
    file: Arc<ImageReader>,
    manifest: Arc<Manifest>,
    level: i32,
    slots: Mutex<(HashMap<usize, Slot>, VecDeque<usize>)>,
    max_slots: usize,
    /// Per chunk, whether its samples compress ([`UNJUDGED`], [`GOES_RAW`],
    /// [`PACKS`]): judged once, whichever path asks first.
    verdicts: Vec<AtomicU8>,
    /// Chunks read from disk (each chunk once, unless evicted and asked again).
    pub reads: AtomicU64,
}

const UNJUDGED: u8 = 0;
const GOES_RAW: u8 = 1;
const PACKS: u8 = 2;

impl ChunkSource {
    /// A source keeping up to `cache_bytes` of prepared chunks (at least
    /// four chunks).
    pub fn new(
        file: ImageReader,
        manifest: Arc<Manifest>,
        level: i32,
        cache_bytes: u64,
    ) -> Arc<Self> {
        let max_slots = (cache_bytes / manifest.chunk_size.max(1)).max(4) as usize;
        let verdicts = (0..manifest.digests.len())
            .map(|_| AtomicU8::new(UNJUDGED))
            .collect();
        Arc::new(ChunkSource {
            file: Arc::new(file),
            manifest,
            level,
            slots: Mutex::new((HashMap::new(), VecDeque::new())),
            max_slots,
            verdicts,
            reads: AtomicU64::new(0),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn slot(&self, index: usize) -> Slot {
        let mut guard = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *guard;
        if let Some(slot) = map.get(&index) {
            return slot.clone();
        }
        let slot: Slot = Arc::new(OnceCell::new());
        map.insert(index, slot.clone());
        order.push_back(index);
        while order.len() > self.max_slots {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
        slot
    }

    /// Chunk `index`, prepared once and shared.
    pub async fn get(self: &Arc<Self>, index: usize) -> Result<Arc<WireChunk>, SourceError> {
        let slot = self.slot(index);
        let this = self.clone();
        slot.get_or_try_init(|| async move {
            tokio::task::spawn_blocking(move || this.prepare(index))
                .await
                .map_err(|e| SourceError::Reader(e.to_string()))?
                .map(Arc::new)
        })
        .await
        .cloned()
    }

    fn prepare(&self, index: usize) -> Result<WireChunk, SourceError> {
        let raw = self.raw(index)?;
        let raw_len = raw.len() as u64;
        let (codec, data) = self.compress(index, raw);
        Ok(WireChunk {
            index: index as u32,
            codec,
            data,
            raw_len,
        })
    }

    /// Chunk `index` as a range of the image file, when it travels as it is
    /// (blocking: reads a few samples to judge compression, and asks the
    /// kernel to read the range ahead): the image is a plain file, the
    /// chunk is not in the cache already, and it would go uncompressed.
    /// Its digest is not checked here: the node checks it, and a mismatch it
    /// reports is traced back to the image by [`ChunkSource::raw`].
    pub fn from_file(&self, index: usize) -> Result<Option<FileChunk>, SourceError> {
        let Some(file) = self.file.raw_file().filter(|_| self.may_splice(index)) else {
            return Ok(None);
        };
        let m = &self.manifest;
        let (offset, len) = (m.chunk_offset(index), m.chunk_len(index) as usize);
        let compresses = self.judged(index, || match probe_ranges(len) {
            None => Ok(true),
            Some(ranges) => {
                let mut sample = vec![0u8; PROBE * PROBES];
                for (k, start) in ranges.into_iter().enumerate() {
                    std::os::unix::fs::FileExt::read_exact_at(
                        file,
                        &mut sample[k * PROBE..(k + 1) * PROBE],
                        offset + start as u64,
                    )
                    .map_err(|error| SourceError::Read { index, error })?;
                }
                Ok(sample_compresses(&sample, self.level))
            }
        })?;
        if compresses {
            return Ok(None);
        }
        {
            use std::os::fd::AsRawFd;
            // SAFETY: advice on a descriptor we hold; it fails harmlessly.
            unsafe {
                libc::posix_fadvise(
                    file.as_raw_fd(),
                    offset as libc::off_t,
                    len as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                );
            }
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        Ok(Some(FileChunk {
            index: index as u32,
            offset,
            len,
            file: self.file.clone(),
        }))
    }

    /// Whether [`ChunkSource::from_file`] may give chunk `index` (without
    /// blocking): the image is a plain file, the chunk is not in the cache,
    /// and it is not known to compress.
    pub fn may_splice(&self, index: usize) -> bool {
        self.file.raw_file().is_some()
            && !self.cached(index)
            && (self.level <= 0 || self.verdict(index) != PACKS)
    }

    fn verdict(&self, index: usize) -> u8 {
        self.verdicts
            .get(index)
            .map_or(UNJUDGED, |v| v.load(Ordering::Relaxed))
    }

    /// Whether chunk `index` is sent compressed: never at level 0; else the
    /// verdict already reached, or `judge`'s, kept for the next asker.
    fn judged(
        &self,
        index: usize,
        judge: impl FnOnce() -> Result<bool, SourceError>,
    ) -> Result<bool, SourceError> {
        if self.level <= 0 {
            return Ok(false);
        }
        match self.verdict(index) {
            GOES_RAW => Ok(false),
            PACKS => Ok(true),
            _ => {
                let compresses = judge()?;
                if let Some(v) = self.verdicts.get(index) {
                    v.store(if compresses { PACKS } else { GOES_RAW }, Ordering::Relaxed);
                }
                Ok(compresses)
            }
        }
    }

    /// Whether chunk `index` is prepared in the cache (or being prepared).
    fn cached(&self, index: usize) -> bool {
        let guard = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        guard.0.contains_key(&index)
    }

    /// Chunk `index`'s bytes, read (blocking) and checked against the
    /// manifest; not cached. For a node's patch, whose blocks are its own.
    pub fn raw(&self, index: usize) -> Result<Vec<u8>, SourceError> {
        let m = &self.manifest;
        let len = m.chunk_len(index) as usize;
        let mut raw = vec![0u8; len];
        self.file
            .read_exact_at(&mut raw, m.chunk_offset(index))
            .map_err(|error| SourceError::Read { index, error })?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        if crate::image::digest::chunk_digest(&raw) != m.digests[index] {
            return Err(SourceError::Changed { index });
        }
        Ok(raw)
    }

    /// `raw` as it travels: compressed at the run's level when that makes
    /// it smaller, else as it is.
    pub fn pack(&self, raw: Vec<u8>) -> (Codec, Vec<u8>) {
        if self.level <= 0 {
            return (Codec::Raw, raw);
        }
        match zstd::bulk::compress(&raw, self.level) {
            Ok(packed) if packed.len() < raw.len() / 100 * 97 => (Codec::Zstd, packed),
            _ => (Codec::Raw, raw),
        }
    }

    fn compress(&self, index: usize, raw: Vec<u8>) -> (Codec, Vec<u8>) {
        // Incompressible data (random, already compressed) costs CPU for
        // nothing: a chunk whose samples do not compress goes as it is.
        let worth = self.judged(index, || Ok(worth_compressing(&raw, self.level)));
        if !matches!(worth, Ok(true)) {
            return (Codec::Raw, raw);
        }
        self.pack(raw)
    }
}

/// Bytes compressed to judge a chunk: [`PROBES`] samples of [`PROBE`] bytes,
/// spread over it.
const PROBE: usize = 16 << 10;
const PROBES: usize = 4;

/// Whether zstd is likely to shrink `raw` below 97 %: samples from its
/// start, middle and end are compressed together (about 1.6 % of a 4 MiB
/// chunk's work). A chunk of zeros with a random header, or the reverse,
/// compresses in its samples too; data that hides its redundancy from every
/// sample goes raw, which costs bandwidth, never correctness.
fn worth_compressing(raw: &[u8], level: i32) -> bool {
    let Some(ranges) = probe_ranges(raw.len()) else {
        return true;
    };
    let mut sample = Vec::with_capacity(PROBE * PROBES);
    for start in ranges {
        sample.extend_from_slice(&raw[start..start + PROBE]);
    }
    sample_compresses(&sample, level)
}

/// Where the samples of a chunk of `len` bytes start; None: it is small
/// enough to be tried whole.
fn probe_ranges(len: usize) -> Option<Vec<usize>> {
    if len <= PROBE * PROBES {
        return None;
    }
    let step = (len - PROBE) / (PROBES - 1);
    Some((0..PROBES).map(|k| k * step).collect())
}

fn sample_compresses(sample: &[u8], level: i32) -> bool {
    match zstd::bulk::compress(sample, level) {
        Ok(packed) => packed.len() < sample.len() / 100 * 97,
        Err(_) => false,
    }
}

/// A token bucket shared by every node of a run: `rate` bytes per second
/// on the wire, with one second of burst.
pub struct RateLimit {
    rate: f64,
    state: tokio::sync::Mutex<(f64, Instant)>,
}

impl RateLimit {
    /// None when `bytes_per_sec` is 0 (no cap).
    pub fn new(bytes_per_sec: u64) -> Option<Arc<Self>> {
        (bytes_per_sec > 0).then(|| {
            Arc::new(RateLimit {
                rate: bytes_per_sec as f64,
                state: tokio::sync::Mutex::new((bytes_per_sec as f64, Instant::now())),
            })
        })
    }

    pub async fn take(&self, bytes: u64) {
        let mut state = self.state.lock().await;
        let (tokens, last) = &mut *state;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.rate);
        *last = now;
        *tokens -= bytes as f64;
        if *tokens < 0.0 {
            // Sleeping with the lock held queues the other senders behind us.
            tokio::time::sleep(Duration::from_secs_f64(-*tokens / self.rate)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::error::NodeError;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_chunk_is_read_once_however_many_nodes_take_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mut data = vec![0u8; 16 << 16];
        fastrand::Rng::with_seed(7).fill(&mut data);
        std::fs::write(&path, &data).unwrap();
        let manifest = Arc::new(Manifest::build(&path, 1 << 16).unwrap());
        let source = ChunkSource::new(
            ImageReader::open(&path).unwrap(),
            manifest.clone(),
            3,
            CACHE_BYTES,
        );
        let mut nodes = Vec::new();
        for _ in 0..4 {
            let source = source.clone();
            nodes.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..16 {
                    let c = source.get(i).await.unwrap();
                    let raw = match c.codec {
                        Codec::Raw => c.data.clone(),
                        Codec::Zstd => zstd::bulk::decompress(&c.data, 1 << 16).unwrap(),
                    };
                    got.extend_from_slice(&raw);
                }
                got
            }));
        }
        for n in nodes {
            assert!(n.await.unwrap() == data);
        }
        assert_eq!(source.reads.load(Ordering::Relaxed), 16);
    }

    #[tokio::test]
    async fn a_share_of_the_cache_keeps_that_many_chunks_and_reads_the_rest_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mut data = vec![0u8; 16 << 16];
        fastrand::Rng::with_seed(8).fill(&mut data);
        std::fs::write(&path, &data).unwrap();
        let manifest = Arc::new(Manifest::build(&path, 1 << 16).unwrap());
        // Room for 8 of the 16 chunks.
        let source = ChunkSource::new(ImageReader::open(&path).unwrap(), manifest, 0, 8 << 16);
        for i in 0..16 {
            source.get(i).await.unwrap();
        }
        // The last 8 are kept, the first 8 were let go.
        for i in 8..16 {
            source.get(i).await.unwrap();
        }
        assert_eq!(source.reads.load(Ordering::Relaxed), 16);
        source.get(0).await.unwrap();
        assert_eq!(source.reads.load(Ordering::Relaxed), 17);
        // Four images share the run's cache; one has all of it.
        assert_eq!(cache_share(1), CACHE_BYTES);
        assert_eq!(cache_share(4), CACHE_BYTES / 4);
        assert_eq!(cache_share(0), CACHE_BYTES);
    }

    #[tokio::test]
    async fn a_changed_image_is_refused_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![1u8; 1 << 16]).unwrap();
        let manifest = Arc::new(Manifest::build(&path, 1 << 16).unwrap());
        std::fs::write(&path, vec![2u8; 1 << 16]).unwrap();
        let source = ChunkSource::new(ImageReader::open(&path).unwrap(), manifest, 3, CACHE_BYTES);
        let err = source.get(0).await.unwrap_err();
        assert!(matches!(err, SourceError::Changed { index: 0 }), "{err:?}");
        assert!(err.to_string().contains("image changed"), "{err}");
        let err = crate::engine::error::NodeError::from(err);
        assert!(
            matches!(err, NodeError::ImageChanged { chunk: 0 }),
            "{err:?}"
        );
        assert!(err.to_string().contains("image changed"), "{err}");
        assert!(!err.is_retryable());
    }

    #[test]
    fn random_chunks_go_raw_and_compressible_ones_compressed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let chunk = 1usize << 20;
        // Chunk 0 random; chunk 1 half random, half zeros; chunk 2 text.
        let mut data = vec![0u8; 3 * chunk];
        fastrand::Rng::with_seed(9).fill(&mut data[..chunk + chunk / 2]);
        for (k, b) in data[2 * chunk..].iter_mut().enumerate() {
            *b = b"imaging loads disk images\n"[k % 26];
        }
        std::fs::write(&path, &data).unwrap();
        let manifest = Arc::new(Manifest::build(&path, chunk as u64).unwrap());
        let source = ChunkSource::new(ImageReader::open(&path).unwrap(), manifest, 3, CACHE_BYTES);
        let codecs: Vec<Codec> = (0..3).map(|i| source.prepare(i).unwrap().codec).collect();
        assert_eq!(codecs, [Codec::Raw, Codec::Zstd, Codec::Zstd]);
        assert!(!worth_compressing(&data[..chunk], 3));
        // Compression off: everything raw.
        let manifest = Arc::new(Manifest::build(&path, chunk as u64).unwrap());
        let off = ChunkSource::new(ImageReader::open(&path).unwrap(), manifest, 0, CACHE_BYTES);
        assert_eq!(off.prepare(2).unwrap().codec, Codec::Raw);
    }

    #[tokio::test]
    async fn rate_limit_paces_senders() {
        let rate = RateLimit::new(1 << 20).unwrap();
        let started = Instant::now();
        // One second of burst, then 1 MiB more takes about another second.
        rate.take(1 << 20).await;
        rate.take(1 << 20).await;
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(900), "{took:?}");
    }
}
