//! `imaging clean` on the node: remove, from the directory of a target
//! pattern (`/var/lib/libvirt/images/{image}`), the image files that imaging
//! stamped and that are not kept. A file without a stamp, or changed since
//! its load (it may be another file at the same path), is never removed: it
//! is reported as skipped.

use std::os::unix::fs::MetadataExt;

use std::io::Write;
use std::path::Path;

use crate::agent::env::AgentEnv;
use crate::agent::error::AgentError;
use crate::agent::lock::{Mode, TargetLock};
use crate::agent::replies::Replies;
use crate::agent::stamp::StampFile;
use crate::agent::status::{IMAGE_PLACEHOLDER, image_part, matching_files};
use crate::proto::Msg;
use crate::proto::status::{CleanAction, CleanBegin, CleanEntry, CleanReport};

pub(super) fn clean<W: Write>(
    out: &mut Replies<W>,
    env: &AgentEnv,
    req: &CleanBegin,
) -> Result<(), AgentError> {
    if !req.pattern.contains(IMAGE_PLACEHOLDER) {
        return Err(AgentError::Target(format!(
            "{}: a clean needs a target holding {IMAGE_PLACEHOLDER}",
            req.pattern
        )));
    }
    let paths = matching_files(&req.pattern).map_err(AgentError::Target)?;
    let entries = paths.iter().map(|p| one(env, req, p)).collect();
    out.reply(&Msg::CleanReport(CleanReport { entries }))
}

fn one(env: &AgentEnv, req: &CleanBegin, path: &str) -> CleanEntry {
    let mut entry = CleanEntry {
        path: path.to_string(),
        image: String::new(),
        action: CleanAction::Skipped,
        bytes: 0,
        reason: String::new(),
    };
    let skip = |mut entry: CleanEntry, reason: String| {
        entry.reason = reason;
        entry
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) => return skip(entry, format!("cannot stat: {e}")),
    };
    entry.bytes = meta.blocks() * 512;
    let stamp_file = StampFile::for_path(env, path);
    let stamp = stamp_file.read();
    if let Some(stamp) = &stamp {
        entry.image = stamp.image.clone();
    }
    let part = image_part(&req.pattern, path).unwrap_or_default();
    let kept = req.keep.iter().any(|k| {
        [part, entry.image.as_str()]
            .iter()
            .any(|name| !name.is_empty() && (*name == k || *name == format!("{k}.img")))
    });
    if kept {
        entry.action = CleanAction::Kept;
        return entry;
    }
    if !meta.is_file() {
        return skip(entry, "not a regular file".into());
    }
    let Some(stamp) = stamp else {
        return skip(entry, "not written by imaging (no stamp)".into());
    };
    // Size, mtime, inode and device as the load left them: the file imaging
    // wrote. A file changed since may be another one at the same path (a
    // new file can get the inode of a removed one): kept, and said so.
    if !stamp.intact(&meta) || stamp.target != stamp_file.key {
        return skip(
            entry,
            "changed or replaced since imaging wrote it (not intact): remove it by hand if it should go"
                .into(),
        );
    }
    if req.dry_run {
        entry.action = CleanAction::WouldRemove;
        return entry;
    }
    // No load or verify may hold it while it goes.
    let _lock = match TargetLock::take(env, Path::new(path), Mode::Exclusive, &req.holder) {
        Ok(lock) => lock,
        Err(e) => return skip(entry, e.to_string()),
    };
    if let Err(e) = std::fs::remove_file(path) {
        return skip(entry, format!("cannot remove: {e}"));
    }
    if let Err(e) = stamp_file.remove() {
        eprintln!("imaging agent: warning: {e}");
    }
    entry.action = CleanAction::Removed;
    entry
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::testkit::*;

    #[test]
    fn clean_removes_stamped_unkept_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let images = dir.path().join("images");
        std::fs::create_dir(&images).unwrap();
        let image = Image::new("rr", 9, 21);
        for name in ["old.img", "base.img", "replaced.img"] {
            run(
                &env,
                &image.load(&images.join(name), false, &image.data_chunks()),
            )
            .0
            .unwrap();
        }
        std::fs::write(images.join("mine.img"), b"not imaging's").unwrap();
        // Replaced by another file at the same path: the stamp is not its.
        std::fs::remove_file(images.join("replaced.img")).unwrap();
        std::fs::write(images.join("replaced.img"), b"someone's").unwrap();
        let ask = |dry_run: bool| {
            let begin = Msg::CleanBegin(CleanBegin {
                pattern: format!("{}/{{image}}", images.display()),
                keep: vec!["base".into()],
                dry_run,
                holder: "test".into(),
            });
            let (result, replies) = run(&env, &[begin]);
            result.unwrap();
            let Some(Msg::CleanReport(r)) = replies.into_iter().nth(1) else {
                panic!("no CleanReport")
            };
            r.entries
                .into_iter()
                .map(|e| {
                    let name = Path::new(&e.path)
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned();
                    (name, e.action, e.reason)
                })
                .collect::<Vec<_>>()
        };
        let dry = ask(true);
        let actions: Vec<(&str, CleanAction)> =
            dry.iter().map(|(n, a, _)| (n.as_str(), *a)).collect();
        assert_eq!(
            actions,
            [
                ("base.img", CleanAction::Kept),
                ("mine.img", CleanAction::Skipped),
                ("old.img", CleanAction::WouldRemove),
                ("replaced.img", CleanAction::Skipped),
            ]
        );
        assert!(dry[1].2.contains("no stamp"), "{dry:?}");
        assert!(dry[3].2.contains("not intact"), "{dry:?}");
        assert!(images.join("old.img").exists(), "a dry run removes nothing");
        let done = ask(false);
        assert_eq!(done[2].1, CleanAction::Removed);
        assert!(!images.join("old.img").exists());
        for kept in ["base.img", "mine.img", "replaced.img"] {
            assert!(images.join(kept).exists(), "{kept}");
        }
        // Its stamp went with it: base.img's and replaced.img's remain.
        assert_eq!(stamps(&env), 2);
    }
}
