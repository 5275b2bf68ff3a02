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
