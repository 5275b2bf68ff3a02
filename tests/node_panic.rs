//! A panic in one node's task (forced in debug builds by
//! `IMAGING_TEST_PANIC_NODE`) fails that node, runs its after hook, and
//! leaves the other nodes' loads alone.

mod common;

use std::time::Duration;

use common::{Rig, assert_same, imaging, node, summary};

fn check(fanout: &str) {
    let rig = Rig::new(3);
    let mut rng = fastrand::Rng::with_seed(7);
    let mut image = vec![0u8; 4 << 20];
    rng.fill(&mut image[..]);
    std::fs::write(rig.dir().join("images/lab.img"), &image).unwrap();
    let log = rig.dir().join("hooks.log");
    let cfg = rig.dir().join("p.conf");
    std::fs::write(
        &cfg,
        format!(
            "[load]\nchunk_size = 1048576\nbefore = \"echo before {{name}} >> {0}\"\nafter = \"echo after {{name}} >> {0}\"\n",
            log.display()
        ),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = imaging(&rig, &cfg)
        .env("IMAGING_TEST_PANIC_NODE", "node02")
        .args([
            "load", "--json", "-t", "60", "--fanout", fanout, "-i", "lab.img", "1-3",
        ])
        .output()
        .unwrap();
    let took = started.elapsed();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = summary(&out);
    let failed = node(&s, "node02");
    assert_eq!(failed["state"], "failed", "{s}");
    let why = failed["error"].as_str().unwrap_or("");
    assert!(why.contains("panicked"), "{s}");
    for name in ["node01", "node03"] {
        assert_eq!(node(&s, name)["state"], "done", "{s}");
    }
    for n in rig.nodes() {
        if n.name != "node02" {
            assert_same(&n.target, &image);
        }
    }
    let hooks = std::fs::read_to_string(&log).unwrap();
    for n in rig.nodes() {
        for hook in ["before", "after"] {
            assert_eq!(
                hooks.matches(&format!("{hook} {}\n", n.name)).count(),
                1,
                "{hooks}"
            );
        }
    }
    assert!(took < Duration::from_secs(40), "took {took:?}");
}

#[test]
fn a_panic_in_a_star_node_task_fails_that_node_and_runs_its_after_hook() {
    check("star");
}

#[test]
fn a_panic_in_a_chain_node_task_fails_that_node_and_runs_its_after_hook() {
    check("chain");
}
