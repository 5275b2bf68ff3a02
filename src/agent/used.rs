//! Which parts of a target disk must be read when saving it.
//!
//! Like Emulab's imagezip, `imaging save` does not need to read or send the
//! blocks that a file system marks free: they become holes (zeros) in the
//! saved image. [`analyse`] looks at a target (a whole disk, as a file or a
//! block device) through random reads and returns the byte ranges that must
//! be read, plus human-readable notes for the log.
//!
//! # Safety rule
//!
//! A block is reported free only when the on-disk metadata says so
//! unambiguously. Anything not understood is saved raw (all of its bytes are
//! "used") with a note saying why:
//!
//! * partition tables: MBR (primary partitions, and the logical partitions
//!   of one extended partition, numbered from 5; an EBR chain that is not
//!   strictly forward and inside its extended partition means the extended
//!   partition is saved raw) and GPT (primary header and entry array, CRC32
//!   checked, 512- or 4096-byte logical sectors; the backup is not read).
//!   Overlapping partitions, entries past the end of the disk, bad CRCs:
//!   whole disk raw. A boot sector without a valid table, or no table at
//!   all: whole disk raw unless it holds a bare ext file system.
//! * a bare ext2/3/4 file system on the whole disk (no partition table).
//! * ext2/3/4 file systems in partitions of Linux type (MBR 0x83, GPT Linux
//!   file system data, Linux root x86-64 and Linux home). Other partition
//!   types are saved raw.
//! * ext2/3/4: the superblock is checked thoroughly (sizes, counts, that the
//!   file system fits in its partition, clean state, no journal recovery
//!   pending, known features only: META_BG, BIGALLOC, COMPRESSION,
//!   JOURNAL_DEV, DIRDATA and unknown features mean raw). With
//!   `metadata_csum` the superblock, group descriptor and block bitmap
//!   checksums (CRC32C) are verified; with `uninit_bg` (GDT_CSUM) the group
//!   descriptor CRC16 is verified. Each group's count of free blocks in its
//!   bitmap must equal the free count in its descriptor, otherwise that group
//!   is kept whole.
//! * groups flagged `BLOCK_UNINIT` (no bitmap written yet): their used
//!   blocks (superblock backup, descriptor table, reserved descriptor blocks,
//!   bitmaps and inode tables of any group placed there) are computed, and the
//!   result is accepted only if it agrees with the descriptor's free count.
//!
//! The first MiB of the disk (partition table, boot loader), the last MiB of
//! a GPT disk (backup table), and the head of each file system (boot block,
//! superblock, group descriptors, reserved descriptor blocks) are always
//! reported used, whatever the bitmaps say.
//!
//! Only ext file systems that are cleanly unmounted, error-free and whose
//! journal needs no recovery are looked into: a file system mounted
//! read-write while being saved is not safe to analyse (nor to save).
//!
//! The module only uses `std`, never panics on any disk content, bounds every
//! allocation sized from disk data (at most 2^20 block groups per file
//! system, whose descriptors, about 50 bytes each, are kept; at most 2^22
//! free runs per disk, past which the rest is kept used), and holds
//! at most one bitmap block in memory at a time.
//!
//! # Example
//!
//! ```text
//! let disk = std::fs::File::open(&target)?;
//! let size = target_size; // e.g. from seeking to the end of a block device
//! let a = analyse(&disk, size);
//! for note in &a.notes { log(note); }
//! for &(offset, len) in &a.used { /* read and send these bytes */ }
//! ```

use std::io;

/// Random read access to a target.
///
/// Implemented for [`std::fs::File`] (via `std::os::unix::fs::FileExt`), for
/// byte slices and vectors (handy in tests), and for references to any
/// implementor. Where `FileExt` is also in scope, call it as
/// `ReadAt::read_exact_at(&file, ..)` to avoid the name clash.
pub trait ReadAt {
    /// Fills `buf` entirely from the bytes starting at `offset`, or fails.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let range = usize::try_from(offset)
            .ok()
            .and_then(|s| s.checked_add(buf.len()).map(|e| (s, e)))
            .filter(|&(_, e)| e <= self.len());
        match range {
            Some((s, e)) => {
                buf.copy_from_slice(&self[s..e]);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past end of buffer",
            )),
        }
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

/// Result of [`analyse`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Analysis {
    /// Byte ranges `(offset, len)` that must be read, sorted, non-empty,
    /// non-overlapping and merged (no two ranges touch). The complement
    /// within `[0, size)` is free and may be saved as holes.
    pub used: Vec<(u64, u64)>,
    /// Human-readable notes for the log, one line each.
    pub notes: Vec<String>,
}

/// Number of bytes of `[0, size)` that `a` reports free (not to be read).
pub fn free_bytes(a: &Analysis, size: u64) -> u64 {
    let used: u64 = a
        .used
        .iter()
        .map(|&(off, len)| {
            let end = off.saturating_add(len).min(size);
            end.saturating_sub(off.min(size))
        })
        .fold(0u64, |acc, x| acc.saturating_add(x));
    size.saturating_sub(used)
}

/// Finds which byte ranges of a target of `size` bytes must be read.
///
/// Never fails: on an I/O error or anything not understood, the affected
/// area (or the whole disk) is reported used, with a note.
pub fn analyse<R: ReadAt + ?Sized>(disk: &R, size: u64) -> Analysis {
    let mut st = State {
        disk: Disk { r: disk, size },
        free: Vec::new(),
        forced: Vec::new(),
        notes: Vec::new(),
    };
    if size == 0 {
        st.notes.push("empty target: nothing to read".to_string());
        return Analysis::default();
    }
    st.force(0, TABLE_AREA);
    st.scan_disk();
    st.finish()
}

/// Always-used area at the start of the disk (and at the end of GPT disks).
const TABLE_AREA: u64 = 1 << 20;
/// MBR logical sector size.
const SECTOR: u64 = 512;
/// Most block groups a file system may have before it is saved raw.
const MAX_GROUPS: u64 = 1 << 20;
/// Most free runs kept per disk; past that, the rest is kept used.
const MAX_FREE_RUNS: usize = 1 << 22;
/// Most per-group notes per file system (the rest are summarised).
const MAX_GROUP_NOTES: usize = 8;
/// Largest GPT partition entry array read.
const MAX_GPT_ARRAY: u64 = 1 << 20;

struct Disk<'a, R: ?Sized> {
    r: &'a R,
    size: u64,
}

impl<R: ReadAt + ?Sized> Disk<'_, R> {
    /// Reads `len` bytes at `off`, refusing reads outside the target.
    fn read(&self, off: u64, len: u64) -> Result<Vec<u8>, String> {
        if off.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(format!("read of {len} bytes at byte {off} is past the end"));
        }
        let n = usize::try_from(len).map_err(|_| "read too large".to_string())?;
        let mut buf = vec![0u8; n];
        self.r
            .read_exact_at(&mut buf, off)
            .map_err(|e| format!("read error at byte {off}: {e}"))?;
        Ok(buf)
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at.saturating_add(2)) {
        Some(s) => u16::from_le_bytes([s[0], s[1]]),
        None => 0,
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    match b.get(at..at.saturating_add(4)) {
        Some(s) => u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at.saturating_add(4))) << 32)
}

// ---------------------------------------------------------------- checksums

const fn crc32_table(poly: u32) -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ poly } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

const fn crc16_table() -> [u16; 256] {
    let mut t = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u16;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xA001
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC32_IEEE: [u32; 256] = crc32_table(0xEDB8_8320);
static CRC32C: [u32; 256] = crc32_table(0x82F6_3B78);
static CRC16: [u16; 256] = crc16_table();

/// Raw reflected CRC32 update (no pre/post inversion).
fn crc32_update(table: &[u32; 256], mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = table[usize::from((crc as u8) ^ b)] ^ (crc >> 8);
    }
    crc
}

/// Standard CRC-32 (IEEE 802.3, as used by GPT).
fn crc32_ieee(data: &[u8]) -> u32 {
    !crc32_update(&CRC32_IEEE, !0, data)
}

/// CRC32C update as ext4 uses it (`ext2fs_crc32c_le`: no inversions).
fn crc32c_le(crc: u32, data: &[u8]) -> u32 {
    crc32_update(&CRC32C, crc, data)
}

/// CRC16 (poly 0x8005 reflected) update as ext4 uses it for GDT_CSUM.
fn crc16_update(mut crc: u16, data: &[u8]) -> u16 {
    for &b in data {
        crc = CRC16[usize::from((crc as u8) ^ b)] ^ (crc >> 8);
    }
    crc
}

// ------------------------------------------------------------- disk layout

/// What a partition holds, as far as its type says.
enum Kind {
    /// May hold an ext2/3/4 file system.
    Linux(String),
    /// Not understood; saved raw.
    Other(String),
    /// An MBR extended partition (type byte) holding logical partitions.
    Extended(u8),
}

