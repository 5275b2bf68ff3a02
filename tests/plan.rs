//! `load -n` on real sshd nodes: what each node would receive, from its
//! stamp, or with `--verify` from a digest compare of its target; a node
//! that is down is part of the plan; and the plan writes nothing.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::{Rig, imaging, output_text, summary, write_8mib_image};

const MIB: u64 = 1 << 20;

/// 1 MiB chunks.
fn layer(rig: &Rig) -> PathBuf {
    let path = rig.dir().join("plan.conf");
    fs::write(&path, "[load]\nchunk_size = 1048576\n").unwrap();
    path
}

/// The one plan `load -n --json` printed.
fn plan(rig: &Rig, cfg: &Path, args: &[&str]) -> serde_json::Value {
    let out = imaging(rig, cfg).args(args).output().unwrap();
    // A node that is down is part of the plan, not its failure.
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", output_text(&out));
    let plan: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(plan["event"], "plan", "{plan}");
    plan
}

fn entry<'a>(plan: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {plan}"))
}

/// Every target's bytes and mtime.
fn snapshot(rig: &Rig) -> Vec<Option<(Vec<u8>, SystemTime)>> {
    rig.nodes()
        .iter()
        .map(|n| {
            let meta = fs::metadata(&n.target).ok()?;
            Some((fs::read(&n.target).unwrap(), meta.modified().unwrap()))
        })
        .collect()
}

