//! Sparse files and devices: sizes, and where the data is (SEEK_DATA/SEEK_HOLE).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Size of a regular file or a block device.
pub(crate) fn file_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    // SAFETY: lseek on a descriptor we own; it touches no memory.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(end as u64)
}

/// `lseek(offset, whence)`; `None` for ENXIO (no data at or after `offset`).
/// The file position it moves is never used: all I/O here is positioned.
fn seek_from(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: lseek on a descriptor we own; it touches no memory.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// True if `[offset, offset+len)` of a regular file is known to be a hole;
/// any doubt answers false.
pub(crate) fn is_hole(file: &File, offset: u64, len: u64) -> bool {
    match seek_from(file, offset, libc::SEEK_DATA) {
        Ok(Some(data)) => data >= offset.saturating_add(len),
        Ok(None) => true,
        Err(_) => false,
    }
}

/// Data extents `[start, end)` from SEEK_DATA/SEEK_HOLE; `None` when the
/// system cannot tell (then everything is read).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn data_extents(file: &File, size: u64) -> Option<Vec<(u64, u64)>> {
    let seek = |offset, whence| seek_from(file, offset, whence);
    let mut extents = Vec::new();
    let mut at = 0;
    while at < size {
        let start = match seek(at, libc::SEEK_DATA).ok()? {
            Some(start) if start < size => start,
            _ => break,
        };
        let end = seek(start, libc::SEEK_HOLE).ok()?.unwrap_or(size).min(size);
        if end <= start {
            // Should not happen; read the rest rather than loop.
            extents.push((start, size));
            break;
        }
        extents.push((start, end));
        at = end;
    }
    Some(extents)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn data_extents(_file: &File, _size: u64) -> Option<Vec<(u64, u64)>> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn finds_data_between_holes() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create_new(dir.path().join("f")).unwrap();
        file.set_len(8 << 20).unwrap();
        file.write_all_at(&[1u8; 4096], 4 << 20).unwrap();
        assert_eq!(file_size(&file).unwrap(), 8 << 20);
        assert!(is_hole(&file, 0, 1 << 20));
        assert!(!is_hole(&file, 4 << 20, 4096));
        assert!(is_hole(&file, 6 << 20, 1 << 20));
        if let Some(extents) = data_extents(&file, 8 << 20) {
            // Filesystems round to their own blocks; the written block is in.
            assert!(
                extents
                    .iter()
                    .any(|&(s, e)| s <= 4 << 20 && e >= (4 << 20) + 4096)
            );
        }
    }
}