struct Part {
    label: String,
    start: u64,
    len: u64,
    /// Logical sector size, for notes.
    sector: u64,
    kind: Kind,
}

struct State<'a, R: ?Sized> {
    disk: Disk<'a, R>,
    /// Free byte ranges `(start, end)`.
    free: Vec<(u64, u64)>,
    /// Byte ranges `(start, len)` that are used whatever else says.
    forced: Vec<(u64, u64)>,
    notes: Vec<String>,
}

impl<R: ReadAt + ?Sized> State<'_, R> {
    fn force(&mut self, start: u64, len: u64) {
        self.forced.push((start, len));
    }

    fn whole_raw(&mut self, why: String) {
        self.notes.push(why);
        self.free.clear();
        self.force(0, self.disk.size);
    }

    fn scan_disk(&mut self) {
        let size = self.disk.size;
        let mbr = match self.disk.read(0, SECTOR.min(size)) {
            Ok(b) => b,
            Err(e) => {
                return self.whole_raw(format!("cannot read sector 0 ({e}): whole disk saved raw"));
            }
        };
        let signed = mbr.len() == 512 && mbr[510] == 0x55 && mbr[511] == 0xAA;
        if signed {
            let entries: Vec<&[u8]> = (0..4).map(|i| &mbr[446 + 16 * i..462 + 16 * i]).collect();
            if entries.iter().any(|e| e[4] == 0xEE) {
                match parse_gpt(&self.disk) {
                    Ok((parts, array)) => {
                        self.force(array.0, array.1);
                        self.force(size.saturating_sub(TABLE_AREA), TABLE_AREA);
                        return self.scan_parts(parts, "GPT");
                    }
                    Err(why) => {
                        return self.whole_raw(format!(
                            "GPT not understood ({why}): whole disk saved raw"
                        ));
                    }
                }
            }
            match parse_mbr(&entries, size) {
                Ok(parts) if !parts.is_empty() => {
                    let parts = self.expand_extended(parts);
                    return self.scan_parts(parts, "MBR");
                }
                Ok(_) => {
                    if self.try_bare() {
                        return;
                    }
                    return self
                        .whole_raw("MBR with no partitions: whole disk saved raw".to_string());
                }
                Err(why) => {
                    if self.try_bare() {
                        return;
                    }
                    return self.whole_raw(format!(
                        "boot signature but no valid MBR partition table ({why}): whole disk saved raw"
                    ));
                }
            }
        }
        if !self.try_bare() {
            self.whole_raw("no partition table: whole disk saved raw".to_string());
        }
    }

    /// Tries an ext file system on the whole disk. Returns false (and
    /// changes nothing) if there is no ext superblock at all.
    fn try_bare(&mut self) -> bool {
        let part = Part {
            label: "whole disk".to_string(),
            start: 0,
            len: self.disk.size,
            sector: SECTOR,
            kind: Kind::Linux("none".to_string()),
        };
        match ext_scan(&self.disk, part.start, part.len, self.free.len()) {
            Err(ExtError::NoMagic) => false,
            r => {
                self.take_ext(&part, r);
                true
            }
        }
    }

    /// Replaces the (single) extended partition by its logical partitions,
    /// or by a raw partition if its chain of EBRs is not understood.
    fn expand_extended(&self, parts: Vec<Part>) -> Vec<Part> {
        let n_ext = parts
            .iter()
            .filter(|p| matches!(p.kind, Kind::Extended(_)))
            .count();
        let mut out = Vec::new();
        for p in parts {
            let Kind::Extended(ty) = p.kind else {
                out.push(p);
                continue;
            };
            let why = if n_ext > 1 {
                "more than one extended partition".to_string()
            } else {
                match parse_ebr(&self.disk, p.start / SECTOR, p.len / SECTOR) {
                    Ok(logical) => {
                        out.extend(logical);
                        continue;
                    }
                    Err(why) => why,
                }
            };
            out.push(Part {
                kind: Kind::Other(format!("{ty:#04x} (extended: {why})")),
                ..p
            });
        }
        out
    }

    fn scan_parts(&mut self, mut parts: Vec<Part>, table: &str) {
        if parts.is_empty() {
            self.notes
                .push(format!("{table} with no partitions: whole disk saved raw"));
            return;
        }
        parts.sort_by_key(|p| p.start);
        for w in parts.windows(2) {
            if w[0].start.saturating_add(w[0].len) > w[1].start {
                return self.whole_raw(format!(
                    "{table}: {} and {} overlap: whole disk saved raw",
                    w[0].label, w[1].label
                ));
            }
        }
        for p in parts {
            match &p.kind {
                Kind::Extended(ty) => {
                    self.notes.push(format!(
                        "{} ({}): extended partition {ty:#04x}, saved raw",
                        p.label,
                        sectors(&p)
                    ));
                    self.force(p.start, p.len);
                }
                Kind::Other(t) => {
                    self.notes.push(format!(
                        "{} ({}): type {t} not understood, saved raw",
                        p.label,
                        sectors(&p)
                    ));
                    self.force(p.start, p.len);
                }
                Kind::Linux(_) => {
                    let r = ext_scan(&self.disk, p.start, p.len, self.free.len());
                    self.take_ext(&p, r);
                }
            }
        }
    }

    fn take_ext(&mut self, p: &Part, r: Result<ExtScan, ExtError>) {
        let t = match &p.kind {
            Kind::Linux(t) | Kind::Other(t) => t.clone(),
            Kind::Extended(ty) => format!("{ty:#04x}"),
        };
        match r {
            Err(ExtError::NoMagic) => {
                self.notes.push(format!(
                    "{} ({}): type {t} but no ext2/3/4 superblock, saved raw",
                    p.label,
                    sectors(p)
                ));
                self.force(p.start, p.len);
            }
            Err(ExtError::Refused(why)) => {
                self.notes.push(format!(
                    "{} ({}): ext2/3/4 file system not understood ({why}), saved raw",
                    p.label,
                    sectors(p)
                ));
                self.force(p.start, p.len);
            }
            Ok(s) => {
                let free_blocks = s
                    .free
                    .iter()
                    .map(|&(a, b)| (b - a) / s.block_size)
                    .sum::<u64>();
                self.notes.push(format!(
                    "{} ({}, {}): {free_blocks} of {} blocks free, skipped",
                    p.label,
                    s.name,
                    sectors(p),
                    s.blocks
                ));
                self.notes.extend(s.notes);
                self.force(p.start, s.head);
                self.free.extend(s.free);
            }
        }
    }

    fn finish(mut self) -> Analysis {
        let size = self.disk.size;
        let free = merge(std::mem::take(&mut self.free));
        // Complement of the free ranges within [0, size).
        let mut used: Vec<(u64, u64)> = Vec::with_capacity(free.len() + self.forced.len() + 1);
        let mut pos = 0u64;
        for &(a, b) in &free {
            let (a, b) = (a.min(size), b.min(size));
            if a > pos {
                used.push((pos, a));
            }
            pos = pos.max(b);
        }
        if pos < size {
            used.push((pos, size));
        }
        for &(off, len) in &self.forced {
            let s = off.min(size);
            let e = off.saturating_add(len).min(size);
            if e > s {
                used.push((s, e));
            }
        }
        let used = merge(used).into_iter().map(|(a, b)| (a, b - a)).collect();
        Analysis {
            used,
            notes: self.notes,
        }
    }
}

/// Sorts and merges `(start, end)` ranges, dropping empty ones and joining
/// touching ones.
fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|&(a, b)| b > a);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

fn sectors(p: &Part) -> String {
    let first = p.start / p.sector;
    let last = (p.start.saturating_add(p.len) / p.sector).saturating_sub(1);
    format!("{first}..{last} sectors")
}

fn parse_mbr(entries: &[&[u8]], size: u64) -> Result<Vec<Part>, String> {
    let disk_sectors = size / SECTOR;
    let mut parts = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let n = i + 1;
        if e[0] != 0 && e[0] != 0x80 {
            return Err(format!("entry {n} has status byte {:#04x}", e[0]));
        }
        let ty = e[4];
        if ty == 0 {
            continue;
        }
        let start = u64::from(le32(e, 8));
        let count = u64::from(le32(e, 12));
        if start == 0 || count == 0 {
            return Err(format!("partition {n} is empty or starts at sector 0"));
        }
        if start + count > disk_sectors {
            return Err(format!("partition {n} extends past the end of the disk"));
        }
        let kind = match ty {
            0x83 => Kind::Linux("0x83".to_string()),
            0x05 | 0x0F | 0x85 => Kind::Extended(ty),
            _ => Kind::Other(format!("{ty:#04x}")),
        };
        parts.push(Part {
            label: format!("partition {n}"),
            start: start * SECTOR,
            len: count * SECTOR,
            sector: SECTOR,
            kind,
        });
    }
    Ok(parts)
}

