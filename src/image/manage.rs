//! Managing the repositories: which file a name loads (`resolve`), aliases,
//! publishing to a shared repository (`share`), removal (`rm`) and
//! retention of saves (`prune`).
//!
//! `[repository] dir` is where saves, aliases and removals happen; the
//! `[repository] shared` directories are searched after it, in order, and
//! are only written by `share`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::image::repo::{LOCAL, check_name, with_img};
use crate::image::{manifest, provenance};
use crate::ui::fmt::human_bytes;

/// The repository directories, in search order.
#[derive(Debug, Clone)]
pub struct Repos {
    pub dir: PathBuf,
    pub shared: Vec<PathBuf>,
}

/// What a name a user typed stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The repository entry that matched (`gold.img` for `gold`).
    pub entry: String,
    /// The entry's path (an alias or the image itself).
    pub path: PathBuf,
    /// The image file, aliases followed.
    pub file: PathBuf,
    /// For an alias: its link text.
    pub alias_to: Option<String>,
    /// `local`, `shared:N`, or `path` for a name with a '/'.
    pub location: String,
}

/// One name in one directory.
enum Entry {
    Image,
    Alias { to: PathBuf, real: Option<PathBuf> },
}

fn entry(path: &Path) -> Option<Entry> {
    let own = fs::symlink_metadata(path).ok()?;
    if own.file_type().is_symlink() {
        let to = fs::read_link(path).ok()?;
        let real = fs::canonicalize(path).ok().filter(|p| p.is_file());
        return Some(Entry::Alias { to, real });
    }
    own.is_file().then_some(Entry::Image)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Resolve the image a user names: a path if it contains '/', else
/// `repo/arg`, else `repo/arg.img`, else `repo/arg.ndz` (see
/// [`Repos::resolve`] for the shared repositories too).
pub fn resolve_image(repo: &Path, arg: &str) -> Result<PathBuf, String> {
    Repos::new(repo.to_path_buf(), Vec::new())
        .resolve(arg)
        .map(|r| r.path)
}

/// What a removal did (or would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removal {
    /// One line per entry removed (or kept, for prune), for the user.
    pub lines: Vec<String>,
    /// Bytes of disk space freed (allocated blocks of files whose last link
    /// went).
    pub freed: u64,
    pub removed: usize,
}

impl Removal {
    /// The last line: "removed 3 images, freed 2.1 GiB".
    pub fn total(&self, dry_run: bool) -> String {
        let (verb, free) = if dry_run {
            ("would remove", "would free")
        } else {
            ("removed", "freed")
        };
        let s = if self.removed == 1 { "" } else { "s" };
        format!(
            "{verb} {} entr{}, {free} {}",
            self.removed,
            if s.is_empty() { "y" } else { "ies" },
            human_bytes(self.freed)
        )
    }
}

impl Repos {
    pub fn new(dir: PathBuf, shared: Vec<PathBuf>) -> Repos {
        Repos { dir, shared }
    }

    /// Every directory with its location label, in search order.
    pub fn dirs(&self) -> Vec<(PathBuf, String)> {
        let mut dirs = vec![(self.dir.clone(), LOCAL.to_string())];
        for (k, d) in self.shared.iter().enumerate() {
            dirs.push((d.clone(), format!("shared:{}", k + 1)));
        }
        dirs
    }

