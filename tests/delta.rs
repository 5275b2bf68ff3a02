//! Block-level delta on real sshd nodes: a chunk that differs on a node
//! travels as the 16 KiB blocks that differ, in the star and in the relay
//! chain's catch-up, and is still verified whole before it is written.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{Rig, assert_same, imaging, lines, node, summary};

const MIB: usize = 1 << 20;
const BLOCK: u64 = 16 << 10;
/// The chunk size of the tests where a target changes under a patch: four
/// blocks, so the retry's whole chunk is quick at their bandwidth cap.
const SMALL_CHUNK: u64 = 64 << 10;

fn write_random(path: &Path, mib: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; mib * MIB];
    fastrand::Rng::with_seed(seed).fill(&mut data);
    std::fs::write(path, &data).unwrap();
    data
}

/// `n` scattered 8-byte changes: one at a seeded place in each of `n`
/// equal slices of the target. Returns their offsets.
fn scatter_changes(target: &Path, n: usize, seed: u64) -> Vec<u64> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(target)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let slice = len / n as u64;
    let mut rng = fastrand::Rng::with_seed(seed);
    let offsets: Vec<u64> = (0..n as u64)
        .map(|k| k * slice + rng.u64(0..slice - 8))
        .collect();
    for &at in &offsets {
        f.write_all_at(&rng.u64(..).to_le_bytes(), at).unwrap();
    }
    offsets
}

/// Distinct units of `unit` bytes that 8-byte changes at `offsets` touch.
fn touched(offsets: &[u64], unit: u64) -> u64 {
    let mut units: Vec<u64> = offsets
        .iter()
        .flat_map(|o| [o / unit, (o + 7) / unit])
        .collect();
    units.dedup();
    units.len() as u64
}

fn layer(rig: &Rig, name: &str, text: &str) -> PathBuf {
    let path = rig.dir().join(name);
    std::fs::write(&path, format!("[load]\n{text}\n")).unwrap();
    path
}

fn logs(out: &Output) -> Vec<String> {
    lines(out)
        .iter()
        .filter(|v| v["event"] == "log")
        .map(|v| v["text"].as_str().unwrap_or("").to_string())
        .collect()
}

fn load(rig: &Rig, cfg: &Path, args: &[&str]) -> Output {
    let out = imaging(rig, cfg)
        .args(["load", "--json", "-t", "300", "-i", "lab.img"])
        .args(args)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn star_reload_after_scattered_changes_sends_only_the_changed_blocks() {
    let rig = Rig::new(1);
    let image = write_random(&rig.dir().join("images/lab.img"), 64, 11);
    // The default chunk size (4 MiB): no chunk_size in the layer.
    let cfg = layer(&rig, "star.conf", "fanout = \"star\"");
    load(&rig, &cfg, &["1"]);
    let target = &rig.nodes()[0].target;
    assert_same(target, &image);

    let offsets = scatter_changes(target, 20, 5);
    let changed = touched(&offsets, BLOCK);
    let out = load(&rig, &cfg, &["1"]);
    let s = summary(&out);
    assert_same(target, &image);
    let n = node(&s, "node01");
    assert_eq!(n["state"], "done", "{s}");
    let sent = n["bytes_sent"].as_u64().unwrap();
    // Whole chunks would be 20 x 4 MiB (as many as the changes hit).
    assert_eq!(sent, changed * BLOCK, "{s}");
    assert!(sent < 2 * MIB as u64, "{s}");
    assert_eq!(n["bytes_written"].as_u64().unwrap(), changed * BLOCK, "{s}");
    let logs = logs(&out);
    let chunks = touched(&offsets, 4 << 20);
    let line = format!("node01: {chunks} chunks as block patches: ");
    assert!(logs.iter().any(|l| l.starts_with(&line)), "{logs:?}");
}

#[test]
fn chain_reload_patches_the_changed_node_in_its_catch_up() {
    let rig = Rig::new(4);
    let image = write_random(&rig.dir().join("images/lab.img"), 64, 12);
    let cfg = layer(
        &rig,
        "chain.conf",
        "fanout = \"chain\"\nrelay_bind = \"127.0.0.1\"",
    );
    let out = load(&rig, &cfg, &["1-4"]);
    assert!(
        logs(&out).iter().any(|l| l.starts_with("relay chain: ")),
        "the first load went through a chain"
    );
    for n in rig.nodes() {
        assert_same(&n.target, &image);
    }

    let offsets = scatter_changes(&rig.nodes()[2].target, 20, 6);
    let changed = touched(&offsets, BLOCK);
    let out = load(&rig, &cfg, &["1-4"]);
    let s = summary(&out);
    for n in rig.nodes() {
        assert_same(&n.target, &image);
    }
    for other in ["node01", "node02", "node04"] {
        assert_eq!(node(&s, other)["state"], "up-to-date", "{s}");
    }
    let n = node(&s, "node03");
    assert_eq!(n["state"], "done", "{s}");
    let total: u64 = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["bytes_sent"].as_u64().unwrap())
        .sum();
    assert_eq!(total, changed * BLOCK, "{s}");
    assert!(total < 2 * MIB as u64, "{s}");
    let logs = logs(&out);
    // The changed chunks stayed out of the stream and came in node03's
    // catch-up, as patches.
    assert!(
        logs.iter().any(|l| l.starts_with("relay chain: ")
            && l.contains(
                "left out of the stream: the nodes that lack them get block patches directly"
            )),
        "{logs:?}"
    );
    let catch_up = logs
        .iter()
        .position(|l| l.starts_with("node03: catching up on "))
        .unwrap_or_else(|| panic!("no catch-up: {logs:?}"));
    assert!(
        logs[catch_up..]
            .iter()
            .any(|l| l.starts_with("node03: ") && l.contains(" as block patches: ")),
        "{logs:?}"
    );
}

