//! `imaging status` on the node: what each target holds, from its stamp and
//! its metadata alone (no byte of a target is read), and on request a
//! verify that reads a target and counts the chunks that differ from an
//! image, with the digest compare a load uses.

use std::os::unix::fs::FileTypeExt;

use std::fs::{File, Metadata};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::agent::env::{AgentEnv, WORKERS};
use crate::agent::error::{AgentError, malformed};
use crate::agent::load::chunk_matches;
use crate::agent::lock::{Mode, TargetLock};
use crate::agent::replies::Replies;
use crate::agent::stamp::StampFile;
use crate::agent::target::{LoadRequest, Target, TargetKind, not_usable};
use crate::image::sparse;
use crate::proto::status::{
    FileKind, StampInfo, StatusReport, TargetStatus, VerifyBegin, VerifyResult,
};
use crate::proto::{LoadBegin, Msg, ProtocolError, bitmap_len, read_msg_sync, set_bit};

/// The placeholder that makes a target a pattern over its directory.
pub(super) const IMAGE_PLACEHOLDER: &str = "{image}";

/// How often a verify says how far it got.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Answer StatusBegin, then serve VerifyBegin requests until the
/// controller closes.
pub(super) fn status<R: Read, W: Write>(
    input: &mut R,
    out: &mut Replies<W>,
    env: &AgentEnv,
    queries: &[String],
) -> Result<(), AgentError> {
    let mut targets = Vec::new();
    for (q, query) in queries.iter().enumerate() {
        if query.is_empty() {
            return Err(malformed("StatusBegin has an empty target".into()));
        }
        // At most u32::MAX queries fit in a frame's count.
        let q = q as u32;
        match matching_files(query) {
            Ok(paths) => targets.extend(paths.iter().map(|p| look(env, q, p))),
            Err(error) => targets.push(TargetStatus {
                query: q,
                path: query.clone(),
                kind: FileKind::Missing,
                size: 0,
                stamp: None,
                intact: false,
                error,
            }),
        }
    }
    out.reply(&Msg::StatusReport(StatusReport {
        targets,
        rchar: rchar(),
    }))?;
    loop {
        match read_msg_sync(input) {
            Err(ProtocolError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
            Ok(Msg::VerifyBegin(v)) => {
                let result = verify(out, env, &v)?;
                out.reply(&Msg::VerifyResult(result))?;
            }
            Ok(Msg::Error { message, .. }) => return Err(AgentError::Peer(message)),
            Ok(other) => {
                return Err(malformed(format!(
                    "expected VerifyBegin after a StatusReport, got {}",
                    other.name()
                )));
            }
        }
    }
}

/// A target, or, when it holds `{image}`, the files of its directory that
/// match it (`{image}` standing for any name without a `/`), sorted. An
/// unreadable directory is an error (the reason); an empty match is no file.
pub(super) fn matching_files(query: &str) -> Result<Vec<String>, String> {
    let Some((prefix, suffix)) = query.split_once(IMAGE_PLACEHOLDER) else {
        return Ok(vec![query.to_string()]);
    };
    if suffix.contains('/') || suffix.contains(IMAGE_PLACEHOLDER) {
        return Err(format!(
            "{query}: {IMAGE_PLACEHOLDER} must appear once, in the file name"
        ));
    }
    let (dir, head) = match prefix.rfind('/') {
        Some(slash) => (&prefix[..=slash], &prefix[slash + 1..]),
        None => ("", prefix),
    };
    let listed = if dir.is_empty() { "." } else { dir };
    let entries = std::fs::read_dir(listed).map_err(|e| format!("cannot list {listed}: {e}"))?;
    let mut paths = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let fits = name.len() > head.len() + suffix.len()
            && name.starts_with(head)
            && name.ends_with(suffix)
            // Hidden files (temporary and partial ones) unless asked for.
            && (!name.starts_with('.') || head.starts_with('.'));
        if fits && entry.file_type().is_ok_and(|t| !t.is_dir()) {
            paths.push(format!("{dir}{name}"));
        }
    }
    paths.sort();
    Ok(paths)
}

/// The part of `path` that `{image}` stands for in `pattern`.
pub(super) fn image_part<'a>(pattern: &str, path: &'a str) -> Option<&'a str> {
    let (prefix, suffix) = pattern.split_once(IMAGE_PLACEHOLDER)?;
    path.strip_prefix(prefix)?.strip_suffix(suffix)
}