    /// The file `-i arg` loads: a path if `arg` has a '/', else `arg`, then
    /// `arg.img`, then `arg.ndz` in each directory in search order; the first entry found
    /// wins, and a broken alias is an error, not a reason to look further.
    pub fn resolve(&self, arg: &str) -> Result<Resolved, String> {
        if arg.is_empty() {
            return Err("empty image name".into());
        }
        if arg.contains('/') {
            let path = PathBuf::from(arg);
            return match (entry(&path), fs::metadata(&path)) {
                (Some(Entry::Alias { to, real: None }), _) => {
                    Err(format!("{arg} is a broken alias to {}", to.display()))
                }
                (_, Ok(m)) if m.is_file() => Ok(Resolved {
                    entry: arg.to_string(),
                    file: fs::canonicalize(&path).unwrap_or_else(|_| path.clone()),
                    path,
                    alias_to: None,
                    location: "path".into(),
                }),
                (_, Ok(_)) => Err(format!("{arg}: not an image file")),
                (_, Err(e)) => Err(format!("{arg}: {e}")),
            };
        }
        let mut names = vec![arg.to_string()];
        if !arg.ends_with(".img") && !arg.ends_with(".ndz") {
            names.push(format!("{arg}.img"));
            names.push(format!("{arg}.ndz"));
        }
        let mut tried = Vec::new();
        for (dir, location) in self.dirs() {
            for name in &names {
                let path = dir.join(name);
                tried.push(path.display().to_string());
                match entry(&path) {
                    None => continue,
                    Some(Entry::Image) => {
                        return Ok(Resolved {
                            entry: name.clone(),
                            file: path.clone(),
                            path,
                            alias_to: None,
                            location,
                        });
                    }
                    Some(Entry::Alias { to, real: None }) => {
                        let place = if location == LOCAL {
                            String::new()
                        } else {
                            format!(" (in {})", dir.display())
                        };
                        return Err(format!(
                            "{name} is a broken alias to {}{place}",
                            to.display()
                        ));
                    }
                    Some(Entry::Alias {
                        to,
                        real: Some(real),
                    }) => {
                        return Ok(Resolved {
                            entry: name.clone(),
                            path,
                            file: real,
                            alias_to: Some(to.to_string_lossy().into_owned()),
                            location,
                        });
                    }
                }
            }
        }
        let where_ = if self.shared.is_empty() {
            self.dir.display().to_string()
        } else {
            "the repositories".to_string()
        };
        let last = tried.pop().unwrap_or_default();
        let tried = if tried.is_empty() {
            last
        } else {
            format!("{} and {last}", tried.join(", "))
        };
        let mut msg = format!("no image {arg:?} in {where_}: tried {tried}");
        let mut close = Vec::new();
        for (dir, _) in self.dirs() {
            close.extend(crate::image::repo::close_names(&dir, arg));
        }
        close.sort();
        close.dedup();
        if !close.is_empty() {
            close.truncate(3);
            msg.push_str(&format!("; did you mean {}?", close.join(", ")));
        }
        Err(msg)
    }

