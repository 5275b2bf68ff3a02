//! The image repository: listing, naming, resolving what a user types, and
//! the image names it makes.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::fmt::human_bytes;
use crate::image::manifest::{self, ManifestState};
use crate::image::provenance::{self, Provenance};
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
    /// Local time with its zone, `YYYY-MM-DD HH:MM +HH:MM`.
    pub modified: String,
    /// For a file: the repository symlinks (aliases) that point at it; one
    /// in another repository directory has its location after it
    /// (`default.img (local)`).
    pub symlinks: Vec<String>,
    pub manifest: ManifestState,
    /// For a symlink: what it points at.
    pub link_to: Option<String>,
    /// Which repository holds it: `local` (`[repository] dir`) or
    /// `shared:N` (the Nth of `[repository] shared`, from 1).
    pub location: String,
    /// A symlink whose image is gone.
    pub broken: bool,
    /// Where a saved image came from (its `.NAME.info`).
    pub provenance: Option<Provenance>,
}

/// Images in `repo`, sorted by name, optionally filtered by `pattern` (a
/// glob with `*` and `?` if it has one of them, else a substring). Never
/// builds manifests.
pub fn list(repo: &Path, pattern: Option<&str>, chunk_size: u64) -> io::Result<Vec<ImageInfo>> {
    let (images, mut problems) =
        list_dirs(&[(repo.to_path_buf(), LOCAL.into())], pattern, chunk_size);
    match problems.pop() {
        Some((_, e)) => Err(e),
        None => Ok(images),
    }
}

/// The label of `[repository] dir` in listings.
pub const LOCAL: &str = "local";

/// Images in every directory of `dirs` (each with its location label),
/// sorted by name then by search order. Directories that cannot be read are
/// returned as errors (with their index in `dirs`) beside what the others hold.
pub fn list_dirs(
    dirs: &[(PathBuf, String)],
    pattern: Option<&str>,
    chunk_size: u64,
) -> (Vec<ImageInfo>, Vec<(usize, io::Error)>) {
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    // (dev, inode) of each file, to tie symlinks to their targets across
    // directories.
    let mut ids: HashMap<(u64, u64), Vec<(String, String)>> = HashMap::new();
    for (order, (repo, location)) in dirs.iter().enumerate() {
        match read_entries(repo, location, &mut ids) {
            Ok(found) => entries.extend(found.into_iter().map(|e| (order, e))),
            Err(e) => problems.push((
                order,
                io::Error::new(e.kind(), format!("{}: {e}", repo.display())),
            )),
        }
    }
    let mut out = Vec::new();
    for (order, e) in entries {
        if !pattern.is_none_or(|p| name_matches(p, &e.name)) {
            continue;
        }
        let modified = |t: io::Result<std::time::SystemTime>| {
            t.map(crate::ui::fmt::local_date).unwrap_or_default()
        };
        let Some(meta) = e.meta else {
            out.push((
                order,
                ImageInfo {
                    name: e.name,
                    path: e.path,
                    format: "-".into(),
                    size: 0,
                    data_size: 0,
                    modified: modified(e.own.modified()),
                    symlinks: Vec::new(),
                    manifest: ManifestState::Missing,
                    link_to: e.link_to,
                    location: e.location,
                    broken: true,
                    provenance: None,
                },
            ));
            continue;
        };
        let (state, cached) = manifest::lookup(&e.path, chunk_size);
        let format = Format::sniff(&e.path).unwrap_or(Format::Raw);
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
        let symlinks = if e.link_to.is_none() {
            let mut names: Vec<String> = ids
                .get(&(meta.dev(), meta.ino()))
                .into_iter()
                .flatten()
                .map(|(name, location)| {
                    if *location == e.location {
                        name.clone()
                    } else {
                        format!("{name} ({location})")
                    }
                })
                .collect();
            names.sort();
            names
        } else {
            Vec::new()
        };
        out.push((
            order,
            ImageInfo {
                provenance: provenance::read(&e.path),
                name: e.name,
                path: e.path,
                format: format.label(),
                size,
                data_size,
                modified: modified(meta.modified()),
                symlinks,
                manifest: state,
                link_to: e.link_to,
                location: e.location,
                broken: false,
            },
        ));
    }
    out.sort_by(|a, b| a.1.name.cmp(&b.1.name).then(a.0.cmp(&b.0)));
    (out.into_iter().map(|(_, i)| i).collect(), problems)
}

