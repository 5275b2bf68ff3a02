//! The image repository: listing, naming, resolving what a user types, and
//! the product's one byte and rate formatter.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::image::manifest::{self, ManifestState};
use crate::image::reader::Format;

#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageInfo {
    pub name: String,
    pub path: PathBuf,
    /// `raw`, `qcow2` (loaded as it is) or `ndz v1`..`ndz v4` (decoded).
    pub format: String,
    /// Bytes in the image; for an `.ndz`, of the disk it describes once its
    /// manifest is built (until then, of the compressed file).
    pub size: u64,
    /// Bytes allocated on disk, and no more than the bytes in non-zero
    /// chunks (fresh manifest): zeros written out in full do not count, nor
    /// do holes inside a chunk (free blocks of a saved file system).
    pub data_size: u64,
    /// Local time, `YYYY-MM-DD HH:MM`.
    pub modified: String,
    /// For a file: the repository symlinks that point at it.
    pub symlinks: Vec<String>,
    pub manifest: ManifestState,
    /// For a symlink: what it points at.
    pub link_to: Option<String>,
}

/// Images in `repo`, sorted by name, optionally filtered by `pattern` (a
/// glob with `*` and `?` if it has one of them, else a substring). Never
/// builds manifests.
pub fn list(repo: &Path, pattern: Option<&str>, chunk_size: u64) -> io::Result<Vec<ImageInfo>> {
    let in_repo = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", repo.display()));
    let mut images = Vec::new();
    // (dev, inode) of each file, to tie symlinks to their targets.
    let mut ids: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    for entry in fs::read_dir(repo).map_err(in_repo)? {
        let entry = entry.map_err(in_repo)?;
        let Ok(name) = entry.file_name().into_string() else {
            continue; // not a name a user could type
        };
        if name.starts_with('.') {
            continue; // manifests, in-progress saves
        }
        let path = entry.path();
        let Ok(own) = fs::symlink_metadata(&path) else {
            continue; // vanished
        };
        let Ok(meta) = fs::metadata(&path) else {
            continue; // broken symlink
        };
        if !meta.is_file() {
            continue;
        }
        let link_to = if own.file_type().is_symlink() {
            let target = fs::read_link(&path).map_err(in_repo)?;
            ids.entry((meta.dev(), meta.ino()))
                .or_default()
                .push(name.clone());
            Some(link_name(repo, &target))
        } else {
            None
        };
        images.push((name, path, meta, link_to));
    }

    let mut out = Vec::new();
    for (name, path, meta, link_to) in images {
        if !pattern.is_none_or(|p| name_matches(p, &name)) {
            continue;
        }
        let (state, cached) = manifest::lookup(&path, chunk_size);
        let format = Format::sniff(&path).unwrap_or(Format::Raw);
        let size = match (&cached, format) {
            (Some(m), Format::Ndz(_)) => m.size,
            _ => meta.len(),
        };
        let allocated = meta.blocks().saturating_mul(512).min(meta.len());
        // An .ndz's own blocks are compressed: its data is the decoded disk's.
        let data_size = match (cached, format) {
            (Some(m), Format::Ndz(_)) => m.data_size(),
            (Some(m), _) => m.data_size().min(allocated),
            (None, _) => allocated,
        };
        let symlinks = if link_to.is_none() {
            let mut names = ids
                .get(&(meta.dev(), meta.ino()))
                .cloned()
                .unwrap_or_default();
            names.sort();
            names
        } else {
            Vec::new()
        };
        out.push(ImageInfo {
            name,
            path,
            format: format.label(),
            size,
            data_size,
            modified: meta
                .modified()
                .map(|t| {
                    chrono::DateTime::<chrono::Local>::from(t)
                        .format("%Y-%m-%d %H:%M")
                        .to_string()
                })
                .unwrap_or_default(),
            symlinks,
            manifest: state,
            link_to,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// A symlink target as a user thinks of it: its name when it lies in the
/// repository, else the link text.
fn link_name(repo: &Path, target: &Path) -> String {
    let in_repo = match target.parent() {
        None => true,
        Some(p) if p.as_os_str().is_empty() => true,
        Some(p) => {
            let abs = if p.is_absolute() {
                p.to_path_buf()
            } else {
                repo.join(p)
            };
            matches!((fs::canonicalize(abs), fs::canonicalize(repo)), (Ok(a), Ok(b)) if a == b)
        }
    };
    match target.file_name() {
        Some(name) if in_repo => name.to_string_lossy().into_owned(),
        _ => target.to_string_lossy().into_owned(),
    }
}

/// `pattern` as a glob (`*`, `?`) matching the whole name, or as a substring.
fn name_matches(pattern: &str, name: &str) -> bool {
    if !pattern.contains(['*', '?']) {
        return name.contains(pattern);
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Greedy matching with backtracking to the last `*`.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Resolve the image a user names: a path if it contains '/', else
/// `repo/arg`, else `repo/arg.img`, else `repo/arg.ndz`.
pub fn resolve_image(repo: &Path, arg: &str) -> Result<PathBuf, String> {
    if arg.is_empty() {
        return Err("empty image name".into());
    }
    if arg.contains('/') {
        let path = PathBuf::from(arg);
        return match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(path),
            Ok(_) => Err(format!("{arg}: not an image file")),
            Err(e) => Err(format!("{arg}: {e}")),
        };
    }
    let mut tried = vec![repo.join(arg)];
    if !arg.ends_with(".img") && !arg.ends_with(".ndz") {
        tried.push(repo.join(format!("{arg}.img")));
        tried.push(repo.join(format!("{arg}.ndz")));
    }
    if let Some(hit) = tried.iter().find(|p| p.is_file()) {
        return Ok(hit.clone());
    }
    let mut tried_text: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    let last = tried_text.pop().unwrap_or_default();
    let tried_text = if tried_text.is_empty() {
        last
    } else {
        format!("{} and {last}", tried_text.join(", "))
    };
    let mut msg = format!("no image {arg:?} in {}: tried {tried_text}", repo.display(),);
    let close = close_names(repo, arg);
    if !close.is_empty() {
        msg.push_str(&format!("; did you mean {}?", close.join(", ")));
    }
    Err(msg)
}

/// Up to 3 repository images whose names look like `arg`.
fn close_names(repo: &Path, arg: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(repo) else {
        return Vec::new();
    };
    let want = arg.strip_suffix(".img").unwrap_or(arg).to_lowercase();
    let mut scored: Vec<(usize, String)> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| !name.starts_with('.') && repo.join(name).is_file())
        .filter_map(|name| {
            let stem = name.strip_suffix(".img").unwrap_or(&name).to_lowercase();
            let distance = if stem.contains(&want) || want.contains(&stem) {
                0
            } else {
                edit_distance(&want, &stem)
            };
            let limit = (want.chars().count() / 3).max(2);
            (distance <= limit).then_some((distance, name))
        })
        .collect();
    scored.sort();
    scored.into_iter().take(3).map(|(_, n)| n).collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// rhubarbe's name for a saved image:
/// `saving__<node>__<YYYY-MM-DD@HH-MM>[__<name>].img`.
pub fn save_name(
    node: &str,
    when: chrono::NaiveDateTime,
    name: Option<&str>,
) -> Result<String, String> {
    if node.is_empty() || node.contains(['/', '\0']) {
        return Err(format!("node name {node:?} cannot be part of a file name"));
    }
    let stamp = when.format("%Y-%m-%d@%H-%M");
    let Some(name) = name else {
        return Ok(format!("saving__{node}__{stamp}.img"));
    };
    let why = if name.is_empty() {
        Some("it is empty")
    } else if name.contains(['/', '\0']) {
        Some("it contains '/' or a NUL byte")
    } else if name.contains("..") {
        Some("it contains \"..\"")
    } else if name.starts_with('.') {
        Some("it starts with '.' (hidden names are for manifests and saves in progress)")
    } else {
        None
    };
    if let Some(why) = why {
        return Err(format!("image name {name:?} is not usable: {why}"));
    }
    let ext = if name.ends_with(".img") { "" } else { ".img" };
    Ok(format!("saving__{node}__{stamp}__{name}{ext}"))
}

/// The hidden name a save writes to before its final rename.
pub fn partial_name(final_name: &str) -> String {
    format!(".{final_name}.partial")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::symlink;

    const CS: u64 = 4096;

    fn names(images: &[ImageInfo]) -> Vec<&str> {
        images.iter().map(|i| i.name.as_str()).collect()
    }

    fn repo() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        fs::write(p.join("ubuntu.img"), vec![1u8; 3 * CS as usize]).unwrap();
        fs::write(p.join("fedora.img"), vec![2u8; 100]).unwrap();
        let sparse = File::create(p.join("sparse.img")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        fs::write(p.join(".ubuntu.img.manifest"), b"junk").unwrap();
        fs::write(p.join(".saving__fit01__x.img.partial"), b"half").unwrap();
        fs::create_dir(p.join("subdir")).unwrap();
        symlink("ubuntu.img", p.join("default.img")).unwrap();
        symlink(p.join("ubuntu.img"), p.join("latest.img")).unwrap();
        symlink("gone.img", p.join("broken.img")).unwrap();
        dir
    }

    #[test]
    fn list_shows_images_and_hides_manifests_partials_and_directories() {
        let dir = repo();
        let images = list(dir.path(), None, CS).unwrap();
        assert_eq!(
            names(&images),
            [
                "default.img",
                "fedora.img",
                "latest.img",
                "sparse.img",
                "ubuntu.img"
            ]
        );
        let fedora = &images[1];
        assert_eq!(fedora.size, 100);
        assert_eq!(fedora.path, dir.path().join("fedora.img"));
        assert_eq!(fedora.modified.len(), "2024-01-01 12:00".len());
        assert!(fedora.symlinks.is_empty() && fedora.link_to.is_none());
        // A hole costs nothing; allocated size never exceeds the size.
        let sparse = &images[3];
        assert_eq!((sparse.size, sparse.data_size), (1 << 30, 0));
        assert!(fedora.data_size <= 100);
    }

    #[test]
    fn list_resolves_symlinks_both_ways() {
        let dir = repo();
        let images = list(dir.path(), None, CS).unwrap();
        let by = |n: &str| images.iter().find(|i| i.name == n).unwrap();
        assert_eq!(by("ubuntu.img").symlinks, ["default.img", "latest.img"]);
        assert_eq!(by("default.img").link_to.as_deref(), Some("ubuntu.img"));
        assert_eq!(by("latest.img").link_to.as_deref(), Some("ubuntu.img"));
        assert_eq!(by("default.img").size, 3 * CS);
        assert!(by("default.img").symlinks.is_empty());
        // Filtering out the links still names them on their target.
        let only = list(dir.path(), Some("ubu"), CS).unwrap();
        assert_eq!(names(&only), ["ubuntu.img"]);
        assert_eq!(only[0].symlinks, ["default.img", "latest.img"]);
    }

    #[test]
    fn list_filters_by_glob_or_substring() {
        let dir = repo();
        let got = |p: &str| {
            list(dir.path(), Some(p), CS)
                .unwrap()
                .into_iter()
                .map(|i| i.name)
                .collect::<Vec<_>>()
        };
        assert_eq!(got("ora"), ["fedora.img"]);
        assert_eq!(got("*ora*"), ["fedora.img"]);
        assert_eq!(got("ora*"), Vec::<String>::new()); // a glob matches whole names
        assert_eq!(got("?e?ora.img"), ["fedora.img"]);
        assert_eq!(got("?????.img"), Vec::<String>::new());
        assert_eq!(got("*u*.img"), ["default.img", "ubuntu.img"]);
        assert_eq!(got("*"), got(""));
    }

    #[test]
    fn list_reports_manifest_state_without_building() {
        let dir = repo();
        let ubuntu = dir.path().join("ubuntu.img");
        let state = |n: &str| {
            list(dir.path(), None, CS)
                .unwrap()
                .into_iter()
                .find(|i| i.name == n)
                .map(|i| (i.manifest, i.data_size))
                .unwrap()
        };
        assert_eq!(state("fedora.img").0, ManifestState::Missing);
        assert!(!manifest::manifest_path(&dir.path().join("fedora.img")).exists());
        assert_eq!(state("ubuntu.img").0, ManifestState::Stale); // junk cache
        manifest::load_or_build(&ubuntu, CS).unwrap();
        assert_eq!(state("ubuntu.img"), (ManifestState::Fresh, 3 * CS));
        assert_eq!(state("default.img").0, ManifestState::Fresh);
        let f = File::options().write(true).open(&ubuntu).unwrap();
        f.set_len(CS).unwrap();
        assert_eq!(state("ubuntu.img").0, ManifestState::Stale);
    }

    #[test]
    fn list_shows_the_format_and_an_ndz_disk_size_once_known() {
        let dir = repo();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ndz/ext4-v3.ndz");
        let ndz = dir.path().join("frisbee.ndz");
        fs::copy(&fixture, &ndz).unwrap();
        fs::write(dir.path().join("base.qcow2"), b"QFI\xfb\0\0\0\x03").unwrap();
        let get = |n: &str| {
            list(dir.path(), None, CS)
                .unwrap()
                .into_iter()
                .find(|i| i.name == n)
                .unwrap()
        };
        assert_eq!(get("fedora.img").format, "raw");
        assert_eq!(get("base.qcow2").format, "qcow2");
        let before = get("frisbee.ndz");
        assert_eq!(before.format, "ndz v3");
        assert_eq!(before.manifest, ManifestState::Missing);
        assert_eq!(before.size, fs::metadata(&ndz).unwrap().len());
        let m = manifest::load_or_build(&ndz, CS).unwrap();
        let after = get("frisbee.ndz");
        assert_eq!(after.manifest, ManifestState::Fresh);
        assert_eq!((after.size, after.data_size), (m.size, m.data_size()));
        assert_eq!(after.format, "ndz v3");
    }

    #[test]
    fn list_counts_holes_inside_chunks_as_no_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("saved.img");
        let chunk = 16 * CS;
        // One chunk with data in its first block, the rest a hole.
        let f = File::create(&path).unwrap();
        f.set_len(chunk).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; CS as usize], 0).unwrap();
        drop(f);
        manifest::load_or_build(&path, chunk).unwrap();
        let images = list(dir.path(), None, chunk).unwrap();
        assert_eq!(images[0].manifest, ManifestState::Fresh);
        assert!(
            images[0].data_size <= 2 * CS,
            "{} bytes of data",
            images[0].data_size
        );
    }

    #[test]
    fn resolve_image_tries_path_name_then_name_img() {
        let dir = repo();
        let p = dir.path();
        assert_eq!(
            resolve_image(p, "ubuntu.img").unwrap(),
            p.join("ubuntu.img")
        );
        assert_eq!(resolve_image(p, "ubuntu").unwrap(), p.join("ubuntu.img"));
        assert_eq!(resolve_image(p, "default").unwrap(), p.join("default.img"));
        fs::write(p.join("frisbee.ndz"), b"x").unwrap();
        assert_eq!(resolve_image(p, "frisbee").unwrap(), p.join("frisbee.ndz"));
        let full = p.join("fedora.img");
        let full = full.to_str().unwrap();
        assert_eq!(resolve_image(p, full).unwrap(), PathBuf::from(full));
        // A path is not looked up in the repository.
        assert!(resolve_image(p, "./ubuntu").is_err());
        assert!(resolve_image(p, "subdir").is_err());
        assert!(resolve_image(p, "").is_err());
    }

    #[test]
    fn resolve_image_error_says_what_was_tried_and_suggests() {
        let dir = repo();
        let p = dir.path();
        let e = resolve_image(p, "ubunto").unwrap_err();
        assert!(e.contains("ubunto.img"), "{e}");
        assert!(e.contains(&p.join("ubunto").display().to_string()), "{e}");
        assert!(e.contains("did you mean ubuntu.img"), "{e}");
        let e = resolve_image(p, "fed").unwrap_err();
        assert!(e.contains("fedora.img"), "{e}");
        assert!(!e.contains("manifest") && !e.contains("partial"), "{e}");
        let e = resolve_image(p, "zzzzzzzzzzzz").unwrap_err();
        assert!(!e.contains("did you mean"), "{e}");
    }

    #[test]
    fn save_names_follow_rhubarbe() {
        let when = chrono::NaiveDate::from_ymd_opt(2024, 3, 7)
            .unwrap()
            .and_hms_opt(9, 5, 59)
            .unwrap();
        assert_eq!(
            save_name("fit01", when, None).unwrap(),
            "saving__fit01__2024-03-07@09-05.img"
        );
        assert_eq!(
            save_name("fit01", when, Some("gnuradio")).unwrap(),
            "saving__fit01__2024-03-07@09-05__gnuradio.img"
        );
        assert_eq!(
            save_name("fit01", when, Some("u22.img")).unwrap(),
            "saving__fit01__2024-03-07@09-05__u22.img"
        );
        assert_eq!(
            save_name("fit01", when, Some("base.qcow2")).unwrap(),
            "saving__fit01__2024-03-07@09-05__base.qcow2.img"
        );
        for bad in ["", ".", "..", "a/b", "x\0", "a..b", ".hidden", "../up"] {
            assert!(save_name("fit01", when, Some(bad)).is_err(), "{bad:?}");
        }
        assert!(save_name("a/b", when, None).is_err());
        assert_eq!(
            partial_name("saving__fit01__2024-03-07@09-05.img"),
            ".saving__fit01__2024-03-07@09-05.img.partial"
        );
    }

    #[test]
    fn glob_matching_handles_backtracking() {
        assert!(name_matches("a*b*c", "axxbyyc"));
        assert!(name_matches("a*c", "abcbc"));
        assert!(!name_matches("a*c", "abcb"));
        assert!(name_matches("*", ""));
        assert!(!name_matches("?", ""));
        assert!(name_matches("é?", "éa"));
    }
}
