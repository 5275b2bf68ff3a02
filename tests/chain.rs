//! Fan-out by relay chain, on real sshd nodes with real TCP relays on 127.0.0.1.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Rig, assert_same, imaging, lines, node, summary};

const MIB: usize = 1 << 20;

fn write_image(path: &Path) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut data = vec![0u8; 48 * MIB];
    for (start, len) in [(0, 12 * MIB), (20 * MIB, 6 * MIB), (40 * MIB, 8 * MIB)] {
        rng.fill(&mut data[start..start + len]);
    }
    std::fs::write(path, &data).unwrap();
    data
}

fn layer(rig: &Rig, name: &str, extra: &str) -> PathBuf {
    let path = rig.dir().join(name);
    std::fs::write(
        &path,
        format!("[load]\nchunk_size = 1048576\nfanout = \"chain\"\nrelay_bind = \"127.0.0.1\"\n{extra}\n"),
    )
    .unwrap();
    path
}

#[test]
fn chain_load_onto_six_nodes_gives_identical_targets() {
    let rig = Rig::new(6);
    let image = write_image(&rig.dir().join("images/lab.img"));
    let cfg = layer(&rig, "c.conf", "");
    let out = imaging(&rig, &cfg)
        .args(["load", "--json", "-i", "lab.img", "1-6"])
        .output()
        .unwrap();
    let s = summary(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{s}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in rig.nodes() {
        assert_same(&n.target, &image);
        let ns = node(&s, &n.name);
        assert_eq!(ns["state"], "done");
        assert!(
            ns["bytes_written"].as_u64().unwrap() >= 26 * MIB as u64,
            "{ns}"
        );
    }
    let logs: Vec<String> = lines(&out)
        .iter()
        .filter(|v| v["event"] == "log")
        .map(|v| v["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        logs.iter()
            .any(|l| l.contains("relay chain: controller -> node01 -> node02")),
        "{logs:?}"
    );
    // Up to date nodes are left out; a reload sends nothing.
    let out = imaging(&rig, &cfg)
        .args(["load", "--json", "-i", "lab.img", "1-6"])
        .output()
        .unwrap();
    let s = summary(&out);
    for n in rig.nodes() {
        assert_eq!(node(&s, &n.name)["state"], "up-to-date");
    }
}

/// Pids of `root`'s descendants whose command line contains `needle`.
fn descendants(root: u32, needle: &str) -> Vec<u32> {
    let mut parent = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if let Some(ppid) = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok())
        {
            parent.insert(pid, ppid);
        }
    }
    parent
        .keys()
        .copied()
        .filter(|&pid| {
            let mut p = pid;
            for _ in 0..64 {
                match parent.get(&p) {
                    Some(&pp) if pp == root => return true,
                    Some(&pp) if pp > 1 => p = pp,
                    _ => return false,
                }
            }
            false
        })
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn a_killed_member_is_cut_out_and_the_rest_of_the_chain_finishes() {
    let rig = Rig::new(6);
    let image = write_image(&rig.dir().join("images/lab.img"));
    let cfg = layer(&rig, "k.conf", "");
    let child = imaging(&rig, &cfg)
        .args(["load", "--json", "-b", "5M", "-i", "lab.img", "1-6"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for node03's agent to be running and receiving, then kill it.
    let sshd = rig.nodes()[2].pid().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut killed = false;
    while Instant::now() < deadline {
        let written = std::fs::metadata(&rig.nodes()[2].target)
            .map(|m| m.len() > 0)
            .unwrap_or(false);
        let agents = descendants(sshd, " agent");
        if written && !agents.is_empty() {
            std::thread::sleep(Duration::from_secs(2));
            for pid in descendants(sshd, " agent") {
                // SAFETY: killing a process of this test's own rig.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                killed = true;
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(killed, "node03's agent never showed up");
    let out = child.wait_with_output().unwrap();
    let s = summary(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{s}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(node(&s, "node03")["state"], "failed", "{s}");
    for (i, n) in rig.nodes().iter().enumerate() {
        if i != 2 {
            assert_eq!(node(&s, &n.name)["state"], "done", "{s}");
            assert_same(&n.target, &image);
        }
    }
}

#[test]
fn a_relay_peer_with_a_wrong_secret_is_refused_and_the_run_succeeds() {
    let rig = Rig::new(3);
    let image = write_image(&rig.dir().join("images/lab.img"));
    // A known port range, so the intruder knows where to knock.
    let base = 20000 + (std::process::id() % 20000) as u16;
    let cfg = layer(
        &rig,
        "w.conf",
        &format!("relay_port_min = {base}\nrelay_port_max = {}\n", base + 20),
    );
    let child = imaging(&rig, &cfg)
        .args(["load", "--json", "-b", "6M", "-i", "lab.img", "1-3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut knocked = 0;
    while Instant::now() < deadline && knocked == 0 {
        for port in base..=base + 20 {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
                let mut hello = b"IMGRELAY\x01".to_vec();
                hello.extend_from_slice(&[7u8; 16]);
                let _ = s.write_all(&hello);
                let mut reply = [0u8; 48];
                let _ = s.read_exact(&mut reply);
                // A made-up proof: we do not know the secret.
                let _ = s.write_all(&[9u8; 32]);
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
                knocked += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        knocked > 0,
        "no relay listener found in {base}..={}",
        base + 20
    );
    let out = child.wait_with_output().unwrap();
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(0), "{s}");
    for n in rig.nodes() {
        assert_same(&n.target, &image);
    }
    let refused = lines(&out).iter().filter(|v| v["event"] == "log").any(|v| {
        v["text"]
            .as_str()
            .unwrap_or("")
            .contains("refused a relay connection")
    });
    assert!(refused, "{}", String::from_utf8_lossy(&out.stdout));
}

/// A load of 32 MiB at the controller's 8 MiB/s onto nodes 1-5, node02's
/// agent run with `var`=`rate` (a debug-only slow link) through a wrapper
/// that only node02's sshd runs it with. It must succeed, byte exact;
/// returns its log lines and the nodes' `elapsed_s`.
fn load_with_node02_slow(var: &str, rate: u64) -> (Vec<String>, impl Fn(&str) -> f64) {
    let rig = Rig::new(5);
    let mut rng = fastrand::Rng::with_seed(11);
    let mut image = vec![0u8; 32 * MIB];
    rng.fill(&mut image);
    std::fs::write(rig.dir().join("images/lab.img"), &image).unwrap();
    let wrapper = rig.dir().join("agent-wrapper");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \"$SSH_CONNECTION\" in *\" {}\") export {var}={rate} ;; esac\nexec '{}' \"$@\"\n",
            rig.nodes()[1].port,
            env!("CARGO_BIN_EXE_imaging")
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let cfg = layer(
        &rig,
        "slow.conf",
        &format!(
            "bandwidth = 8388608\nagent_path = \"{}\"",
            wrapper.display()
        ),
    );
    let out = imaging(&rig, &cfg)
        .args(["load", "--json", "-t", "300", "-i", "lab.img", "1-5"])
        .output()
        .unwrap();
    let s = summary(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{s}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in rig.nodes() {
        assert_eq!(node(&s, &n.name)["state"], "done", "{s}");
        assert_same(&n.target, &image);
    }
    let logs: Vec<String> = lines(&out)
        .iter()
        .filter(|v| v["event"] == "log")
        .map(|v| v["text"].as_str().unwrap_or("").to_string())
        .collect();
    (logs, move |name: &str| {
        node(&s, name)["elapsed_s"].as_f64().unwrap()
    })
}

/// The log line that moved node02.
fn node02_moved(logs: &[String]) -> &String {
    logs.iter()
        .find(|l| l.starts_with("node02: slow ("))
        .unwrap_or_else(|| panic!("node02 was not found slow: {logs:?}"))
}

/// The latest of the healthy nodes' times.
fn healthy_done(elapsed: &impl Fn(&str) -> f64) -> f64 {
    ["node01", "node03", "node04", "node05"]
        .map(elapsed)
        .into_iter()
        .fold(0.0, f64::max)
}

/// A member behind a slow link (its agent takes its input at 2 MiB/s) is
/// moved to the tail: the healthy nodes go at the controller's 8 MiB/s and
/// are done long before it; it still finishes, byte exact.
#[test]
fn a_slow_member_is_moved_to_the_tail_and_the_others_do_not_wait_for_it() {
    let (logs, elapsed) = load_with_node02_slow("IMAGING_TEST_INPUT_RATE", 2 << 20);
    let moved = node02_moved(&logs);
    assert!(moved.ends_with("moved to the tail of the chain"), "{moved}");
    assert_eq!(
        logs.iter().filter(|l| l.contains(": slow (")).count(),
        1,
        "only node02 is slow: {logs:?}"
    );
    let (slow, healthy) = (elapsed("node02"), healthy_done(&elapsed));
    // Held to node02's pace, every node would take 16 s (32 MiB at 2 MiB/s).
    assert!(
        healthy < 0.6 * slow,
        "healthy nodes done at {healthy} s, node02 at {slow} s: {logs:?}"
    );
}

/// A member whose link is slow outwards only (its agent passes the stream
/// on at 2 MiB/s) makes its predecessor wait as a slow successor would: the
/// successor may be moved first; when that does not help, the member is.
/// The healthy nodes are not held to its pace.
#[test]
fn a_member_slow_to_pass_the_stream_on_is_moved_even_if_its_successor_was_first() {
    let (logs, elapsed) = load_with_node02_slow("IMAGING_TEST_OUTPUT_RATE", 2 << 20);
    let moved = node02_moved(&logs);
    assert!(moved.contains("moved to the tail of the chain"), "{moved}");
    let others: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains(": slow (") && !l.starts_with("node02"))
        .collect();
    assert!(
        others.is_empty() || moved.ends_with("(moving node03 did not help)"),
        "{logs:?}"
    );
    // Held to node02's pace, every node would take 16 s (32 MiB at 2 MiB/s);
    // alone they take 4 s at the controller's 8 MiB/s.
    let healthy = healthy_done(&elapsed);
    assert!(
        healthy < 10.0,
        "healthy nodes done at {healthy} s: {logs:?}"
    );
}