/// Most logical partitions followed in an extended partition.
const MAX_LOGICAL: usize = 128;

/// Follows the chain of extended boot records of the extended partition at
/// sectors `[ext_start, ext_start + ext_count)`; logical partitions are
/// numbered from 5 as Linux does.
fn parse_ebr<R: ReadAt + ?Sized>(
    disk: &Disk<'_, R>,
    ext_start: u64,
    ext_count: u64,
) -> Result<Vec<Part>, String> {
    let ext_end = ext_start + ext_count;
    let mut ebr = ext_start;
    let mut parts: Vec<Part> = Vec::new();
    for n in 5..5 + MAX_LOGICAL {
        let s = disk.read(ebr * SECTOR, SECTOR)?;
        if s[510] != 0x55 || s[511] != 0xAA {
            return Err(format!("no boot signature in the EBR at sector {ebr}"));
        }
        let (e1, e2) = (&s[446..462], &s[462..478]);
        if [e1, e2].iter().any(|e| e[0] != 0 && e[0] != 0x80) || s[478 + 4] != 0 || s[494 + 4] != 0
        {
            return Err(format!("bad EBR at sector {ebr}"));
        }
        if e1[4] != 0 {
            let rel = u64::from(le32(e1, 8));
            let count = u64::from(le32(e1, 12));
            let start = ebr + rel;
            if rel == 0 || count == 0 || start + count > ext_end {
                return Err(format!(
                    "logical partition {n} outside its extended partition"
                ));
            }
            let kind = match e1[4] {
                0x83 => Kind::Linux("0x83".to_string()),
                0x05 | 0x0F | 0x85 => {
                    return Err(format!("logical partition {n} of extended type"));
                }
                t => Kind::Other(format!("{t:#04x}")),
            };
            parts.push(Part {
                label: format!("partition {n}"),
                start: start * SECTOR,
                len: count * SECTOR,
                sector: SECTOR,
                kind,
            });
        }
        match e2[4] {
            0 => return Ok(parts),
            0x05 | 0x0F | 0x85 => {
                let next = ext_start + u64::from(le32(e2, 8));
                if next <= ebr || next >= ext_end {
                    return Err(format!("EBR chain leaves its order at sector {ebr}"));
                }
                if parts
                    .last()
                    .is_some_and(|p| p.start + p.len > next * SECTOR)
                {
                    return Err(format!("logical partition {n} covers the next EBR"));
                }
                ebr = next;
            }
            t => return Err(format!("EBR link of type {t:#04x} at sector {ebr}")),
        }
    }
    Err(format!("more than {MAX_LOGICAL} logical partitions"))
}

/// GPT type GUIDs (on-disk byte order) that may hold an ext file system.
const LINUX_GUIDS: [(&str, [u8; 16]); 3] = [
    (
        "Linux filesystem",
        guid(
            0x0FC6_3DAF,
            0x8483,
            0x4772,
            [0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D, 0xE4],
        ),
    ),
    (
        "Linux root (x86-64)",
        guid(
            0x4F68_BCE3,
            0xE8CD,
            0x4DB1,
            [0x96, 0xE7, 0xFB, 0xCA, 0xF9, 0x84, 0xB7, 0x09],
        ),
    ),
    (
        "Linux home",
        guid(
            0x933A_C7E1,
            0x2EB4,
            0x4F13,
            [0xB8, 0x44, 0x0E, 0x14, 0xE2, 0xAE, 0xF9, 0x15],
        ),
    ),
];

/// A GUID in GPT's on-disk (mixed-endian) byte order.
const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

fn guid_string(g: &[u8]) -> String {
    let mut s = format!("{:08X}-{:04X}-{:04X}-", le32(g, 0), le16(g, 4), le16(g, 6));
    for (i, b) in g.iter().enumerate().skip(8).take(8) {
        if i == 10 {
            s.push('-');
        }
        s.push_str(&format!("{b:02X}"));
    }
    s
}

/// Parses a GPT (primary header and entries, CRC-checked). Returns the
/// partitions and the entry array's byte range `(offset, len)`.
fn parse_gpt<R: ReadAt + ?Sized>(disk: &Disk<'_, R>) -> Result<(Vec<Part>, (u64, u64)), String> {
    let mut found = None;
    for ss in [512u64, 4096] {
        if let Ok(h) = disk.read(ss, ss)
            && &h[..8] == b"EFI PART"
        {
            found = Some((ss, h));
            break;
        }
    }
    let (ss, h) = found.ok_or("protective MBR but no GPT header at LBA 1")?;
    let hsize = le32(&h, 12) as usize;
    if hsize < 92 || hsize > h.len() {
        return Err(format!("header size {hsize}"));
    }
    let mut hc = h[..hsize].to_vec();
    hc[16..20].fill(0);
    if crc32_ieee(&hc) != le32(&h, 16) {
        return Err("header CRC32 mismatch".to_string());
    }
    if le64(&h, 24) != 1 {
        return Err("header does not describe LBA 1".to_string());
    }
    let first_usable = le64(&h, 40);
    let last_usable = le64(&h, 48);
    let array_lba = le64(&h, 72);
    let count = u64::from(le32(&h, 80));
    let esize = u64::from(le32(&h, 84));
    if esize < 128 || esize % 8 != 0 || esize > 4096 {
        return Err(format!("entry size {esize}"));
    }
    let array_len = count * esize;
    if array_len > MAX_GPT_ARRAY {
        return Err(format!("entry array of {array_len} bytes"));
    }
    let disk_lbas = disk.size / ss;
    if first_usable > last_usable || last_usable >= disk_lbas {
        return Err("usable LBA range outside the disk".to_string());
    }
    let array_off = array_lba
        .checked_mul(ss)
        .ok_or("entry array location overflows")?;
    let array = disk.read(array_off, array_len)?;
    if crc32_ieee(&array) != le32(&h, 88) {
        return Err("entry array CRC32 mismatch".to_string());
    }
    let mut parts = Vec::new();
    for (i, e) in array.chunks_exact(esize as usize).enumerate() {
        let ty = &e[..16];
        if ty.iter().all(|&b| b == 0) {
            continue;
        }
        let first = le64(e, 32);
        let last = le64(e, 40);
        if last < first || first < first_usable || last > last_usable {
            return Err(format!("entry {} outside the usable area", i + 1));
        }
        let kind = match LINUX_GUIDS.iter().find(|(_, g)| g[..] == *ty) {
            Some((name, _)) => Kind::Linux(name.to_string()),
            None => Kind::Other(guid_string(ty)),
        };
        parts.push(Part {
            label: format!("partition {}", i + 1),
            start: first * ss,
            len: (last - first + 1) * ss,
            sector: ss,
            kind,
        });
    }
    Ok((parts, (array_off, array_len)))
}

// ------------------------------------------------------------------- ext fs

enum ExtError {
    /// No ext superblock magic: not an ext file system at all.
    NoMagic,
    /// An ext file system that is not understood well enough.
    Refused(String),
}

impl From<String> for ExtError {
    fn from(s: String) -> Self {
        ExtError::Refused(s)
    }
}

impl From<&str> for ExtError {
    fn from(s: &str) -> Self {
        ExtError::Refused(s.to_string())
    }
}

