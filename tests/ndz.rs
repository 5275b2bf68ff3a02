//! Frisbee `.ndz` images: `import`, `load -i X.ndz` onto real sshd nodes,
//! `list`, and damaged images refused before any node is touched.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{Rig, node, summary};
use sha2::{Digest, Sha256};

/// Made by Emulab's imagezip: v3 filesystem-aware, v3 raw (`-r`), v1 (`-1`).
const FIXTURES: [&str; 3] = ["ext4-v3", "ext4-raw", "ext4-v1"];

fn fixture(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ndz")
        .join(file)
}

/// The disk size the fixture was made from.
fn fixture_size(name: &str) -> u64 {
    std::fs::read_to_string(fixture(&format!("{name}.size")))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// SHA-256 of the decoded disk, extended with zeros to `fixture_size`.
fn fixture_sha(name: &str) -> String {
    let s = std::fs::read_to_string(fixture(&format!("{name}.raw.sha256"))).unwrap();
    s.split_whitespace().next().unwrap().to_lowercase()
}

/// SHA-256 of the file's bytes followed by zeros up to `size`.
fn sha_padded(path: &Path, size: u64) -> String {
    let mut data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        data.len() as u64 <= size,
        "{} is {} bytes, more than the disk's {size}",
        path.display(),
        data.len()
    );
    data.resize(size as usize, 0);
    Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Where the agent on a node (this machine, logged in over SSH as this
/// user, so with this user's home from the password database) keeps the
/// load stamp of `target`.
fn stamp_path(target: &Path) -> PathBuf {
    // SAFETY: getpwuid returns a pointer to static storage or null; the
    // string is copied before any other call could reuse it.
    let home = unsafe {
        let pw = libc::getpwuid(libc::getuid());
        assert!(!pw.is_null(), "no password entry for this user");
        std::ffi::CStr::from_ptr((*pw).pw_dir)
            .to_string_lossy()
            .into_owned()
    };
    let key = std::fs::canonicalize(target).unwrap();
    let hash = xxhash_rust::xxh3::xxh3_128(key.as_os_str().as_encoded_bytes());
    Path::new(&home).join(format!(".cache/imaging/stamps/{hash:032x}.stamp"))
}

/// Every name in the repository, hidden ones included, sorted.
fn repo_names(rig: &Rig) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(rig.dir().join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn each_fixture_imports_and_loads_to_its_disk_and_reloads_up_to_date() {
    let rig = Rig::new(2);
    for name in FIXTURES {
        let ndz = format!("{name}.ndz");
        let size = fixture_size(name);
        let want = fixture_sha(name);
        std::fs::copy(fixture(&ndz), rig.dir().join("images").join(&ndz)).unwrap();

        // import: a raw image with the decoded disk, and its manifest.
        let version = if name == "ext4-v1" {
            "ndz v1"
        } else {
            "ndz v3"
        };
        let json = name == "ext4-v1";
        let mut import = rig.imaging();
        import.args(["import", &ndz]);
        if json {
            import.arg("--json");
        }
        let out = import.output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{name}: {}", stderr(&out));
        let img = rig.dir().join("images").join(format!("{name}.img"));
        assert_eq!(sha_padded(&img, size), want, "{name}: imported image");
        let img_len = std::fs::metadata(&img).unwrap().len();
        if json {
            let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
            assert_eq!(v["event"], "import", "{v}");
            assert_eq!(v["name"], format!("{name}.img"), "{v}");
            assert_eq!(v["format"], version, "{v}");
            assert_eq!(v["size"], img_len, "{v}");
        } else {
            let text = stdout(&out);
            assert!(text.contains(&format!("{name}.img")), "{text}");
            assert!(text.contains(&format!("({img_len} bytes)")), "{text}");
        }
        let listed = rig
            .imaging()
            .args(["--json", "list", name])
            .output()
            .unwrap();
        let listed = stdout(&listed);
        let row = listed
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["name"] == format!("{name}.img"))
            .unwrap();
        assert_eq!(row["format"], "raw", "{row}");
        assert_eq!(row["manifest"], "fresh", "{row}");
        assert_eq!(row["size"], img_len);
        // A second import would overwrite it: refused.
        let again = rig.imaging().args(["import", &ndz]).output().unwrap();
        assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
        assert!(
            stderr(&again).contains("already exists"),
            "{}",
            stderr(&again)
        );

        // load -i X.ndz: every target holds the decoded disk. One fixture
        // goes through the relay chain (a star is the default for 2 nodes).
        let mut load = rig.imaging();
        load.args(["load", "--json", "-i", &ndz, "1-2"]);
        if name == "ext4-raw" {
            load.args(["--fanout", "chain"]);
        }
        let out = load.output().unwrap();
        let s = summary(&out);
        assert_eq!(out.status.code(), Some(0), "{name}: {s}\n{}", stderr(&out));
        for n in rig.nodes() {
            assert_eq!(node(&s, &n.name)["state"], "done", "{name}: {s}");
            assert_eq!(sha_padded(&n.target, size), want, "{name}: {}", n.name);
            // The target is the disk the .ndz describes, as `import` made it.
            assert_eq!(
                std::fs::metadata(&n.target).unwrap().len(),
                img_len,
                "{name}: {} size",
                n.name
            );
            assert!(stamp_path(&n.target).is_file(), "{name}: no stamp");
        }

        // Again: up to date, from the cached manifest (not rebuilt).
        let cache = rig.dir().join(format!("images/.{ndz}.manifest"));
        let cached = std::fs::read(&cache).unwrap();
        let cached_at = std::fs::metadata(&cache).unwrap().modified().unwrap();
        let out = rig
            .imaging()
            .args(["load", "--json", "-i", &ndz, "1-2"])
            .output()
            .unwrap();
        let s = summary(&out);
        assert_eq!(out.status.code(), Some(0), "{name}: {s}");
        for n in rig.nodes() {
            assert_eq!(node(&s, &n.name)["state"], "up-to-date", "{name}: {s}");
            assert_eq!(node(&s, &n.name)["bytes_sent"], 0, "{name}: {s}");
        }
        assert_eq!(std::fs::read(&cache).unwrap(), cached);
        assert_eq!(
            std::fs::metadata(&cache).unwrap().modified().unwrap(),
            cached_at,
            "{name}: the manifest was built again"
        );

        // The imported image is the same disk: same identity, up to date.
        let out = rig
            .imaging()
            .args(["load", "--json", "-i", &format!("{name}.img"), "1-2"])
            .output()
            .unwrap();
        let s = summary(&out);
        assert_eq!(out.status.code(), Some(0), "{name}: {s}");
        for n in rig.nodes() {
            assert_eq!(node(&s, &n.name)["state"], "up-to-date", "{name}: {s}");
        }

        // list: the format, and the disk's size once the manifest is known.
        let table = rig.imaging().args(["list", &ndz]).output().unwrap();
        let table = stdout(&table);
        let line = table
            .lines()
            .find(|l| l.starts_with(&ndz))
            .unwrap_or_else(|| panic!("{table}"));
        assert!(line.contains(version) && line.contains("fresh"), "{line}");
        let listed = rig
            .imaging()
            .args(["--json", "list", &ndz])
            .output()
            .unwrap();
        let row: serde_json::Value = serde_json::from_str(stdout(&listed).trim()).unwrap();
        assert_eq!(row["format"], version, "{row}");
        assert_eq!(row["size"], img_len, "{row}");
    }
}

/// Copies of ext4-v3.ndz (3 chunks of 1 MiB): one with a byte of chunk 1's
/// compressed data flipped, one cut in the middle of chunk 1.
fn damaged(rig: &Rig) -> [(&'static str, &'static str); 2] {
    let good = std::fs::read(fixture("ext4-v3.ndz")).unwrap();
    let mut flipped = good.clone();
    flipped[(1 << 20) + 4096 + 100] ^= 0xff;
    std::fs::write(rig.dir().join("images/flipped.ndz"), &flipped).unwrap();
    let cut = &good[..(1 << 20) + (512 << 10)];
    std::fs::write(rig.dir().join("images/cut.ndz"), cut).unwrap();
    [("flipped.ndz", "corrupt"), ("cut.ndz", "truncated")]
}

#[test]
fn a_damaged_ndz_is_refused_naming_the_chunk_and_no_node_is_touched() {
    let rig = Rig::new(2);
    let pattern: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8).collect();
    for n in rig.nodes() {
        std::fs::write(&n.target, &pattern).unwrap();
    }
    for (file, what) in damaged(&rig) {
        let out = rig
            .imaging()
            .args(["load", "--json", "-i", file, "1-2"])
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{file}: {err}\n{}",
            stdout(&out)
        );
        assert!(err.contains("chunk 1"), "{file}: {err}");
        assert!(err.contains(what), "{file}: {err}");
        assert!(err.contains(file), "{file}: {err}");
        // Refused before any node was contacted: no event at all.
        assert!(stdout(&out).trim().is_empty(), "{file}: {}", stdout(&out));
        for n in rig.nodes() {
            assert!(
                std::fs::read(&n.target).unwrap() == pattern,
                "{file}: {} changed",
                n.name
            );
            assert!(
                !stamp_path(&n.target).exists(),
                "{file}: {} stamped",
                n.name
            );
        }

        let out = rig.imaging().args(["import", file]).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{file}: {err}");
        assert!(
            err.contains("chunk 1") && err.contains(what),
            "{file}: {err}"
        );
    }
    // Nothing but the two damaged files: no image, no partial, no manifest.
    assert_eq!(repo_names(&rig), ["cut.ndz", "flipped.ndz"]);

    // The stamp check above looks where a load does stamp.
    std::fs::copy(fixture("ext4-v3.ndz"), rig.dir().join("images/good.ndz")).unwrap();
    let out = rig
        .imaging()
        .args(["load", "--json", "-i", "good", "1-2"])
        .output()
        .unwrap();
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(0), "{s}\n{}", stderr(&out));
    for n in rig.nodes() {
        assert!(stamp_path(&n.target).is_file(), "{}: no stamp", n.name);
        assert_eq!(
            sha_padded(&n.target, fixture_size("ext4-v3")),
            fixture_sha("ext4-v3")
        );
    }
}
