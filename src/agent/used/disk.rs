//! Reading the target: random access ([`ReadAt`]), reads bounded by its
//! size, little-endian fields, merged ranges, and the limits on what a
//! file system may ask the analysis to keep.

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

/// Most block groups a file system may have before it is saved raw.
pub(super) const MAX_GROUPS: u64 = 1 << 20;
/// Most free runs kept per disk; past that, the rest is kept used.
pub(super) const MAX_FREE_RUNS: usize = 1 << 22;
/// Most per-group notes per file system (the rest are summarised).
pub(super) const MAX_GROUP_NOTES: usize = 8;

pub(super) struct Disk<'a, R: ?Sized> {
    pub(super) r: &'a R,
    pub(super) size: u64,
}

impl<R: ReadAt + ?Sized> Disk<'_, R> {
    /// Reads `len` bytes at `off`, refusing reads outside the target.
    pub(super) fn read(&self, off: u64, len: u64) -> Result<Vec<u8>, String> {
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

pub(super) fn le16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at.saturating_add(2)) {
        Some(s) => u16::from_le_bytes([s[0], s[1]]),
        None => 0,
    }
}

pub(super) fn le32(b: &[u8], at: usize) -> u32 {
    match b.get(at..at.saturating_add(4)) {
        Some(s) => u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}

pub(super) fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at.saturating_add(4))) << 32)
}

/// Sorts and merges `(start, end)` ranges, dropping empty ones and joining
/// touching ones.
pub(super) fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
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
