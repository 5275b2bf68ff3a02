//! The checksums the on-disk formats use: CRC32 (GPT), CRC32C
//! (ext4 metadata_csum) and CRC16 (ext4 uninit_bg descriptors).

pub(super) const fn crc32_table(poly: u32) -> [u32; 256] {
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

pub(super) const fn crc16_table() -> [u16; 256] {
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
pub(super) fn crc32_update(table: &[u32; 256], mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = table[usize::from((crc as u8) ^ b)] ^ (crc >> 8);
    }
    crc
}

/// Standard CRC-32 (IEEE 802.3, as used by GPT).
pub(super) fn crc32_ieee(data: &[u8]) -> u32 {
    !crc32_update(&CRC32_IEEE, !0, data)
}

/// CRC32C update as ext4 uses it (`ext2fs_crc32c_le`: no inversions).
pub(super) fn crc32c_le(crc: u32, data: &[u8]) -> u32 {
    crc32_update(&CRC32C, crc, data)
}

/// CRC16 (poly 0x8005 reflected) update as ext4 uses it for GDT_CSUM.
pub(super) fn crc16_update(mut crc: u16, data: &[u8]) -> u16 {
    for &b in data {
        crc = CRC16[usize::from((crc as u8) ^ b)] ^ (crc >> 8);
    }
    crc
}
