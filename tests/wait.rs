//! `imaging wait` against real sshd nodes on 127.0.0.1.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Rig, closed_port, silent_listener};

fn run(cmd: &mut Command) -> (Output, Duration) {
    let started = Instant::now();
    let out = cmd.output().expect("run imaging");
    (out, started.elapsed())
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// No ssh process of a run may outlive it, and no control directory stays.
fn assert_clean(rig: &Rig) {
    let runtime = rig.dir().join("xdg/runtime/imaging");
    if let Ok(entries) = std::fs::read_dir(&runtime) {
        let left: Vec<_> = entries.flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "control dirs left behind: {left:?}");
    }
    let marker = rig.dir().to_string_lossy().into_owned();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let alive: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.starts_with("ssh ") && c.contains(&marker))
            .collect();
        if alive.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ssh processes left behind: {alive:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn all_up_nodes_exit_0() {
    let rig = Rig::new(3);
    let (out, _) = run(rig.imaging().args(["wait", "-t", "20", "1-3"]));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    for name in ["node01", "node02", "node03"] {
        assert!(
            stdout(&out).contains(&format!("{name} ssh OK")),
            "{}",
            stdout(&out)
        );
    }
    assert_clean(&rig);
}

#[test]
fn node_whose_sshd_starts_late_is_waited_for() {
    let mut rig = Rig::new_stopped(2);
    rig.start(0);
    let started = Instant::now();
    let child = rig
        .imaging()
        .args(["wait", "-t", "20", "-v", "node01", "node02"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    rig.start(1);
    let out = child.wait_with_output().unwrap();
    let elapsed = started.elapsed();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("node02 ssh OK"), "{}", stdout(&out));
    // -v shows the refused attempts made before the node came up.
    assert!(
        stdout(&out).contains("node02: connection refused"),
        "{}",
        stdout(&out)
    );
    assert!(
        elapsed >= Duration::from_secs(3) && elapsed < Duration::from_secs(10),
        "{elapsed:?}"
    );
    assert_clean(&rig);
}

#[test]
fn closed_port_and_silent_listener_fail_at_the_deadline() {
    let rig = Rig::new(1);
    let (mute_port, _mute) = silent_listener();
    let dead_port = closed_port();
    rig.write_config(&format!(
        "[[node]]\nname = \"dead\"\naddress = \"127.0.0.1\"\nport = {dead_port}\n\
         [[node]]\nname = \"mute\"\naddress = \"127.0.0.1\"\nport = {mute_port}\n"
    ));
    let (out, elapsed) = run(rig
        .imaging()
        .args(["wait", "-t", "5", "node01", "dead", "mute"]));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    assert!(text.contains("node01 ssh OK"), "{text}");
    assert!(
        text.contains("dead ssh KO (timeout: connection refused)"),
        "{text}"
    );
    let mute = text
        .lines()
        .find(|l| l.contains("mute ssh KO ("))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        mute.contains("handshake") || mute.contains("banner"),
        "{mute}"
    );
    assert!(
        elapsed >= Duration::from_millis(4900) && elapsed < Duration::from_millis(6200),
        "deadline 5 s, took {elapsed:?}"
    );
    assert_clean(&rig);
}

#[test]
fn json_output_matches_the_contract() {
    let rig = Rig::new(2);
    let dead_port = closed_port();
    rig.write_config(&format!(
        "[[node]]\nname = \"dead\"\naddress = \"127.0.0.1\"\nport = {dead_port}\n"
    ));
    let (out, _) = run(rig
        .imaging()
        .args(["wait", "--json", "-t", "6", "1-2", "dead"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert!(lines.iter().all(|v| v["event"].is_string()));
    let summary = lines.last().unwrap();
    assert_eq!(summary["event"], "summary");
    assert_eq!(summary["command"], "wait");
    assert_eq!(summary["ok"], false);
    assert!(summary["elapsed_s"].as_f64().unwrap() > 1.5);
    let nodes = summary["nodes"].as_array().unwrap();
    let names: Vec<&str> = nodes.iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["node01", "node02", "dead"]);
    for n in &nodes[..2] {
        assert_eq!(n["state"], "ok");
        assert!(n["error"].is_null());
        assert_eq!(n["bytes_sent"], 0);
        assert_eq!(n["bytes_written"], 0);
    }
    assert_eq!(nodes[2]["state"], "failed");
    assert!(
        nodes[2]["error"]
            .as_str()
            .unwrap()
            .contains("connection refused")
    );
}

#[test]
fn bad_spec_exits_2_naming_the_token() {
    let rig = Rig::new(1);
    std::fs::write(rig.dir().join("images/ubuntu.img"), b"x").unwrap();
    let (out, _) = run(rig.imaging().args(["wait", "1", "7x-"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("`7x-`"), "{}", stderr(&out));
    let (out, _) = run(rig.imaging().args(["wait", "ubuntu.img"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("did you forget -i?"),
        "{}",
        stderr(&out)
    );
    let (out, _) = run(rig.imaging().args(["nodes", "40"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("`40`"), "{}", stderr(&out));
}

#[test]
fn unknown_client_key_is_ko_at_once_naming_user_and_key() {
    let rig = Rig::new(1);
    let other_key = rig.dir().join("other_key");
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other_key)
        .status()
        .unwrap();
    assert!(ok.success());
    let cfg = rig.dir().join("wrong-key.conf");
    std::fs::write(
        &cfg,
        format!("[ssh]\nidentity_file = \"{}\"\n", other_key.display()),
    )
    .unwrap();
    let (out, elapsed) = run(rig
        .imaging()
        .arg("--config")
        .arg(&cfg)
        .args(["wait", "-t", "30", "1"]));
    assert_eq!(out.status.code(), Some(1));
    // A refused key stays refused: KO at once, naming the user and the key.
    let text = stdout(&out);
    assert!(
        text.contains("node01 ssh KO (authentication refused"),
        "{text}"
    );
    assert!(
        text.contains("user root") && text.contains("other_key"),
        "{text}"
    );
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
}

#[test]
fn nodes_env_and_all_scope_select_nodes() {
    let rig = Rig::new(0);
    let cfg = rig.dir().join("fit.conf");
    std::fs::write(
        &cfg,
        "[nodes]\nall = \"1-5 ~3\"\n[[node]]\nname = \"fit01\"\n[[node]]\nname = \"fit02\"\n\
         [[node]]\nname = \"fit03\"\n[[node]]\nname = \"fit04\"\n[[node]]\nname = \"fit05\"\n",
    )
    .unwrap();
    let imaging = || {
        let mut c = rig.imaging();
        c.env("IMAGING_CONFIG", &cfg);
        c
    };
    let (out, _) = run(imaging().args(["nodes", "-a", "~1"]));
    assert_eq!(stdout(&out).trim(), "fit02 fit04 fit05", "{}", stderr(&out));
    let (out, _) = run(imaging().arg("nodes").env("NODES", "4,1"));
    assert_eq!(stdout(&out).trim(), "fit01 fit04", "{}", stderr(&out));
    let (out, _) = run(imaging().arg("nodes"));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn ctrl_c_exits_130_and_leaves_no_ssh_behind() {
    let rig = Rig::new(1);
    let (mute_port, _mute) = silent_listener();
    rig.write_config(&format!(
        "[[node]]\nname = \"mute\"\naddress = \"127.0.0.1\"\nport = {mute_port}\n"
    ));
    let child = rig
        .imaging()
        .args(["wait", "--json", "-t", "30", "node01", "mute"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    // SAFETY: signalling the child we just spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let last: serde_json::Value =
        serde_json::from_str(stdout(&out).lines().last().unwrap()).unwrap();
    assert_eq!(last["nodes"][0]["state"], "ok");
    assert_eq!(last["nodes"][1]["state"], "cancelled");
    assert_clean(&rig);
}

/// Twenty nodes that are up: exit 0. The time is printed, not asserted (the
/// machine is shared); see README for the measured figure.
#[test]
fn twenty_up_nodes_return_0() {
    let rig = Rig::new(20);
    let (out, elapsed) = run(rig.imaging().args(["wait", "-t", "60", "1-20"]));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(stdout(&out).matches(" ssh OK").count(), 20);
    // The floor for comparison: 20 plain `ssh … true` at once.
    let started = Instant::now();
    let children: Vec<_> = rig
        .nodes()
        .iter()
        .map(|n| {
            Command::new("ssh")
                .arg("-i")
                .arg(rig.client_key())
                .args([
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "IdentitiesOnly=yes",
                    "-o",
                    "StrictHostKeyChecking=yes",
                ])
                .arg("-o")
                .arg(format!(
                    "UserKnownHostsFile={}",
                    rig.known_hosts().display()
                ))
                .args(["-p", &n.port.to_string(), "root@127.0.0.1", "true"])
                .stdin(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let plain = started.elapsed();
    eprintln!("imaging wait on 20 nodes: {elapsed:?}; 20 plain `ssh … true` at once: {plain:?}");
    assert_clean(&rig);
}