/// One target, from `stat` and its stamp: never opened.
pub(super) fn look(env: &AgentEnv, query: u32, path: &str) -> TargetStatus {
    let mut status = TargetStatus {
        query,
        path: path.to_string(),
        kind: FileKind::Missing,
        size: 0,
        stamp: None,
        intact: false,
        error: String::new(),
    };
    let meta = match std::fs::metadata(path) {
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            status.error = format!("cannot stat {path}: {e}");
            None
        }
    };
    if let Some(meta) = &meta {
        status.kind = kind_of(meta);
        if status.kind == FileKind::File {
            status.size = meta.len();
        }
    }
    // Block devices are never stamped; a missing file may have left one.
    if matches!(status.kind, FileKind::File | FileKind::Missing) {
        let file = StampFile::for_path(env, path);
        if let Some(stamp) = file.read() {
            status.intact = meta
                .as_ref()
                .is_some_and(|m| m.is_file() && stamp.intact(m))
                && stamp.target == file.key;
            status.stamp = Some(StampInfo {
                identity: stamp.identity,
                image: stamp.image,
                loaded_at: stamp.origin.loaded_at,
                host: stamp.origin.host,
                user: stamp.origin.user,
                tool: stamp.origin.tool,
                size: stamp.size,
                mtime_ns: stamp.mtime_ns,
                inode: stamp.inode,
                dev: stamp.dev,
                target: stamp.target,
                chunk_size: stamp.chunk_size,
            });
        }
    }
    status
}

fn kind_of(meta: &Metadata) -> FileKind {
    if meta.is_file() {
        FileKind::File
    } else if meta.file_type().is_block_device() {
        FileKind::Block
    } else {
        FileKind::Other
    }
}

