//! Positioned writes in pieces. One 4 MiB `pwrite` into the page cache
//! costs several times the CPU of the same bytes in 256 KiB pieces on some
//! kernels (measured: `dd bs=4M` from a pipe took 3.4x the CPU of
//! `bs=128K`), and the agent competes for the CPU with ssh and sshd.

use std::os::unix::fs::FileExt;

const PIECE: usize = 256 << 10;

/// `write_all_at`, in pieces of at most 256 KiB.
pub fn write_all_at(file: &std::fs::File, data: &[u8], offset: u64) -> std::io::Result<()> {
    for (i, piece) in data.chunks(PIECE).enumerate() {
        file.write_all_at(piece, offset + (i * PIECE) as u64)?;
    }
    Ok(())
}

/// Replace `place` with `bytes` atomically: written to a hidden temporary
/// file beside it (synced first if `sync`), then renamed over it by
/// `tempfile`'s `persist`, so a reader sees the old file or the new one,
/// never half of one. The temporary file is removed on failure.
pub fn replace_atomically(
    place: &std::path::Path,
    bytes: &[u8],
    sync: bool,
) -> std::io::Result<()> {
    use std::io::Write;
    let dir = place.parent().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no parent directory")
    })?;
    std::fs::create_dir_all(dir)?;
    let name = place.file_name().unwrap_or_default().to_string_lossy();
    let prefix = format!(".{}.", name.strip_prefix('.').unwrap_or(&name));
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    if sync {
        tmp.as_file().sync_all()?;
    }
    tmp.persist(place).map_err(|e| e.error)?;
    Ok(())
}

/// Blocks of this size that are all zeros are left as holes by
/// [`write_nonzero_at`]: the block size of common file systems.
pub const HOLE_BLOCK: usize = 4096;

/// Writes only the [`HOLE_BLOCK`]-sized blocks of `data` (counted from
/// `offset`) that hold a non-zero byte, so zero blocks stay holes in a
/// freshly created file; `offset` should be a multiple of [`HOLE_BLOCK`].
/// Returns the bytes written.
pub fn write_nonzero_at(file: &std::fs::File, data: &[u8], offset: u64) -> std::io::Result<u64> {
    let mut written = 0u64;
    // Start of the current run of non-zero blocks.
    let mut run: Option<usize> = None;
    for (k, block) in data.chunks(HOLE_BLOCK).enumerate() {
        let at = k * HOLE_BLOCK;
        match (run, crate::image::digest::is_zero(block)) {
            (None, false) => run = Some(at),
            (Some(start), true) => {
                write_all_at(file, &data[start..at], offset + start as u64)?;
                written += (at - start) as u64;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run {
        write_all_at(file, &data[start..], offset + start as u64)?;
        written += (data.len() - start) as u64;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    #[test]
    fn pieces_land_where_one_write_would() {
        let f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..(1 << 20) + 77).map(|i| (i % 251) as u8).collect();
        super::write_all_at(&f, &data, 4096).unwrap();
        let mut back = vec![0u8; data.len()];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 4096).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn zero_blocks_stay_holes() {
        use std::os::unix::fs::MetadataExt;
        const B: usize = super::HOLE_BLOCK;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let f = std::fs::File::create_new(&path).unwrap();
        f.set_len(64 * B as u64).unwrap();
        // Blocks 0, 1 and 5 hold data, 2..5 and 6.. are zeros; the last
        // block is short.
        let mut data = vec![0u8; 32 * B + 100];
        data[7] = 1;
        data[2 * B - 1] = 2;
        data[5 * B + 9] = 3;
        data[32 * B + 99] = 4;
        let written = super::write_nonzero_at(&f, &data, 8 * B as u64).unwrap();
        assert_eq!(written, (3 * B + 100) as u64);
        let mut back = vec![0u8; 64 * B];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 0).unwrap();
        assert!(back[..8 * B].iter().all(|&b| b == 0));
        assert_eq!(&back[8 * B..8 * B + data.len()], &data[..]);
        assert!(back[8 * B + data.len()..].iter().all(|&b| b == 0));
        // Four data blocks allocated, give or take file system metadata.
        let allocated = f.metadata().unwrap().blocks() * 512;
        assert!(allocated <= 8 * B as u64, "{allocated} bytes allocated");
    }
}
