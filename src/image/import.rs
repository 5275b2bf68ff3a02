//! `imaging import`: turn a Frisbee `.ndz` into a raw sparse image in the
//! repository, with its manifest.
//!
//! The disk is decoded chunk by chunk into a hidden temporary file in the
//! repository (only the regions the `.ndz` covers are written, and within
//! them only blocks that are not all zeros: everything else stays a hole),
//! which is sized, synced, given its manifest, and only then renamed into
//! place, never replacing an existing file. A damaged `.ndz` (or Ctrl-C)
//! leaves nothing behind.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::image::digest::is_zero;
use crate::image::fileio;
use crate::image::manifest::{self, Manifest};
use crate::image::ndz::NdzImage;
use crate::image::reader::Format;
use crate::image::repo;

/// Pieces of a region that are all zeros and this long (or the region's
/// tail) are left as holes.
const PIECE: usize = 64 << 10;

/// What an import made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Imported {
    /// The new image's name in the repository.
    pub name: String,
    pub path: PathBuf,
    /// The format of the source (`ndz v3`).
    pub format: String,
    /// Bytes in the image.
    pub size: u64,
    /// Bytes in chunks that are not all zeros.
    pub data_size: u64,
    pub chunks: usize,
}

#[derive(Debug)]
pub enum ImportError {
    /// Bad input: a name, a source that is not an `.ndz`, a damaged `.ndz`,
    /// an existing image.
    Usage(String),
    /// Writing the repository failed.
    Io(String),
    Cancelled,
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImportError::Usage(s) | ImportError::Io(s) => f.write_str(s),
            ImportError::Cancelled => f.write_str("interrupted"),
        }
    }
}

/// The name the image of `source` gets: `output` (with `.img` added when it
/// has no such ending), else the source's file name with `.ndz` replaced by
/// `.img`.
pub fn output_name(source: &Path, output: Option<&str>) -> Result<String, String> {
    let name = match output {
        Some(name) => name.to_string(),
        None => {
            let file = source
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            let lower = file.to_ascii_lowercase();
            match lower.strip_suffix(".ndz") {
                Some(stem) => file[..stem.len()].to_string(),
                None => file,
            }
        }
    };
    repo::check_name_for(&name, "manifests and files in progress")?;
    Ok(repo::with_img(&name))
}