/// A successfully analysed ext file system.
struct ExtScan {
    name: &'static str,
    block_size: u64,
    blocks: u64,
    /// Bytes from the start of the partition that are always used.
    head: u64,
    /// Free byte ranges `(start, end)`, absolute on the disk.
    free: Vec<(u64, u64)>,
    notes: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Csum {
    None,
    Gdt,
    Meta,
}

struct Sb {
    bs: u64,
    blocks: u64,
    fdb: u64,
    bpg: u64,
    ipg: u64,
    inode_size: u64,
    desc_size: u64,
    groups: u64,
    gdt_blocks: u64,
    reserved_gdt: u64,
    csum: Csum,
    seed: u32,
    uuid: [u8; 16],
    sparse: bool,
    sparse2: Option<[u64; 2]>,
    name: &'static str,
}

// Feature bits.
const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;
const INCOMPAT_COMPRESSION: u32 = 0x1;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_MMP: u32 = 0x100;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_EA_INODE: u32 = 0x400;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_LARGEDIR: u32 = 0x4000;
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
const INCOMPAT_ENCRYPT: u32 = 0x10000;
const INCOMPAT_CASEFOLD: u32 = 0x20000;
const INCOMPAT_OK: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD;
const RO_SPARSE_SUPER: u32 = 0x1;
const RO_GDT_CSUM: u32 = 0x10;
const RO_BIGALLOC: u32 = 0x200;
const RO_METADATA_CSUM: u32 = 0x400;
/// sparse_super, large_file, btree_dir, huge_file, gdt_csum, dir_nlink,
/// extra_isize, quota, metadata_csum, readonly, project, shared_blocks,
/// verity, orphan_present. Not: has_snapshot, bigalloc, replica.
const RO_OK: u32 = 0x1
    | 0x2
    | 0x4
    | 0x8
    | 0x10
    | 0x20
    | 0x40
    | 0x100
    | 0x400
    | 0x1000
    | 0x2000
    | 0x4000
    | 0x8000
    | 0x10000;

const BG_BLOCK_UNINIT: u16 = 0x2;

fn parse_sb(sb: &[u8], part_len: u64) -> Result<Sb, ExtError> {
    if le16(sb, 0x38) != 0xEF53 {
        return Err(ExtError::NoMagic);
    }
    let rev = le32(sb, 0x4C);
    if rev > 1 {
        return Err(format!("revision {rev}").into());
    }
    let (compat, incompat, ro) = if rev == 0 {
        (0, 0, 0)
    } else {
        (le32(sb, 0x5C), le32(sb, 0x60), le32(sb, 0x64))
    };
    if incompat & INCOMPAT_RECOVER != 0 {
        return Err("journal needs recovery, bitmaps may be stale".into());
    }
    for (bit, name) in [
        (INCOMPAT_META_BG, "meta_bg"),
        (INCOMPAT_COMPRESSION, "compression"),
        (INCOMPAT_JOURNAL_DEV, "external journal device"),
    ] {
        if incompat & bit != 0 {
            return Err(format!("feature {name} not supported").into());
        }
    }
    if incompat & !INCOMPAT_OK != 0 {
        return Err(format!(
            "unknown incompatible features {:#x}",
            incompat & !INCOMPAT_OK
        )
        .into());
    }
    if ro & RO_BIGALLOC != 0 {
        return Err("feature bigalloc not supported".into());
    }
    if ro & !RO_OK != 0 {
        return Err(format!("unknown read-only features {:#x}", ro & !RO_OK).into());
    }
    let state = le16(sb, 0x3A);
    if state & 1 == 0 {
        return Err("not cleanly unmounted".into());
    }
    if state & 2 != 0 {
        return Err("file system has errors".into());
    }
    let log_bs = le32(sb, 0x18);
    if log_bs > 6 {
        return Err(format!("block size log {log_bs}").into());
    }
    let bs = 1024u64 << log_bs;
    if le32(sb, 0x1C) != log_bs {
        return Err("cluster size differs from block size".into());
    }
    let is64 = incompat & INCOMPAT_64BIT != 0;
    let mut blocks = u64::from(le32(sb, 0x04));
    if is64 {
        blocks |= u64::from(le32(sb, 0x150)) << 32;
    }
    let fdb = u64::from(le32(sb, 0x14));
    if fdb != u64::from(bs == 1024) {
        return Err(format!("first data block {fdb} with {bs}-byte blocks").into());
    }
    let fs_bytes = blocks.checked_mul(bs).ok_or("block count overflows")?;
    if fs_bytes > part_len {
        return Err(format!(
            "file system of {blocks} blocks ({fs_bytes} bytes) larger than its partition ({part_len} bytes)"
        )
        .into());
    }
    let bpg = u64::from(le32(sb, 0x20));
    if bpg == 0 || bpg % 8 != 0 || bpg > 8 * bs {
        return Err(format!("{bpg} blocks per group").into());
    }
    if u64::from(le32(sb, 0x24)) != bpg {
        return Err("clusters per group differ from blocks per group".into());
    }
    let ipg = u64::from(le32(sb, 0x28));
    if ipg == 0 || ipg > 8 * bs {
        return Err(format!("{ipg} inodes per group").into());
    }
    let inode_size = if rev == 0 {
        128
    } else {
        u64::from(le16(sb, 0x58))
    };
    if inode_size < 128 || !inode_size.is_power_of_two() || inode_size > bs {
        return Err(format!("inode size {inode_size}").into());
    }
    let desc_size = if is64 { u64::from(le16(sb, 0xFE)) } else { 32 };
    if !(32..=1024).contains(&desc_size) || !desc_size.is_power_of_two() || (is64 && desc_size < 64)
    {
        return Err(format!("group descriptor size {desc_size}").into());
    }
    if blocks <= fdb {
        return Err(format!("{blocks} blocks").into());
    }
    let groups = (blocks - fdb).div_ceil(bpg);
    if groups > MAX_GROUPS {
        return Err(format!("{groups} block groups").into());
    }
    let gdt_blocks = (groups * desc_size).div_ceil(bs);
    let reserved_gdt = if rev == 0 {
        0
    } else {
        u64::from(le16(sb, 0xCE))
    };
    if reserved_gdt > bs / 4 {
        return Err(format!("{reserved_gdt} reserved GDT blocks").into());
    }
    // The head (superblock + descriptors + reserved ones) must fit in group 0.
    if fdb + 1 + gdt_blocks + reserved_gdt > blocks.min(fdb + bpg) {
        return Err("group descriptors do not fit in the first group".into());
    }
    let csum = if ro & RO_METADATA_CSUM != 0 {
        Csum::Meta
    } else if ro & RO_GDT_CSUM != 0 {
        Csum::Gdt
    } else {
        Csum::None
    };
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&sb[0x68..0x78]);
    let mut seed = 0;
    if csum == Csum::Meta {
        if sb[0x175] != 1 {
            return Err(format!("checksum type {}", sb[0x175]).into());
        }
        if crc32c_le(!0, &sb[..0x3FC]) != le32(sb, 0x3FC) {
            return Err("superblock checksum mismatch".into());
        }
        seed = if incompat & INCOMPAT_CSUM_SEED != 0 {
            le32(sb, 0x270)
        } else {
            crc32c_le(!0, &uuid)
        };
    }
    let sparse2 = if compat & COMPAT_SPARSE_SUPER2 != 0 {
        Some([u64::from(le32(sb, 0x24C)), u64::from(le32(sb, 0x250))])
    } else {
        None
    };
    let name = if incompat & !(INCOMPAT_FILETYPE) != 0 || ro & !0x7 != 0 {
        "ext4"
    } else if compat & COMPAT_HAS_JOURNAL != 0 {
        "ext3"
    } else {
        "ext2"
    };
    Ok(Sb {
        bs,
        blocks,
        fdb,
        bpg,
        ipg,
        inode_size,
        desc_size,
        groups,
        gdt_blocks,
        reserved_gdt,
        csum,
        seed,
        uuid,
        sparse: ro & RO_SPARSE_SUPER != 0,
        sparse2,
        name,
    })
}

impl Sb {
    /// Whether group `g` holds a superblock backup (and descriptor copies).
    fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        if let Some(b) = self.sparse2 {
            return g == b[0] || g == b[1];
        }
        if !self.sparse || g == 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&p| {
            let mut x = g;
            while x.is_multiple_of(p) {
                x /= p;
            }
            x == 1
        })
    }

    /// Number of blocks in group `g`.
    fn group_blocks(&self, g: u64) -> u64 {
        let start = self.fdb + g * self.bpg;
        (self.blocks - start).min(self.bpg)
    }

    fn inode_table_blocks(&self) -> u64 {
        (self.ipg * self.inode_size).div_ceil(self.bs)
    }

    /// Checks a group descriptor's checksum, if the file system has one.
    fn desc_ok(&self, g: u64, d: &[u8]) -> bool {
        let g32 = (g as u32).to_le_bytes();
        let stored = le16(d, 0x1E);
        match self.csum {
            Csum::None => true,
            Csum::Meta => {
                let mut c = crc32c_le(self.seed, &g32);
                c = crc32c_le(c, &d[..0x1E]);
                c = crc32c_le(c, &[0, 0]);
                c = crc32c_le(c, &d[0x20..]);
                (c & 0xFFFF) as u16 == stored
            }
            Csum::Gdt => {
                let mut c = crc16_update(!0, &self.uuid);
                c = crc16_update(c, &g32);
                c = crc16_update(c, &d[..0x1E]);
                c = crc16_update(c, &d[0x20..]);
                c == stored
            }
        }
    }
}

/// One group descriptor, the parts we use.
#[derive(Clone, Copy)]
struct Desc {
    block_bitmap: u64,
    inode_bitmap: u64,
    inode_table: u64,
    free: u64,
    flags: u16,
    bitmap_csum: u32,
    /// Descriptor checksum verified.
    ok: bool,
}

