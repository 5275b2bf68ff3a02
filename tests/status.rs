//! `imaging status` on real sshd nodes: what each node holds, from the
//! agents' stamps (no target read), `--verify`, outdated images, unknown
//! and missing targets, a node that is down.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Instant;

use common::{Rig, closed_port, imaging, lines, node, output_text, summary, write_8mib_image};

const MIB: usize = 1 << 20;

/// 1 MiB chunks.
fn layer(rig: &Rig) -> PathBuf {
    let path = rig.dir().join("status.conf");
    fs::write(&path, "[load]\nchunk_size = 1048576\n").unwrap();
    path
}

fn run(rig: &Rig, cfg: &Path, args: &[&str]) -> Output {
    imaging(rig, cfg).args(args).output().unwrap()
}

/// The node's target entries in the summary.
fn targets<'a>(s: &'a serde_json::Value, name: &str) -> &'a Vec<serde_json::Value> {
    node(s, name)["targets"].as_array().unwrap()
}

/// The `node` event of `name`.
fn node_event(out: &Output, name: &str) -> serde_json::Value {
    lines(out)
        .into_iter()
        .find(|l| l["event"] == "node" && l["name"] == name)
        .unwrap_or_else(|| panic!("no node event for {name}: {}", output_text(out)))
}

#[test]
fn status_tells_intact_modified_outdated_unknown_missing_and_down_without_reading_targets() {
    let rig = Rig::new(5);
    // node06: in the inventory, nothing listening.
    rig.write_config(&format!(
        "[[node]]\nname = \"node06\"\naddress = \"127.0.0.1\"\nport = {}\n",
        closed_port()
    ));
    let cfg = layer(&rig);
    let images = rig.dir().join("images");
    write_8mib_image(&images.join("a.img"), 1);
    write_8mib_image(&images.join("b.img"), 2);
    for (image, nodes) in [("a.img", "1-2"), ("b.img", "3")] {
        let out = run(&rig, &cfg, &["load", "--json", "-i", image, nodes]);
        assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    }
    let t = |i: usize| rig.nodes()[i].target.clone();
    // 8 bytes written in place into node02's target (chunk 1).
    let f = fs::OpenOptions::new().write(true).open(t(1)).unwrap();
    f.write_all_at(b"CHANGED!", (MIB + 4096) as u64).unwrap();
    drop(f);
    // node04: a file imaging never wrote; node05: no file at all.
    fs::write(t(3), vec![7u8; MIB]).unwrap();
    let _ = fs::remove_file(t(4));

    let started = Instant::now();
    let out = run(&rig, &cfg, &["status", "--json", "1-3"]);
    let three = started.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    eprintln!("status of 3 nodes: {three:?}");
    // Generous: the goal is under 2 s; a busy 2-core machine is slower.
    assert!(three.as_secs_f64() < 10.0, "{three:?}");
    let s = summary(&out);
    assert_eq!(s["command"], "status");
    assert_eq!(s["ok"], true);
    // Exactly the contract's keys.
    let keys =
        |v: &serde_json::Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    assert_eq!(keys(&s), ["event", "command", "ok", "nodes"]);
    assert_eq!(
        keys(node(&s, "node01")),
        ["name", "ssh", "error", "targets"]
    );
    assert_eq!(
        keys(&targets(&s, "node01")[0]),
        ["path", "image", "image_id", "loaded_at", "state", "current"]
    );
    let expect = [
        ("node01", "a.img", "intact"),
        ("node02", "a.img", "modified"),
        ("node03", "b.img", "intact"),
    ];
    for (i, (name, image, state)) in expect.iter().enumerate() {
        let n = node(&s, name);
        assert_eq!(
            (&n["ssh"], &n["error"]),
            (&"up".into(), &serde_json::Value::Null)
        );
        let ts = targets(&s, name);
        assert_eq!(ts.len(), 1, "{n}");
        let target = &ts[0];
        assert_eq!(target["path"], t(i).to_string_lossy().as_ref());
        assert_eq!(target["image"], *image, "{target}");
        assert_eq!(target["state"], *state, "{target}");
        assert_eq!(target["current"], true, "{target}");
        assert_eq!(target["image_id"].as_str().unwrap().len(), 32);
        let at = target["loaded_at"].as_str().unwrap();
        assert!(at.ends_with('Z'), "{at}");
        let loaded = chrono::DateTime::parse_from_rfc3339(at).unwrap();
        let age = chrono::Utc::now().signed_duration_since(loaded);
        assert!(age.num_seconds() >= 0 && age.num_seconds() < 600, "{at}");
        // The node event carries the rest of the stamp and the agent's reads.
        let e = node_event(&out, name);
        let detail = &e["targets"][0];
        assert!(detail["loaded_by"].as_str().unwrap().contains('@'), "{e}");
        assert!(
            detail["tool"].as_str().unwrap().starts_with("imaging "),
            "{e}"
        );
        // The agent read no target: its rchar (every byte it read through a
        // read call, its stdin and stamp included) is far below the 8 MiB
        // target, even below one 1 MiB chunk. The verify below shows the
        // same counter does grow by the target's size when it is read.
        let rchar = e["debug"]["agent_rchar"].as_u64().expect("rchar");
        eprintln!("{name}: the status agent read {rchar} bytes");
        assert!(rchar < 256 << 10, "the agent read {rchar} bytes: {e}");
    }
    let a_id = targets(&s, "node01")[0]["image_id"].clone();
    assert_eq!(targets(&s, "node02")[0]["image_id"], a_id);
    assert_ne!(targets(&s, "node03")[0]["image_id"], a_id);

    // --verify reads node02's target: one chunk differs.
    let out = run(&rig, &cfg, &["status", "--json", "--verify", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let s = summary(&out);
    let target = &targets(&s, "node02")[0];
    assert_eq!(target["state"], "modified", "{target}");
    assert_eq!(target["verify"]["mismatched_chunks"], 1, "{target}");
    assert_eq!(target["verify"]["chunks"], 8, "{target}");
    let e = node_event(&out, "node02");
    let read = e["debug"]["agent_rchar_after_verify"].as_u64().unwrap();
    eprintln!("{e}");
    // The 5 data chunks were read (the zero ones are holes: not read).
    assert!(read >= 5 * MIB as u64, "rchar after verify {read}: {e}");
    assert!(
        lines(&out)
            .iter()
            .any(|l| l["event"] == "progress" && l["done"] == true && l["node"] == "node02"),
        "{}",
        output_text(&out)
    );
    // node01 verifies clean.
    let out = run(&rig, &cfg, &["status", "--json", "--verify", "1"]);
    let s = summary(&out);
    assert_eq!(targets(&s, "node01")[0]["verify"]["mismatched_chunks"], 0);
    assert_eq!(targets(&s, "node01")[0]["state"], "intact");

    // a.img changes in the repository: nodes 1-2 hold an outdated a.img.
    write_8mib_image(&images.join("a.img"), 3);
    let out = run(&rig, &cfg, &["status", "--json", "1-3"]);
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let s = summary(&out);
    for (name, state, current) in [
        ("node01", "intact", false),
        ("node02", "modified", false),
        ("node03", "intact", true),
    ] {
        let target = &targets(&s, name)[0];
        assert_eq!(
            (&target["state"], &target["current"]),
            (&state.into(), &current.into()),
            "{name}: {target}"
        );
    }

    // The identity depends on the chunk size: a status under another
    // configured chunk size still compares at the size of the load.
    let other = rig.dir().join("other-chunks.conf");
    fs::write(&other, "[load]\nchunk_size = 4194304\n").unwrap();
    let out = run(&rig, &other, &["status", "--json", "3"]);
    let s = summary(&out);
    let target = &targets(&s, "node03")[0];
    assert_eq!(target["current"], true, "{target}");

    // Unknown, missing, down: exit 1 for the node that is down.
    let out = run(&rig, &cfg, &["status", "--json", "4-6"]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    let s = summary(&out);
    assert_eq!(s["ok"], false);
    let unknown = &targets(&s, "node04")[0];
    assert_eq!(unknown["state"], "unknown", "{unknown}");
    for key in ["image", "image_id", "loaded_at", "current"] {
        assert!(unknown[key].is_null(), "{key}: {unknown}");
    }
    assert_eq!(targets(&s, "node05")[0]["state"], "missing");
    let down = node(&s, "node06");
    assert_eq!(down["ssh"], "down", "{down}");
    assert!(
        down["error"].as_str().unwrap().contains("refused"),
        "{down}"
    );
    assert_eq!(down["targets"], serde_json::json!([]));
    assert_eq!(node(&s, "node04")["ssh"], "up");

    // The table, as a person reads it.
    let out = run(&rig, &cfg, &["status", "1-6"]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("{table}");
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{table}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        row("node01")[..4],
        ["node01", "up", t(0).to_str().unwrap(), "a.img"]
    );
    assert!(row("node01").ends_with(&["intact", "outdated"]), "{table}");
    assert!(
        row("node02").ends_with(&["modified", "outdated"]),
        "{table}"
    );
    assert!(row("node03").ends_with(&["intact", "yes"]), "{table}");
    assert!(row("node04").ends_with(&["unknown", "-"]), "{table}");
    assert!(row("node05").ends_with(&["missing", "-"]), "{table}");
    assert_eq!(row("node06")[..2], ["node06", "down"], "{table}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("node06"));
}

#[test]
fn status_refuses_the_dashboard_and_bad_specs() {
    let rig = Rig::new_stopped(1);
    let cfg = layer(&rig);
    let out = run(&rig, &cfg, &["status", "-c", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("-c has no effect on `status`"),
        "{}",
        output_text(&out)
    );
    let out = run(&rig, &cfg, &["status", "9"]);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    let out = run(&rig, &cfg, &["status", "-t", "-3", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
}

#[test]
fn a_node_that_never_speaks_ssh_is_down_at_the_deadline() {
    let rig = Rig::new(1);
    let (mute_port, _mute) = common::silent_listener();
    rig.write_config(&format!(
        "[[node]]\nname = \"mute\"\naddress = \"127.0.0.1\"\nport = {mute_port}\n"
    ));
    let cfg = layer(&rig);
    let started = Instant::now();
    let out = run(
        &rig,
        &cfg,
        &["status", "--json", "-t", "3", "node01", "mute"],
    );
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    // The deadline really ends it (generous margin for a busy machine).
    assert!(took.as_secs_f64() < 10.0, "{took:?}");
    let s = summary(&out);
    let mute = node(&s, "mute");
    assert_eq!(mute["ssh"], "down", "{mute}");
    let why = mute["error"].as_str().unwrap();
    assert!(
        why.contains("timed out") || why.contains("timeout"),
        "{mute}"
    );
    // The node that answered is reported all the same: up, its target missing.
    let up = node(&s, "node01");
    assert_eq!(
        (&up["ssh"], &up["error"]),
        (&"up".into(), &serde_json::Value::Null)
    );
    assert_eq!(up["targets"][0]["state"], "missing");
}

#[test]
fn with_power_status_configured_each_node_says_its_power() {
    // No sshd runs: both nodes are down, and the power command says why.
    let rig = Rig::new_stopped(2);
    let cfg = rig.dir().join("power.conf");
    fs::write(
        &cfg,
        "[power]\nstatus = \"if [ {number} = 1 ]; then echo on; else echo off; fi\"\n",
    )
    .unwrap();
    let out = run(&rig, &cfg, &["status", "--json", "-t", "5", "1-2"]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert_eq!(node_event(&out, "node01")["power"], "on");
    assert_eq!(node_event(&out, "node02")["power"], "off");
    assert_eq!(node(&summary(&out), "node02")["ssh"], "down");
    let out = run(&rig, &cfg, &["status", "-t", "5", "1-2"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("NODE    SSH   POWER"), "{table}");
    assert!(table.contains("node02  down  off"), "{table}");
}