    /// Every alias (in any repository directory) whose image is `file`.
    pub fn aliases_of(&self, file: &Path) -> Vec<PathBuf> {
        let Ok(want) = fs::canonicalize(file) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for (dir, _) in self.dirs() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                if file_name(&path).starts_with('.') {
                    continue;
                }
                if let Some(Entry::Alias {
                    real: Some(real), ..
                }) = entry(&path)
                    && real == want
                {
                    found.push(path);
                }
            }
        }
        found.sort();
        found
    }

    /// `alias NAME IMAGE`: make `NAME` (`.img` appended) in `dir` a symlink
    /// to the image IMAGE resolves to. Never replaces an image; replaces an
    /// alias only with `force`. Returns the line to show.
    pub fn alias(&self, name: &str, image: &str, force: bool) -> Result<String, String> {
        check_name(name)?;
        let entry_name = with_img(name);
        let target = self.resolve(image)?;
        let link = self.dir.join(&entry_name);
        match entry(&link) {
            Some(Entry::Image) => {
                return Err(format!(
                    "{entry_name} is an image in {}; an alias never replaces an image",
                    self.dir.display()
                ));
            }
            Some(Entry::Alias { to, .. }) if !force => {
                return Err(format!(
                    "{entry_name} is already an alias to {}; -f moves it",
                    to.display()
                ));
            }
            Some(Entry::Alias { .. }) => {}
            None if fs::symlink_metadata(&link).is_ok() => {
                return Err(format!("{} exists and is not an image", link.display()));
            }
            None => {}
        }
        for (dir, location) in self.dirs().into_iter().skip(1) {
            if matches!(entry(&dir.join(&entry_name)), Some(Entry::Image)) {
                return Err(format!(
                    "{entry_name} is an image in {location} ({}); an alias of that name would hide it",
                    dir.display()
                ));
            }
        }
        let text = self.link_text(&self.dir, &target.file);
        replace_symlink(&text, &link)?;
        Ok(format!("{entry_name} -> {}", text.display()))
    }

    /// How a link in `dir` names `file`: its name if it lies in `dir`, else
    /// its absolute path.
    fn link_text(&self, dir: &Path, file: &Path) -> PathBuf {
        let same_dir = match (file.parent().map(fs::canonicalize), fs::canonicalize(dir)) {
            (Some(Ok(a)), Ok(b)) => a == b,
            _ => false,
        };
        if same_dir {
            PathBuf::from(file_name(file))
        } else {
            std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf())
        }
    }

    /// `share IMAGE [--as NAME]`: move an image of `dir` (an alias is
    /// followed to it), with its manifest and provenance, into the first
    /// shared directory, never overwriting; re-point the aliases of `dir`
    /// that named it; optionally make the alias NAME there.
    pub fn share(
        &self,
        image: &str,
        as_name: Option<&str>,
        chunk_size: u64,
    ) -> Result<Vec<String>, String> {
        let Some(shared) = self.shared.first() else {
            return Err(
                "no shared repository: set [repository] shared = [\"/path/to/shared\"]".into(),
            );
        };
        if !shared.is_dir() {
            return Err(format!(
                "shared repository {} is not a directory",
                shared.display()
            ));
        }
        if fs::canonicalize(shared).ok() == fs::canonicalize(&self.dir).ok() {
            return Err(format!(
                "shared repository {} is [repository] dir itself",
                shared.display()
            ));
        }
        let found = self.resolve(image)?;
        let local_dir =
            fs::canonicalize(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        if found.file.parent() != Some(local_dir.as_path()) {
            return Err(format!(
                "{} is not in {}; share moves images of [repository] dir",
                found.file.display(),
                self.dir.display()
            ));
        }
        let name = file_name(&found.file);
        let dest = shared.join(&name);
        let sidecars = |image: &Path| {
            [
                provenance::sidecar(image, "manifest"),
                provenance::sidecar(image, "info"),
            ]
        };
        for p in std::iter::once(dest.clone()).chain(sidecars(&dest)) {
            if fs::symlink_metadata(&p).is_ok() {
                return Err(format!("{} already exists; nothing was moved", p.display()));
            }
        }
        let alias = match as_name {
            Some(n) => {
                check_name(n)?;
                let link = shared.join(with_img(n));
                if fs::symlink_metadata(&link).is_ok() {
                    return Err(format!(
                        "{} already exists; nothing was moved",
                        link.display()
                    ));
                }
                Some(link)
            }
            None => None,
        };
        let local_aliases = self
            .aliases_of(&found.file)
            .into_iter()
            .filter(|a| a.parent() == Some(self.dir.as_path()))
            .collect::<Vec<_>>();
        let cached = manifest::load_cached(&found.file, chunk_size);
        move_file(&found.file, &dest)?;
        let mut lines = vec![format!("moved {name} to {}", shared.display())];
        // The manifest: rewritten for the moved file (a copy has a new inode).
        let src_manifest = manifest::manifest_path(&found.file);
        if let Some(m) = cached
            && manifest::store(&dest, &m).is_err()
        {
            lines.push("(its manifest will be rebuilt on first use)".into());
        }
        let _ = fs::remove_file(&src_manifest);
        // The provenance moves as it is (whatever it holds).
        let src_info = provenance::sidecar(&found.file, "info");
        if fs::symlink_metadata(&src_info).is_ok() {
            move_file(&src_info, &provenance::sidecar(&dest, "info"))?;
        }
        for a in local_aliases {
            replace_symlink(&dest, &a)?;
            lines.push(format!("alias {} -> {}", file_name(&a), dest.display()));
        }
        if let Some(link) = alias {
            replace_symlink(Path::new(&name), &link)?;
            lines.push(format!(
                "alias {} -> {name} in {}",
                file_name(&link),
                shared.display()
            ));
        }
        Ok(lines)
    }

    /// `rm IMAGE…`: remove entries of `dir` (an alias: the link only; an
    /// image: with its sidecars). An image an alias points to is refused
    /// unless `force`. Everything is checked before anything is removed.
    pub fn rm(&self, names: &[String], force: bool, dry_run: bool) -> Result<Removal, String> {
        let mut plan: Vec<(PathBuf, bool)> = Vec::new(); // (path, is_image)
        let mut problems = Vec::new();
        for arg in names {
            let mut candidates = vec![arg.clone()];
            if !arg.ends_with(".img") && !arg.ends_with(".ndz") {
                candidates.push(format!("{arg}.img"));
                candidates.push(format!("{arg}.ndz"));
            }
            if arg.contains('/') || check_name(arg).is_err() {
                problems.push(format!(
                    "{arg}: rm takes names of [repository] dir, not paths"
                ));
                continue;
            }
            let hit = candidates
                .iter()
                .map(|c| self.dir.join(c))
                .find_map(|p| entry(&p).map(|e| (p, e)));
            match hit {
                Some((path, Entry::Alias { .. })) => plan.push((path, false)),
                Some((path, Entry::Image)) => {
                    let aliases = self.aliases_of(&path);
                    if !aliases.is_empty() && !force {
                        let names: Vec<String> = aliases.iter().map(|a| file_name(a)).collect();
                        problems.push(format!(
                            "{} is aliased by {}; -f removes it anyway (leaving those broken)",
                            file_name(&path),
                            names.join(", ")
                        ));
                    } else {
                        plan.push((path, true));
                    }
                }
                None => match self.resolve(arg) {
                    Ok(r) if r.location != LOCAL => problems.push(format!(
                        "{arg} is in the shared repository {} ({}); rm only removes from {}",
                        r.path
                            .parent()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default(),
                        r.location,
                        self.dir.display()
                    )),
                    Err(e) if e.contains("broken alias") => problems.push(e),
                    _ => problems.push(format!(
                        "no image or alias {arg:?} in {}",
                        self.dir.display()
                    )),
                },
            }
        }
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        let mut removal = Removal::default();
        plan.sort();
        plan.dedup();
        for (path, is_image) in plan {
            remove_entry(&path, is_image, dry_run, &mut removal)?;
        }
        Ok(removal)
    }

    /// `prune --keep N [PATTERN]`: among the saves of `dir`
    /// (`saving__<node>__<date>[__<name>].img`, matching PATTERN), keep the
    /// N newest of each node and name and remove the rest, except those an
    /// alias points to.
    pub fn prune(
        &self,
        keep: usize,
        pattern: Option<&str>,
        dry_run: bool,
    ) -> Result<Removal, String> {
        let entries =
            fs::read_dir(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let mut groups: BTreeMap<(String, String), Vec<(chrono::NaiveDateTime, String)>> =
            BTreeMap::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(save) = SaveName::parse(&name) else {
                continue;
            };
            if !pattern.is_none_or(|p| crate::image::repo::name_matches(p, &name)) {
                continue;
            }
            if !matches!(entry(&e.path()), Some(Entry::Image)) {
                continue;
            }
            groups
                .entry((save.node, save.name))
                .or_default()
                .push((save.when, name));
        }
        let mut removal = Removal::default();
        for (_, mut saves) in groups {
            saves.sort_by(|a, b| b.cmp(a)); // newest first
            for (_, name) in saves.into_iter().skip(keep) {
                let path = self.dir.join(&name);
                let aliases = self.aliases_of(&path);
                if aliases.is_empty() {
                    remove_entry(&path, true, dry_run, &mut removal)?;
                } else {
                    let names: Vec<String> = aliases.iter().map(|a| file_name(a)).collect();
                    removal
                        .lines
                        .push(format!("kept {name}: aliased by {}", names.join(", ")));
                }
            }
        }
        Ok(removal)
    }
}