fn ext_scan<R: ReadAt + ?Sized>(
    disk: &Disk<'_, R>,
    base: u64,
    part_len: u64,
    runs_so_far: usize,
) -> Result<ExtScan, ExtError> {
    if part_len < 2048 {
        return Err(ExtError::NoMagic);
    }
    let sbuf = disk.read(base + 1024, 1024)?;
    let sb = parse_sb(&sbuf, part_len)?;
    let bs = sb.bs;
    let head_blocks = sb.fdb + 1 + sb.gdt_blocks + sb.reserved_gdt;
    let mut out = ExtScan {
        name: sb.name,
        block_size: bs,
        blocks: sb.blocks,
        head: head_blocks * bs,
        free: Vec::new(),
        notes: Vec::new(),
    };

    // Group descriptors, one descriptor-table block at a time.
    let ds = sb.desc_size as usize;
    let per_block = bs / sb.desc_size;
    let mut descs: Vec<Desc> = Vec::with_capacity(sb.groups as usize);
    for b in 0..sb.gdt_blocks {
        let blk = disk.read(base + (sb.fdb + 1 + b) * bs, bs)?;
        for (i, d) in blk.chunks_exact(ds).enumerate() {
            let g = b * per_block + i as u64;
            if g >= sb.groups {
                break;
            }
            let hi = |at: usize| {
                if ds >= 64 {
                    u64::from(le32(d, at)) << 32
                } else {
                    0
                }
            };
            let hi16 = |at: usize| {
                if ds >= 64 {
                    u64::from(le16(d, at)) << 16
                } else {
                    0
                }
            };
            let mut bitmap_csum = u32::from(le16(d, 0x18));
            if ds >= 0x3A {
                bitmap_csum |= u32::from(le16(d, 0x38)) << 16;
            }
            descs.push(Desc {
                block_bitmap: u64::from(le32(d, 0x00)) | hi(0x20),
                inode_bitmap: u64::from(le32(d, 0x04)) | hi(0x24),
                inode_table: u64::from(le32(d, 0x08)) | hi(0x28),
                free: u64::from(le16(d, 0x0C)) | hi16(0x2C),
                flags: le16(d, 0x12),
                bitmap_csum,
                ok: sb.desc_ok(g, d),
            });
        }
    }
    if descs.len() as u64 != sb.groups {
        return Err("short group descriptor table".into());
    }
    let itb = sb.inode_table_blocks();
    for d in &descs {
        let in_fs =
            |b: u64, n: u64| b >= sb.fdb && b.checked_add(n).is_some_and(|e| e <= sb.blocks);
        if !in_fs(d.block_bitmap, 1) || !in_fs(d.inode_bitmap, 1) || !in_fs(d.inode_table, itb) {
            return Err("group metadata outside the file system".into());
        }
    }

    let mut group_notes = Vec::new();
    let mut kept_groups = 0u64;
    let mut uninit_groups = 0u64;
    let mut runs = runs_so_far;
    // Merged block ranges `(start, end)` of all groups' bitmaps and inode
    // tables, built when the first BLOCK_UNINIT group is met.
    let mut meta: Vec<(u64, u64)> = Vec::new();
    let bitmap_bytes = sb.bpg / 8;
    let any_bad_desc = descs.iter().any(|d| !d.ok);
    for g in 0..sb.groups {
        let d = descs[g as usize];
        let n = sb.group_blocks(g);
        let first = sb.fdb + g * sb.bpg;
        let mut keep = |why: String| {
            kept_groups += 1;
            group_notes.push(format!("group {g}: {why}, kept whole"));
        };
        if !d.ok {
            keep("descriptor checksum mismatch".to_string());
            continue;
        }
        if d.free > n {
            keep(format!("free count {} exceeds group size {n}", d.free));
            continue;
        }
        if d.free == 0 {
            continue;
        }
        if runs >= MAX_FREE_RUNS {
            keep("too many free extents on the disk".to_string());
            continue;
        }
        // Bitmap of this group: bit set = block used; bits past `n` ignored.
        let bitmap: Vec<u8> = if d.flags & BG_BLOCK_UNINIT != 0 {
            if sb.csum == Csum::None {
                keep("BLOCK_UNINIT without group checksums".to_string());
                continue;
            }
            if any_bad_desc {
                // The layout is not fully known: another group's metadata
                // might lie here.
                keep("BLOCK_UNINIT while a group descriptor is damaged".to_string());
                continue;
            }
            uninit_groups += 1;
            if meta.is_empty() {
                meta = merge(
                    descs
                        .iter()
                        .flat_map(|d| {
                            [
                                (d.block_bitmap, d.block_bitmap + 1),
                                (d.inode_bitmap, d.inode_bitmap + 1),
                                (d.inode_table, d.inode_table + itb),
                            ]
                        })
                        .collect(),
                );
            }
            uninit_bitmap(&sb, &meta, g)
        } else {
            let bm = match disk.read(base + d.block_bitmap * bs, bitmap_bytes) {
                Ok(b) => b,
                Err(e) => {
                    keep(e);
                    continue;
                }
            };
            if sb.csum == Csum::Meta {
                let mut c = crc32c_le(sb.seed, &bm);
                if sb.desc_size < 0x3A {
                    c &= 0xFFFF;
                }
                if c != d.bitmap_csum {
                    keep("block bitmap checksum mismatch".to_string());
                    continue;
                }
            }
            bm
        };
        let zeros = count_free(&bitmap, n);
        if zeros != d.free {
            keep(format!(
                "bitmap has {zeros} free blocks but descriptor says {}",
                d.free
            ));
            continue;
        }
        // Collect the runs of free blocks.
        let mut i = 0u64;
        while i < n {
            let whole_byte = |i: u64, v: u8| {
                i.is_multiple_of(8) && i + 8 <= n && bitmap.get((i / 8) as usize) == Some(&v)
            };
            if whole_byte(i, 0xFF) {
                i += 8;
                continue;
            }
            if bit(&bitmap, i) {
                i += 1;
                continue;
            }
            let s = i;
            while i < n {
                if whole_byte(i, 0) {
                    i += 8;
                } else if !bit(&bitmap, i) {
                    i += 1;
                } else {
                    break;
                }
            }
            let a = base + (first + s) * bs;
            let e = base + (first + i) * bs;
            match out.free.last_mut() {
                Some(last) if last.1 == a => last.1 = e,
                _ => {
                    out.free.push((a, e));
                    runs += 1;
                }
            }
        }
    }
    if uninit_groups > 0 {
        out.notes.push(format!(
            "{uninit_groups} group(s) without an initialised bitmap: used blocks computed from the layout"
        ));
    }
    let shown = group_notes.len().min(MAX_GROUP_NOTES);
    out.notes.extend(group_notes.drain(..shown));
    if kept_groups > shown as u64 {
        out.notes.push(format!(
            "... and {} more group(s) kept whole",
            kept_groups - shown as u64
        ));
    }
    Ok(out)
}

fn bit(bm: &[u8], i: u64) -> bool {
    // Missing bytes count as used.
    bm.get((i / 8) as usize)
        .is_none_or(|b| b & (1 << (i % 8)) != 0)
}

/// Number of clear bits among the first `n` bits of `bm`.
fn count_free(bm: &[u8], n: u64) -> u64 {
    let full = (n / 8) as usize;
    let mut z: u64 = bm
        .iter()
        .take(full)
        .map(|b| u64::from(b.count_zeros()))
        .sum();
    for i in (full as u64 * 8)..n {
        if !bit(bm, i) {
            z += 1;
        }
    }
    z
}

/// Builds the bitmap of a `BLOCK_UNINIT` group from the file system layout,
/// as the kernel does: superblock backup and descriptor blocks (if the group
/// has them) and any group's bitmaps and inode table lying in it (`meta`:
/// sorted, merged block ranges `(start, end)`).
fn uninit_bitmap(sb: &Sb, meta: &[(u64, u64)], g: u64) -> Vec<u8> {
    let mut bm = vec![0u8; (sb.bpg / 8) as usize];
    let first = sb.fdb + g * sb.bpg;
    let end = first + sb.group_blocks(g);
    let mut mark = |s: u64, e: u64| {
        // Mark blocks [s, e) that fall in this group.
        for x in s.max(first)..e.min(end) {
            let i = x - first;
            if let Some(byte) = bm.get_mut((i / 8) as usize) {
                *byte |= 1 << (i % 8);
            }
        }
    };
    if sb.has_super(g) {
        mark(first, first + 1 + sb.gdt_blocks + sb.reserved_gdt);
    }
    let from = meta.partition_point(|&(_, e)| e <= first);
    for &(s, e) in meta[from..].iter().take_while(|&&(s, _)| s < end) {
        mark(s, e);
    }
    bm
}

