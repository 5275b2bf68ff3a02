//! Free-block-aware `imaging save` against real sshd nodes on 127.0.0.1:
//! blocks that an ext4 file system marks free are neither read nor sent and
//! become holes; what the tool does not understand is saved raw.
//!
//! The disks are built like a user would: `mkfs.ext4 -d DIR` on a file, files
//! deleted with `debugfs -w` (no mount needed), the file system copied into
//! a disk file behind an MBR.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{Rig, imaging, lines, node, summary};

const MIB: u64 = 1 << 20;
/// Where the partition starts on the disk.
const PART_AT: u64 = MIB;

/// Whether e2fsprogs can be run; prints why the test is skipped if not.
fn have_e2fsprogs() -> bool {
    let ok = ["mkfs.ext4", "debugfs", "e2fsck"]
        .iter()
        .all(|t| Command::new(t).arg("-V").output().is_ok());
    if !ok {
        eprintln!("SKIP: mkfs.ext4, debugfs or e2fsck not installed");
    }
    ok
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run tool");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// An ext4 file system of `mib` MiB in its own file under `dir`, made by
/// `mkfs.ext4 -d` from `nfiles` files of random data of `file_mib` MiB
/// each, then the files of `deleted` removed with `debugfs -w`. Returns the
/// file system's path and the surviving files' names and SHA-256s.
fn ext4_fs(
    dir: &Path,
    mib: u64,
    nfiles: usize,
    file_mib: u64,
    deleted: impl Fn(usize) -> bool,
) -> (PathBuf, Vec<(String, String)>) {
    let src = dir.join("files");
    std::fs::create_dir_all(&src).unwrap();
    let mut rng = fastrand::Rng::with_seed(2026);
    let mut kept = Vec::new();
    let mut rm = String::new();
    for i in 0..nfiles {
        let name = format!("file{i}");
        let mut data = vec![0u8; (file_mib * MIB) as usize];
        rng.fill(&mut data);
        std::fs::write(src.join(&name), &data).unwrap();
        if deleted(i) {
            rm.push_str(&format!("rm /{name}\n"));
        } else {
            kept.push((name, sha256(&data)));
        }
    }
    let fs = dir.join("fs.img");
    std::fs::File::create(&fs)
        .unwrap()
        .set_len(mib * MIB)
        .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&src)
        .arg(&fs));
    let cmds = dir.join("rm.cmds");
    std::fs::write(&cmds, rm).unwrap();
    run(Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&cmds)
        .arg(&fs));
    (fs, kept)
}

/// A disk file of `disk_mib` MiB: an MBR whose one primary partition of type
/// `ty` starts at 1 MiB and holds `fs`, copied there.
fn mbr_disk(path: &Path, disk_mib: u64, ty: u8, fs: &Path) -> Vec<u8> {
    let part = std::fs::read(fs).unwrap();
    let mut disk = vec![0u8; (disk_mib * MIB) as usize];
    let e = &mut disk[446..462];
    e[4] = ty;
    e[8..12].copy_from_slice(&((PART_AT / 512) as u32).to_le_bytes());
    e[12..16].copy_from_slice(&((part.len() as u64 / 512) as u32).to_le_bytes());
    disk[510] = 0x55;
    disk[511] = 0xAA;
    disk[PART_AT as usize..PART_AT as usize + part.len()].copy_from_slice(&part);
    std::fs::write(path, &disk).unwrap();
    disk
}

/// Layer with 1 MiB chunks.
fn layer(rig: &Rig) -> PathBuf {
    let path = rig.dir().join("fb.conf");
    std::fs::write(&path, "[load]\nchunk_size = 1048576\n").unwrap();
    path
}

/// Runs `imaging save --json ARGS` and checks that it succeeded for every
/// node in `nodes`.
fn save(rig: &Rig, cfg: &Path, args: &[&str], nodes: &[&str]) -> Output {
    let out = imaging(rig, cfg)
        .args(["save", "--json"])
        .args(args)
        .output()
        .unwrap();
    let s = summary(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{s}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s["command"], "save");
    for n in nodes {
        assert_eq!(node(&s, n)["state"], "done", "{s}");
    }
    out
}

/// The agent's notes about one node in a `--json` run.
fn notes(out: &Output, node: &str) -> Vec<String> {
    lines(out)
        .into_iter()
        .filter(|l| l["event"] == "log" && l["node"] == node)
        .filter_map(|l| l["text"].as_str().map(str::to_string))
        .collect()
}