/// The parts of rhubarbe's save name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveName {
    pub node: String,
    pub when: chrono::NaiveDateTime,
    /// "" for a save without `-o`.
    pub name: String,
}

impl SaveName {
    /// `saving__<node>__<YYYY-MM-DD@HH-MM>[__<name>].img`, else None.
    pub fn parse(file: &str) -> Option<SaveName> {
        let rest = file.strip_prefix("saving__")?.strip_suffix(".img")?;
        let (node, rest) = rest.split_once("__")?;
        let (stamp, name) = match rest.split_once("__") {
            Some((stamp, name)) => (stamp, name),
            None => (rest, ""),
        };
        let when = chrono::NaiveDateTime::parse_from_str(stamp, "%Y-%m-%d@%H-%M").ok()?;
        (!node.is_empty()).then(|| SaveName {
            node: node.to_string(),
            when,
            name: name.to_string(),
        })
    }
}

/// Remove an entry (and, for an image, its sidecars), counting what it frees.
fn remove_entry(
    path: &Path,
    is_image: bool,
    dry_run: bool,
    removal: &mut Removal,
) -> Result<(), String> {
    let verb = if dry_run { "would remove" } else { "removed" };
    let name = file_name(path);
    let mut files = vec![path.to_path_buf()];
    if is_image {
        files.push(provenance::sidecar(path, "manifest"));
        files.push(provenance::sidecar(path, "info"));
    }
    let mut freed = 0;
    for f in &files {
        let Ok(meta) = fs::symlink_metadata(f) else {
            continue;
        };
        if meta.nlink() <= 1 {
            freed += meta.blocks() * 512;
        }
        if !dry_run {
            fs::remove_file(f).map_err(|e| format!("cannot remove {}: {e}", f.display()))?;
        }
    }
    removal.lines.push(if is_image {
        format!("{verb} {name} ({} on disk)", human_bytes(freed))
    } else {
        format!("{verb} alias {name}")
    });
    removal.freed += freed;
    removal.removed += 1;
    Ok(())
}