/// `load -b 32K` of `lab.img` with `cfg`, running.
fn slow_load(rig: &Rig, cfg: &Path, nodes: &str) -> std::process::Child {
    let mut cmd = imaging(rig, cfg);
    cmd.args([
        "load", "--json", "-t", "300", "-b", "32K", "-i", "lab.img", nodes,
    ]);
    common::die_with_test(&mut cmd);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Once the first change of `offsets` is repaired on `target`, change the
/// chunk (of [`SMALL_CHUNK`]) of the last one in a block its patch does not carry,
/// behind the agent's back.
fn change_the_last_chunk_once_the_first_patch_landed(target: &Path, image: &[u8], offsets: &[u64]) {
    let first = offsets[0] as usize;
    let file = std::fs::File::open(target).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut got = [0u8; 8];
        file.read_exact_at(&mut got, first as u64).unwrap();
        if got == image[first..first + 8] {
            break;
        }
        assert!(Instant::now() < deadline, "the first patch never landed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let last = *offsets.last().unwrap();
    let chunk_start = last / SMALL_CHUNK * SMALL_CHUNK;
    let other_block = if last - chunk_start < BLOCK {
        chunk_start + 2 * BLOCK
    } else {
        chunk_start
    };
    let w = std::fs::OpenOptions::new()
        .write(true)
        .open(target)
        .unwrap();
    w.write_all_at(b"meanwhile", other_block + 100).unwrap();
}

#[test]
fn a_target_changed_under_a_patch_is_retried_with_whole_chunks_and_ends_exact() {
    let rig = Rig::new(1);
    let image = write_random(&rig.dir().join("images/lab.img"), 16, 13);
    // Four blocks to a chunk; 16 changes hit 16 chunks.
    let cfg = layer(
        &rig,
        "stale.conf",
        "fanout = \"star\"\nchunk_size = 65536\nretries = 3",
    );
    load(&rig, &cfg, &["1"]);
    let target = rig.nodes()[0].target.clone();
    let offsets = scatter_changes(&target, 16, 7);

    // The patches (16 x 16 KiB) at 32 KiB/s take about 7 s: once the first
    // is written, the last chunk changes on the node in a block its patch
    // does not carry, behind the agent's back.
    let run = slow_load(&rig, &cfg, "1");
    change_the_last_chunk_once_the_first_patch_landed(&target, &image, &offsets);
    let out = run.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(&target, &image);
    let logs = logs(&out);
    assert!(
        logs.iter()
            .any(|l| l.contains("changed since it was checked") && l.contains("retry 1/3")),
        "{logs:?}"
    );
    let s = summary(&out);
    assert_eq!(node(&s, "node01")["state"], "done", "{s}");
    // Every patch went out once; the retry sent the changed chunk whole.
    let changed = touched(&offsets, BLOCK);
    assert_eq!(
        node(&s, "node01")["bytes_sent"].as_u64().unwrap(),
        changed * BLOCK + SMALL_CHUNK,
        "{s}\n{logs:?}"
    );
}

#[test]
fn a_chain_member_whose_catch_up_patch_is_refused_starts_again_alone() {
    let rig = Rig::new(4);
    let image = write_random(&rig.dir().join("images/lab.img"), 16, 14);
    let cfg = layer(
        &rig,
        "chain-stale.conf",
        "fanout = \"chain\"\nrelay_bind = \"127.0.0.1\"\nchunk_size = 65536",
    );
    load(&rig, &cfg, &["1-4"]);
    let target = rig.nodes()[2].target.clone();
    let offsets = scatter_changes(&target, 16, 8);

    let run = slow_load(&rig, &cfg, "1-4");
    change_the_last_chunk_once_the_first_patch_landed(&target, &image, &offsets);
    let out = run.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for n in rig.nodes() {
        assert_same(&n.target, &image);
    }
    let logs = logs(&out);
    assert!(
        logs.iter().any(|l| l.starts_with("node03: ")
            && l.contains("changed since it was checked")
            && l.ends_with("it starts again on its own, with whole chunks")),
        "{logs:?}"
    );
    let s = summary(&out);
    assert_eq!(node(&s, "node03")["state"], "done", "{s}");
    let changed = touched(&offsets, BLOCK);
    assert_eq!(
        node(&s, "node03")["bytes_sent"].as_u64().unwrap(),
        changed * BLOCK + SMALL_CHUNK,
        "{s}\n{logs:?}"
    );
}
