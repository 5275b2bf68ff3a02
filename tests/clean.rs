//! `imaging clean` on real sshd nodes: image files imaging wrote into an
//! `{image}` directory go unless kept; a file imaging did not write, or one
//! changed since its load, never goes; `-n` removes nothing. `status` with
//! the same `{image}` template lists what each host holds.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{Rig, assert_same, imaging, lines, node, output_text, summary};

const MIB: usize = 1 << 20;

fn write_image(path: &Path, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut data = vec![0u8; 4 * MIB];
    rng.fill(&mut data[..MIB]);
    rng.fill(&mut data[3 * MIB..]);
    fs::write(path, &data).unwrap();
    data
}

/// A layer whose target is `targets/{name}/FILE` (FILE may be `{image}`).
fn layer(rig: &Rig, file: &str) -> PathBuf {
    let path = rig
        .dir()
        .join(format!("layer-{}.conf", file.replace(['{', '}'], "")));
    let target = rig.dir().join("targets").join("{name}").join(file);
    fs::write(
        &path,
        format!(
            "[load]\nchunk_size = 1048576\ntarget = \"{}\"\n",
            target.display()
        ),
    )
    .unwrap();
    path
}

fn run(rig: &Rig, cfg: &Path, args: &[&str]) -> Output {
    imaging(rig, cfg).args(args).output().unwrap()
}

/// (file name, action, reason) of a node's files in a clean summary.
fn files(s: &serde_json::Value, name: &str) -> Vec<(String, String, String)> {
    node(s, name)["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let path = f["path"].as_str().unwrap();
            (
                Path::new(path)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                f["action"].as_str().unwrap().to_string(),
                f["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn clean_removes_the_unkept_images_imaging_wrote_and_nothing_else() {
    let rig = Rig::new(2);
    let images = rig.dir().join("images");
    let dir = |n: usize| rig.dir().join("targets").join(format!("node0{n}"));
    for n in 1..=2 {
        fs::create_dir_all(dir(n)).unwrap();
    }
    let data: Vec<Vec<u8>> = ["a.img", "b.img", "c.img"]
        .iter()
        .enumerate()
        .map(|(i, name)| write_image(&images.join(name), i as u64 + 1))
        .collect();
    for (image, nodes) in [("a.img", "1-2"), ("b.img", "1-2"), ("c.img", "1")] {
        let cfg = layer(&rig, image);
        let out = run(&rig, &cfg, &["load", "--json", "-i", image, nodes]);
        assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    }
    // node01: a file imaging never wrote. node02: a.img changed since its load.
    fs::write(dir(1).join("mine.img"), b"someone else's disk").unwrap();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(dir(2).join("a.img"))
        .unwrap();
    f.write_all_at(b"12345678", 4096).unwrap();
    drop(f);

    let pattern = layer(&rig, "{image}");
    // status lists every file of the {image} directory.
    let out = run(&rig, &pattern, &["status", "--json", "1-2"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let s = summary(&out);
    let held: Vec<(String, String)> = node(&s, "node01")["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["image"].as_str().unwrap_or("-").to_string(),
                t["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        held,
        [
            ("a.img".to_string(), "intact".to_string()),
            ("b.img".into(), "intact".into()),
            ("c.img".into(), "intact".into()),
            ("-".into(), "unknown".into()),
        ]
    );
    assert_eq!(node(&s, "node02")["targets"][0]["state"], "modified");

    // -n: what would go, nothing removed.
    let out = run(
        &rig,
        &pattern,
        &["clean", "-n", "--json", "1-2", "--keep", "b"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let s = summary(&out);
    let n1 = files(&s, "node01");
    let actions: Vec<(&str, &str)> = n1
        .iter()
        .map(|(f, a, _)| (f.as_str(), a.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("a.img", "would-remove"),
            ("b.img", "kept"),
            ("c.img", "would-remove"),
            ("mine.img", "skipped"),
        ]
    );
    assert!(n1[3].2.contains("not written by imaging"), "{n1:?}");
    let n2 = files(&s, "node02");
    assert_eq!((n2[0].0.as_str(), n2[0].1.as_str()), ("a.img", "skipped"));
    assert!(n2[0].2.contains("not intact"), "{n2:?}");
    for (n, f) in [(1, "a.img"), (1, "c.img"), (2, "a.img")] {
        assert!(dir(n).join(f).exists(), "-n removed {f}");
    }
    let plain = run(&rig, &pattern, &["clean", "-n", "1-2", "--keep", "b.img"]);
    let said = String::from_utf8_lossy(&plain.stdout);
    assert!(said.contains("node01 would remove "), "{said}");
    assert!(
        said.contains("would remove 2 files, would free 4.0 MiB"),
        "{said}"
    );

    // For real.
    let out = run(&rig, &pattern, &["clean", "1-2", "--keep", "b.img"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    eprintln!("{said}");
    assert!(said.contains("removed 2 files, freed 4.0 MiB"), "{said}");
    assert!(said.contains("node01 skipped "), "{said}");
    assert!(!dir(1).join("a.img").exists() && !dir(1).join("c.img").exists());
    assert_same(&dir(1).join("b.img"), &data[1]);
    assert_same(&dir(2).join("b.img"), &data[1]);
    assert!(dir(2).join("a.img").exists(), "a changed file stays");
    assert_eq!(
        fs::read(dir(1).join("mine.img")).unwrap(),
        b"someone else's disk"
    );
    // What status sees now; a removed file's stamp went with it.
    let out = run(&rig, &pattern, &["status", "--json", "1"]);
    let s = summary(&out);
    let paths: Vec<&str> = node(&s, "node01")["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths.len(), 2, "{paths:?}");
    assert!(paths[0].ends_with("/b.img") && paths[1].ends_with("/mine.img"));
    assert!(lines(&out).iter().any(|l| l["event"] == "node"));
}

#[test]
fn clean_refuses_a_target_without_image_and_an_empty_keep() {
    let rig = Rig::new_stopped(1);
    let cfg = layer(&rig, "a.img");
    let out = run(&rig, &cfg, &["clean", "1", "--keep", "a.img"]);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("holding {image}"),
        "{}",
        output_text(&out)
    );
    let cfg = layer(&rig, "{image}");
    for args in [
        &["clean", "1", "--keep", ","][..],
        &["clean", "1", "--keep", "x/y.img"],
        &["clean", "1"],
        &["clean", "-c", "1", "--keep", "a"],
    ] {
        let out = run(&rig, &cfg, args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            output_text(&out)
        );
    }
}