struct Entry {
    name: String,
    path: PathBuf,
    own: fs::Metadata,
    /// None: a broken symlink.
    meta: Option<fs::Metadata>,
    link_to: Option<String>,
    location: String,
}

/// The image files and symlinks of one directory.
fn read_entries(
    repo: &Path,
    location: &str,
    ids: &mut HashMap<(u64, u64), Vec<(String, String)>>,
) -> io::Result<Vec<Entry>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(repo)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue; // not a name a user could type
        };
        if name.starts_with('.') {
            continue; // manifests, provenance, in-progress saves
        }
        let path = entry.path();
        let Ok(own) = fs::symlink_metadata(&path) else {
            continue; // vanished
        };
        let link_to = if own.file_type().is_symlink() {
            let target = fs::read_link(&path)?;
            Some(link_name(repo, &target))
        } else {
            None
        };
        let meta = fs::metadata(&path).ok();
        match &meta {
            None if link_to.is_some() => {} // a broken alias: listed as such
            Some(m) if m.is_file() => {
                if link_to.is_some() {
                    ids.entry((m.dev(), m.ino()))
                        .or_default()
                        .push((name.clone(), location.to_string()));
                }
            }
            _ => continue,
        }
        found.push(Entry {
            name,
            path,
            own,
            meta,
            link_to,
            location: location.to_string(),
        });
    }
    Ok(found)
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
pub(crate) fn name_matches(pattern: &str, name: &str) -> bool {
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

/// A table for humans: NAME FORMAT SIZE DATA DATE MANIFEST WHERE LINKS;
/// with `long`, each saved image's provenance on an indented line below it.
pub fn format_table(images: &[ImageInfo], long: bool) -> String {
    let header = [
        "NAME", "FORMAT", "SIZE", "DATA", "DATE", "MANIFEST", "WHERE", "LINKS",
    ];
    let rows: Vec<[String; 8]> = images
        .iter()
        .map(|i| {
            let links = match &i.link_to {
                Some(target) if i.broken => format!("-> {target} (broken)"),
                Some(target) => format!("-> {target}"),
                None if i.symlinks.is_empty() => String::new(),
                None => format!("<- {}", i.symlinks.join(", ")),
            };
            let state = match i.manifest {
                _ if i.broken => "-",
                ManifestState::Fresh => "fresh",
                ManifestState::Stale => "stale",
                ManifestState::Missing => "missing",
            };
            let size = |n| if i.broken { "-".into() } else { human_bytes(n) };
            [
                i.name.clone(),
                i.format.clone(),
                size(i.size),
                size(i.data_size),
                i.modified.clone(),
                state.to_string(),
                i.location.clone(),
                links,
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 8]| {
        let mut s = String::new();
        for (k, (cell, w)) in cells.iter().zip(widths).enumerate() {
            match k {
                0 => s.push_str(&format!("{cell:<w$}")),
                2 | 3 => s.push_str(&format!("  {cell:>w$}")),
                7 => s.push_str(&format!("  {cell}")),
                _ => s.push_str(&format!("  {cell:<w$}")),
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(header);
    for (row, image) in rows.iter().zip(images) {
        out.push_str(&line(row.each_ref().map(String::as_str)));
        if long
            && image.link_to.is_none()
            && let Some(p) = &image.provenance
        {
            out.push_str(&format!("    {}\n", p.describe()));
        }
    }
    out
}

/// `NAME` as an entry name: `.img` appended unless it already ends so.
pub fn with_img(name: &str) -> String {
    if name.ends_with(".img") {
        name.to_string()
    } else {
        format!("{name}.img")
    }
}

/// A name usable as a repository entry (aliases, `share --as`).
pub fn check_name(name: &str) -> Result<(), String> {
    check_name_for(name, "manifests and saves in progress")
}

/// A name usable as a repository entry; a refused hidden name is told what
/// such names are `hidden_for`.
pub(crate) fn check_name_for(name: &str, hidden_for: &str) -> Result<(), String> {
    let why = if name.is_empty() {
        "it is empty".to_string()
    } else if name.contains(['/', '\0']) {
        "it contains '/' or a NUL byte".to_string()
    } else if name.contains("..") {
        "it contains \"..\"".to_string()
    } else if name.starts_with('.') {
        format!("it starts with '.' (hidden names are for {hidden_for})")
    } else {
        return Ok(());
    };
    Err(format!("image name {name:?} is not usable: {why}"))
}

/// The images a node-spec token probably meant, when it is not a node:
/// `None` if the token does not look like an image at all; else the
/// repository's images it names exactly, by prefix or fuzzily (possibly
/// none, for a token with a dot: it looks like a file all the same).
pub fn images_a_token_may_mean(repo: &Path, token: &str) -> Option<Vec<String>> {
    if token.contains('/') {
        return None;
    }
    for exact in [token.to_string(), format!("{token}.img")] {
        if repo.join(&exact).is_file() {
            return Some(vec![exact]);
        }
    }
    if token.contains('.') {
        return Some(close_names(repo, token));
    }
    // No dot: only a letter-bearing token that starts an image's name or is
    // a near miss of one (`ubunt`), so `fit99` is not taken for a save.
    if token.chars().count() < 3 || !token.chars().any(|c| c.is_ascii_alphabetic()) {
        return None;
    }
    let want = token.to_lowercase();
    let names: Vec<String> = image_names(repo)
        .into_iter()
        .filter(|name| {
            let stem = name.strip_suffix(".img").unwrap_or(name).to_lowercase();
            stem.starts_with(&want) || edit_distance(&want, &stem) <= (want.len() / 4).max(1)
        })
        .take(3)
        .collect();
    (!names.is_empty()).then_some(names)
}

/// The names of the repository's images (regular files, links to them).
fn image_names(repo: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(repo) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| !name.starts_with('.') && repo.join(name).is_file())
        .collect();
    names.sort();
    names
}

/// Up to 3 repository images whose names look like `arg`.
pub(crate) fn close_names(repo: &Path, arg: &str) -> Vec<String> {
    let want = arg.strip_suffix(".img").unwrap_or(arg).to_lowercase();
    let mut scored: Vec<(usize, String)> = image_names(repo)
        .into_iter()
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
    check_name(name)?;
    Ok(format!("saving__{node}__{stamp}__{}", with_img(name)))
}

/// The hidden name a save writes to before its final rename. It carries
/// the saving process's pid, so that two runs saving one name at once
/// never share a file.
pub fn partial_name(final_name: &str, pid: u32) -> String {
    format!(".{final_name}.{pid}.partial")
}

/// Create (or take over) the partial file at `path` and lock it for the
/// save's life: a partial that nobody holds locked is stale, and
/// [`remove_stale_partials`] removes it. Locking, then checking that the
/// path still names the locked file, closes the race with such a removal.
pub fn create_partial(path: &Path) -> io::Result<fs::File> {
    for _ in 0..10 {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        file.lock()?;
        let (held, named) = (file.metadata()?, fs::metadata(path));
        if named.is_ok_and(|n| n.ino() == held.ino() && n.dev() == held.dev()) {
            file.set_len(0)?;
            return Ok(file);
        }
    }
    Err(io::Error::other(format!(
        "{}: removed again and again while being created",
        path.display()
    )))
}

/// Remove the hidden partial files of saves that are no longer running (a
/// run killed before it could remove its own): those nobody holds locked.
/// Returns the names removed.
pub fn remove_stale_partials(dir: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with('.') && name.ends_with(".partial")) {
            continue;
        }
        let path = entry.path();
        let Ok(file) = fs::File::open(&path) else {
            continue;
        };
        if file.try_lock().is_err() {
            continue; // a save is writing it
        }
        let same = file.metadata().ok().zip(fs::symlink_metadata(&path).ok());
        if same.is_some_and(|(a, b)| a.ino() == b.ino() && a.dev() == b.dev())
            && fs::remove_file(&path).is_ok()
        {
            removed.push(name);
        }
    }
    removed
}

/// `name` with ` -N` before its `.img`: the N-th choice when the plain
/// name is taken (`…__golden.img`, `…__golden-2.img`, …).
pub fn numbered_name(name: &str, n: u32) -> String {
    if n <= 1 {
        return name.to_string();
    }
    match name.strip_suffix(".img") {
        Some(stem) => format!("{stem}-{n}.img"),
        None => format!("{name}-{n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::manage::resolve_image;

    #[test]
    fn a_partial_held_by_a_save_is_kept_a_released_one_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let held = dir.path().join(partial_name("saving__n1__x.img", 1));
        let left = dir.path().join(partial_name("saving__n2__x.img", 2));
        let _file = create_partial(&held).unwrap();
        drop(create_partial(&left).unwrap());
        fs::write(dir.path().join("saving__n3__x.img"), b"an image").unwrap();
        let removed = remove_stale_partials(dir.path());
        assert_eq!(removed, vec![".saving__n2__x.img.2.partial".to_string()]);
        assert!(held.exists() && !left.exists());
        assert!(dir.path().join("saving__n3__x.img").exists());
    }

    #[test]
    fn numbered_names_go_before_the_extension() {
        assert_eq!(
            numbered_name("saving__a__t__g.img", 1),
            "saving__a__t__g.img"
        );
        assert_eq!(
            numbered_name("saving__a__t__g.img", 3),
            "saving__a__t__g-3.img"
        );
    }
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
                "broken.img",
                "default.img",
                "fedora.img",
                "latest.img",
                "sparse.img",
                "ubuntu.img"
            ]
        );
        // A broken alias is listed, as broken; the others are not.
        assert!(images[0].broken && images[0].link_to.as_deref() == Some("gone.img"));
        assert!(
            images
                .iter()
                .skip(1)
                .all(|i| !i.broken && i.location == LOCAL)
        );
        let fedora = &images[2];
        assert_eq!(fedora.size, 100);
        assert_eq!(fedora.path, dir.path().join("fedora.img"));
        assert_eq!(fedora.modified.len(), "2024-01-01 12:00 +00:00".len());
        assert!(fedora.symlinks.is_empty() && fedora.link_to.is_none());
        // A hole costs nothing; allocated size never exceeds the size.
        let sparse = &images[4];
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
        assert!(format_table(&[after], false).contains("ndz v3"));
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
    fn table_has_one_row_per_image_with_human_sizes() {
        let dir = repo();
        let images = list(dir.path(), None, CS).unwrap();
        let table = format_table(&images, false);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 1 + images.len());
        for col in [
            "NAME", "FORMAT", "SIZE", "DATA", "DATE", "MANIFEST", "WHERE", "LINKS",
        ] {
            assert!(lines[0].contains(col), "{}", lines[0]);
        }
        let sparse = lines.iter().find(|l| l.starts_with("sparse.img")).unwrap();
        assert!(
            sparse.contains("1.0 GiB") && sparse.contains("0 B"),
            "{sparse}"
        );
        let ubuntu = lines.iter().find(|l| l.starts_with("ubuntu.img")).unwrap();
        assert!(ubuntu.contains("<- default.img, latest.img"), "{ubuntu}");
        let default = lines.iter().find(|l| l.starts_with("default.img")).unwrap();
        assert!(default.ends_with("local  -> ubuntu.img"), "{default}");
        let broken = lines.iter().find(|l| l.starts_with("broken.img")).unwrap();
        assert!(broken.ends_with("-> gone.img (broken)"), "{broken}");
        assert_eq!(format_table(&[], false).lines().count(), 1);
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
            partial_name("saving__fit01__2024-03-07@09-05.img", 42),
            ".saving__fit01__2024-03-07@09-05.img.42.partial"
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