/// Decode the `.ndz` at `source` into `repo/name`, and store its manifest
/// with `chunk_size`. `cancel` is checked between chunks.
pub fn import_ndz(
    source: &Path,
    repo: &Path,
    name: &str,
    chunk_size: u64,
    cancel: &AtomicBool,
) -> Result<Imported, ImportError> {
    let usage = ImportError::Usage;
    let final_path = repo.join(name);
    let exists = |p: &Path| p.symlink_metadata().is_ok();
    let format = Format::sniff(source)
        .map_err(|e| usage(format!("cannot read {}: {e}", source.display())))?;
    if !matches!(format, Format::Ndz(_)) {
        return Err(usage(format!(
            "{} is not an .ndz image (it reads as {format}); load it as it is",
            source.display()
        )));
    }
    if exists(&final_path) {
        return Err(usage(format!(
            "{name} already exists in {}",
            repo.display()
        )));
    }
    let img = NdzImage::open(source).map_err(|e| usage(format!("{}: {e}", source.display())))?;
    let io_err = |what: &str, e: std::io::Error| ImportError::Io(format!("{what}: {e}"));

    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".partial")
        // Like any file created: readable by others as the umask allows.
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(repo)
        .map_err(|e| io_err(&format!("cannot create a file in {}", repo.display()), e))?;
    let written = |e| io_err(&format!("writing {}", tmp.path().display()), e);
    tmp.as_file().set_len(img.size()).map_err(written)?;
    for index in 0..img.chunk_count() {
        if cancel.load(Ordering::Relaxed) {
            return Err(ImportError::Cancelled);
        }
        let regions = img
            .decode_chunk(index)
            .map_err(|e| usage(format!("{}: {e}", source.display())))?;
        for (offset, bytes) in regions {
            for (k, piece) in bytes.chunks(PIECE).enumerate() {
                if !is_zero(piece) {
                    let at = offset + (k * PIECE) as u64;
                    fileio::write_all_at(tmp.as_file(), piece, at).map_err(written)?;
                }
            }
        }
    }
    tmp.as_file().sync_all().map_err(written)?;

    let manifest =
        Manifest::build(tmp.path(), chunk_size).map_err(|e| io_err("reading the image back", e))?;
    if cancel.load(Ordering::Relaxed) {
        return Err(ImportError::Cancelled);
    }
    if exists(&final_path) {
        return Err(usage(format!(
            "{name} appeared in {} while importing",
            repo.display()
        )));
    }
    manifest::store_renamed(tmp.path(), &final_path, &manifest)
        .map_err(|e| io_err("writing the manifest", e))?;
    tmp.persist_noclobber(&final_path).map_err(|e| {
        usage(format!(
            "cannot create {}: {}",
            final_path.display(),
            e.error
        ))
    })?;
    Ok(Imported {
        name: name.to_string(),
        path: final_path,
        format: format.label(),
        size: manifest.size,
        data_size: manifest.data_size(),
        chunks: img.chunk_count(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_source_or_the_option() {
        let src = Path::new("/r/ubuntu-22.04.ndz");
        assert_eq!(output_name(src, None).unwrap(), "ubuntu-22.04.img");
        assert_eq!(output_name(Path::new("x.NDZ"), None).unwrap(), "x.img");
        assert_eq!(output_name(Path::new("plain"), None).unwrap(), "plain.img");
        assert_eq!(output_name(src, Some("golden")).unwrap(), "golden.img");
        assert_eq!(output_name(src, Some("g.img")).unwrap(), "g.img");
        for bad in ["", "a/b", ".hidden", "a..b"] {
            assert!(output_name(src, Some(bad)).is_err(), "{bad:?}");
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn an_import_is_the_decoded_disk_or_nothing() {
        let repo = tempfile::tempdir().unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ndz/ext4-v3.ndz");
        let go = AtomicBool::new(false);
        // A raw file is refused, whatever its name.
        let raw = repo.path().join("raw.ndz.img");
        std::fs::write(&raw, vec![7u8; 4096]).unwrap();
        let e = import_ndz(&raw, repo.path(), "x.img", 1 << 20, &go).unwrap_err();
        assert!(e.to_string().contains("not an .ndz"), "{e}");
        // Interrupted: nothing is left.
        let stop = AtomicBool::new(true);
        let e = import_ndz(&fixture, repo.path(), "x.img", 1 << 20, &stop).unwrap_err();
        assert!(matches!(e, ImportError::Cancelled), "{e}");
        assert_eq!(names(repo.path()), ["raw.ndz.img"]);
        // Done: every byte as decoded, holes where the image has no data.
        let got = import_ndz(&fixture, repo.path(), "x.img", 1 << 20, &go).unwrap();
        let img = NdzImage::open(&fixture).unwrap();
        let mut want = vec![0u8; img.size() as usize];
        for i in 0..img.chunk_count() {
            for (off, bytes) in img.decode_chunk(i).unwrap() {
                want[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes);
            }
        }
        assert!(std::fs::read(&got.path).unwrap() == want);
        let allocated = std::os::unix::fs::MetadataExt::blocks(&got.path.metadata().unwrap()) * 512;
        assert!(allocated < img.size() / 2, "{allocated} of {}", img.size());
        assert_eq!(
            manifest::load_cached(&got.path, 1 << 20).map(|m| m.size),
            Some(img.size())
        );
        assert_eq!(
            names(repo.path()),
            [".x.img.manifest", "raw.ndz.img", "x.img"]
        );
        // Never over an existing image.
        let e = import_ndz(&fixture, repo.path(), "x.img", 1 << 20, &go).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
    }
}
