use std::os::unix::fs::FileExt;
use std::path::Path;

use super::*;
use crate::agent::load::plan;
use crate::agent::target::open_load_target;
use crate::agent::testkit::{Driven, env, err_of, run, stamps};
use crate::proto::{ErrorKind, LoadBegin, set_bit};

/// Four delta blocks to a chunk.
const CSU: usize = 4 * DELTA_BLOCK;
const CS: u32 = CSU as u32;

fn image(chunks: usize, tail: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; chunks * CSU + tail];
    fastrand::Rng::with_seed(seed).fill(&mut data);
    data
}

fn chunk_count(data: &[u8]) -> usize {
    data.len().div_ceil(CSU)
}

fn chunk_of(data: &[u8], i: usize) -> &[u8] {
    &data[i * CSU..((i + 1) * CSU).min(data.len())]
}

fn digests(data: &[u8]) -> Vec<u128> {
    (0..chunk_count(data))
        .map(|i| chunk_digest(chunk_of(data, i)))
        .collect()
}

/// LoadBegin of `data` (no zero chunks) onto `target`, chunks of [`CS`].
fn begin(data: &[u8], target: &Path, force: bool) -> Msg {
    Msg::LoadBegin(load_begin(data, target, force))
}

fn load_begin(data: &[u8], target: &Path, force: bool) -> LoadBegin {
    LoadBegin {
        target: target.to_string_lossy().into_owned(),
        size: data.len() as u64,
        chunk_size: CS,
        identity: xxhash_rust::xxh3::xxh3_128(data),
        force,
        force_mounted: false,
        verify: false,
        holder: String::new(),
        digests: digests(data),
        zero: vec![0; bitmap_len(chunk_count(data))],
        image: "delta.img".into(),
        user: "tester".into(),
        host: "testhost".into(),
    }
}

fn poke(target: &Path, at: usize, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(target)
        .unwrap();
    f.write_all_at(bytes, at as u64).unwrap();
}

/// What a controller sends for chunk `i` given the node's block digests:
/// the blocks that differ, compressed when `zstd`. Also their raw length.
fn patch_for(data: &[u8], i: usize, theirs: &[BlockDigest], zstd: bool) -> (Msg, usize) {
    let chunk = chunk_of(data, i);
    let ours = block_digests(chunk);
    assert_eq!(ours.len(), theirs.len());
    let mut blocks = vec![0u8; bitmap_len(ours.len())];
    let mut raw = Vec::new();
    for (k, block) in chunk.chunks(DELTA_BLOCK).enumerate() {
        if ours[k] != theirs[k] {
            set_bit(&mut blocks, k);
            raw.extend_from_slice(block);
        }
    }
    let len = raw.len();
    let (codec, data) = if zstd {
        (Codec::Zstd, zstd::bulk::compress(&raw, 3).unwrap())
    } else {
        (Codec::Raw, raw)
    };
    let msg = Msg::Patch {
        index: i as u32,
        blocks,
        codec,
        data,
    };
    (msg, len)
}

/// Block digests the agent announced and sent after Needed.
fn held(node: &mut Driven) -> Vec<(usize, Vec<BlockDigest>)> {
    let count = node
        .log
        .iter()
        .find_map(|m| match m {
            Msg::Needed { block_digests, .. } => Some(*block_digests),
            _ => None,
        })
        .unwrap();
    (0..count)
        .map(
            |_| match node.wait_for("BlockDigests", |m| matches!(m, Msg::BlockDigests { .. })) {
                Msg::BlockDigests { index, digests } => (index as usize, digests),
                _ => unreachable!(),
            },
        )
        .collect()
}

#[test]
fn a_patch_carries_only_the_blocks_that_differ_and_the_chunk_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let env = env(&dir);
    let target = dir.path().join("disk.img");
    // Three full chunks and one of 1000 bytes (a single short block).
    let data = image(3, 1000, 1);
    std::fs::write(&target, &data).unwrap();
    poke(&target, DELTA_BLOCK + 5, b"changed!");
    poke(&target, 2 * CSU + 7, b"x");
    poke(&target, 2 * CSU + 3 * DELTA_BLOCK + 100, b"changed!");
    poke(&target, 3 * CSU + 999, b"!");

    std::thread::scope(|s| {
        let (mut node, session, bitmap) =
            Driven::start(s, &env, "node", begin(&data, &target, false));
        assert_eq!(
            (0..4).filter(|&i| bit(&bitmap, i)).collect::<Vec<_>>(),
            [0, 2, 3]
        );
        let held = held(&mut node);
        assert_eq!(held.iter().map(|h| h.0).collect::<Vec<_>>(), [0, 2, 3]);
        assert_eq!(held[0].1.len(), 4);
        assert_eq!(held[2].1.len(), 1);
        let mut patched = Vec::new();
        for (k, (i, theirs)) in held.iter().enumerate() {
            let (patch, len) = patch_for(&data, *i, theirs, k % 2 == 0);
            patched.push(len);
            node.send(&patch);
            node.wait_for("Written", |m| matches!(m, Msg::Written { .. }));
        }
        assert_eq!(
            patched,
            [DELTA_BLOCK, 2 * DELTA_BLOCK, 1000],
            "one block of chunk 0, two of chunk 2, the short one of chunk 3"
        );
        let total: usize = patched.iter().sum();
        assert_eq!(
            node.finish(),
            total as u64,
            "only the patched blocks written"
        );
        drop(node);
        session.join().unwrap().unwrap();
    });
    assert!(std::fs::read(&target).unwrap() == data);
    assert_eq!(stamps(&env), 1);
}

