//! A save on the node: stream the target's chunks back, zero chunks as
//! flags only.

use std::os::unix::fs::FileTypeExt;

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use crate::agent::env::{AgentEnv, RECEIVE_QUEUE, WORKERS};
use crate::agent::error::{AgentError, check_chunk_size};
use crate::agent::lock::{Mode, TargetLock};
use crate::agent::replies::Replies;
use crate::agent::stamp::StampFile;
use crate::agent::target::{Layout, Target, TargetKind, not_usable};
use crate::agent::used;
use crate::image::digest::{chunk_digest, is_zero, zero_digest};
use crate::image::sparse;
use crate::proto::{Codec, Msg};

pub(super) fn save<W: Write>(
    out: &mut Replies<W>,
    env: &AgentEnv,
    target: &str,
    chunk_size: u32,
    level: i32,
    holder: &str,
    raw: bool,
) -> Result<(), AgentError> {
    check_chunk_size(chunk_size)?;
    // A save must not read a target a load is writing.
    let _lock =
        match std::fs::metadata(target) {
            Ok(meta) if meta.is_file() || meta.file_type().is_block_device() => Some(
                TargetLock::take(env, Path::new(target), Mode::Shared, holder)?,
            ),
            // open_save_target says what is wrong.
            _ => None,
        };
    let target = open_save_target(target)?;
    let layout = Layout::new(target.old_len, chunk_size)?;
    let held = (target.kind == TargetKind::File)
        .then(|| StampFile::new(env, &target).held())
        .flatten();
    out.reply(&Msg::SaveInfo {
        size: layout.size,
        held,
    })?;
    // None: read every byte.
    let used = if raw {
        None
    } else {
        Some(analyse_target(out, &target, layout.size)?)
    };
    let used = used.as_deref();

    let level = level.min(*zstd::compression_level_range().end());
    let workers = WORKERS.min(layout.chunks).max(1);
    std::thread::scope(|s| {
        // One queue per worker, worker w taking chunks w, w+workers, …: the
        // chunks leave in order and memory stays bounded.
        let queues: Vec<Receiver<Result<Msg, AgentError>>> = (0..workers)
            .map(|w| {
                let (tx, rx) = sync_channel(RECEIVE_QUEUE / workers);
                let target = &target;
                s.spawn(move || {
                    let chunks = Chunks {
                        target,
                        layout,
                        used,
                    };
                    save_worker(&chunks, level, w, workers, tx)
                });
                rx
            })
            .collect();
        for i in 0..layout.chunks {
            match queues[i % workers].recv() {
                Ok(Ok(msg)) => out.send(&msg)?,
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(AgentError::Target(format!(
                        "reading {} stopped at chunk {i}",
                        target.name
                    )));
                }
            }
        }
        Ok(())
    })?;
    out.reply(&Msg::SaveEnd)
}

/// Finds the byte ranges of the target that hold data (see [`used`]) and
/// tells the controller what was found, one note per line.
fn analyse_target<W: Write>(
    out: &mut Replies<W>,
    target: &Target,
    size: u64,
) -> Result<Vec<(u64, u64)>, AgentError> {
    let analysis = used::analyse(&target.file, size);
    let free = used::free_bytes(&analysis, size);
    for text in &analysis.notes {
        out.send(&Msg::Note { text: text.clone() })?;
    }
    out.reply(&Msg::Note {
        text: format!(
            "free-block analysis: {} of {} free, not read",
            crate::fmt::human_bytes(free),
            crate::fmt::human_bytes(size)
        ),
    })?;
    Ok(analysis.used)
}

/// The parts of `[offset, offset + len)` that `used` (sorted, merged
/// `(offset, len)` ranges) covers, as `(start, end)` relative to `offset`.
fn used_within(used: &[(u64, u64)], offset: u64, len: usize) -> Vec<(usize, usize)> {
    let end = offset.saturating_add(len as u64);
    let first = used.partition_point(|&(o, l)| o.saturating_add(l) <= offset);
    used[first..]
        .iter()
        .take_while(|&&(o, _)| o < end)
        .map(|&(o, l)| {
            let s = o.max(offset) - offset;
            let e = o.saturating_add(l).min(end) - offset;
            // Both within len, which is a usize.
            (s as usize, e as usize)
        })
        .collect()
}