/// Make `link` a symlink to `to`, replacing an existing symlink atomically.
fn replace_symlink(to: &Path, link: &Path) -> Result<(), String> {
    let dir = link.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}-{:08x}.link",
        file_name(link),
        std::process::id(),
        fastrand::u32(..)
    ));
    std::os::unix::fs::symlink(to, &tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    fs::rename(&tmp, link).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("cannot create {}: {e}", link.display())
    })
}

/// Move `from` to `to` without ever replacing `to`: a hard link and an
/// unlink on one filesystem, else a sparse copy (synced) under a hidden
/// name that is then linked into place.
pub fn move_file(from: &Path, to: &Path) -> Result<(), String> {
    let exists = |to: &Path| format!("{} already exists; nothing was moved", to.display());
    match fs::hard_link(from, to) {
        Ok(()) => {
            return fs::remove_file(from)
                .map_err(|e| format!("cannot remove {}: {e}", from.display()));
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(exists(to)),
        Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {}
        Err(e) => {
            return Err(format!(
                "cannot move {} to {}: {e}",
                from.display(),
                to.display()
            ));
        }
    }
    let partial = to.with_file_name(format!(".{}.partial", file_name(to)));
    let copied = copy_sparse(from, &partial).and_then(|()| {
        fs::hard_link(&partial, to).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                exists(to)
            } else {
                format!("cannot name {}: {e}", to.display())
            }
        })
    });
    let _ = fs::remove_file(&partial);
    copied?;
    fs::remove_file(from).map_err(|e| format!("cannot remove {}: {e}", from.display()))
}

