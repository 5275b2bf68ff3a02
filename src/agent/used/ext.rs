//! ext2/3/4: superblock, group descriptors and block bitmaps.

use super::crc::*;
use super::disk::*;

pub(super) enum ExtError {
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
pub(super) struct ExtScan {
    pub(super) name: &'static str,
    pub(super) block_size: u64,
    pub(super) blocks: u64,
    /// Bytes from the start of the partition that are always used.
    pub(super) head: u64,
    /// Free byte ranges `(start, end)`, absolute on the disk.
    pub(super) free: Vec<(u64, u64)>,
    pub(super) notes: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Csum {
    None,
    Gdt,
    Meta,
}

pub(super) struct Sb {
    pub(super) bs: u64,
    pub(super) blocks: u64,
    pub(super) fdb: u64,
    pub(super) bpg: u64,
    pub(super) ipg: u64,
    pub(super) inode_size: u64,
    pub(super) desc_size: u64,
    pub(super) groups: u64,
    pub(super) gdt_blocks: u64,
    pub(super) reserved_gdt: u64,
    pub(super) csum: Csum,
    pub(super) seed: u32,
    pub(super) uuid: [u8; 16],
    pub(super) sparse: bool,
    pub(super) sparse2: Option<[u64; 2]>,
    pub(super) name: &'static str,
}

// Feature bits.
pub(super) const COMPAT_HAS_JOURNAL: u32 = 0x4;
pub(super) const COMPAT_SPARSE_SUPER2: u32 = 0x200;
pub(super) const INCOMPAT_COMPRESSION: u32 = 0x1;
pub(super) const INCOMPAT_FILETYPE: u32 = 0x2;
pub(super) const INCOMPAT_RECOVER: u32 = 0x4;
pub(super) const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
pub(super) const INCOMPAT_META_BG: u32 = 0x10;
pub(super) const INCOMPAT_EXTENTS: u32 = 0x40;
pub(super) const INCOMPAT_64BIT: u32 = 0x80;
pub(super) const INCOMPAT_MMP: u32 = 0x100;
pub(super) const INCOMPAT_FLEX_BG: u32 = 0x200;
pub(super) const INCOMPAT_EA_INODE: u32 = 0x400;
pub(super) const INCOMPAT_CSUM_SEED: u32 = 0x2000;
pub(super) const INCOMPAT_LARGEDIR: u32 = 0x4000;
pub(super) const INCOMPAT_INLINE_DATA: u32 = 0x8000;
pub(super) const INCOMPAT_ENCRYPT: u32 = 0x10000;
pub(super) const INCOMPAT_CASEFOLD: u32 = 0x20000;
pub(super) const INCOMPAT_OK: u32 = INCOMPAT_FILETYPE
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
pub(super) const RO_SPARSE_SUPER: u32 = 0x1;
pub(super) const RO_GDT_CSUM: u32 = 0x10;
pub(super) const RO_BIGALLOC: u32 = 0x200;
pub(super) const RO_METADATA_CSUM: u32 = 0x400;
/// sparse_super, large_file, btree_dir, huge_file, gdt_csum, dir_nlink,
/// extra_isize, quota, metadata_csum, readonly, project, shared_blocks,
/// verity, orphan_present. Not: has_snapshot, bigalloc, replica.
pub(super) const RO_OK: u32 = 0x1
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

pub(super) const BG_BLOCK_UNINIT: u16 = 0x2;

pub(super) fn parse_sb(sb: &[u8], part_len: u64) -> Result<Sb, ExtError> {
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
pub(super) struct Desc {
    pub(super) block_bitmap: u64,
    pub(super) inode_bitmap: u64,
    pub(super) inode_table: u64,
    pub(super) free: u64,
    pub(super) flags: u16,
    pub(super) bitmap_csum: u32,
    /// Descriptor checksum verified.
    pub(super) ok: bool,
}

pub(super) fn ext_scan<R: ReadAt + ?Sized>(
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

pub(super) fn bit(bm: &[u8], i: u64) -> bool {
    // Missing bytes count as used.
    bm.get((i / 8) as usize)
        .is_none_or(|b| b & (1 << (i % 8)) != 0)
}

/// Number of clear bits among the first `n` bits of `bm`.
pub(super) fn count_free(bm: &[u8], n: u64) -> u64 {
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
pub(super) fn uninit_bitmap(sb: &Sb, meta: &[(u64, u64)], g: u64) -> Vec<u8> {
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