#[test]
fn a_patch_that_does_not_verify_is_refused_and_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let env = env(&dir);
    let target = dir.path().join("disk.img");
    let data = image(2, 0, 2);
    std::fs::write(&target, &data).unwrap();
    poke(&target, CSU + 2 * DELTA_BLOCK + 9, b"old data");

    std::thread::scope(|s| {
        let (mut node, session, _) = Driven::start(s, &env, "node", begin(&data, &target, false));
        let held = held(&mut node);
        assert_eq!(held.len(), 1);
        let (patch, len) = patch_for(&data, 1, &held[0].1, true);
        assert_eq!(len, DELTA_BLOCK);
        // Someone writes another block of the chunk after the check.
        poke(&target, CSU + 10, b"meanwhile");
        let before = std::fs::read(&target).unwrap();
        node.send(&patch);
        let reply = node.wait_for("Error", |m| {
            matches!(m, Msg::Error { .. } | Msg::Written { .. })
        });
        let Msg::Error { kind, message } = reply else {
            panic!("a stale patch was acknowledged: {reply:?}");
        };
        assert_eq!(kind, ErrorKind::Stale);
        assert!(
            message.contains("chunk 1") && message.contains("changed"),
            "{message}"
        );
        assert!(
            std::fs::read(&target).unwrap() == before,
            "not one byte of the patch written"
        );
        drop(node);
        let e = err_of(session.join().unwrap());
        assert!(matches!(e, AgentError::Stale(_)), "{e:?}");
        assert_eq!(e.exit_code(), 3);
    });
    assert_eq!(stamps(&env), 0);
}

#[test]
fn a_malformed_patch_is_refused_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let env = env(&dir);
    let target = dir.path().join("disk.img");
    let data = image(2, 0, 3);
    let mut old = data.clone();
    old[CSU + 1] ^= 0xff;
    std::fs::write(&target, &old).unwrap();
    let block = chunk_of(&data, 1)[..DELTA_BLOCK].to_vec();

    // A bitmap for more blocks than the chunk has.
    let wide = Msg::Patch {
        index: 1,
        blocks: vec![1, 0],
        codec: Codec::Raw,
        data: block.clone(),
    };
    let e = err_of(run(&env, &[begin(&data, &target, false), wide]).0);
    assert_eq!(e.exit_code(), 2, "{e}");
    assert!(e.to_string().contains("block bitmap"), "{e}");
    // A block bit beyond the chunk's four.
    let beyond = Msg::Patch {
        index: 1,
        blocks: vec![0b1_0001],
        codec: Codec::Raw,
        data: block.clone(),
    };
    let e = err_of(run(&env, &[begin(&data, &target, false), beyond]).0);
    assert_eq!(e.exit_code(), 2, "{e}");
    // Data shorter than the blocks it claims, raw and compressed.
    for (codec, bytes) in [
        (Codec::Raw, block[..100].to_vec()),
        (Codec::Zstd, zstd::bulk::compress(&block[..100], 3).unwrap()),
        (Codec::Zstd, b"not zstd".to_vec()),
    ] {
        let short = Msg::Patch {
            index: 1,
            blocks: vec![1],
            codec,
            data: bytes,
        };
        let e = err_of(run(&env, &[begin(&data, &target, false), short]).0);
        assert!(matches!(e, AgentError::Verify(_)), "{e:?}");
    }
    assert!(std::fs::read(&target).unwrap() == old, "nothing written");
}

#[test]
fn block_digests_only_for_data_the_target_held_and_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let data = image(6, 0, 4);
    // Chunks 0-2 held (changed) data, chunk 3 a hole, chunk 4 half beyond
    // the old end, chunk 5 wholly beyond it.
    let mut old = data[..4 * CSU + CSU / 2].to_vec();
    for i in 0..5 {
        old[i * CSU + 3] ^= 1;
    }
    std::fs::write(&path, &old).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(0).unwrap();
    f.write_all_at(&old[..3 * CSU], 0).unwrap();
    f.write_all_at(&old[4 * CSU..], 4 * CSU as u64).unwrap();
    drop(f);

    let req = |force| LoadRequest::new(load_begin(&data, &path, force)).unwrap();
    let all = |bitmap: &[u8]| (0..6).all(|i| bit(bitmap, i));
    let per_chunk = 4 * size_of::<BlockDigest>();

    let r = req(false);
    let target = open_load_target(&r).unwrap();
    let (needed, _, held) = plan(&target, &r, &Budget::new(DIGEST_BUDGET)).unwrap();
    assert!(all(&needed));
    assert_eq!(held.iter().map(|h| h.0).collect::<Vec<_>>(), [0, 1, 2]);
    for (i, digests) in &held {
        assert_eq!(*digests, block_digests(&old[i * CSU..(i + 1) * CSU]));
    }

    // A budget for two chunks' digests: two chunks get them, every chunk is
    // still needed.
    let (needed, _, held) = plan(&target, &r, &Budget::new(2 * per_chunk + 7)).unwrap();
    assert!(all(&needed));
    assert_eq!(held.len(), 2, "{held:?}");
    assert!(held.iter().all(|h| h.0 < 3));
    let (needed, _, held) = plan(&target, &r, &Budget::new(0)).unwrap();
    assert!(all(&needed) && held.is_empty());

    // A forced load reads nothing, so has no digests.
    let r = req(true);
    let target = open_load_target(&r).unwrap();
    let (needed, _, held) = plan(&target, &r, &Budget::new(DIGEST_BUDGET)).unwrap();
    assert!(all(&needed) && held.is_empty());
}