/// Copy `from` to a new file `to`, leaving holes where `from` reads zeros,
/// and sync it.
pub fn copy_sparse(from: &Path, to: &Path) -> Result<(), String> {
    let at = |p: &Path, e: io::Error| format!("{}: {e}", p.display());
    let mut src = fs::File::open(from).map_err(|e| at(from, e))?;
    let len = src.metadata().map_err(|e| at(from, e))?.len();
    let dst = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(|e| at(to, e))?;
    dst.set_len(len).map_err(|e| at(to, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let n = src.read(&mut buf).map_err(|e| at(from, e))?;
        if n == 0 {
            break;
        }
        if !crate::image::digest::is_zero(&buf[..n]) {
            dst.write_all_at(&buf[..n], offset).map_err(|e| at(to, e))?;
        }
        offset += n as u64;
    }
    if offset != len {
        return Err(format!("{} changed while it was copied", from.display()));
    }
    dst.sync_all().map_err(|e| at(to, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A local and a shared directory: local holds ubuntu.img (with a
    /// manifest and provenance sidecar) and default.img -> ubuntu.img;
    /// shared holds base.img.
    fn repos() -> (tempfile::TempDir, Repos) {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("local");
        let shared = dir.path().join("shared");
        fs::create_dir_all(&local).unwrap();
        fs::create_dir_all(&shared).unwrap();
        fs::write(local.join("ubuntu.img"), vec![7u8; 8192]).unwrap();
        fs::write(local.join(".ubuntu.img.manifest"), b"m").unwrap();
        fs::write(local.join(".ubuntu.img.info"), b"{}").unwrap();
        symlink("ubuntu.img", local.join("default.img")).unwrap();
        fs::write(shared.join("base.img"), vec![1u8; 100]).unwrap();
        let r = Repos::new(local, vec![shared]);
        (dir, r)
    }

    #[test]
    fn resolve_follows_aliases_and_the_search_order() {
        let (_d, r) = repos();
        let hit = r.resolve("default").unwrap();
        assert_eq!(hit.entry, "default.img");
        assert_eq!(
            hit.file,
            fs::canonicalize(r.dir.join("ubuntu.img")).unwrap()
        );
        assert_eq!(hit.alias_to.as_deref(), Some("ubuntu.img"));
        assert_eq!(hit.location, "local");
        let base = r.resolve("base").unwrap();
        assert_eq!(
            (base.location.as_str(), base.path.clone()),
            ("shared:1", r.shared[0].join("base.img"))
        );
        // The local directory comes first.
        fs::write(r.dir.join("base.img"), b"local").unwrap();
        assert_eq!(r.resolve("base").unwrap().location, "local");
        let e = r.resolve("nothere").unwrap_err();
        assert!(
            e.contains("tried") && e.contains(&r.shared[0].display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn a_broken_alias_is_an_error_naming_it() {
        let (_d, r) = repos();
        symlink("gone.img", r.dir.join("old.img")).unwrap();
        assert_eq!(
            r.resolve("old").unwrap_err(),
            "old.img is a broken alias to gone.img"
        );
        // Not hidden by an image of that name further down the search order.
        fs::write(r.shared[0].join("old.img"), b"x").unwrap();
        assert!(r.resolve("old.img").unwrap_err().contains("broken alias"));
    }

    #[test]
    fn alias_links_replaces_only_aliases_and_only_with_force() {
        let (_d, r) = repos();
        assert_eq!(
            r.alias("gold", "ubuntu", false).unwrap(),
            "gold.img -> ubuntu.img"
        );
        assert_eq!(
            fs::read_link(r.dir.join("gold.img")).unwrap(),
            Path::new("ubuntu.img")
        );
        // An alias of an alias names the image itself.
        r.alias("copy", "gold", false).unwrap();
        assert_eq!(
            fs::read_link(r.dir.join("copy.img")).unwrap(),
            Path::new("ubuntu.img")
        );
        // A shared image is named by its absolute path.
        r.alias("gold", "base", true).unwrap();
        assert_eq!(
            fs::read_link(r.dir.join("gold.img")).unwrap(),
            r.shared[0].join("base.img")
        );
        let e = r.alias("gold", "ubuntu", false).unwrap_err();
        assert!(e.contains("already an alias") && e.contains("-f"), "{e}");
        let e = r.alias("ubuntu", "base", true).unwrap_err();
        assert!(e.contains("never replaces an image"), "{e}");
        assert!(
            fs::symlink_metadata(r.dir.join("ubuntu.img"))
                .unwrap()
                .is_file()
        );
        let e = r.alias("base", "ubuntu", true).unwrap_err();
        assert!(e.contains("would hide it"), "{e}");
        assert!(r.alias("../x", "ubuntu", false).is_err());
        assert!(
            r.alias("y", "missing", false)
                .unwrap_err()
                .contains("no image")
        );
        // No temporary link left behind.
        let hidden: Vec<_> = fs::read_dir(&r.dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".link"))
            .collect();
        assert!(hidden.is_empty());
    }

    #[test]
    fn rm_refuses_aliased_images_unless_forced_and_checks_all_first() {
        let (_d, r) = repos();
        fs::write(r.dir.join("other.img"), vec![3u8; 4096]).unwrap();
        let e = r
            .rm(&["other".into(), "ubuntu".into()], false, false)
            .unwrap_err();
        assert!(e.contains("ubuntu.img is aliased by default.img"), "{e}");
        assert!(
            r.dir.join("other.img").exists(),
            "nothing removed after a refusal"
        );
        let e = r.rm(&["base".into()], false, false).unwrap_err();
        assert!(e.contains("shared repository"), "{e}");
        assert!(r.rm(&["none".into()], false, false).is_err());
        // Dry run: said, not done.
        let plan = r.rm(&["ubuntu".into()], true, true).unwrap();
        assert_eq!(plan.removed, 1);
        assert!(
            plan.lines[0].starts_with("would remove ubuntu.img"),
            "{:?}",
            plan.lines
        );
        assert!(r.dir.join("ubuntu.img").exists());
        let done = r
            .rm(&["ubuntu".into(), "default".into()], true, false)
            .unwrap();
        assert_eq!(done.removed, 2);
        assert!(done.freed >= 8192, "{}", done.freed);
        for gone in [
            "ubuntu.img",
            ".ubuntu.img.manifest",
            ".ubuntu.img.info",
            "default.img",
        ] {
            assert!(fs::symlink_metadata(r.dir.join(gone)).is_err(), "{gone}");
        }
        assert!(done.total(false).starts_with("removed 2 entries, freed "));
    }

    #[test]
    fn prune_keeps_the_newest_per_node_and_name_and_aliased_saves() {
        let (_d, r) = repos();
        let names = [
            "saving__fit01__2026-01-01@10-00__gold.img",
            "saving__fit01__2026-01-02@10-00__gold.img",
            "saving__fit01__2026-01-03@10-00__gold.img",
            "saving__fit02__2026-01-01@10-00__gold.img",
            "saving__fit01__2026-01-01@09-00.img",
            "saving__fit01__2026-01-02@09-00.img",
        ];
        for n in names {
            fs::write(r.dir.join(n), vec![1u8; 4096]).unwrap();
        }
        symlink(names[0], r.dir.join("first.img")).unwrap();
        let plan = r.prune(1, None, true).unwrap();
        assert_eq!(plan.removed, 2, "{:?}", plan.lines);
        assert!(plan.lines.iter().any(|l| l.contains(names[1])));
        assert!(plan.lines.iter().any(|l| l.contains(names[4])));
        assert!(
            plan.lines
                .iter()
                .any(|l| l.starts_with("kept") && l.contains(names[0]))
        );
        assert!(
            names.iter().all(|n| r.dir.join(n).exists()),
            "dry run touched nothing"
        );
        let done = r.prune(1, Some("gold"), false).unwrap();
        assert_eq!(done.removed, 1);
        assert!(!r.dir.join(names[1]).exists());
        assert!(r.dir.join(names[4]).exists(), "not matching the pattern");
        assert!(r.dir.join("ubuntu.img").exists(), "not a save");
    }

    #[test]
    fn save_names_parse_back() {
        let s = SaveName::parse("saving__fit01__2026-11-28@10-03__with__two.img").unwrap();
        assert_eq!((s.node.as_str(), s.name.as_str()), ("fit01", "with__two"));
        assert_eq!(
            s.when.format("%Y-%m-%d %H:%M").to_string(),
            "2026-11-28 10:03"
        );
        assert_eq!(
            SaveName::parse("saving__fit01__2026-11-28@10-03.img")
                .unwrap()
                .name,
            ""
        );
        for bad in [
            "ubuntu.img",
            "saving__fit01__yesterday.img",
            "saving____2026-11-28@10-03.img",
        ] {
            assert_eq!(SaveName::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn share_moves_image_and_sidecars_repoints_aliases_and_never_overwrites() {
        let (_d, r) = repos();
        let shared = r.shared[0].clone();
        let lines = r.share("default", Some("golden"), 4096).unwrap();
        assert!(lines[0].starts_with("moved ubuntu.img to"), "{lines:?}");
        assert!(!r.dir.join("ubuntu.img").exists());
        assert!(!r.dir.join(".ubuntu.img.manifest").exists());
        assert_eq!(
            fs::read(shared.join("ubuntu.img")).unwrap(),
            vec![7u8; 8192]
        );
        assert_eq!(
            fs::read_link(r.dir.join("default.img")).unwrap(),
            shared.join("ubuntu.img")
        );
        assert_eq!(
            fs::read_link(shared.join("golden.img")).unwrap(),
            Path::new("ubuntu.img")
        );
        assert_eq!(r.resolve("golden").unwrap().location, "shared:1");
        // Again under the same name: refused, nothing moved.
        fs::write(r.dir.join("ubuntu.img"), b"second").unwrap();
        let e = r.share("ubuntu", None, 4096).unwrap_err();
        assert!(e.contains("already exists"), "{e}");
        assert_eq!(fs::read(r.dir.join("ubuntu.img")).unwrap(), b"second");
        // Without a shared repository.
        let alone = Repos::new(r.dir.clone(), Vec::new());
        assert!(
            alone
                .share("ubuntu", None, 4096)
                .unwrap_err()
                .contains("no shared repository")
        );
    }

    #[test]
    fn sparse_copy_keeps_holes_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("a.img");
        let f = fs::File::create(&from).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"data", 10 << 20).unwrap();
        drop(f);
        let to = dir.path().join("b.img");
        copy_sparse(&from, &to).unwrap();
        assert_eq!(fs::read(&from).unwrap(), fs::read(&to).unwrap());
        assert!(fs::metadata(&to).unwrap().blocks() * 512 < 4 << 20);
        assert!(copy_sparse(&from, &to).is_err(), "never overwrites");
    }

    #[test]
    fn move_across_filesystems_copies_sparsely_and_never_overwrites() {
        // /dev/shm is a tmpfs on Linux, the temp dir usually is not.
        let Ok(other) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("no /dev/shm: the cross-filesystem move is not exercised");
            return;
        };
        let here = tempfile::tempdir().unwrap();
        let dev = |p: &Path| fs::metadata(p).unwrap().dev();
        if dev(here.path()) == dev(other.path()) {
            eprintln!("one filesystem: the cross-filesystem move is not exercised");
            return;
        }
        let from = here.path().join("a.img");
        let f = fs::File::create(&from).unwrap();
        f.set_len(32 << 20).unwrap();
        f.write_all_at(b"payload", 20 << 20).unwrap();
        drop(f);
        let want = fs::read(&from).unwrap();
        let to = other.path().join("a.img");
        move_file(&from, &to).unwrap();
        assert!(!from.exists());
        assert_eq!(fs::read(&to).unwrap(), want);
        assert!(
            fs::metadata(&to).unwrap().blocks() * 512 < 4 << 20,
            "holes kept"
        );
        assert_eq!(
            fs::read_dir(other.path()).unwrap().count(),
            1,
            "no partial left"
        );
        // Never over an existing file.
        fs::write(&from, b"new").unwrap();
        assert!(
            move_file(&from, &to)
                .unwrap_err()
                .contains("already exists")
        );
        assert_eq!(fs::read(&from).unwrap(), b"new");
        assert_eq!(fs::read(&to).unwrap(), want);
    }
}