/// `list --json` rows: name → (size, data size).
fn listed(rig: &Rig, cfg: &Path) -> Vec<(String, u64, u64)> {
    let out = imaging(rig, cfg).args(["list", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    lines(&out)
        .into_iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["size"].as_u64().unwrap(),
                r["data_size"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The one listed image that `node` saved under the name `-o NAME`.
fn image(rows: &[(String, u64, u64)], node: &str, name: &str) -> (String, u64, u64) {
    let (prefix, suffix) = (format!("saving__{node}__"), format!("__{name}.img"));
    let found: Vec<_> = rows
        .iter()
        .filter(|r| r.0.starts_with(&prefix) && r.0.ends_with(&suffix))
        .collect();
    assert_eq!(found.len(), 1, "{node} {name} in {rows:?}");
    found[0].clone()
}

#[test]
fn free_blocks_are_not_saved_and_the_image_loads_back_intact() {
    if !have_e2fsprogs() {
        return;
    }
    let rig = Rig::new(2);
    let cfg = layer(&rig);
    let work = rig.dir().join("work");
    std::fs::create_dir_all(&work).unwrap();
    // 48 MiB of ext4 holding 16 files of 2 MiB; 10 of them (62 % of the
    // data) deleted: their blocks are free but still hold their bytes.
    let (fs, kept) = ext4_fs(&work, 48, 16, 2, |i| i % 5 < 3);
    assert_eq!(kept.len(), 6);
    let target = &rig.nodes()[0].target;
    let disk = mbr_disk(target, 50, 0x83, &fs);

    let free = save(&rig, &cfg, &["1", "-o", "free"], &["node01"]);
    let said = notes(&free, "node01");
    assert!(
        said.iter()
            .any(|n| n.starts_with("node01: partition 1 (ext4") && n.contains("free, skipped")),
        "{said:?}"
    );
    assert!(
        said.iter().any(|n| n.contains("free-block analysis")),
        "{said:?}"
    );
    let raw = save(&rig, &cfg, &["--raw", "1", "-o", "raw"], &["node01"]);
    // Chunks (1 MiB) that hold only free blocks are not sent at all.
    let sent = |out: &Output| {
        node(&summary(out), "node01")["bytes_sent"]
            .as_u64()
            .unwrap()
    };
    let (free_sent, raw_sent) = (sent(&free), sent(&raw));
    eprintln!("bytes_sent: free-block save {free_sent}, raw save {raw_sent}");
    assert!(
        free_sent * 4 <= raw_sent * 3,
        "sent {free_sent} vs {raw_sent}"
    );
    let said = notes(&raw, "node01");
    assert!(
        !said.iter().any(|n| n.contains("free")),
        "a raw save analyses nothing: {said:?}"
    );
    // The run log holds the notes too.
    let log = std::fs::read_to_string(rig.dir().join("xdg/state/imaging/imaging.log")).unwrap();
    assert!(log.contains("blocks free, skipped"), "{log}");
    // Saving never changes the target.
    assert!(std::fs::read(target).unwrap() == disk, "the target changed");

    let rows = listed(&rig, &cfg);
    let (free_name, free_size, free_data) = image(&rows, "node01", "free");
    let (raw_name, raw_size, raw_data) = image(&rows, "node01", "raw");
    assert_eq!(
        (free_size, raw_size),
        (disk.len() as u64, disk.len() as u64)
    );
    // The raw image holds all 32 MiB of file data, deleted or not.
    assert!(raw_data >= 32 * MIB, "raw image data {raw_data}");
    eprintln!("list DATA: free-block save {free_data} bytes, raw save {raw_data} bytes");
    assert!(
        free_data * 2 <= raw_data,
        "free-block save holds {free_data} bytes of data, raw {raw_data}"
    );
    // What was saved raw is the disk, byte for byte.
    let images = rig.dir().join("images");
    assert!(std::fs::read(images.join(&raw_name)).unwrap() == disk);

    // Loaded back onto node 2, the file system checks clean and every
    // surviving file reads back the same.
    let out = imaging(&rig, &cfg)
        .args(["load", "--json", "-i", &free_name, "2"])
        .output()
        .unwrap();
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(0), "{s}");
    let loaded = std::fs::read(&rig.nodes()[1].target).unwrap();
    assert_eq!(loaded.len(), disk.len());
    let part_len = std::fs::metadata(&fs).unwrap().len() as usize;
    let at = PART_AT as usize;
    assert!(
        loaded[..at] == disk[..at],
        "the partition table and boot area changed"
    );
    let back = work.join("back.img");
    std::fs::write(&back, &loaded[at..at + part_len]).unwrap();
    assert!(
        loaded[at..at + part_len] != disk[at..at + part_len],
        "free blocks should read as zeros, not as the deleted files' bytes"
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&back)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    for (name, digest) in &kept {
        let cat = run(Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat /{name}"))
            .arg(&back));
        assert_eq!(cat.stdout.len() as u64, 2 * MIB, "{name}");
        assert_eq!(&sha256(&cat.stdout), digest, "{name}");
    }
}

#[test]
fn what_is_not_understood_is_saved_raw_and_said_so() {
    if !have_e2fsprogs() {
        return;
    }
    let rig = Rig::new(2);
    let cfg = layer(&rig);
    let work = rig.dir().join("work");
    std::fs::create_dir_all(&work).unwrap();
    // Node 1: the same kind of ext4 with deleted files, but in a partition
    // of type 0x07 (NTFS/exFAT): not looked into, its free blocks kept.
    let (fs, _) = ext4_fs(&work, 16, 6, 2, |i| i % 2 == 0);
    let odd_type = mbr_disk(&rig.nodes()[0].target, 18, 0x07, &fs);
    // Node 2: no partition table at all, random data and zeros.
    let mut bare = vec![0u8; 9 * MIB as usize + 4096];
    let mut rng = fastrand::Rng::with_seed(7);
    rng.fill(&mut bare[..3 * MIB as usize]);
    rng.fill(&mut bare[5 * MIB as usize + 512..7 * MIB as usize]);
    std::fs::write(&rig.nodes()[1].target, &bare).unwrap();

    // Plain lines (not a terminal): the notes are among them.
    let out = imaging(&rig, &cfg)
        .args(["save", "1-2", "-o", "odd"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.lines().any(|l| l.contains("node01: partition 1 (")
            && l.ends_with("type 0x07 not understood, saved raw")),
        "{said}"
    );
    assert!(
        said.contains("node02: no partition table: whole disk saved raw"),
        "{said}"
    );
    let rows = listed(&rig, &cfg);
    let images = rig.dir().join("images");
    let (name, _, _) = image(&rows, "node01", "odd");
    assert!(std::fs::read(images.join(&name)).unwrap() == odd_type);
    let (name, _, _) = image(&rows, "node02", "odd");
    assert!(std::fs::read(images.join(&name)).unwrap() == bare);
}