/// This process's `rchar` (bytes read through read calls, from any file or
/// pipe), if `/proc/self/io` tells it.
pub(super) fn rchar() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/io").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Read the target under a shared lock (a load may not write meanwhile)
/// and count the chunks that differ from the image.
fn verify<W: Write>(
    out: &mut Replies<W>,
    env: &AgentEnv,
    v: &VerifyBegin,
) -> Result<VerifyResult, AgentError> {
    let req = LoadRequest::new(LoadBegin {
        target: v.target.clone(),
        size: v.size,
        chunk_size: v.chunk_size,
        identity: v.identity,
        verify: true,
        holder: v.holder.clone(),
        digests: v.digests.clone(),
        zero: v.zero.clone(),
        ..LoadBegin::default()
    })?;
    let name = v.target.clone();
    let path = Path::new(&name);
    let meta = std::fs::metadata(path)
        .map_err(|e| AgentError::Target(format!("cannot verify {name}: {e}")))?;
    let kind = match kind_of(&meta) {
        FileKind::File => TargetKind::File,
        FileKind::Block => TargetKind::Block,
        _ => return Err(not_usable(&name, &meta)),
    };
    let _lock = TargetLock::take(env, path, Mode::Verify, &v.holder)?;
    let file =
        File::open(path).map_err(|e| AgentError::Target(format!("cannot open {name}: {e}")))?;
    let old_len = match kind {
        TargetKind::File => file.metadata().map(|m| m.len()),
        TargetKind::Block => sparse::file_size(&file),
    }
    .map_err(|e| AgentError::Target(format!("cannot size {name}: {e}")))?;
    let target = Target {
        file,
        kind,
        name,
        old_len,
    };
    let layout = req.layout;
    // A chunk the target does not hold whole cannot match.
    let within = (0..layout.chunks)
        .take_while(|&i| layout.offset(i) + layout.chunk_len(i) as u64 <= old_len)
        .count();
    let short = (layout.chunks - within) as u64;

    let next = AtomicUsize::new(0);
    let mismatched = AtomicU64::new(0);
    let checked = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let finished = AtomicUsize::new(0);
    let worker = || {
        let mut buf = Vec::new();
        let mut differ = Vec::new();
        let outcome = (|| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= within || failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            if !chunk_matches(&target, &req, i, &mut buf)? {
                mismatched.fetch_add(1, Ordering::Relaxed);
                differ.push(i);
            }
            checked.fetch_add(layout.chunk_len(i) as u64, Ordering::Relaxed);
        })();
        if outcome.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        finished.fetch_add(1, Ordering::Release);
        outcome.map(|()| differ)
    };
    let outcomes: Vec<Result<Vec<usize>, AgentError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..WORKERS).map(|_| s.spawn(worker)).collect();
        let mut said = Instant::now();
        let mut progress = Ok(Vec::new());
        while finished.load(Ordering::Acquire) < WORKERS {
            std::thread::sleep(Duration::from_millis(20));
            if progress.is_ok() && said.elapsed() >= PROGRESS_EVERY {
                said = Instant::now();
                progress = out
                    .reply(&Msg::VerifyProgress {
                        bytes_checked: checked.load(Ordering::Relaxed),
                    })
                    .map(|()| Vec::new());
                if progress.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
            }
        }
        let mut outcomes: Vec<_> = workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(AgentError::Target("a checking thread failed".into())))
            })
            .collect();
        outcomes.push(progress);
        outcomes
    });
    let mut differing = vec![0u8; bitmap_len(layout.chunks)];
    for outcome in outcomes {
        for i in outcome? {
            set_bit(&mut differing, i);
        }
    }
    for i in within..layout.chunks {
        set_bit(&mut differing, i);
    }
    Ok(VerifyResult {
        chunks: layout.chunks as u64,
        mismatched: mismatched.load(Ordering::Relaxed) + short,
        rchar: rchar(),
        differing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::testkit::*;
    use crate::proto::Msg;

    fn report(replies: &[Msg]) -> &StatusReport {
        replies
            .iter()
            .find_map(|m| match m {
                Msg::StatusReport(r) => Some(r),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no StatusReport in {replies:?}"))
    }

    #[test]
    fn status_tells_stamped_modified_missing_and_unknown_without_reading() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rzr", 3, 17);
        let loaded = dir.path().join("a.img");
        run(&env, &image.load(&loaded, false, &image.data_chunks()))
            .0
            .unwrap();
        let unknown = dir.path().join("b.img");
        std::fs::write(&unknown, b"someone else's").unwrap();
        let missing = dir.path().join("gone.img");
        let ask = |targets: Vec<String>| {
            let (result, replies) = run(&env, &[Msg::StatusBegin { targets }]);
            result.unwrap();
            report(&replies).clone()
        };
        let s = |p: &std::path::Path| p.to_string_lossy().into_owned();
        let r = ask(vec![s(&loaded), s(&unknown), s(&missing)]);
        let [a, b, c] = &r.targets[..] else {
            panic!("{r:?}")
        };
        let stamp = a.stamp.as_ref().unwrap();
        assert!(a.intact && a.kind == FileKind::File, "{a:?}");
        assert_eq!(stamp.image, "test.img");
        assert_eq!(stamp.identity, image.identity());
        assert_eq!(
            (stamp.user.as_str(), stamp.host.as_str()),
            ("tester", "testhost")
        );
        assert!(stamp.tool.starts_with("imaging "), "{stamp:?}");
        assert!(stamp.loaded_at.ends_with('Z'), "{stamp:?}");
        assert!(chrono::DateTime::parse_from_rfc3339(&stamp.loaded_at).is_ok());
        assert_eq!(stamp.chunk_size, u64::from(CS));
        assert!(b.stamp.is_none() && b.kind == FileKind::File && !b.intact);
        assert!(c.stamp.is_none() && c.kind == FileKind::Missing);

        // A write in place: modified, and the stamp still says what was loaded.
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&loaded)
            .unwrap()
            .write_all_at(b"12345678", 0)
            .unwrap();
        let r = ask(vec![s(&loaded)]);
        assert!(!r.targets[0].intact);
        assert_eq!(
            r.targets[0].stamp.as_ref().unwrap().identity,
            image.identity()
        );

        // The pattern form lists the directory's matching files.
        let r = ask(vec![format!("{}/{{image}}", dir.path().display())]);
        let paths: Vec<&str> = r.targets.iter().map(|t| t.path.as_str()).collect();
        assert_eq!(paths, vec![s(&loaded), s(&unknown)]);
        let r = ask(vec!["/nonexistent-dir/{image}.img".into()]);
        assert!(r.targets[0].error.contains("cannot list"), "{r:?}");
    }

    #[test]
    fn verify_counts_the_chunks_that_differ() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("rrzr", 5, 17);
        let target = dir.path().join("a.img");
        run(&env, &image.load(&target, false, &image.data_chunks()))
            .0
            .unwrap();
        let begin = || {
            let b = image.load_begin(&target, false);
            Msg::VerifyBegin(VerifyBegin {
                target: b.target,
                size: b.size,
                chunk_size: b.chunk_size,
                identity: b.identity,
                holder: "test".into(),
                digests: b.digests,
                zero: b.zero,
            })
        };
        let verified = |env: &AgentEnv| {
            let (result, replies) = run(env, &[Msg::StatusBegin { targets: vec![] }, begin()]);
            result.unwrap();
            replies
                .iter()
                .find_map(|m| match m {
                    Msg::VerifyResult(r) => Some(r.clone()),
                    _ => None,
                })
                .unwrap()
        };
        assert_eq!(verified(&env).mismatched, 0);
        // Chunk 1 changed, and data where the zero chunk 2 was.
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)
            .unwrap();
        f.write_all_at(b"x", u64::from(CS) + 5).unwrap();
        f.write_all_at(b"y", 2 * u64::from(CS)).unwrap();
        let r = verified(&env);
        assert_eq!((r.chunks, r.mismatched), (5, 2), "{r:?}");
        let differ = |r: &VerifyResult| -> Vec<usize> {
            (0..r.chunks as usize)
                .filter(|&i| crate::proto::bit(&r.differing, i))
                .collect()
        };
        assert_eq!(differ(&r), vec![1, 2]);
        // Nothing was written back.
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, 2 * u64::from(CS)).unwrap();
        assert_eq!(&byte, b"y");
        // A shorter file: the chunks it lacks differ too.
        f.set_len(u64::from(CS) * 3 - 1).unwrap();
        let r = verified(&env);
        assert_eq!(r.mismatched, 4);
        assert_eq!(differ(&r), vec![1, 2, 3, 4]);
    }
}