/// Tests build real file systems with e2fsprogs (`mkfs.ext4`, `debugfs`,
/// `e2fsck`) in temporary directories; a test needing a missing tool prints
/// `SKIP` and passes. Partition tables are written by hand.
#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    const MIB: u64 = 1 << 20;

    /// Whether an external tool can be run; prints a skip message if not.
    fn have(tool: &str) -> bool {
        let ok = Command::new(tool).arg("-V").output().is_ok();
        if !ok {
            eprintln!("SKIP: {tool} not installed");
        }
        ok
    }

    fn have_e2fsprogs() -> bool {
        have("mkfs.ext4") && have("debugfs") && have("e2fsck")
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    fn run(cmd: &mut Command) -> std::process::Output {
        let out = cmd.output().expect("run tool");
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// A file system image with files of random data.
    struct Fs {
        path: PathBuf,
        files: Vec<(String, Vec<u8>)>,
    }

    /// Makes an ext file system of `mib` MiB in its own file, fills it with
    /// `nfiles` files of `kib` KiB each, then deletes all but every third.
    fn make_fs(dir: &Path, mib: u64, args: &[&str], nfiles: usize, kib: usize, seed: u64) -> Fs {
        let src = dir.join("src");
        std::fs::create_dir_all(&src).unwrap();
        let mut rng = Rng(seed | 1);
        let mut files = Vec::new();
        for i in 0..nfiles {
            let name = format!("file{i}");
            let data = rng.bytes(kib * 1024);
            std::fs::write(src.join(&name), &data).unwrap();
            files.push((name, data));
        }
        let path = dir.join("part.img");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(mib * MIB).unwrap();
        drop(f);
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .args(args)
            .arg("-d")
            .arg(&src)
            .arg(&path));
        let mut cmds = String::new();
        let mut kept = Vec::new();
        for (i, f) in files.into_iter().enumerate() {
            if i % 3 == 0 {
                kept.push(f);
            } else {
                cmds.push_str(&format!("rm /{}\n", f.0));
            }
        }
        let cf = dir.join("cmds");
        std::fs::write(&cf, cmds).unwrap();
        run(Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&cf)
            .arg(&path));
        Fs { path, files: kept }
    }

    /// A disk of `mib` MiB with an MBR whose entries are
    /// `(type, start sector, sector count)`.
    fn mbr_disk(mib: u64, entries: &[(u8, u32, u32)]) -> Vec<u8> {
        let mut d = vec![0u8; (mib * MIB) as usize];
        for (i, &(ty, start, count)) in entries.iter().enumerate() {
            let e = &mut d[446 + 16 * i..462 + 16 * i];
            e[4] = ty;
            e[8..12].copy_from_slice(&start.to_le_bytes());
            e[12..16].copy_from_slice(&count.to_le_bytes());
        }
        d[510] = 0x55;
        d[511] = 0xAA;
        d
    }

    /// Writes partition entry `i` of the boot record at sector `at` (and
    /// its boot signature).
    fn entry(d: &mut [u8], at: u64, i: usize, (ty, start, count): (u8, u32, u32)) {
        let b = (at * 512) as usize;
        let e = &mut d[b + 446 + 16 * i..b + 462 + 16 * i];
        e[4] = ty;
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&count.to_le_bytes());
        d[b + 510] = 0x55;
        d[b + 511] = 0xAA;
    }

    /// A disk of `mib` MiB with a (primary-only) GPT on 512-byte sectors;
    /// entries are `(type guid, first lba, last lba)`.
    fn gpt_disk(mib: u64, entries: &[([u8; 16], u64, u64)]) -> Vec<u8> {
        gpt_disk_ss(mib, 512, entries)
    }

    /// Same with logical sectors of `ss` bytes.
    fn gpt_disk_ss(mib: u64, ss: u64, entries: &[([u8; 16], u64, u64)]) -> Vec<u8> {
        let lbas = mib * MIB / ss;
        let mut d = mbr_disk(mib, &[(0xEE, 1, (lbas - 1) as u32)]);
        let mut array = vec![0u8; 128 * 128];
        for (i, &(ty, first, last)) in entries.iter().enumerate() {
            let e = &mut array[128 * i..128 * (i + 1)];
            e[..16].copy_from_slice(&ty);
            e[16] = i as u8 + 1;
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
        }
        let array_lbas = array.len() as u64 / ss;
        let mut h = vec![0u8; 92];
        h[..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&1u64.to_le_bytes());
        h[32..40].copy_from_slice(&(lbas - 1).to_le_bytes());
        h[40..48].copy_from_slice(&(2 + array_lbas).to_le_bytes());
        h[48..56].copy_from_slice(&(lbas - 2 - array_lbas).to_le_bytes());
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&crc32_ieee(&array).to_le_bytes());
        let c = crc32_ieee(&h);
        h[16..20].copy_from_slice(&c.to_le_bytes());
        let ss = ss as usize;
        d[ss..ss + 92].copy_from_slice(&h);
        d[2 * ss..2 * ss + array.len()].copy_from_slice(&array);
        d
    }

    fn put(disk: &mut [u8], at: u64, part: &Path) {
        let p = std::fs::read(part).unwrap();
        disk[at as usize..at as usize + p.len()].copy_from_slice(&p);
    }

    /// The image `imaging save` would produce: used ranges copied, the
    /// rest zero.
    fn reconstruct(disk: &[u8], a: &Analysis) -> Vec<u8> {
        let mut out = vec![0u8; disk.len()];
        for &(off, len) in &a.used {
            let r = off as usize..(off + len) as usize;
            out[r.clone()].copy_from_slice(&disk[r]);
        }
        out
    }

    /// Checks the used list's invariants.
    fn check_ranges(a: &Analysis, size: u64) {
        let mut prev_end = None;
        for &(off, len) in &a.used {
            assert!(len > 0);
            assert!(off + len <= size);
            if let Some(p) = prev_end {
                assert!(off > p, "ranges not sorted/merged: {:?}", a.used);
            }
            prev_end = Some(off + len);
        }
    }

    /// Extracts the partition at `off` from `img`, checks it with e2fsck and
    /// that the surviving files read back identical.
    fn check_fs(dir: &Path, img: &[u8], off: u64, len: u64, fs: &Fs) {
        let p = dir.join("check.img");
        std::fs::write(&p, &img[off as usize..(off + len) as usize]).unwrap();
        let out = Command::new("e2fsck").arg("-fn").arg(&p).output().unwrap();
        assert!(
            out.status.success(),
            "e2fsck failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for (name, data) in &fs.files {
            let out = run(Command::new("debugfs")
                .arg("-R")
                .arg(format!("cat /{name}"))
                .arg(&p));
            assert!(out.stdout == *data, "{name} differs after reconstruction");
        }
    }

    /// Full round trip: MBR disk with one Linux partition at 1 MiB.
    fn round_trip(args: &[&str], seed: u64) -> Analysis {
        round_trip_sized(args, seed, 47, 18, 20)
    }

    /// Round trip with a file system of `mib` MiB holding `nfiles` files of
    /// 1.5 MiB (a third survive); asserts at least `min_free` MiB free.
    fn round_trip_sized(
        args: &[&str],
        seed: u64,
        mib: u64,
        nfiles: usize,
        min_free: u64,
    ) -> Analysis {
        let dir = tempfile::tempdir().unwrap();
        let fs = make_fs(dir.path(), mib, args, nfiles, 1536, seed);
        let mut disk = mbr_disk(mib + 1, &[(0x83, 2048, (mib * 2048) as u32)]);
        put(&mut disk, MIB, &fs.path);
        let size = disk.len() as u64;
        let a = analyse(&disk, size);
        eprintln!("{args:?}: {:#?}", a.notes);
        check_ranges(&a, size);
        assert!(a.notes[0].contains("blocks free, skipped"), "{:?}", a.notes);
        assert!(
            !a.notes.iter().any(|n| n.contains("kept whole")),
            "{:?}",
            a.notes
        );
        let free = free_bytes(&a, size);
        assert!(free > min_free * MIB, "only {free} bytes free");
        let img = reconstruct(&disk, &a);
        check_fs(dir.path(), &img, MIB, mib * MIB, &fs);
        a
    }

    #[test]
    fn block_uninit_groups_computed() {
        if !have_e2fsprogs() {
            return;
        }
        for (args, seed) in [
            (&["-b", "1024"][..], 30),
            (
                &["-b", "1024", "-O", "^64bit,^metadata_csum,uninit_bg"][..],
                31,
            ),
            (&["-b", "4096", "-g", "2048"][..], 32),
            (&["-b", "1024", "-O", "^flex_bg"][..], 33),
        ] {
            let a = round_trip_sized(args, seed, 96, 6, 60);
            assert!(
                a.notes
                    .iter()
                    .any(|n| n.contains("without an initialised bitmap")),
                "{:?}",
                a.notes
            );
        }
    }

    #[test]
    fn corrupt_bitmap_keeps_group_whole() {
        if !have_e2fsprogs() {
            return;
        }
        for (args, expect) in [
            (
                &["-b", "4096", "-g", "4096"][..],
                "block bitmap checksum mismatch",
            ),
            (
                &["-b", "4096", "-g", "4096", "-O", "^metadata_csum,uninit_bg"][..],
                "but descriptor says",
            ),
            (
                &[
                    "-b",
                    "4096",
                    "-g",
                    "4096",
                    "-O",
                    "^metadata_csum,^uninit_bg",
                ][..],
                "but descriptor says",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let fs = make_fs(dir.path(), 40, args, 12, 1536, 40);
            let mut disk = std::fs::read(&fs.path).unwrap();
            let size = disk.len() as u64;
            let before = free_bytes(&analyse(&disk, size), size);
            // Group 0's block bitmap location, from its descriptor at block 1.
            let bitmap = u64::from(le32(&disk, 4096));
            // Mark block 4000 of group 0 as used (it is free: 12 MiB files
            // deleted, 6 MiB kept, and the tail of group 0 is free).
            let at = (bitmap * 4096 + 500) as usize;
            disk[at] ^= 1;
            let a = analyse(&disk, size);
            eprintln!("{args:?}: {:#?}", a.notes);
            assert!(
                a.notes
                    .iter()
                    .any(|n| n.contains("group 0: ") && n.contains(expect)),
                "{:?}",
                a.notes
            );
            let after = free_bytes(&a, size);
            assert!(after < before && after > 0, "{before} {after}");
            // Undo the corruption in the saved image: the file system must
            // then be clean and the files intact.
            let mut img = reconstruct(&disk, &a);
            img[at] ^= 1;
            check_fs(dir.path(), &img, 0, size, &fs);
        }
    }

    #[test]
    fn crc_vectors() {
        assert_eq!(crc32_ieee(b"123456789"), 0xCBF4_3926);
        assert_eq!(!crc32c_le(!0, b"123456789"), 0xE306_9283);
        // CRC-16/ARC.
        assert_eq!(crc16_update(0, b"123456789"), 0xBB3D);
    }

    #[test]
    fn merge_and_free_bytes() {
        assert_eq!(
            merge(vec![(5, 9), (0, 2), (2, 3), (8, 10), (4, 4)]),
            vec![(0, 3), (5, 10)]
        );
        let a = Analysis {
            used: vec![(0, 10), (20, 5)],
            notes: vec![],
        };
        assert_eq!(free_bytes(&a, 100), 85);
        assert_eq!(free_bytes(&Analysis::default(), 7), 7);
    }

    #[test]
    fn ext4_4k_64bit() {
        if !have_e2fsprogs() {
            return;
        }
        round_trip(&["-b", "4096", "-O", "64bit"], 1);
    }

    #[test]
    fn ext4_4k_not_64bit() {
        if !have_e2fsprogs() {
            return;
        }
        round_trip(&["-b", "4096", "-O", "^64bit"], 2);
    }

    #[test]
    fn ext4_1k_64bit() {
        if !have_e2fsprogs() {
            return;
        }
        round_trip(&["-b", "1024", "-O", "64bit"], 3);
    }

    #[test]
    fn ext4_1k_uninit_bg_crc16() {
        if !have_e2fsprogs() {
            return;
        }
        round_trip(&["-b", "1024", "-O", "^64bit,^metadata_csum,uninit_bg"], 4);
    }

    #[test]
    fn ext2_and_ext3() {
        if !have_e2fsprogs() {
            return;
        }
        let a = round_trip(&["-t", "ext2"], 5);
        assert!(a.notes[0].contains("ext2"), "{:?}", a.notes);
        let a = round_trip(&["-t", "ext3", "-b", "1024"], 6);
        assert!(a.notes[0].contains("ext3"), "{:?}", a.notes);
    }

    #[test]
    fn logical_partitions() {
        if !have_e2fsprogs() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let fs = make_fs(dir.path(), 40, &[], 15, 1536, 12);
        // Extended partition at sector 2048; logical 5 (ext4) at 4096,
        // next EBR at 86016, logical 6 (NTFS type) at 88064.
        let mut disk = mbr_disk(64, &[(0x05, 2048, 63 * 2048)]);
        entry(&mut disk, 2048, 0, (0x83, 2048, 40 * 2048));
        entry(&mut disk, 2048, 1, (0x05, 86016 - 2048, 10240));
        entry(&mut disk, 86016, 0, (0x07, 2048, 8192));
        put(&mut disk, 4096 * 512, &fs.path);
        let size = disk.len() as u64;
        let a = analyse(&disk, size);
        eprintln!("{:#?}", a.notes);
        check_ranges(&a, size);
        assert!(
            a.notes[0].starts_with("partition 5 (ext4, 4096..86015 sectors)"),
            "{:?}",
            a.notes
        );
        assert!(
            a.notes[1].contains("partition 6 (88064..96255 sectors): type 0x07"),
            "{:?}",
            a.notes
        );
        assert!(free_bytes(&a, size) > 20 * MIB);
        let img = reconstruct(&disk, &a);
        assert_eq!(img[86016 * 512 + 510..86016 * 512 + 512], [0x55, 0xAA]);
        check_fs(dir.path(), &img, 4096 * 512, 40 * MIB, &fs);

        // A broken chain (a loop back): the extended partition is raw.
        entry(&mut disk, 86016, 1, (0x05, 0, 10));
        let a = analyse(&disk, size);
        assert_eq!(a.used, vec![(0, size)], "{:?}", a.notes);
        assert!(a.notes[0].contains("extended: EBR chain"), "{:?}", a.notes);
    }

    #[test]
    fn gpt_4k_sectors() {
        if !have_e2fsprogs() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let fs = make_fs(dir.path(), 30, &[], 12, 1536, 13);
        let home = LINUX_GUIDS[2].1;
        let mut disk = gpt_disk_ss(32, 4096, &[(home, 256, 256 + 30 * 256 - 1)]);
        put(&mut disk, MIB, &fs.path);
        let size = disk.len() as u64;
        let a = analyse(&disk, size);
        eprintln!("{:#?}", a.notes);
        assert!(
            a.notes[0].starts_with("partition 1 (ext4, 256..7935 sectors)"),
            "{:?}",
            a.notes
        );
        assert!(free_bytes(&a, size) > 10 * MIB);
        let img = reconstruct(&disk, &a);
        check_fs(dir.path(), &img, MIB, 30 * MIB, &fs);
    }

    #[test]
    fn gpt_disk_with_ext4_and_unknown() {
        if !have_e2fsprogs() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let fs = make_fs(dir.path(), 40, &[], 15, 1536, 7);
        let linux = LINUX_GUIDS[0].1;
        let other = guid(
            0xEBD0_A0A2,
            0xB9E5,
            0x4433,
            [0x87, 0xC0, 0x68, 0xB6, 0xB7, 0x26, 0x99, 0xC7],
        );
        let mut disk = gpt_disk(
            48,
            &[
                (linux, 2048, 2048 + 40 * 2048 - 1),
                (other, 83968, 83968 + 2048 * 4 - 1),
            ],
        );
        put(&mut disk, MIB, &fs.path);
        let size = disk.len() as u64;
        let a = analyse(&disk, size);
        eprintln!("{:#?}", a.notes);
        check_ranges(&a, size);
        assert!(
            a.notes
                .iter()
                .any(|n| n.contains("partition 1 (ext4") && n.contains("free, skipped"))
        );
        assert!(a.notes.iter().any(|n| n.contains("partition 2")
            && n.contains("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7 not understood")));
        assert!(free_bytes(&a, size) > 15 * MIB);
        // The unknown partition and the last MiB are wholly used.
        let img = reconstruct(&disk, &a);
        let p2 = 83968 * 512;
        assert!(free_bytes(&a, size) < size - (p2 + 4 * MIB - 41 * MIB));
        for &(s, l) in &[(p2, 4 * MIB), (size - MIB, MIB)] {
            assert!(a.used.iter().any(|&(o, n)| o <= s && o + n >= s + l));
        }
        check_fs(dir.path(), &img, MIB, 40 * MIB, &fs);

        // A bad entry-array CRC: whole disk raw.
        let mut bad = disk.clone();
        bad[1024 + 200] ^= 1;
        let a = analyse(&bad, size);
        assert_eq!(a.used, vec![(0, size)]);
        assert!(a.notes[0].contains("GPT not understood"), "{:?}", a.notes);
    }

    #[test]
    fn bare_fs_on_whole_disk() {
        if !have_e2fsprogs() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let fs = make_fs(dir.path(), 32, &[], 12, 1536, 8);
        let disk = std::fs::read(&fs.path).unwrap();
        let size = disk.len() as u64;
        // Through a real file too.
        let file = std::fs::File::open(&fs.path).unwrap();
        let a = analyse(&file, size);
        eprintln!("{:#?}", a.notes);
        assert!(a.notes[0].starts_with("whole disk (ext4"), "{:?}", a.notes);
        assert!(free_bytes(&a, size) > 10 * MIB);
        let img = reconstruct(&disk, &a);
        check_fs(dir.path(), &img, 0, size, &fs);
    }

    #[test]
    fn unknown_type_and_garbage_are_raw() {
        // Unknown partition type: raw.
        let size = 8 * MIB;
        let disk = mbr_disk(8, &[(0x07, 2048, 4096)]);
        let a = analyse(&disk, size);
        assert_eq!(a.used, vec![(0, size)]);
        assert!(
            a.notes
                .iter()
                .any(|n| n.contains("type 0x07 not understood")),
            "{:?}",
            a.notes
        );

        // Linux type but nothing in it.
        let disk = mbr_disk(8, &[(0x83, 2048, 4096)]);
        let a = analyse(&disk, size);
        assert_eq!(a.used, vec![(0, size)]);
        assert!(
            a.notes.iter().any(|n| n.contains("no ext2/3/4 superblock")),
            "{:?}",
            a.notes
        );

        // Garbage, with and without a boot signature.
        let mut rng = Rng(99);
        let mut disk = rng.bytes(size as usize);
        let a = analyse(&disk, size);
        assert_eq!(a.used, vec![(0, size)]);
        assert!(!a.notes.is_empty());
        disk[510] = 0x55;
        disk[511] = 0xAA;
        let a = analyse(&disk, size);
        assert_eq!(a.used, vec![(0, size)]);
        assert!(!a.notes.is_empty());

        // Zeros; tiny and empty targets; short reads.
        let a = analyse(&vec![0u8; 4096], 4096);
        assert_eq!(a.used, vec![(0, 4096)]);
        assert!(a.notes[0].contains("no partition table"));
        assert_eq!(analyse(&vec![0u8; 3], 3).used, vec![(0, 3)]);
        assert!(analyse(&Vec::new(), 0).used.is_empty());
        assert_eq!(analyse(&vec![0u8; 100], 1 << 40).used, vec![(0, 1 << 40)]);

        // Overlapping and out-of-range partitions.
        let disk = mbr_disk(8, &[(0x83, 2048, 4096), (0x83, 4000, 100)]);
        let a = analyse(&disk, size);
        assert_eq!(a.used, vec![(0, size)]);
        assert!(a.notes[0].contains("overlap"), "{:?}", a.notes);
        let disk = mbr_disk(8, &[(0x83, 2048, 40960)]);
        let a = analyse(&disk, size);
        assert_eq!(a.used, vec![(0, size)]);
    }

    #[test]
    fn fs_larger_than_partition_is_raw() {
        if !have_e2fsprogs() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let fs = make_fs(dir.path(), 40, &[], 6, 1024, 9);
        let mut disk = mbr_disk(48, &[(0x83, 2048, 39 * 2048)]);
        put(&mut disk, MIB, &fs.path);
        let size = disk.len() as u64;
        let a = analyse(&disk, size);
        assert_eq!(a.used, vec![(0, size)]);
        assert!(
            a.notes[0].contains("larger than its partition"),
            "{:?}",
            a.notes
        );
    }

    #[test]
    fn needs_recovery_is_raw() {
        if !have_e2fsprogs() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let fs = make_fs(dir.path(), 16, &[], 3, 1024, 10);
        run(Command::new("debugfs")
            .args(["-w", "-R", "feature needs_recovery"])
            .arg(&fs.path));
        let disk = std::fs::read(&fs.path).unwrap();
        let size = disk.len() as u64;
        let a = analyse(&disk, size);
        assert_eq!(a.used, vec![(0, size)]);
        assert!(a.notes[0].contains("needs recovery"), "{:?}", a.notes);
    }

    #[test]
    fn meta_bg_is_raw() {
        if !have_e2fsprogs() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let fs = make_fs(
            dir.path(),
            16,
            &["-O", "meta_bg,^resize_inode"],
            3,
            1024,
            11,
        );
        let disk = std::fs::read(&fs.path).unwrap();
        let size = disk.len() as u64;
        let a = analyse(&disk, size);
        assert_eq!(a.used, vec![(0, size)]);
        assert!(a.notes[0].contains("meta_bg"), "{:?}", a.notes);
    }

    #[test]
    fn fuzzed_superblock_and_descriptors_never_panic() {
        if !have_e2fsprogs() {
            return;
        }
        // No checksums at all, so corrupted numbers reach the parser.
        for (k, args) in [
            &["-t", "ext2", "-b", "1024"][..],
            &[
                "-b",
                "4096",
                "-g",
                "1024",
                "-O",
                "^metadata_csum,^uninit_bg",
            ][..],
        ]
        .into_iter()
        .enumerate()
        {
            let dir = tempfile::tempdir().unwrap();
            let fs = make_fs(dir.path(), 8, args, 3, 512, 50 + k as u64);
            let mut disk = std::fs::read(&fs.path).unwrap();
            let size = disk.len() as u64;
            let mut rng = Rng(777 + k as u64);
            let mut understood = 0;
            for _ in 0..3000 {
                // Superblock and the first descriptor block(s).
                let mut saved = Vec::new();
                for _ in 0..1 + rng.next() % 3 {
                    let gdt = if k == 0 { 2048 } else { 4096 };
                    let at = if rng.next().is_multiple_of(2) {
                        (1024 + rng.next() % 0x180) as usize
                    } else {
                        (gdt + rng.next() % 256) as usize
                    };
                    saved.push((at, disk[at]));
                    disk[at] = if rng.next().is_multiple_of(2) {
                        rng.next() as u8
                    } else {
                        disk[at] ^ (1 << (rng.next() % 8))
                    };
                }
                let a = analyse(&disk, size);
                check_ranges(&a, size);
                assert!(a.used.first().is_some_and(|&(o, n)| o == 0 && n >= MIB));
                if a.notes[0].contains("skipped") {
                    understood += 1;
                }
                for (at, b) in saved.into_iter().rev() {
                    disk[at] = b;
                }
            }
            eprintln!("{args:?}: understood in {understood}/3000 rounds");
        }
    }

    /// Block numbers (file system relative) holding each surviving file.
    fn file_blocks(part: &Path, fs: &Fs) -> Vec<u64> {
        let mut v = Vec::new();
        for (name, _) in &fs.files {
            let out = run(Command::new("debugfs")
                .arg("-R")
                .arg(format!("blocks /{name}"))
                .arg(part));
            for w in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                v.push(w.parse::<u64>().unwrap());
            }
        }
        assert!(!v.is_empty());
        v
    }

    #[test]
    fn fuzzed_metadata_never_frees_file_data() {
        if !have_e2fsprogs() {
            return;
        }
        // (mkfs arguments, file system MiB, files written): the last one
        // has mostly BLOCK_UNINIT groups.
        for (k, (args, mib, nfiles)) in [
            (&["-b", "4096"][..], 24u64, 9usize),
            (&["-b", "1024", "-O", "^64bit"][..], 24, 9),
            (
                &["-b", "1024", "-O", "^64bit,^metadata_csum,uninit_bg"][..],
                24,
                9,
            ),
            (&["-b", "1024"][..], 64, 3),
        ]
        .into_iter()
        .enumerate()
        {
            let dir = tempfile::tempdir().unwrap();
            let fs = make_fs(dir.path(), mib, args, nfiles, 1536, 20 + k as u64);
            let blocks = file_blocks(&fs.path, &fs);
            let bs: u64 = args[1].parse().unwrap();
            let mut disk = mbr_disk(mib + 1, &[(0x83, 2048, (mib * 2048) as u32)]);
            put(&mut disk, MIB, &fs.path);
            let size = disk.len() as u64;
            let mut rng = Rng(1234 + k as u64);
            let mut understood = 0;
            for round in 0..1000 {
                let flips = 1 + rng.next() % 4;
                let mut done = Vec::new();
                for _ in 0..flips {
                    // Mostly the first 300 KiB of the partition (superblock,
                    // descriptors, bitmaps), sometimes the MBR.
                    let at = if rng.next().is_multiple_of(10) {
                        446 + rng.next() % 66
                    } else {
                        MIB + rng.next() % (300 * 1024)
                    };
                    let mask = 1 << (rng.next() % 8);
                    disk[at as usize] ^= mask;
                    done.push((at as usize, mask));
                }
                let a = analyse(&disk, size);
                check_ranges(&a, size);
                if a.notes[0].contains("skipped") {
                    understood += 1;
                }
                // Data of surviving files is never reported free. With
                // metadata_csum the checksums catch the corruption; without,
                // the bitmap/descriptor free-count check does (a corruption
                // that keeps the count and frees a data block needs two
                // compensating flips in one bitmap: not met with these seeds).
                for &b in &blocks {
                    let s = MIB + b * bs;
                    let covered = a.used.iter().any(|&(o, n)| o <= s && s + bs <= o + n);
                    assert!(
                        covered,
                        "round {round}: block {b} reported free: {:?}",
                        a.notes
                    );
                }
                for (at, mask) in done {
                    disk[at] ^= mask;
                }
            }
            eprintln!("{args:?}: understood in {understood}/1000 rounds");
        }
    }
}