pub(super) fn open_save_target(name: &str) -> Result<Target, AgentError> {
    let file =
        File::open(name).map_err(|e| AgentError::Target(format!("cannot open {name}: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| AgentError::Target(format!("cannot stat {name}: {e}")))?;
    let (kind, size) = if meta.is_file() {
        (TargetKind::File, meta.len())
    } else if meta.file_type().is_block_device() {
        let size = sparse::file_size(&file)
            .map_err(|e| AgentError::Target(format!("cannot size {name}: {e}")))?;
        (TargetKind::Block, size)
    } else {
        return Err(not_usable(name, &meta));
    };
    Ok(Target {
        file,
        kind,
        name: name.to_string(),
        old_len: size,
    })
}

/// What a save worker reads from.
pub(super) struct Chunks<'a> {
    pub(super) target: &'a Target,
    pub(super) layout: Layout,
    /// Ranges to read (the rest reads as zeros); None: everything.
    pub(super) used: Option<&'a [(u64, u64)]>,
}

pub(super) fn save_worker(
    chunks: &Chunks<'_>,
    level: i32,
    first: usize,
    step: usize,
    tx: SyncSender<Result<Msg, AgentError>>,
) {
    let mut compressor = if level > 0 {
        match zstd::bulk::Compressor::new(level) {
            Ok(c) => Some(c),
            Err(e) => {
                let _ = tx.send(Err(AgentError::Target(format!(
                    "cannot start zstd at level {level}: {e}"
                ))));
                return;
            }
        }
    } else {
        None
    };
    let mut buf = Vec::new();
    for i in (first..chunks.layout.chunks).step_by(step) {
        let msg = save_chunk(chunks, i, compressor.as_mut(), &mut buf);
        let failed = msg.is_err();
        if tx.send(msg).is_err() || failed {
            return;
        }
    }
}

pub(super) fn save_chunk(
    chunks: &Chunks<'_>,
    i: usize,
    compressor: Option<&mut zstd::bulk::Compressor<'static>>,
    buf: &mut Vec<u8>,
) -> Result<Msg, AgentError> {
    let Chunks {
        target,
        layout,
        used,
    } = chunks;
    let offset = layout.offset(i);
    let len = layout.chunk_len(i);
    // Fewer than 2^32 chunks: checked by Layout::new.
    let index = i as u32;
    let zero_chunk = || Msg::SaveChunk {
        index,
        digest: zero_digest(len),
        zero: true,
        codec: Codec::Raw,
        data: vec![],
    };
    if target.is_hole(offset, len) {
        return Ok(zero_chunk());
    }
    buf.resize(len, 0);
    let data = &mut buf[..len];
    match used {
        None => target.read_at(data, offset)?,
        Some(used) => {
            let parts = used_within(used, offset, len);
            if parts.is_empty() {
                return Ok(zero_chunk());
            }
            if parts != [(0, len)] {
                data.fill(0);
            }
            for (s, e) in parts {
                target.read_at(&mut data[s..e], offset + s as u64)?;
            }
        }
    }
    if is_zero(data) {
        return Ok(zero_chunk());
    }
    let digest = chunk_digest(data);
    let packed = compressor
        .and_then(|c| c.compress(data).ok())
        .filter(|packed| packed.len() < len);
    let (codec, data) = match packed {
        Some(packed) => (Codec::Zstd, packed),
        None => (Codec::Raw, data.to_vec()),
    };
    Ok(Msg::SaveChunk {
        index,
        digest,
        zero: false,
        codec,
        data,
    })
}

#[cfg(test)]
mod tests {

    use std::fs::File;
    use std::os::unix::fs::FileExt;

    use super::used_within;
    use crate::agent::error::AgentError;

    use crate::agent::testkit::*;
    use crate::image::digest::{chunk_digest, is_zero};
    use crate::proto::{Codec, HeldImage, Msg};

    #[test]
    fn save_reports_holes_zeros_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let source = dir.path().join("disk.img");
        // Chunk 1 is a hole, chunk 3 written zeros, chunk 6 a partial tail.
        let image = Image::new("rzrztr", 5000, 12);
        let file = File::create(&source).unwrap();
        file.set_len(image.data.len() as u64).unwrap();
        for i in [0, 2, 3, 4, 5, 6] {
            let at = image.layout().offset(i);
            file.write_all_at(image.chunk_data(i), at).unwrap();
        }
        drop(file);

        // No partition table: the analysis saves it raw, and says so.
        for (level, raw) in [(3, false), (0, true)] {
            let (result, replies) = run(
                &env,
                &[Msg::SaveBegin {
                    target: source.to_string_lossy().into_owned(),
                    chunk_size: CS,
                    level,
                    raw,
                    holder: String::new(),
                }],
            );
            result.unwrap();
            let (notes, replies): (Vec<Msg>, Vec<Msg>) = replies
                .into_iter()
                .partition(|m| matches!(m, Msg::Note { .. }));
            let notes: Vec<String> = notes
                .into_iter()
                .map(|m| match m {
                    Msg::Note { text } => text,
                    _ => unreachable!(),
                })
                .collect();
            if raw {
                assert!(notes.is_empty(), "{notes:?}");
            } else {
                assert!(
                    notes
                        .iter()
                        .any(|n| n.contains("no partition table: whole disk saved raw")),
                    "{notes:?}"
                );
                assert!(notes.iter().any(|n| n.contains("0 B of")), "{notes:?}");
            }
            assert_eq!(
                replies[1],
                Msg::SaveInfo {
                    size: image.data.len() as u64,
                    held: None,
                }
            );
            let chunks = image.layout().chunks;
            assert_eq!(replies.len(), 2 + chunks + 1);
            assert_eq!(replies.last(), Some(&Msg::SaveEnd));
            for (i, reply) in replies[2..2 + chunks].iter().enumerate() {
                let Msg::SaveChunk {
                    index,
                    digest,
                    zero,
                    codec,
                    data,
                } = reply
                else {
                    panic!("expected SaveChunk, got {reply:?}");
                };
                let original = image.chunk_data(i);
                assert_eq!(*index as usize, i);
                assert_eq!(*digest, chunk_digest(original), "chunk {i}");
                assert_eq!(*zero, is_zero(original), "chunk {i}");
                let bytes = match codec {
                    Codec::Raw => data.clone(),
                    Codec::Zstd => zstd::bulk::decompress(data, CSU).unwrap(),
                };
                if *zero {
                    assert!(data.is_empty());
                } else {
                    assert!(bytes == original, "chunk {i} data");
                }
                let expect = match (level, i) {
                    (3, 4) => Codec::Zstd, // text compresses
                    _ => Codec::Raw,       // random data does not; zeros travel as flags
                };
                assert_eq!(*codec, expect, "chunk {i} level {level}");
            }
        }
    }

    #[test]
    fn save_reports_what_the_stamp_says_the_target_was_loaded_with() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let target = dir.path().join("disk.img");
        let image = Image::new("held", 0, 16);
        run(&env, &image.load(&target, false, &image.data_chunks()))
            .0
            .unwrap();
        // Changed since the load, as a node that is saved usually is.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .unwrap()
            .write_all_at(b"nginx", 3)
            .unwrap();
        let save = Msg::SaveBegin {
            target: target.to_string_lossy().into_owned(),
            chunk_size: CS,
            level: 0,
            raw: false,
            holder: String::new(),
        };
        let (result, replies) = run(&env, &[save]);
        result.unwrap();
        assert_eq!(
            replies[1],
            Msg::SaveInfo {
                size: image.data.len() as u64,
                held: Some(HeldImage {
                    identity: image.identity(),
                    image: "test.img".into()
                }),
            }
        );
        // Another file was never loaded: nothing held.
        let other = dir.path().join("other.img");
        std::fs::write(&other, vec![1u8; CS as usize]).unwrap();
        let (result, replies) = run(
            &env,
            &[Msg::SaveBegin {
                target: other.to_string_lossy().into_owned(),
                chunk_size: CS,
                level: 0,
                raw: false,
                holder: String::new(),
            }],
        );
        result.unwrap();
        assert!(
            matches!(&replies[1], Msg::SaveInfo { held: None, .. }),
            "{:?}",
            replies[1]
        );
    }

    #[test]
    fn used_within_clips_ranges_to_the_chunk() {
        let used = [(0, 10), (100, 50), (200, 1000), (5000, 1)];
        assert_eq!(used_within(&used, 0, 100), [(0, 10)]);
        assert_eq!(used_within(&used, 10, 90), []);
        assert_eq!(used_within(&used, 120, 100), [(0, 30), (80, 100)]);
        assert_eq!(used_within(&used, 300, 100), [(0, 100)]);
        assert_eq!(used_within(&used, 1200, 3800), []);
        assert_eq!(used_within(&used, 4096, 4096), [(904, 905)]);
        assert_eq!(used_within(&[], 0, 4096), []);
    }

    #[test]
    fn save_of_a_missing_or_odd_target_is_a_target_error() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        for target in [dir.path().join("missing"), dir.path().to_path_buf()] {
            let e = err_of(
                run(
                    &env,
                    &[Msg::SaveBegin {
                        target: target.to_string_lossy().into_owned(),
                        chunk_size: CS,
                        level: 1,
                        raw: false,
                        holder: String::new(),
                    }],
                )
                .0,
            );
            assert!(matches!(e, AgentError::Target(_)), "{e:?}");
            assert!(e.to_string().contains(&*target.to_string_lossy()), "{e}");
            assert_eq!(e.exit_code(), 3);
        }
    }

    #[test]
    fn directory_target_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir);
        let image = Image::new("r", 0, 13);
        let e = err_of(run(&env, &[image.begin(dir.path(), false)]).0);
        assert!(matches!(e, AgentError::Target(_)), "{e:?}");
        let text = e.to_string();
        assert!(text.contains(&*dir.path().to_string_lossy()), "{text}");
        assert!(text.contains("is a directory"), "{text}");
        assert_eq!(e.exit_code(), 3);

        let nowhere = dir.path().join("no-such-dir").join("disk.img");
        let e = err_of(run(&env, &[image.begin(&nowhere, false)]).0);
        assert!(e.to_string().contains("no-such-dir"), "{e}");
        assert_eq!(e.exit_code(), 3);
    }
}
