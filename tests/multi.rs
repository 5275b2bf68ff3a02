//! `imaging load -i a -i b NODES`: several images in one run, each into
//! its own target (`{image}` in the target template), against real sshd
//! nodes on 127.0.0.1.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Rig, assert_same, imaging, lines, summary};

const MIB: usize = 1 << 20;

/// An image of `mib` MiB and `tail` bytes: random data in the chunks
/// `data` names (1 MiB chunks), zeros elsewhere.
fn write_image(path: &Path, mib: usize, tail: usize, data: &[usize], seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut bytes = vec![0u8; mib * MIB + tail];
    for &c in data {
        let end = ((c + 1) * MIB).min(bytes.len());
        rng.fill(&mut bytes[c * MIB..end]);
    }
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// Chunks of 1 MiB that hold any non-zero byte: what a load reads.
fn data_chunks(image: &[u8]) -> u64 {
    image
        .chunks(MIB)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count() as u64
}

/// A config layer: 1 MiB chunks, relays on loopback, more `[load]` keys.
/// (A `[[node]]` list in a layer would replace the rig's: tests that add
/// nodes add them to the rig's own config.)
fn layer(rig: &Rig, name: &str, load: &str) -> PathBuf {
    let path = rig.dir().join(name);
    std::fs::write(
        &path,
        format!("[load]\nchunk_size = 1048576\nrelay_bind = \"127.0.0.1\"\n{load}\n"),
    )
    .unwrap();
    path
}

/// `targets/{name}-{image}` in the rig.
fn image_target(rig: &Rig) -> String {
    format!(
        "target = \"{}/targets/{{name}}-{{image}}\"",
        rig.dir().display()
    )
}

fn target_of(rig: &Rig, node: &str, image: &str) -> PathBuf {
    rig.dir().join("targets").join(format!("{node}-{image}"))
}

fn entry<'a>(s: &'a serde_json::Value, node: &str, image: &str) -> &'a serde_json::Value {
    s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node && n["image"] == image)
        .unwrap_or_else(|| panic!("no entry for {node} and {image}: {s}"))
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The chunks each image's source read, from the run's log events.
fn reads(out: &std::process::Output, image: &str) -> u64 {
    let prefix = format!("image {image}: ");
    let line = lines(out)
        .into_iter()
        .filter(|l| l["event"] == "log")
        .filter_map(|l| l["text"].as_str().map(String::from))
        .find(|t| t.starts_with(&prefix) && t.contains("read from its file"))
        .unwrap_or_else(|| panic!("no read count for {image}: {}", text(out)));
    line[prefix.len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"))
}

#[test]
fn two_images_onto_three_nodes_with_chain_and_star_then_all_up_to_date() {
    let rig = Rig::new(3);
    let a = write_image(
        &rig.dir().join("images/a.img"),
        7,
        4096 + 77,
        &[0, 1, 2, 5, 7],
        1,
    );
    let b = write_image(&rig.dir().join("images/b.img"), 5, 0, &[0, 3, 4], 2);
    let hooks = rig.dir().join("hooks.log");
    let cfg = layer(
        &rig,
        "m.conf",
        &format!(
            "{}\nbefore = \"echo before {{name}} {{image}} >> {h}\"\nafter = \"echo after {{name}} {{image}} >> {h}\"",
            image_target(&rig),
            h = hooks.display()
        ),
    );
    let nodes = ["node01", "node02", "node03"];
    let check_files = || {
        for n in nodes {
            assert_same(&target_of(&rig, n, "a.img"), &a);
            assert_same(&target_of(&rig, n, "b.img"), &b);
        }
    };

    // A relay chain per image.
    let out = imaging(&rig, &cfg)
        .args([
            "load", "--json", "--fanout", "chain", "-i", "a.img", "-i", "b.img", "1-3",
        ])
        .output()
        .unwrap();
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    check_files();
    assert_eq!(s["nodes"].as_array().unwrap().len(), 6, "{s}");
    for n in nodes {
        for (image, data) in [("a.img", &a), ("b.img", &b)] {
            let e = entry(&s, n, image);
            assert_eq!(e["state"], "done", "{s}");
            assert_eq!(e["error"], serde_json::Value::Null, "{s}");
            // Only the data chunks cross the wire (the partial last one is
            // short); a chain member may get a chunk or two again directly
            // when the stream starts before its relay link is up.
            let sent = e["bytes_sent"].as_u64().unwrap();
            assert!(
                sent >= (data_chunks(data) - 1) * MIB as u64
                    && sent <= (data_chunks(data) + 2) * MIB as u64,
                "{s}"
            );
        }
    }
    // Each image's chunks were read from its file once for the three nodes.
    assert_eq!(reads(&out, "a.img"), data_chunks(&a), "{}", text(&out));
    assert_eq!(reads(&out, "b.img"), data_chunks(&b), "{}", text(&out));
    // Events say which image they are about.
    let states: Vec<serde_json::Value> = lines(&out)
        .into_iter()
        .filter(|l| l["event"] == "state" && l["state"] == "done")
        .collect();
    assert_eq!(states.len(), 6, "{}", text(&out));
    assert!(states.iter().any(|l| l["image"] == "b.img"), "{states:?}");
    // The hooks ran once per node, around both images.
    let log = std::fs::read_to_string(&hooks).unwrap();
    for n in nodes {
        for hook in ["before", "after"] {
            assert_eq!(
                log.matches(&format!("{hook} {n} a.img b.img\n")).count(),
                1,
                "{log}"
            );
        }
    }
    assert_eq!(log.lines().count(), 6, "{log}");

    // Again from scratch with star fan-out, as plain lines.
    for n in nodes {
        for image in ["a.img", "b.img"] {
            std::fs::remove_file(target_of(&rig, n, image)).unwrap();
        }
    }
    let out = imaging(&rig, &cfg)
        .args([
            "load", "--plain", "--fanout", "star", "-i", "a.img", "-i", "b.img", "1-3",
        ])
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    check_files();
    assert!(t.contains("node02:b.img done"), "{t}");
    assert!(t.contains("IMAGE"), "{t}");
    assert!(t.contains("all 3 nodes × 2 images succeeded"), "{t}");
    let table: Vec<&str> = t
        .lines()
        .filter(|l| l.starts_with("node0") && l.contains(".img") && l.contains("done"))
        .collect();
    assert_eq!(table.len(), 6, "{t}");

    // A second identical run (default fan-out): all up to date, nothing sent.
    let started = Instant::now();
    let out = imaging(&rig, &cfg)
        .args(["load", "--json", "-i", "a.img", "-i", "b.img", "1-3"])
        .output()
        .unwrap();
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(s["nodes"].as_array().unwrap().len(), 6, "{s}");
    for n in nodes {
        for image in ["a.img", "b.img"] {
            let e = entry(&s, n, image);
            assert_eq!(e["state"], "up-to-date", "{s}");
            assert_eq!(e["bytes_sent"], 0, "{s}");
        }
    }
    assert_eq!(reads(&out, "a.img"), 0, "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(60));
    check_files();
}

/// A listener that counts the connections it gets (and drops them).
fn counting_listener() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            seen.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (port, count)
}

#[test]
fn several_images_without_image_in_the_target_are_refused_before_any_node_is_contacted() {
    let rig = Rig::new(1);
    write_image(&rig.dir().join("images/a.img"), 2, 0, &[0], 1);
    write_image(&rig.dir().join("images/b.img"), 2, 0, &[1], 2);
    let (port, contacts) = counting_listener();
    let hooks = rig.dir().join("hooks.log");
    let watch = format!("[[node]]\nname = \"watch02\"\naddress = \"127.0.0.1\"\nport = {port}\n");
    // The rig's target is targets/{name}.img: one file for both images.
    // (A layer's [[node]] list replaces the rig's: add to the rig's own.)
    rig.write_config(&watch);
    let cfg = layer(
        &rig,
        "plain.conf",
        &format!("before = \"echo before >> {}\"", hooks.display()),
    );
    let out = imaging(&rig, &cfg)
        .args(["load", "-i", "a.img", "-i", "b.img", "1-2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(err.contains("{image}"), "{err}");
    assert!(err.contains("[load] target"), "{err}");
    assert!(err.contains("a.img, b.img"), "{err}");
    assert!(err.contains("{name}.img"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Nothing was touched: no hook ran, no target appeared, no connection.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(contacts.load(Ordering::SeqCst), 0);
    assert!(!hooks.exists());
    assert!(!rig.nodes()[0].target.exists());
    assert!(
        std::fs::read_dir(rig.dir().join("targets"))
            .unwrap()
            .next()
            .is_none()
    );

    // [load] target has {image}, but a node's own target does not: named.
    rig.write_config(&format!("{watch}target = \"/var/lib/one-file.img\"\n"));
    let cfg = layer(&rig, "own.conf", &image_target(&rig));
    let out = imaging(&rig, &cfg)
        .args(["load", "-i", "a.img", "-i", "b.img", "1-2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(err.contains("node watch02's own target"), "{err}");
    assert_eq!(contacts.load(Ordering::SeqCst), 0);

    // The same image twice is refused too.
    let cfg = layer(&rig, "dup.conf", &image_target(&rig));
    let out = imaging(&rig, &cfg)
        .args(["load", "-i", "a.img", "-i", "a.img", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(err.contains("-i a.img is given twice"), "{err}");
    assert!(
        std::fs::read_dir(rig.dir().join("targets"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn one_image_with_image_in_the_target_loads_into_the_named_file_and_keeps_the_summary_shape() {
    let rig = Rig::new(2);
    let a = write_image(&rig.dir().join("images/a.img"), 3, 10, &[0, 2], 5);
    let cfg = layer(&rig, "one.conf", &image_target(&rig));
    let out = imaging(&rig, &cfg)
        .args(["load", "--json", "-i", "a.img", "1-2"])
        .output()
        .unwrap();
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_same(&target_of(&rig, "node01", "a.img"), &a);
    assert_same(&target_of(&rig, "node02", "a.img"), &a);
    // One image: one entry per node, without an "image" key, as before.
    let entries = s["nodes"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{s}");
    for e in entries {
        assert!(e.get("image").is_none(), "{s}");
        assert_eq!(e["state"], "done", "{s}");
    }
    let keys: Vec<&String> = entries[0].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "name",
            "state",
            "bytes_sent",
            "bytes_written",
            "error",
            "elapsed_s"
        ],
        "{s}"
    );
}

#[test]
fn one_image_failing_on_a_node_leaves_its_other_image_and_the_other_nodes_done() {
    let rig = Rig::new(2);
    let a = write_image(&rig.dir().join("images/a.img"), 2, 0, &[0, 1], 7);
    let b = write_image(&rig.dir().join("images/b.img"), 2, 0, &[1], 8);
    // odd03 (node02's sshd under another name) has a directory per image
    // for its targets; only a.img's exists.
    let own = rig.dir().join("own");
    std::fs::create_dir_all(own.join("a.img")).unwrap();
    rig.write_config(&format!(
        "[[node]]\nname = \"odd03\"\naddress = \"127.0.0.1\"\nport = {}\ntarget = \"{}/{{image}}/disk\"\n",
        rig.nodes()[1].port,
        own.display()
    ));
    let cfg = layer(&rig, "fail.conf", &image_target(&rig));
    let out = imaging(&rig, &cfg)
        .args([
            "load", "--json", "--fanout", "star", "-i", "a.img", "-i", "b.img", "1,3",
        ])
        .output()
        .unwrap();
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_same(&target_of(&rig, "node01", "a.img"), &a);
    assert_same(&target_of(&rig, "node01", "b.img"), &b);
    assert_same(&own.join("a.img/disk"), &a);
    assert_eq!(entry(&s, "odd03", "a.img")["state"], "done", "{s}");
    let failed = entry(&s, "odd03", "b.img");
    assert_eq!(failed["state"], "failed", "{s}");
    assert!(
        failed["error"].as_str().unwrap_or("").contains("b.img"),
        "{s}"
    );
    assert_eq!(entry(&s, "node01", "b.img")["state"], "done", "{s}");
}

#[test]
fn dry_run_with_several_images_lists_each_image_and_its_targets() {
    let rig = Rig::new(2);
    write_image(&rig.dir().join("images/a.img"), 2, 0, &[0], 1);
    write_image(&rig.dir().join("images/b.img"), 3, 0, &[2], 2);
    let cfg = layer(&rig, "n.conf", &image_target(&rig));
    let out = imaging(&rig, &cfg)
        .args(["load", "-n", "-i", "a.img", "-i", "b.img", "1-2"])
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(t.matches("would load").count(), 2, "{t}");
    for image in ["a.img", "b.img"] {
        for n in ["node01", "node02"] {
            let target = target_of(&rig, n, image).display().to_string();
            assert!(t.contains(&target), "{target} not in {t}");
        }
    }
    let out = imaging(&rig, &cfg)
        .args(["load", "-n", "--json", "-i", "a.img", "-i", "b.img", "1-2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let plans = lines(&out);
    assert_eq!(plans.len(), 2, "{}", text(&out));
    assert!(plans[0]["image"].as_str().unwrap().ends_with("a.img"));
    assert!(plans[1]["image"].as_str().unwrap().ends_with("b.img"));
    assert_eq!(plans[1]["size"], 3 * MIB as u64);
    assert_eq!(
        plans[1]["nodes"][1]["target"],
        target_of(&rig, "node02", "b.img").display().to_string()
    );
    // Nothing written.
    assert!(
        std::fs::read_dir(rig.dir().join("targets"))
            .unwrap()
            .next()
            .is_none()
    );
    for p in &plans {
        for n in p["nodes"].as_array().unwrap() {
            assert_eq!(n["basis"], "missing", "{n}");
            assert_eq!(n["would_receive"], p["data_size"], "{n}");
        }
    }

    // Once a.img is on node 1, its plan says so from the stamp; b.img's not.
    let out = imaging(&rig, &cfg)
        .args(["load", "--json", "-i", "a.img", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = imaging(&rig, &cfg)
        .args(["load", "-n", "--json", "-i", "a.img", "-i", "b.img", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let plans = lines(&out);
    assert_eq!(plans.len(), 2, "{}", text(&out));
    let (a, b) = (&plans[0]["nodes"][0], &plans[1]["nodes"][0]);
    assert_eq!(
        (&a["basis"], &a["would_receive"]),
        (&"stamp".into(), &0.into()),
        "{a}"
    );
    assert_eq!(b["basis"], "missing", "{b}");
    assert_eq!(b["would_receive"], MIB as u64, "{b}");
}

#[test]
fn a_failing_after_hook_fails_every_image_of_its_node_and_runs_once() {
    let rig = Rig::new(2);
    let a = write_image(&rig.dir().join("images/a.img"), 2, 0, &[0], 3);
    let b = write_image(&rig.dir().join("images/b.img"), 2, 0, &[1], 4);
    let hooks = rig.dir().join("hooks.log");
    // node01's after hook fails (once it logged itself); node02's succeeds.
    let cfg = layer(
        &rig,
        "after.conf",
        &format!(
            "{}\nafter = \"echo after {{name}} {{target}} >> {}; test {{name}} != node01\"",
            image_target(&rig),
            hooks.display()
        ),
    );
    let out = imaging(&rig, &cfg)
        .args([
            "load", "--json", "--fanout", "star", "-i", "a.img", "-i", "b.img", "1-2",
        ])
        .output()
        .unwrap();
    // No before hook: the after hook does not run (it runs once before ran).
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(entry(&s, "node01", "b.img")["state"], "done", "{s}");
    assert_same(&target_of(&rig, "node01", "a.img"), &a);
    assert_same(&target_of(&rig, "node01", "b.img"), &b);
    assert!(!hooks.exists());

    // …with one, it runs once per node, with both targets.
    let cfg = layer(
        &rig,
        "both.conf",
        &format!(
            "{}\nbefore = \"true\"\nafter = \"echo after {{name}} {{target}} >> {}; test {{name}} != node01\"",
            image_target(&rig),
            hooks.display()
        ),
    );
    let out = imaging(&rig, &cfg)
        .args([
            "load", "--json", "--fanout", "star", "-i", "a.img", "-i", "b.img", "1-2",
        ])
        .output()
        .unwrap();
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    for image in ["a.img", "b.img"] {
        let e = entry(&s, "node01", image);
        assert_eq!(e["state"], "failed", "{s}");
        assert!(
            e["error"].as_str().unwrap_or("").starts_with("after hook"),
            "{s}"
        );
        assert_eq!(entry(&s, "node02", image)["state"], "up-to-date", "{s}");
    }
    // The data is there all the same: only the hook failed.
    assert_same(&target_of(&rig, "node01", "a.img"), &a);
    assert_same(&target_of(&rig, "node01", "b.img"), &b);
    let log = std::fs::read_to_string(&hooks).unwrap();
    for n in ["node01", "node02"] {
        let line = format!(
            "after {n} {} {}\n",
            target_of(&rig, n, "a.img").display(),
            target_of(&rig, n, "b.img").display()
        );
        assert_eq!(log.matches(&line).count(), 1, "{log}");
    }
    assert_eq!(log.lines().count(), 2, "{log}");
}

/// `save` from a host holding several images (`{image}` in its target):
/// `-i` says which file; without it the run is refused before any node is
/// contacted, instead of reading the template with `{image}` left empty.
#[test]
fn save_from_an_image_templated_target_takes_the_file_named_by_dash_i() {
    let rig = Rig::new(1);
    write_image(&rig.dir().join("images/a.img"), 3, 0, &[0, 2], 11);
    let b = write_image(&rig.dir().join("images/b.img"), 2, 300, &[1, 2], 12);
    let cfg = layer(&rig, "s.conf", &image_target(&rig));
    let out = imaging(&rig, &cfg)
        .args(["load", "--json", "-i", "a.img", "-i", "b.img", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let saved = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(rig.dir().join("images"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("saving__"))
            .collect();
        names.sort();
        names
    };

    // Without -i: which of the node's images? Refused, naming the way out.
    let out = imaging(&rig, &cfg)
        .args(["save", "--json", "1", "-o", "none"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("{image}") && err.contains("-i"), "{err}");
    assert!(saved().is_empty(), "{:?}", saved());

    // A path is not a file name on the node.
    let out = imaging(&rig, &cfg)
        .args(["save", "--json", "1", "-i", "../b.img"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    // -i b.img saves node01-b.img, byte for byte, and records it as the origin.
    let out = imaging(&rig, &cfg)
        .args(["save", "--json", "1", "-i", "b.img", "-o", "bcopy"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let names = saved();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].ends_with("__bcopy.img"), "{names:?}");
    assert_same(&rig.dir().join("images").join(&names[0]), &b);
    let out = imaging(&rig, &cfg)
        .args(["list", "-l", &names[0]])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("b.img"),
        "{}",
        text(&out)
    );

    // A target without {image} takes no -i.
    let plain = layer(
        &rig,
        "p.conf",
        &format!("target = \"{}/targets/plain\"", rig.dir().display()),
    );
    let out = imaging(&rig, &plain)
        .args(["save", "--json", "1", "-i", "b.img"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("{image}"),
        "{}",
        text(&out)
    );
}
