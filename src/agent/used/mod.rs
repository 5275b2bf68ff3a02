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
mod crc;
mod disk;
mod ext;

use crc::*;
use disk::*;
use ext::*;

pub use disk::ReadAt;

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
/// Largest GPT partition entry array read.
const MAX_GPT_ARRAY: u64 = 1 << 20;

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

/// Tests build real file systems with e2fsprogs (`mkfs.ext4`, `debugfs`,
/// `e2fsck`) in temporary directories; a test needing a missing tool prints
/// `SKIP` and passes. Partition tables are written by hand.
#[cfg(test)]
mod tests;
