//! `imaging on|off|reset|power` through `[power]` command templates that run
//! real local commands, and the run check (`[load] check`, `[save] check`)
//! that ends a run before it touches any node.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Rig, assert_same, imaging, lines, node, summary};

/// A TOML string for a path.
fn q(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// A fake power controller, `switch NODE ACTION`, as a CMC would be: it
/// keeps each node's power in `NODE.power`. fit02's controller does not
/// answer; fit03's hangs (a `sleep 60` whose pid it writes to fit03.sleep).
fn write_switch(dir: &Path) -> PathBuf {
    let path = dir.join("switch");
    std::fs::write(
        &path,
        r#"#!/bin/sh
dir=$(dirname "$0")
case "$1" in
  fit02) echo "connecting to reboot02" >&2; echo "switch: no route to reboot02" >&2; exit 1 ;;
  fit03) sleep 60 & echo $! > "$dir/fit03.sleep"; wait; exit 0 ;;
esac
case "$2" in
  status) cat "$dir/$1.power" ;;
  reset) echo reset >> "$dir/$1.resets" ;;
  *) echo "$2" > "$dir/$1.power" ;;
esac
"#,
    )
    .unwrap();
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&path, perms).unwrap();
    path
}

fn layer(rig: &Rig, name: &str, text: &str) -> PathBuf {
    let path = rig.dir().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn four_nodes() -> String {
    (1..=4)
        .map(|i| format!("[[node]]\nname = \"fit0{i}\"\n"))
        .collect()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Is `pid` (read from a file) still a live `sleep`?
/// Whether the hung command's `sleep` is gone within 2 s: its group was sent
/// SIGKILL before the run exited, and on a busy machine the kernel may take
/// a moment to finish it off (a zombie counts as gone).
fn sleep_ends(pidfile: &Path) -> bool {
    let since = Instant::now();
    while sleep_alive(pidfile) {
        if since.elapsed() > Duration::from_secs(2) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn sleep_alive(pidfile: &Path) -> bool {
    let pid =
        std::fs::read_to_string(pidfile).unwrap_or_else(|e| panic!("{}: {e}", pidfile.display()));
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default();
    String::from_utf8_lossy(&cmdline).starts_with("sleep")
}

#[test]
fn power_actions_run_per_node_and_report_failures_and_timeouts() {
    let rig = Rig::new(0);
    let switch = write_switch(rig.dir());
    let s = q(&switch);
    let s = s.trim_matches('"');
    let cfg = layer(
        &rig,
        "power.conf",
        &format!(
            "[power]\non = \"{s} {{name}} on\"\noff = \"{s} {{name}} off\"\n\
             reset = \"{s} {{name}} reset\"\nstatus = \"{s} {{name}} status\"\ntimeout = 2\n\n{}",
            four_nodes()
        ),
    );
    let dir = rig.dir();

    let started = Instant::now();
    let out = imaging(&rig, &cfg).args(["on", "1-4"]).output().unwrap();
    let took = started.elapsed();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    let shown: Vec<&str> = text.lines().collect();
    assert_eq!(
        shown,
        [
            "fit01 on",
            "fit02 failed: switch: no route to reboot02",
            "fit03 timeout after 2s",
            "fit04 on",
        ],
        "{text}"
    );
    assert!(stderr(&out).contains("2 of 4 nodes failed: fit02 fit03"));
    // Ends near the timeout, and the hung controller's sleep is gone.
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "{took:?}"
    );
    assert!(
        sleep_ends(&dir.join("fit03.sleep")),
        "sleep outlived the run by 2 s"
    );
    for n in ["fit01", "fit04"] {
        assert_eq!(
            std::fs::read_to_string(dir.join(format!("{n}.power"))).unwrap(),
            "on\n"
        );
    }

    // Off, then the state as `power` reads it.
    let out = imaging(&rig, &cfg).args(["off", "fit04"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "fit04 off\n");
    let out = imaging(&rig, &cfg).args(["power", "1,4"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "fit01 on\nfit04 off\n");

    // The JSON summary: power for every node, unknown where it failed.
    let out = imaging(&rig, &cfg)
        .args(["power", "--json", "1-4"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let sum = summary(&out);
    assert_eq!(sum["command"], "power");
    assert_eq!(sum["ok"], false);
    assert!(sum["elapsed_s"].as_f64().unwrap() >= 2.0, "{sum}");
    let expect = [
        ("fit01", "ok", "on"),
        ("fit02", "failed", "unknown"),
        ("fit03", "timeout", "unknown"),
        ("fit04", "ok", "off"),
    ];
    for (name, state, power) in expect {
        let n = node(&sum, name);
        assert_eq!(n["state"], state, "{sum}");
        assert_eq!(n["power"], power, "{sum}");
    }
    assert_eq!(node(&sum, "fit01")["error"], serde_json::Value::Null);
    assert_eq!(
        node(&sum, "fit02")["error"],
        "switch: no route to reboot02",
        "{sum}"
    );
    assert_eq!(node(&sum, "fit03")["error"], "timeout after 2s");
    // Every line is an event; one state per node before the summary.
    let events = lines(&out);
    assert_eq!(events.len(), 5);
    assert!(events[..4].iter().all(|e| e["event"] == "state"));
    assert!(
        sleep_ends(&dir.join("fit03.sleep")),
        "sleep outlived the run by 2 s"
    );

    // Reset: only the selected node; -t overrides the timeout.
    let log = dir.join("power.log");
    let out = imaging(&rig, &cfg)
        .args(["reset", "-t", "1", "fit01", "fit03", "--log"])
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout(&out), "fit01 reset\nfit03 timeout after 1s\n");
    // The run is in the log, which the failure message names.
    assert!(stderr(&out).contains(&format!("log: {}", log.display())));
    let logged: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(logged.len(), 4, "{logged:?}");
    assert_eq!(logged[0]["event"], "start");
    assert_eq!(logged[3]["event"], "summary");
    assert_eq!(logged[3]["command"], "reset");
    assert_eq!(logged[2]["state"], "timeout");
    assert_eq!(
        std::fs::read_to_string(dir.join("fit01.resets")).unwrap(),
        "reset\n"
    );
    assert!(!dir.join("fit04.resets").exists());

    // An answer that says neither on nor off.
    std::fs::write(dir.join("fit01.power"), "blinking\n").unwrap();
    let out = imaging(&rig, &cfg).args(["power", "1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "fit01 unknown (answered \"blinking\")\n");
}

#[test]
fn an_unconfigured_power_action_is_a_usage_error_naming_its_key() {
    let rig = Rig::new(0);
    let marker = rig.dir().join("ran");
    let cfg = layer(
        &rig,
        "power.conf",
        &format!(
            "[power]\non = \"touch {}\"\n\n{}",
            marker.display(),
            four_nodes()
        ),
    );
    for action in ["off", "reset", "power"] {
        let out = imaging(&rig, &cfg).args([action, "1-4"]).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{action}: {err}");
        let key = if action == "power" { "status" } else { action };
        assert!(err.contains(&format!("`[power] {key}`")), "{err}");
    }
    // A node spec that selects nothing is a usage error too, and nothing ran.
    let out = imaging(&rig, &cfg).args(["on", "9"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(!marker.exists());
}

#[test]
fn cmc_placeholder_comes_from_the_r2lab_inventory() {
    let rig = Rig::new(0);
    let inventory = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/r2lab-inventory.json");
    let dir = rig.dir().join("cmc");
    std::fs::create_dir(&dir).unwrap();
    let d = dir.display();
    // fit03's [[node]] entry overrides its CMC; fit04's JSON entry has only
    // a CMC hostname.
    let cfg = layer(
        &rig,
        "r2lab.conf",
        &format!(
            "[nodes]\ninventory = {}\n\n[power]\non = \"echo {{name}} on > {d}/{{cmc}}\"\n\
             status = \"cat {d}/{{cmc}}\"\n\n[[node]]\nname = \"fit03\"\ncmc = \"bmc-fit03\"\n",
            q(&inventory)
        ),
    );
    let out = imaging(&rig, &cfg)
        .args(["on", "--json", "1-4"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(summary(&out)["command"], "on");
    for (cmc, name) in [
        ("192.168.1.1", "fit01"),
        ("192.168.1.2", "fit02"),
        ("bmc-fit03", "fit03"),
        ("reboot04", "fit04"),
    ] {
        assert_eq!(
            std::fs::read_to_string(dir.join(cmc)).unwrap_or_default(),
            format!("{name} on\n"),
            "{cmc}"
        );
    }
    // "fit02 on" read back as a power state.
    let out = imaging(&rig, &cfg).args(["power", "2"]).output().unwrap();
    assert_eq!(stdout(&out), "fit02 on\n");

    // A node with no CMC anywhere: refused before any command runs.
    let cfg = layer(
        &rig,
        "nocmc.conf",
        &format!("[power]\non = \"echo on > {d}/{{cmc}}-again\"\n\n[[node]]\nname = \"hv-west\"\n"),
    );
    let out = imaging(&rig, &cfg)
        .args(["on", "hv-west"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("hv-west") && err.contains("{cmc}"), "{err}");
    assert!(!dir.join("-again").exists());
}

/// Two local nodes (loaded in-process, no sshd), a `before` hook that
/// records each node it prepares, and `check`.
fn load_layer(rig: &Rig, check: &str) -> PathBuf {
    let targets = rig.dir().join("targets");
    let hooks = rig.dir().join("hooks.log");
    layer(
        rig,
        "load.conf",
        &format!(
            "[load]\nchunk_size = 1048576\nbefore = \"echo before {{name}} >> {}\"\ncheck = {}\n\
             [save]\ncheck = {}\n\
             [[node]]\nname = \"local01\"\nlocal = true\ntarget = \"{}/{{name}}.img\"\n\
             [[node]]\nname = \"local02\"\nlocal = true\ntarget = \"{}/{{name}}.img\"\n",
            hooks.display(),
            q(Path::new(check)),
            q(Path::new(check)),
            targets.display(),
            targets.display()
        ),
    )
}

#[test]
fn a_failing_check_ends_the_run_before_any_node_is_touched() {
    let rig = Rig::new(0);
    let mut rng = fastrand::Rng::with_seed(7);
    let mut image = vec![0u8; 3 << 20];
    rng.fill(&mut image[..2 << 20]);
    std::fs::write(rig.dir().join("images/lab.img"), &image).unwrap();
    let hooks = rig.dir().join("hooks.log");
    let target = |n: &str| rig.dir().join(format!("targets/{n}.img"));

    let refuse = "echo 'checking leases' >&2; echo 'no current lease for {nodes}' >&2; exit 1";
    let cfg = load_layer(&rig, refuse);
    let out = imaging(&rig, &cfg)
        .args(["load", "-i", "lab.img", "1-2"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("[load] check"), "{err}");
    assert!(
        err.contains("no current lease for local01 local02"),
        "{err}"
    );
    assert!(!hooks.exists(), "the before hook ran");
    assert!(!target("local01").exists() && !target("local02").exists());

    // A save is checked the same way: no image appears.
    let out = imaging(&rig, &cfg)
        .args(["save", "1", "-o", "x"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("[save] check") && err.contains("no current lease"),
        "{err}"
    );
    let images: Vec<_> = std::fs::read_dir(rig.dir().join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(images, ["lab.img"]);

    // A check that passes (it sees the selected nodes) lets the load proceed.
    let cfg = load_layer(&rig, "test \"{nodes}\" = 'local01 local02'");
    let out = imaging(&rig, &cfg)
        .args(["load", "--json", "-i", "lab.img", "1-2"])
        .output()
        .unwrap();
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(0), "{s}{}", stderr(&out));
    assert_same(&target("local01"), &image);
    assert_same(&target("local02"), &image);
    let mut log: Vec<String> = std::fs::read_to_string(&hooks)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    log.sort();
    assert_eq!(log, ["before local01", "before local02"]);
}

/// The README's R2LAB configuration, run as written except for the
/// inventory path and the pxelinux dir (a temp dir instead of /tftpboot):
/// `curl` (the CMC cards) and `rhubarbe` (the lease check) are fakes on
/// PATH, and the inventory's nodes are loaded as local nodes.
#[test]
fn readme_r2lab_recipe_links_pxe_power_cycles_and_checks_the_lease() {
    let readme = include_str!("../README.md");
    let section = &readme[readme
        .find("\n## R2LAB")
        .expect("README has an R2LAB section")..];
    let start = section.find("```toml\n").unwrap() + "```toml\n".len();
    let recipe = &section[start..start + section[start..].find("```").unwrap()];

    let rig = Rig::new(0);
    let dir = rig.dir();
    let tftp = dir.join("tftpboot/pxelinux.cfg");
    std::fs::create_dir_all(&tftp).unwrap();
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let calls = dir.join("calls.log");
    let fake = |name: &str, body: &str| {
        let path = bin.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&path, perms).unwrap();
    };
    // The CMC: status answers "off"; each call is logged with the node's
    // pxelinux link as it is at that moment.
    fake(
        "curl",
        &format!(
            "url=$(for a; do :; done; echo $a)\n\
             echo \"$url $(readlink {}/01-02-00-00-00-03-01)\" >> {}\n\
             case $url in */status) echo off ;; *) echo ok ;; esac",
            tftp.display(),
            calls.display()
        ),
    );
    let lease = dir.join("lease");
    fake(
        "rhubarbe",
        &format!(
            "test \"$*\" = 'leases --check' || exit 9\n\
             test -e {} || {{ echo 'rhubarbe: no lease for you right now' >&2; exit 1; }}",
            lease.display()
        ),
    );
    let inventory = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/r2lab-inventory.json");
    let config = recipe
        .replace(
            "/etc/rhubarbe/inventory-nodes.json",
            &inventory.display().to_string(),
        )
        .replace("/tftpboot/pxelinux.cfg", &tftp.display().to_string());
    let targets = dir.join("targets");
    let cfg = layer(
        &rig,
        "r2lab.conf",
        &format!(
            "{config}\n[[node]]\nname = \"fit01\"\nlocal = true\ntarget = \"{}/{{name}}.img\"\n",
            targets.display()
        ),
    );
    let mut image = vec![0u8; 2 << 20];
    fastrand::Rng::with_seed(9).fill(&mut image[..1 << 20]);
    std::fs::write(dir.join("images/lab.img"), &image).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    // No lease: refused, nothing touched.
    let out = imaging(&rig, &cfg)
        .env("PATH", &path)
        .args(["load", "-i", "lab.img", "fit01"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no lease for you right now"), "{err}");
    assert!(!calls.exists(), "a CMC was called");
    assert_eq!(std::fs::read_dir(&tftp).unwrap().count(), 0);

    // With the lease: link, status (off) → on, load, link removed, reset.
    std::fs::write(&lease, "").unwrap();
    let out = imaging(&rig, &cfg)
        .env("PATH", &path)
        .args(["load", "--json", "-i", "lab.img", "fit01"])
        .output()
        .unwrap();
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(0), "{s}{}", stderr(&out));
    assert_same(&targets.join("fit01.img"), &image);
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap(),
        "http://192.168.1.1/status pxeimaging\n\
         http://192.168.1.1/on pxeimaging\n\
         http://192.168.1.1/reset \n"
    );
    assert_eq!(
        std::fs::read_dir(&tftp).unwrap().count(),
        0,
        "link left behind"
    );

    // The same file's [power] section.
    std::fs::remove_file(&calls).unwrap();
    let out = imaging(&rig, &cfg)
        .env("PATH", &path)
        .args(["power", "1", "4"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "fit01 off\nfit04 off\n");
    let called = std::fs::read_to_string(&calls).unwrap();
    assert!(called.contains("http://reboot04/status"), "{called}");
}

#[test]
fn ctrl_c_ends_a_power_run_and_its_commands() {
    let rig = Rig::new(0);
    let switch = write_switch(rig.dir());
    let cfg = layer(
        &rig,
        "power.conf",
        &format!(
            "[power]\non = \"{} {{name}} on\"\ntimeout = 60\n\n{}",
            switch.display(),
            four_nodes()
        ),
    );
    let started = Instant::now();
    let mut cmd = imaging(&rig, &cfg);
    cmd.args(["on", "fit03"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    common::die_with_test(&mut cmd);
    let child = cmd.spawn().unwrap();
    let pidfile = rig.dir().join("fit03.sleep");
    while !pidfile.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "fit03 never hung"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(sleep_ends(&pidfile), "sleep outlived the run by 2 s");
}

#[test]
fn a_hook_placeholder_a_node_lacks_is_refused_before_the_load() {
    let rig = Rig::new(0);
    std::fs::write(rig.dir().join("images/lab.img"), vec![1u8; 1 << 20]).unwrap();
    let marker = rig.dir().join("reset");
    let cfg = layer(
        &rig,
        "l.conf",
        &format!(
            "[load]\nchunk_size = 1048576\nbefore = \"echo {{cmc}} > {}\"\n\
             [[node]]\nname = \"local01\"\nlocal = true\ntarget = \"{}/t.img\"\n",
            marker.display(),
            rig.dir().display()
        ),
    );
    let out = imaging(&rig, &cfg)
        .args(["load", "-i", "lab.img", "local01"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("`[load] before`") && err.contains("{cmc}") && err.contains("local01"),
        "{err}"
    );
    assert!(!marker.exists() && !rig.dir().join("t.img").exists());
}