/// What `status` says of nodes 1-3's targets (stamps included).
fn stamps(rig: &Rig, cfg: &Path) -> Vec<serde_json::Value> {
    let out = imaging(rig, cfg)
        .args(["status", "--json", "1-3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let s = summary(&out);
    ["node01", "node02", "node03"]
        .iter()
        .map(|n| common::node(&s, n)["targets"].clone())
        .collect()
}

#[test]
fn dry_run_says_what_each_node_would_receive_from_stamps_and_digests_and_writes_nothing() {
    let mut rig = Rig::new_stopped(4);
    for i in 0..3 {
        rig.start(i);
    }
    let cfg = layer(&rig);
    write_8mib_image(&rig.dir().join("images/a.img"), 1);
    let data = 5 * MIB;

    let out = imaging(&rig, &cfg)
        .args(["load", "--json", "-i", "a.img", "1-2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    // Node 3 holds 2 MiB imaging never wrote; node 4 is down.
    let mut other = vec![0u8; 2 * MIB as usize];
    fastrand::Rng::with_seed(9).fill(&mut other);
    fs::write(&rig.nodes()[2].target, &other).unwrap();

    let files = snapshot(&rig);
    let stamped = stamps(&rig, &cfg);
    let p = plan(&rig, &cfg, &["load", "-n", "--json", "-i", "a.img", "1-4"]);
    assert_eq!(p["data_size"], data);
    assert_eq!(p["verify"], false);
    for name in ["node01", "node02"] {
        let n = entry(&p, name);
        assert_eq!(n["reachable"], true, "{n}");
        assert_eq!(n["would_receive"], 0, "{n}");
        assert_eq!(n["basis"], "stamp", "{n}");
    }
    let n3 = entry(&p, "node03");
    assert_eq!(n3["would_receive"], data, "{n3}");
    assert_eq!(n3["basis"], "upper bound", "{n3}");
    assert_eq!(n3["reason"], "no stamp", "{n3}");
    let n4 = entry(&p, "node04");
    assert_eq!(n4["reachable"], false, "{n4}");
    assert!(n4["error"].as_str().unwrap().len() > 3, "{n4}");
    assert_eq!(n4["basis"], "upper bound", "{n4}");
    assert_eq!(n4["reason"], "unreachable", "{n4}");
    assert_eq!(snapshot(&rig), files, "a dry run changed a target");
    assert_eq!(stamps(&rig, &cfg), stamped, "a dry run changed a stamp");

    // 8 bytes change in node 2's data chunk 0, and its mtime with them.
    let t2 = &rig.nodes()[1].target;
    let f = fs::OpenOptions::new().write(true).open(t2).unwrap();
    f.write_all_at(b"CHANGED!", 100).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    drop(f);
    let files = snapshot(&rig);
    let stamped = stamps(&rig, &cfg);

    // The stamp no longer vouches for node 2: only the bound.
    let p = plan(&rig, &cfg, &["load", "-n", "--json", "-i", "a.img", "1-2"]);
    let n2 = entry(&p, "node02");
    assert_eq!(n2["basis"], "upper bound", "{n2}");
    assert_eq!(n2["would_receive"], data, "{n2}");
    assert_eq!(n2["reason"], "changed since its stamp", "{n2}");

    // The digests say exactly: one chunk for node 2.
    let p = plan(
        &rig,
        &cfg,
        &["load", "-n", "--verify", "--json", "-i", "a.img", "1-4"],
    );
    assert_eq!(p["verify"], true);
    let n1 = entry(&p, "node01");
    assert_eq!(
        (&n1["would_receive"], &n1["basis"], &n1["differing_chunks"]),
        (&0.into(), &"digests".into(), &0.into()),
        "{n1}"
    );
    let n2 = entry(&p, "node02");
    assert_eq!(
        (&n2["would_receive"], &n2["basis"], &n2["differing_chunks"]),
        (&MIB.into(), &"digests".into(), &1.into()),
        "{n2}"
    );
    // Node 3's 2 MiB differ from the image, and it lacks the rest; the
    // zero chunks differ too (past its end) but are zeroed there, not sent.
    let n3 = entry(&p, "node03");
    assert_eq!(
        (&n3["would_receive"], &n3["basis"], &n3["differing_chunks"]),
        (&data.into(), &"digests".into(), &8.into()),
        "{n3}"
    );
    assert_eq!(entry(&p, "node04")["reason"], "unreachable");

    // For humans.
    let out = imaging(&rig, &cfg)
        .args(["load", "-n", "--verify", "-i", "a.img", "1-4"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    let t = String::from_utf8_lossy(&out.stdout);
    let row = |name: &str| {
        t.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{t}"))
            .to_string()
    };
    assert!(row("node01").contains("0 B (up to date: digests)"), "{t}");
    assert!(
        row("node02").contains("1.0 MiB (1 of 8 chunks differ)"),
        "{t}"
    );
    assert!(
        row("node04").contains("at most 5.0 MiB (unreachable)"),
        "{t}"
    );
    assert!(t.contains("1 of 4 nodes do not answer over SSH now"), "{t}");
    assert!(t.contains("would receive at most 11 MiB in all"), "{t}");

    // Nothing was written: no target byte or mtime, no stamp.
    assert_eq!(snapshot(&rig), files, "a dry run changed a target");
    let after = stamps(&rig, &cfg);
    assert_eq!(after, stamped, "a dry run changed a stamp");
    assert_eq!(after[1][0]["state"], "modified", "{:?}", after[1]);
    assert_eq!(after[2][0]["state"], "unknown", "{:?}", after[2]);
}

#[test]
fn a_node_that_never_answers_is_reported_within_the_timeout() {
    let rig = Rig::new(1);
    let (mute_port, _mute) = common::silent_listener();
    rig.write_config(&format!(
        "[[node]]\nname = \"mute\"\naddress = \"127.0.0.1\"\nport = {mute_port}\n"
    ));
    let cfg = layer(&rig);
    write_8mib_image(&rig.dir().join("images/a.img"), 2);
    let started = std::time::Instant::now();
    let p = plan(
        &rig,
        &cfg,
        &[
            "load", "-n", "--json", "-t", "3", "-i", "a.img", "node01", "mute",
        ],
    );
    let took = started.elapsed();
    // Generous: 3 s and a busy machine.
    assert!(took < Duration::from_secs(30), "{took:?}");
    let mute = entry(&p, "mute");
    assert_eq!(mute["reachable"], false, "{mute}");
    assert_eq!(mute["reason"], "unreachable", "{mute}");
    let n1 = entry(&p, "node01");
    assert_eq!(
        (&n1["basis"], &n1["reachable"]),
        (&"missing".into(), &true.into()),
        "{n1}"
    );
}
