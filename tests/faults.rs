//! Fault suite (issue 9): real sshd nodes on 127.0.0.1, the `imaging`
//! binary driven through its command line only.
//!
//! One test per defect of issue 9, named for the behaviour it pins, plus the
//! fault scenarios: sshd killed mid-load, agent SIGKILLed and SIGSTOPped,
//! a full filesystem, concurrent loads onto one node, garbage into the
//! agent, an interrupted save, a flooded relay port, the demo's defaults.
//!
//! Every child is bounded in time and killed (with its process group) when
//! the test ends, also when it fails.
//!
//! Defects (issue 9) and their tests:
//!  1 second_load_onto_a_held_target_fails_at_once_naming_the_holder,
//!    overlapping_loads_never_report_done_over_mixed_data
//!  2 demo_with_default_node_count_on_{local_agents,sshd_nodes}_succeeds
//!  3 huge_timeout_option_is_a_usage_error_not_a_panic,
//!    huge_timeout_in_any_config_section_is_a_usage_error_naming_the_key,
//!    huge_concurrency_is_a_usage_error_naming_the_key,
//!    huge_reconnect_wait_is_a_usage_error_and_hooks_stay_paired
//!  4 relay_ports_flooded_with_idle_connections_still_give_byte_exact_nodes,
//!    chain_member_its_predecessor_cannot_link_to_gets_its_data_from_the_controller,
//!    chain_member_whose_relink_fails_gets_its_data_from_the_controller
//!  5 empty_image_is_a_usage_error_and_leaves_the_target_alone
//!  6 missing_identity_file_…, unauthorised_key_…, wrong_user_…,
//!    unknown_host_key_with_strict_…, changed_host_key_…
//!  7 interrupted_save_…, two_saves_of_one_name_at_once_…
//!  8 star_load_does_not_wait_for_the_deadline_on_a_stopped_agent
//!  9 duplicate_names_in_a_json_inventory_are_a_usage_error_naming_them
//! 10 target_inside_the_repository_is_refused,
//!    target_that_is_the_image_being_loaded_is_up_to_date_without_writing
//! 11 demo_into_a_pipe_closed_after_{2,8}_lines_…
//! 12 control_dir_of_a_sigkilled_run_is_removed_by_the_next_run
//! 13 verify_finds_a_zero_chunk_that_gained_data_under_a_matching_stamp
//!
//! And what fails for good fails at once (issue 8, one typed error per node):
//! missing_configured_agent_fails_at_once_naming_agent_path,
//! agent_of_another_protocol_version_fails_at_once_saying_so

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{Rig, assert_same, die_with_test, imaging, lines, node, summary, wait_for_data};

const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------
// helpers

/// An image of `mib` MiB: random data with a zero region in the middle
/// (a quarter of the image), seeded.
fn write_image(path: &Path, mib: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut data = vec![0u8; mib * MIB];
    let quarter = mib * MIB / 4;
    rng.fill(&mut data[..quarter]);
    rng.fill(&mut data[2 * quarter..]);
    std::fs::write(path, &data).unwrap();
    data
}

/// An extra config layer: 1 MiB chunks and `load_extra` in `[load]`, then
/// `tables` (other tables).
fn layer(rig: &Rig, name: &str, load_extra: &str, tables: &str) -> PathBuf {
    let path = rig.dir().join(name);
    std::fs::write(
        &path,
        format!("[load]\nchunk_size = 1048576\n{load_extra}\n{tables}\n"),
    )
    .unwrap();
    path
}

/// A running imaging process in its own process group, killed (group and
/// all) on drop; its output is collected by reader threads.
struct Proc {
    child: Option<Child>,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

fn reader(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

fn spawn(cmd: &mut Command) -> Proc {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    die_with_test(cmd);
    let mut child = cmd.spawn().expect("spawn imaging");
    let stdout = child.stdout.take().map(reader);
    let stderr = child.stderr.take().map(reader);
    Proc {
        child: Some(child),
        stdout,
        stderr,
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Wait at most `secs` for the exit; past that, kill and panic.
    fn finish(mut self, secs: u64) -> Output {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let status = loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() >= deadline {
                break None;
            }
            thread::sleep(Duration::from_millis(50));
        };
        let Some(status) = status else {
            self.kill();
            let out = self.take_output();
            panic!(
                "imaging did not exit within {secs} s\nstdout (tail): {}\nstderr: {}",
                tail(&out.0, 3000),
                String::from_utf8_lossy(&out.1)
            );
        };
        // The group may still hold ssh children holding the pipes.
        kill_group(self.pid());
        let (stdout, stderr) = self.take_output();
        self.child = None;
        Output {
            status,
            stdout,
            stderr,
        }
    }

    fn take_output(&mut self) -> (Vec<u8>, Vec<u8>) {
        let join =
            |h: Option<JoinHandle<Vec<u8>>>| h.map(|h| h.join().unwrap()).unwrap_or_default();
        (join(self.stdout.take()), join(self.stderr.take()))
    }

    fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_group(child.id());
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn kill_group(pgid: u32) {
    // SAFETY: signalling a process group this test created.
    unsafe { libc::kill(-(pgid as i32), libc::SIGKILL) };
}

fn tail(bytes: &[u8], n: usize) -> String {
    let s = String::from_utf8_lossy(bytes);
    let start = s.len().saturating_sub(n);
    let start = (start..s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        tail(&out.stdout, 4000),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run to the end (at most `secs`), timed.
fn run(cmd: &mut Command, secs: u64) -> (Output, Duration) {
    let started = Instant::now();
    let out = spawn(cmd).finish(secs);
    (out, started.elapsed())
}

/// Parent pid of every process.
fn parents() -> std::collections::HashMap<u32, u32> {
    let mut map = std::collections::HashMap::new();
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
            map.insert(pid, ppid);
        }
    }
    map
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}

/// Pids of `root`'s descendants whose command line contains `needle`.
fn descendants(root: u32, needle: &str) -> Vec<u32> {
    let parent = parents();
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
        .filter(|&pid| cmdline(pid).contains(needle))
        .collect()
}

/// Every live process (not a zombie) whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, r)| r.trim_start().starts_with('Z'))
                })
                == Some(false)
        })
        .map(|pid| (pid, cmdline(pid)))
        .filter(|(_, c)| c.contains(needle))
        .collect()
}

/// The agents running under node `i`'s sshd, waiting (bounded) until one
/// shows up.
fn agents_of(rig: &Rig, i: usize, secs: u64) -> Vec<u32> {
    let sshd = rig.nodes()[i].pid().unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let found = descendants(sshd, " agent");
        if !found.is_empty() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no agent under {}'s sshd within {secs} s",
            rig.nodes()[i].name
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn signal(pids: &[u32], sig: i32) {
    for &pid in pids {
        // SAFETY: signalling processes of this test's own rig.
        unsafe { libc::kill(pid as i32, sig) };
    }
}

fn state<'a>(s: &'a serde_json::Value, name: &str) -> &'a str {
    node(s, name)["state"].as_str().unwrap_or("")
}

fn error<'a>(s: &'a serde_json::Value, name: &str) -> &'a str {
    node(s, name)["error"].as_str().unwrap_or("")
}

fn not_a_panic(out: &Output) {
    assert_ne!(out.status.code(), Some(101), "panicked:\n{}", text(out));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "panicked:\n{}",
        text(out)
    );
}

fn usage_error_naming(out: &Output, names: &[&str]) {
    not_a_panic(out);
    assert_eq!(out.status.code(), Some(2), "{}", text(out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        names.iter().any(|n| err.contains(n)),
        "the error names none of {names:?}:\n{}",
        text(out)
    );
}

/// Like [`usage_error_naming`], as a message instead of a panic (to check
/// several cases in one test and report them all).
fn check_usage_error(what: &str, out: &Output, names: &[&str]) -> Option<String> {
    let err = String::from_utf8_lossy(&out.stderr);
    let named = names.iter().any(|n| err.contains(n));
    let ok = out.status.code() == Some(2) && !err.contains("panicked") && named;
    (!ok).then(|| {
        let first = err
            .lines()
            .find(|l| l.contains("Message:") || l.contains("error"))
            .unwrap_or("");
        format!(
            "{what}: exit {:?}, names {names:?}: {named}; {first}",
            out.status.code()
        )
    })
}

fn repo_files(rig: &Rig) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(rig.dir().join("images"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// 1. two loads onto one node

#[test]
fn second_load_onto_a_held_target_fails_at_once_naming_the_holder() {
    let rig = Rig::new(1);
    let a = write_image(&rig.dir().join("images/A.img"), 24, 1);
    write_image(&rig.dir().join("images/B.img"), 24, 2);
    let cfg = layer(&rig, "c.conf", "fanout = \"star\"", "");
    // 18 MiB of data at 1 MiB/s: about 18 s, so the second run (which
    // first builds B's manifest and digests its own executable) surely
    // reaches the node while the first still writes, also on a busy machine.
    let first = spawn(imaging(&rig, &cfg).args([
        "load", "--json", "-t", "120", "-b", "1M", "-i", "A.img", "1",
    ]));
    wait_for_data(&rig.nodes()[0].target);
    // The holder may be named by the controller's pid or by its agent's
    // pid on the node (the agent takes the lock): either will do.
    let mut holders = agents_of(&rig, 0, 20);
    holders.push(first.pid());
    thread::sleep(Duration::from_millis(500));
    let (out, took) = run(
        imaging(&rig, &cfg).args(["load", "--json", "-t", "120", "-i", "B.img", "1"]),
        150,
    );
    let first = first.finish(150);
    not_a_panic(&out);
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(1), "second run: {}", text(&out));
    assert_eq!(state(&s, "node01"), "failed", "{s}");
    let why = error(&s, "node01");
    assert!(
        holders.iter().any(|p| why.contains(&p.to_string())),
        "the reason names none of the holder's pids {holders:?}: {why}"
    );
    assert!(took < Duration::from_secs(20), "took {took:?} to fail");
    let s1 = summary(&first);
    assert_eq!(first.status.code(), Some(0), "first run: {}", text(&first));
    assert_eq!(state(&s1, "node01"), "done", "{s1}");
    assert_same(&rig.nodes()[0].target, &a);
    // A later load of A is right to call the node up to date only if it is.
    let (out, _) = run(
        imaging(&rig, &cfg).args(["load", "--json", "-t", "120", "-i", "A.img", "1"]),
        150,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_same(&rig.nodes()[0].target, &a);
}

/// Defect 1 without depending on the lock's wording: two overlapping loads
/// must not both report `done` over a target that is neither image, and a
/// later load of A must leave A (no stamp over mixed data).
#[test]
fn overlapping_loads_never_report_done_over_mixed_data() {
    let rig = Rig::new(1);
    let a = write_image(&rig.dir().join("images/A.img"), 24, 3);
    write_image(&rig.dir().join("images/B.img"), 24, 4);
    // A is capped (18 MiB of data at 1 MiB/s, long enough that B surely
    // overlaps it on a busy machine), B is not: B ends first.
    let cfg = layer(&rig, "c.conf", "fanout = \"star\"", "");
    let first = spawn(imaging(&rig, &cfg).args([
        "load", "--json", "-t", "120", "-b", "1M", "-i", "A.img", "1",
    ]));
    wait_for_data(&rig.nodes()[0].target);
    thread::sleep(Duration::from_millis(1500));
    let (second, _) = run(
        imaging(&rig, &cfg).args(["load", "--json", "-t", "120", "-i", "B.img", "1"]),
        150,
    );
    let first = first.finish(150);
    not_a_panic(&first);
    not_a_panic(&second);
    let b = std::fs::read(rig.dir().join("images/B.img")).unwrap();
    let now = std::fs::read(&rig.nodes()[0].target).unwrap();
    let (s1, s2) = (summary(&first), summary(&second));
    let which = if now == a {
        "A"
    } else if now == b {
        "B"
    } else {
        "neither A nor B"
    };
    let (d1, d2) = (
        state(&s1, "node01") == "done",
        state(&s2, "node01") == "done",
    );
    assert!(
        !(d1 && d2),
        "both runs report done; the target holds {which}\nfirst (A): {s1}\nsecond (B): {s2}"
    );
    assert!(
        !d1 || which == "A",
        "A reports done, the target holds {which}"
    );
    assert!(
        !d2 || which == "B",
        "B reports done, the target holds {which}"
    );
    let (out, _) = run(
        imaging(&rig, &cfg).args(["load", "--json", "-t", "120", "-i", "A.img", "1"]),
        150,
    );
    let s = summary(&out);
    eprintln!(
        "first: {}\nsecond: {}\nthird: {s}",
        summary(&first),
        summary(&second)
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let got = std::fs::read(&rig.nodes()[0].target).unwrap();
    assert!(
        got == a,
        "after `load -i A` the target is not A (state {}, bytes_sent {}); first run: {}; second run: {}",
        state(&s, "node01"),
        node(&s, "node01")["bytes_sent"],
        summary(&first),
        summary(&second)
    );
}

// ---------------------------------------------------------------------------
// 2. the demo with its defaults

/// Demos print their temp dir and run many processes: one at a time.
static DEMO: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn demo_cmd(home: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imaging"));
    // Default node count (8: the relay chain) and bandwidth; a small image
    // keeps the suite fast.
    cmd.args(["demo", "--size", "48M"])
        .args(extra)
        .env("HOME", home)
        .env("XDG_STATE_HOME", home.join("state"))
        .env("XDG_RUNTIME_DIR", home.join("run"))
        .env("NO_COLOR", "1")
        .env_remove("IMAGING_CONFIG")
        .env_remove("NODES");
    cmd
}

/// `--local` is what a machine without sshd gets: the README's first
/// command must pass there with its defaults (8 nodes, hence a chain).
#[test]
fn demo_with_default_node_count_on_local_agents_succeeds() {
    let _one = DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let home = tempfile::tempdir().unwrap();
    let (out, took) = run(&mut demo_cmd(home.path(), &["--local"]), 240);
    eprintln!("demo --local: {took:?}");
    not_a_panic(&out);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("load: all 8 nodes succeeded"), "{all}");
    assert!(!all.contains("failed to lookup address"), "{all}");
}

#[test]
fn demo_with_default_node_count_on_sshd_nodes_succeeds() {
    let _one = DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let home = tempfile::tempdir().unwrap();
    let (out, took) = run(&mut demo_cmd(home.path(), &[]), 240);
    eprintln!("demo: {took:?}");
    not_a_panic(&out);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("load: all 8 nodes succeeded"), "{all}");
}

// ---------------------------------------------------------------------------
// 3. numbers out of range are usage errors, never panics

#[test]
fn huge_timeout_option_is_a_usage_error_not_a_panic() {
    let rig = Rig::new(1);
    write_image(&rig.dir().join("images/lab.img"), 4, 5);
    std::fs::write(&rig.nodes()[0].target, vec![7u8; MIB]).unwrap();
    let mut wrong = Vec::new();
    for args in [
        &["load", "-t", "1e19", "-i", "lab.img", "1"][..],
        &["save", "-t", "1e19", "1", "-o", "huge"][..],
        &["wait", "-t", "1e19", "1"][..],
    ] {
        let (out, _) = run(rig.imaging().args(args), 60);
        wrong.extend(check_usage_error(args[0], &out, &["-t", "timeout"]));
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn huge_timeout_in_any_config_section_is_a_usage_error_naming_the_key() {
    let rig = Rig::new(1);
    write_image(&rig.dir().join("images/lab.img"), 4, 6);
    std::fs::write(&rig.nodes()[0].target, vec![7u8; MIB]).unwrap();
    let max = i64::MAX;
    let mut wrong = Vec::new();
    for (section, args) in [
        ("load", &["load", "-i", "lab.img", "1"][..]),
        ("save", &["save", "1", "-o", "huge"][..]),
        ("wait", &["wait", "1"][..]),
    ] {
        let cfg = rig.dir().join(format!("{section}.conf"));
        std::fs::write(&cfg, format!("[{section}]\ntimeout = {max}\n")).unwrap();
        let (out, _) = run(imaging(&rig, &cfg).args(args), 60);
        wrong.extend(check_usage_error(
            section,
            &out,
            &[&format!("{section}.timeout")],
        ));
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn huge_concurrency_is_a_usage_error_naming_the_key() {
    let rig = Rig::new(1);
    write_image(&rig.dir().join("images/lab.img"), 4, 7);
    let cfg = rig.dir().join("conc.conf");
    std::fs::write(&cfg, format!("[load]\nconcurrency = {}\n", i64::MAX)).unwrap();
    let (out, _) = run(imaging(&rig, &cfg).args(["load", "-i", "lab.img", "1"]), 60);
    usage_error_naming(&out, &["load.concurrency"]);
}

/// The issue's repro: the panic comes when a dropped connection is retried
/// (here: node01's sshd killed mid-load and restarted). Until the value is
/// refused up front, the run must not panic, must run every `after` hook
/// whose `before` ran, and must report only contract states.
#[test]
fn huge_reconnect_wait_is_a_usage_error_and_hooks_stay_paired() {
    let mut rig = Rig::new(2);
    write_image(&rig.dir().join("images/lab.img"), 16, 8);
    let log = rig.dir().join("hooks.log");
    let cfg = layer(
        &rig,
        "rw.conf",
        &format!(
            "fanout = \"star\"\nreconnect_wait = {}\nbefore = \"echo before {{name}} >> {1}\"\nafter = \"echo after {{name}} >> {1}\"\n",
            i64::MAX,
            log.display()
        ),
        "",
    );
    let mut load = spawn(imaging(&rig, &cfg).args([
        "load", "--json", "-t", "60", "-b", "3M", "-i", "lab.img", "1-2",
    ]));
    // Data reaching node01, or the run ending (refused up front).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut running = true;
    while Instant::now() < deadline {
        if load.child.as_mut().unwrap().try_wait().unwrap().is_some() {
            running = false;
            break;
        }
        let blocks = std::fs::metadata(&rig.nodes()[0].target)
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m))
            .unwrap_or(0);
        if blocks > 0 {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    if running {
        rig.kill(0);
        thread::sleep(Duration::from_secs(1));
        rig.start(0);
    }
    let out = load.finish(90);
    not_a_panic(&out);
    let hooks = std::fs::read_to_string(&log).unwrap_or_default();
    for n in rig.nodes() {
        assert_eq!(
            hooks.matches(&format!("before {}\n", n.name)).count(),
            hooks.matches(&format!("after {}\n", n.name)).count(),
            "{}: a before hook ran without its after hook: {hooks}\n{}",
            n.name,
            text(&out)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    if let Ok(s) = serde_json::from_str::<serde_json::Value>(last) {
        for n in s["nodes"].as_array().into_iter().flatten() {
            let st = n["state"].as_str().unwrap_or("");
            assert!(
                ["done", "up-to-date", "failed", "timeout", "cancelled"].contains(&st),
                "not a contract state: {s}"
            );
        }
    }
    usage_error_naming(&out, &["reconnect_wait"]);
}

// ---------------------------------------------------------------------------
// 5. an empty image

#[test]
fn empty_image_is_a_usage_error_and_leaves_the_target_alone() {
    let rig = Rig::new(1);
    std::fs::write(rig.dir().join("images/empty.img"), b"").unwrap();
    let before = vec![0x5Au8; 2 * MIB];
    std::fs::write(&rig.nodes()[0].target, &before).unwrap();
    let (out, _) = run(
        rig.imaging()
            .args(["load", "--json", "-t", "60", "-i", "empty.img", "1"]),
        90,
    );
    let target = std::fs::read(&rig.nodes()[0].target).unwrap();
    assert!(
        target == before,
        "the target was touched: now {} bytes",
        target.len()
    );
    usage_error_naming(&out, &["empty.img"]);
}

// ---------------------------------------------------------------------------
// 6. permanent SSH failures fail at once

/// A load with `ssh_table` replacing the rig's `[ssh]` keys; fails at once.
fn permanent_ssh_failure(rig: &Rig, ssh_table: &str) -> (Output, Duration, serde_json::Value) {
    write_image(&rig.dir().join("images/lab.img"), 4, 9);
    let cfg = rig.dir().join("ssh.conf");
    std::fs::write(&cfg, format!("[ssh]\n{ssh_table}\n")).unwrap();
    let (out, took) = run(
        imaging(rig, &cfg).args(["load", "--json", "-t", "45", "-i", "lab.img", "1"]),
        75,
    );
    not_a_panic(&out);
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(state(&s, "node01"), "failed", "{s}");
    assert!(took < Duration::from_secs(20), "took {took:?}: {s}");
    (out, took, s)
}

#[test]
fn missing_identity_file_is_a_usage_error_before_anything_starts() {
    // Today this waits for the deadline: keep it short.
    let rig = Rig::new(1);
    write_image(&rig.dir().join("images/lab.img"), 4, 10);
    let missing = rig.dir().join("no-such-key");
    let log = rig.dir().join("hooks.log");
    let cfg = rig.dir().join("id.conf");
    std::fs::write(
        &cfg,
        format!(
            "[ssh]\nidentity_file = \"{}\"\n[load]\nbefore = \"echo before >> {1}\"\nafter = \"echo after >> {1}\"\n",
            missing.display(),
            log.display()
        ),
    )
    .unwrap();
    let (out, took) = run(
        imaging(&rig, &cfg).args(["load", "--json", "-t", "40", "-i", "lab.img", "1"]),
        70,
    );
    eprintln!("took {took:?}");
    assert!(!log.exists(), "a hook ran");
    usage_error_naming(&out, &["no-such-key"]);
}

#[test]
fn unauthorised_key_fails_at_once_naming_user_and_key() {
    let rig = Rig::new(1);
    let other = rig.dir().join("other_key");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .status()
        .unwrap();
    assert!(st.success());
    let (_, _, s) =
        permanent_ssh_failure(&rig, &format!("identity_file = \"{}\"", other.display()));
    let why = error(&s, "node01");
    assert!(why.contains("root"), "no user in: {why}");
    assert!(why.contains("other_key"), "no key path in: {why}");
}

#[test]
fn wrong_user_fails_at_once_naming_the_user() {
    let rig = Rig::new(1);
    let (_, _, s) = permanent_ssh_failure(&rig, "user = \"nosuchuser\"");
    let why = error(&s, "node01");
    assert!(why.contains("nosuchuser"), "no user in: {why}");
}

#[test]
fn unknown_host_key_with_strict_fails_at_once_naming_known_hosts() {
    let rig = Rig::new(1);
    let empty = rig.dir().join("empty_known_hosts");
    std::fs::write(&empty, "").unwrap();
    let (_, _, s) = permanent_ssh_failure(
        &rig,
        &format!(
            "known_hosts = \"strict\"\nknown_hosts_file = \"{}\"",
            empty.display()
        ),
    );
    let why = error(&s, "node01");
    assert!(
        why.contains("empty_known_hosts"),
        "no known_hosts file in: {why}"
    );
}

#[test]
fn changed_host_key_fails_at_once_saying_changed_and_hinting_ssh_keygen_r() {
    let rig = Rig::new(1);
    let key = rig.dir().join("impostor");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let pubkey = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let mut f = pubkey.split_whitespace();
    let kh = rig.dir().join("changed_known_hosts");
    std::fs::write(
        &kh,
        format!(
            "[127.0.0.1]:{} {} {}\n",
            rig.nodes()[0].port,
            f.next().unwrap(),
            f.next().unwrap()
        ),
    )
    .unwrap();
    let (_, _, s) = permanent_ssh_failure(
        &rig,
        &format!(
            "known_hosts = \"accept-new\"\nknown_hosts_file = \"{}\"",
            kh.display()
        ),
    );
    let why = error(&s, "node01");
    assert!(why.to_lowercase().contains("changed"), "{why}");
    assert!(!why.to_lowercase().contains("unknown"), "{why}");
    assert!(why.contains("ssh-keygen -R"), "{why}");
    assert!(why.contains("changed_known_hosts"), "{why}");
}

// ---------------------------------------------------------------------------
// 7. save leftovers

/// Start a save and SIGKILL it as soon as its partial file exists.
fn kill_save_once_partial(rig: &Rig, cfg: &Path, name: &str) {
    let mut save = spawn(imaging(rig, cfg).args(["save", "1", "-o", name]));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if repo_files(rig).iter().any(|f| f.ends_with(".partial")) {
            break;
        }
        assert!(Instant::now() < deadline, "no partial within 30 s");
        thread::sleep(Duration::from_millis(5));
    }
    save.kill();
}

#[test]
fn interrupted_save_lists_nothing_and_the_next_run_removes_its_partial() {
    let rig = Rig::new(1);
    let image = write_image(&rig.nodes()[0].target, 32, 11);
    let cfg = layer(&rig, "s.conf", "", "");
    kill_save_once_partial(&rig, &cfg, "golden");
    let (out, _) = run(imaging(&rig, &cfg).args(["list", "--json"]), 30);
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "{}",
        text(&out)
    );
    // A retry with the same name, in the same minute as likely as not.
    let (out, _) = run(
        imaging(&rig, &cfg).args(["save", "--json", "-t", "90", "1", "-o", "golden"]),
        120,
    );
    not_a_panic(&out);
    assert_eq!(out.status.code(), Some(0), "retry: {}", text(&out));
    let files = repo_files(&rig);
    assert!(
        files.iter().all(|f| !f.ends_with(".partial")),
        "partials left: {files:?}"
    );
    let saved: Vec<&String> = files
        .iter()
        .filter(|f| f.starts_with("saving__") && f.ends_with(".img"))
        .collect();
    assert_eq!(saved.len(), 1, "{files:?}");
    assert_same(&rig.dir().join("images").join(saved[0]), &image);
}

#[test]
fn two_saves_of_one_name_at_once_both_succeed_with_distinct_names() {
    let rig = Rig::new(1);
    let image = write_image(&rig.nodes()[0].target, 32, 12);
    let cfg = layer(&rig, "s.conf", "", "");
    let a = spawn(imaging(&rig, &cfg).args(["save", "--json", "-t", "90", "1", "-o", "twin"]));
    let b = spawn(imaging(&rig, &cfg).args(["save", "--json", "-t", "90", "1", "-o", "twin"]));
    let (a, b) = (a.finish(120), b.finish(120));
    not_a_panic(&a);
    not_a_panic(&b);
    assert_eq!(a.status.code(), Some(0), "first: {}", text(&a));
    assert_eq!(b.status.code(), Some(0), "second: {}", text(&b));
    let files = repo_files(&rig);
    let saved: Vec<&String> = files
        .iter()
        .filter(|f| f.starts_with("saving__") && f.ends_with(".img"))
        .collect();
    assert_eq!(saved.len(), 2, "{files:?}");
    for f in saved {
        assert_same(&rig.dir().join("images").join(f), &image);
    }
    assert!(files.iter().all(|f| !f.ends_with(".partial")), "{files:?}");
}

// ---------------------------------------------------------------------------
// 8. stall detection in star loads (agent SIGSTOPped)

#[test]
fn star_load_does_not_wait_for_the_deadline_on_a_stopped_agent() {
    let rig = Rig::new(2);
    let image = write_image(&rig.dir().join("images/lab.img"), 24, 13);
    let cfg = layer(
        &rig,
        "st.conf",
        "fanout = \"star\"\nretries = 2\nreconnect_wait = 10",
        "",
    );
    let started = Instant::now();
    let load = spawn(imaging(&rig, &cfg).args([
        "load", "--json", "-t", "120", "-b", "4M", "-i", "lab.img", "1-2",
    ]));
    wait_for_data(&rig.nodes()[0].target);
    let stopped = agents_of(&rig, 0, 20);
    signal(&stopped, libc::SIGSTOP);
    let out = load.finish(200);
    let took = started.elapsed();
    signal(&stopped, libc::SIGKILL);
    not_a_panic(&out);
    let s = summary(&out);
    assert_eq!(state(&s, "node02"), "done", "{s}");
    assert_same(&rig.nodes()[1].target, &image);
    let st = state(&s, "node01");
    assert!(
        st == "failed" || st == "done",
        "node01 {st} (a stopped agent must be failed or retried): {s}"
    );
    if st == "done" {
        assert_same(&rig.nodes()[0].target, &image);
    }
    assert!(
        took < Duration::from_secs(80),
        "the run took {took:?} with a 120 s deadline: {s}"
    );
}

// ---------------------------------------------------------------------------
// 9. duplicate names in an R2LAB inventory

#[test]
fn duplicate_names_in_a_json_inventory_are_a_usage_error_naming_them() {
    let rig = Rig::new_stopped(0);
    let inv = rig.dir().join("inventory.json");
    std::fs::write(
        &inv,
        r#"[
  {"control": {"hostname": "fit01", "ip": "192.168.3.1", "mac": "00:03:1d:0e:03:01"}},
  {"control": {"hostname": "fit02", "ip": "192.168.3.2", "mac": "00:03:1d:0e:03:02"}},
  {"control": {"hostname": "fit01", "ip": "192.168.3.3", "mac": "00:03:1d:0e:03:03"}}
]"#,
    )
    .unwrap();
    rig.write_config(&format!("inventory = \"{}\"\n", inv.display()));
    let (out, _) = run(rig.imaging().args(["nodes", "1-3"]), 30);
    usage_error_naming(&out, &["fit01"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("192.168.3.1") && err.contains("192.168.3.3")
            || err.matches("fit01").count() >= 2,
        "both entries should be named: {err}"
    );
}

// ---------------------------------------------------------------------------
// 10. a target inside the repository

#[test]
fn target_inside_the_repository_is_refused() {
    let rig = Rig::new(1);
    let r = write_image(&rig.dir().join("images/r.img"), 4, 14);
    write_image(&rig.dir().join("images/other.img"), 4, 15);
    let cfg = layer(
        &rig,
        "t.conf",
        &format!("target = \"{}\"", rig.dir().join("images/r.img").display()),
        "",
    );
    let (out, _) = run(
        imaging(&rig, &cfg).args(["load", "--json", "-t", "60", "-i", "other.img", "1"]),
        90,
    );
    assert!(
        std::fs::read(rig.dir().join("images/r.img")).unwrap() == r,
        "r.img in the repository was overwritten: {}",
        text(&out)
    );
    usage_error_naming(&out, &["r.img"]);
}

#[test]
fn target_that_is_the_image_being_loaded_is_up_to_date_without_writing() {
    let rig = Rig::new(1);
    let path = rig.dir().join("images/r.img");
    let r = write_image(&path, 4, 16);
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let cfg = layer(
        &rig,
        "t.conf",
        &format!("target = \"{}\"", path.display()),
        "",
    );
    let (out, _) = run(
        imaging(&rig, &cfg).args(["load", "--json", "-t", "60", "-i", "r.img", "1"]),
        90,
    );
    not_a_panic(&out);
    assert!(std::fs::read(&path).unwrap() == r, "r.img changed");
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(state(&s, "node01"), "up-to-date", "{s}");
    assert_eq!(node(&s, "node01")["bytes_written"], 0, "{s}");
    assert_eq!(
        std::fs::metadata(&path).unwrap().modified().unwrap(),
        mtime,
        "r.img was written"
    );
}

// ---------------------------------------------------------------------------
// 11. a closed stdout

/// Run the demo into a reader that closes after `keep` lines; the demo must
/// end cleanly and leave no process and no temp dir behind.
fn demo_into_a_closed_pipe(keep: usize) {
    let _one = DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let home = tempfile::tempdir().unwrap();
    let mut cmd = demo_cmd(home.path(), &["--nodes", "3"]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    die_with_test(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let pid = child.id();
    let stderr = child.stderr.take().map(reader);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = Vec::new();
    for _ in 0..keep {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        seen.push(line);
    }
    drop(out); // the reader goes away, as `head` does
    // "demo: generating a 48 MiB disk image in <its temp dir>/images/demo.img"
    let dir = seen
        .first()
        .and_then(|l| l.split_whitespace().find(|w| w.contains("imaging-demo-")))
        .and_then(|w| w.split("/images/").next())
        .map(str::to_string);
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() >= deadline {
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let cleanup = |dir: &Option<String>| {
        kill_group(pid);
        if let Some(d) = dir {
            for (p, _) in processes_with(d) {
                signal(&[p], libc::SIGKILL);
            }
            thread::sleep(Duration::from_millis(200));
            let _ = std::fs::remove_dir_all(d);
        }
    };
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        cleanup(&dir);
        panic!("the demo did not end within 120 s of its reader closing");
    };
    thread::sleep(Duration::from_secs(2));
    let left = dir.as_ref().map(|d| processes_with(d)).unwrap_or_default();
    let dir_left = dir.as_ref().is_some_and(|d| Path::new(d).exists());
    cleanup(&dir);
    let err = stderr.map(|h| h.join().unwrap()).unwrap_or_default();
    let err = String::from_utf8_lossy(&err);
    assert!(dir.is_some(), "no temp dir in the first line: {seen:?}");
    assert_ne!(status.code(), Some(101), "panicked: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(left.is_empty(), "processes left behind: {left:?}");
    assert!(!dir_left, "temp dir {dir:?} left behind");
}

#[test]
fn demo_into_a_pipe_closed_after_2_lines_ends_cleanly() {
    demo_into_a_closed_pipe(2);
}

#[test]
fn demo_into_a_pipe_closed_after_8_lines_leaves_no_process_or_temp_dir() {
    demo_into_a_closed_pipe(8);
}

// ---------------------------------------------------------------------------
// 12. stale control-socket dirs

#[test]
fn control_dir_of_a_sigkilled_run_is_removed_by_the_next_run() {
    let rig = Rig::new(1);
    write_image(&rig.dir().join("images/lab.img"), 16, 17);
    let cfg = layer(&rig, "k.conf", "fanout = \"star\"", "");
    let runtime = rig.dir().join("xdg/runtime/imaging");
    let mut load =
        spawn(imaging(&rig, &cfg).args(["load", "-t", "120", "-b", "2M", "-i", "lab.img", "1"]));
    wait_for_data(&rig.nodes()[0].target);
    // SIGKILL the controller alone (not its ssh children), as a crash would.
    signal(&[load.pid()], libc::SIGKILL);
    let _ = load.child.as_mut().unwrap().wait();
    let stale: Vec<String> = std::fs::read_dir(&runtime)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    drop(load);
    assert!(
        !stale.is_empty(),
        "the killed run left no control dir in the runtime dir (repro failed)"
    );
    let (out, _) = run(imaging(&rig, &cfg).args(["wait", "-t", "30", "1"]), 60);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let after: Vec<String> = std::fs::read_dir(&runtime)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let kept: Vec<&String> = after.iter().filter(|e| stale.contains(e)).collect();
    assert!(kept.is_empty(), "stale control dirs kept: {kept:?}");
}

// ---------------------------------------------------------------------------
// 13. --verify

#[test]
fn verify_finds_a_zero_chunk_that_gained_data_under_a_matching_stamp() {
    let rig = Rig::new(1);
    let image = write_image(&rig.dir().join("images/lab.img"), 8, 18);
    let cfg = layer(&rig, "v.conf", "fanout = \"star\"", "");
    let (out, _) = run(
        imaging(&rig, &cfg).args(["load", "--json", "-t", "60", "-i", "lab.img", "1"]),
        90,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let target = &rig.nodes()[0].target;
    // Chunk 2 (bytes 2..4 MiB are the zero quarter) gains data; mtime restored.
    {
        use std::os::unix::fs::FileExt;
        let meta = std::fs::metadata(target).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(target)
            .unwrap();
        f.write_all_at(&[0xEE; 512], 2 * MIB as u64 + 100).unwrap();
        f.sync_all().unwrap();
        f.set_times(
            std::fs::FileTimes::new()
                .set_modified(meta.modified().unwrap())
                .set_accessed(meta.accessed().unwrap()),
        )
        .unwrap();
    }
    let (out, _) = run(
        imaging(&rig, &cfg).args([
            "load", "--json", "--verify", "-t", "60", "-i", "lab.img", "1",
        ]),
        90,
    );
    not_a_panic(&out);
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(state(&s, "node01"), "done", "{s}");
    assert_same(target, &image);
}

// ---------------------------------------------------------------------------
// scenarios

#[test]
fn sshd_killed_mid_load_and_restarted_finishes_byte_exact_resending_under_10_percent() {
    let mut rig = Rig::new(1);
    let image = write_image(&rig.dir().join("images/lab.img"), 32, 19);
    let data = (image.len() * 3 / 4) as u64; // 24 MiB of data
    let cfg = layer(
        &rig,
        "r.conf",
        "fanout = \"star\"\nretries = 3\nreconnect_wait = 20",
        "",
    );
    let load = spawn(imaging(&rig, &cfg).args([
        "load", "--json", "-t", "120", "-b", "3M", "-i", "lab.img", "1",
    ]));
    wait_for_data(&rig.nodes()[0].target);
    thread::sleep(Duration::from_secs(3));
    rig.kill(0);
    thread::sleep(Duration::from_secs(1));
    rig.start(0);
    let out = load.finish(150);
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_same(&rig.nodes()[0].target, &image);
    let sent = node(&s, "node01")["bytes_sent"].as_u64().unwrap();
    assert!(
        sent <= data + data / 10,
        "sent {sent} bytes for {data} bytes of data (more than 10 % resent)"
    );
}

#[test]
fn sigkilled_agent_is_retried_and_the_load_finishes_byte_exact() {
    let rig = Rig::new(2);
    let image = write_image(&rig.dir().join("images/lab.img"), 24, 20);
    let cfg = layer(
        &rig,
        "a.conf",
        "fanout = \"star\"\nretries = 3\nreconnect_wait = 10",
        "",
    );
    let load = spawn(imaging(&rig, &cfg).args([
        "load", "--json", "-t", "120", "-b", "4M", "-i", "lab.img", "1-2",
    ]));
    wait_for_data(&rig.nodes()[0].target);
    signal(&agents_of(&rig, 0, 20), libc::SIGKILL);
    let out = load.finish(150);
    not_a_panic(&out);
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for n in rig.nodes() {
        assert_eq!(state(&s, &n.name), "done", "{s}");
        assert_same(&n.target, &image);
    }
}

/// A small tmpfs, unmounted on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn target_on_a_full_filesystem_fails_that_node_and_the_others_finish() {
    let rig = Rig::new(2);
    let image = write_image(&rig.dir().join("images/lab.img"), 16, 21);
    let small = rig.dir().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "imaging-faults"])
        .arg(&small)
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not allowed)");
        return;
    }
    let _mount = Mount(small.clone());
    let cfg = layer(
        &rig,
        "f.conf",
        "fanout = \"star\"",
        &format!(
            "[[node]]\nname = \"node01\"\naddress = \"127.0.0.1\"\nport = {}\ntarget = \"{}/t.img\"\n\
             [[node]]\nname = \"node02\"\naddress = \"127.0.0.1\"\nport = {}\n",
            rig.nodes()[0].port,
            small.display(),
            rig.nodes()[1].port
        ),
    );
    let (out, took) = run(
        imaging(&rig, &cfg).args(["load", "--json", "-t", "90", "-i", "lab.img", "1-2"]),
        120,
    );
    not_a_panic(&out);
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(state(&s, "node01"), "failed", "{s}");
    let why = error(&s, "node01").to_lowercase();
    assert!(why.contains("space"), "{why}");
    assert_eq!(state(&s, "node02"), "done", "{s}");
    assert_same(&rig.nodes()[1].target, &image);
    assert!(took < Duration::from_secs(60), "took {took:?}");
}

/// Peak resident memory of a process, in KiB.
fn vm_hwm(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn hello() -> Vec<u8> {
    let mut b = vec![1u8];
    b.extend_from_slice(b"IMAGING\0");
    b.extend_from_slice(&1u16.to_le_bytes());
    let build = b"faults";
    b.extend_from_slice(&(build.len() as u32).to_le_bytes());
    b.extend_from_slice(build);
    frame(&b)
}

#[test]
fn garbage_and_oversized_frames_into_the_agent_neither_panic_nor_balloon() {
    let bin = env!("CARGO_BIN_EXE_imaging");
    let mut rng = fastrand::Rng::with_seed(99);
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    cases.push(("length u32::MAX".into(), vec![0xff; 4]));
    // Declares the largest frame allowed (65 MiB) and sends 1 KiB of it.
    cases.push((
        "declared 65 MiB, sent 1 KiB".into(),
        [((65u32 << 20).to_le_bytes().to_vec()), vec![1u8; 1024]].concat(),
    ));
    // After a good Hello: every tag with random bodies and lying lengths.
    for tag in 0u8..=40 {
        let mut body = vec![tag];
        body.extend_from_slice(&[0xff, 0xff, 0xff, 0x7f]);
        body.extend((0..64).map(|_| rng.u8(..)));
        cases.push((
            format!("hello then tag {tag}"),
            [hello(), frame(&body)].concat(),
        ));
    }
    // LoadBegin claiming 2^31 digests.
    {
        let mut b = vec![10u8];
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(b"/x/y");
        b.extend_from_slice(&(1u64 << 40).to_le_bytes());
        b.extend_from_slice(&(1u32 << 20).to_le_bytes());
        b.extend_from_slice(&0u128.to_le_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&(1u32 << 31).to_le_bytes());
        cases.push((
            "LoadBegin with 2^31 digests".into(),
            [hello(), frame(&b)].concat(),
        ));
    }
    cases.push((
        "random stream".into(),
        (0..65536).map(|_| rng.u8(..)).collect(),
    ));
    for (what, input) in cases {
        let mut cmd = Command::new(bin);
        cmd.arg("agent")
            .env("HOME", std::env::temp_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_test(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let pid = child.id();
        let stdout = child.stdout.take().map(reader);
        let stderr = child.stderr.take().map(reader);
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(&input);
        let _ = stdin.flush();
        // Keep stdin open a moment: the agent must not wait on memory.
        thread::sleep(Duration::from_millis(200));
        let peak = vm_hwm(pid);
        drop(stdin);
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "{what}: the agent hangs");
            thread::sleep(Duration::from_millis(20));
        };
        let _ = stdout.map(|h| h.join());
        let err = stderr.map(|h| h.join().unwrap()).unwrap_or_default();
        let err = String::from_utf8_lossy(&err);
        assert_ne!(status.code(), Some(101), "{what}: {err}");
        assert!(
            status.code().is_some(),
            "{what}: killed by a signal {status:?}"
        );
        assert!(!err.contains("panicked"), "{what}: {err}");
        if let Some(kib) = peak {
            assert!(kib < 160 * 1024, "{what}: peak RSS {kib} KiB");
        }
    }
}

/// Holds up to `per_port` idle TCP connections on every port of a range,
/// reconnecting as the listeners close them, until dropped.
struct Flood {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<usize>>,
}

impl Flood {
    fn start(ports: std::ops::RangeInclusive<u16>, per_port: usize) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut held: Vec<Vec<TcpStream>> = ports.clone().map(|_| Vec::new()).collect();
                let mut most = 0;
                while !stop.load(Ordering::SeqCst) {
                    for (k, port) in ports.clone().enumerate() {
                        // Drop the ones the listener closed.
                        held[k].retain(|s| {
                            let _ = s.set_nonblocking(true);
                            let mut b = [0u8; 64];
                            !matches!((&*s).read(&mut b), Ok(0))
                        });
                        while held[k].len() < per_port {
                            match TcpStream::connect_timeout(
                                &([127, 0, 0, 1], port).into(),
                                Duration::from_millis(100),
                            ) {
                                Ok(s) => held[k].push(s),
                                Err(_) => break,
                            }
                        }
                        most = most.max(held[k].len());
                    }
                    thread::sleep(Duration::from_millis(20));
                }
                most
            })
        };
        Flood {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().map(|t| t.join().unwrap()).unwrap_or(0)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn relay_ports_flooded_with_idle_connections_still_give_byte_exact_nodes() {
    let rig = Rig::new(5);
    let image = write_image(&rig.dir().join("images/lab.img"), 24, 22);
    let base = 45000 + (std::process::id() % 4000) as u16 * 4;
    let ports = base..=base + 15;
    let cfg = layer(
        &rig,
        "fl.conf",
        &format!(
            "fanout = \"chain\"\nrelay_bind = \"127.0.0.1\"\nrelay_port_min = {base}\nrelay_port_max = {}\nretries = 2\nreconnect_wait = 5",
            base + 15
        ),
        "",
    );
    let flood = Flood::start(ports, 18);
    let load = spawn(imaging(&rig, &cfg).args([
        "load", "--json", "-t", "150", "-b", "4M", "-i", "lab.img", "1-5",
    ]));
    // Once node02 is receiving, kill its agent: its successors get relinked
    // while the relay ports are flooded.
    wait_for_data(&rig.nodes()[1].target);
    thread::sleep(Duration::from_secs(1));
    signal(&agents_of(&rig, 1, 20), libc::SIGKILL);
    let out = load.finish(200);
    let most = flood.stop();
    not_a_panic(&out);
    let s = summary(&out);
    assert!(
        most > 0,
        "the flood never got a connection in (repro failed)"
    );
    let refusals = lines(&out)
        .iter()
        .filter(|v| v["event"] == "log")
        .filter(|v| v["text"].as_str().unwrap_or("").contains("refused"))
        .count();
    eprintln!("{refusals} refusal log events; up to {most} idle connections held on a port");
    for (i, n) in rig.nodes().iter().enumerate() {
        if i == 1 {
            continue;
        }
        assert_eq!(state(&s, &n.name), "done", "{}: {s}", n.name);
        assert_same(&n.target, &image);
    }
    assert!(refusals <= 50, "{refusals} refusal log events");
}

/// The rig's `[[node]]` list again, with `data_address` set on some nodes
/// (a list in a higher layer replaces the rig's whole list).
fn nodes_with_data_address(rig: &Rig, data: &[(usize, &str)]) -> String {
    let mut text = String::new();
    for (i, n) in rig.nodes().iter().enumerate() {
        text.push_str(&format!(
            "[[node]]\nname = \"{}\"\naddress = \"127.0.0.1\"\nport = {}\n",
            n.name, n.port
        ));
        if let Some((_, a)) = data.iter().find(|(k, _)| *k == i) {
            text.push_str(&format!("data_address = \"{a}\"\n"));
        }
    }
    text
}

/// Log texts of a `--json` run.
fn log_texts(out: &Output) -> Vec<String> {
    lines(out)
        .iter()
        .filter(|v| v["event"] == "log")
        .map(|v| v["text"].as_str().unwrap_or("").to_string())
        .collect()
}

/// A chain member its predecessor cannot link to (its `data_address` does
/// not resolve) is not failed: it leaves the chain and gets its data
/// directly from the controller, byte-exact, and the chain goes on past it.
#[test]
fn chain_member_its_predecessor_cannot_link_to_gets_its_data_from_the_controller() {
    let rig = Rig::new(3);
    let image = write_image(&rig.dir().join("images/lab.img"), 16, 41);
    let cfg = layer(
        &rig,
        "unlinkable.conf",
        "fanout = \"chain\"\nrelay_bind = \"127.0.0.1\"",
        &nodes_with_data_address(&rig, &[(1, "relay.invalid")]),
    );
    let (out, _) = run(
        imaging(&rig, &cfg).args(["load", "--json", "-t", "120", "-i", "lab.img", "1-3"]),
        150,
    );
    not_a_panic(&out);
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for n in rig.nodes() {
        assert_eq!(state(&s, &n.name), "done", "{}: {s}", n.name);
        assert_same(&n.target, &image);
    }
    let logs = log_texts(&out);
    assert!(
        logs.iter().any(|l| l
            .starts_with("node02: out of the relay chain (node01 could not forward to it")
            && l.contains("relay.invalid")
            && l.ends_with("it gets its data directly from the controller")),
        "{logs:#?}"
    );
    assert!(
        logs.iter()
            .any(|l| l.contains("catching up on") && l.starts_with("node02")),
        "{logs:#?}"
    );
}

/// Like `reader`, and each stdout line also goes to `lines` as it comes.
fn line_reader(
    r: impl Read + Send + 'static,
    lines: std::sync::mpsc::Sender<String>,
) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        for line in BufReader::new(r).split(b'\n') {
            let Ok(line) = line else { break };
            let _ = lines.send(String::from_utf8_lossy(&line).into_owned());
            buf.extend_from_slice(&line);
            buf.push(b'\n');
        }
        buf
    })
}

/// A relink that fails (here: after node02 is killed, node01 is relinked to
/// node03, whose agent is stopped, so the handshake times out) sends node03
/// its data directly from the controller: node03 ends `done`, byte-exact.
#[test]
fn chain_member_whose_relink_fails_gets_its_data_from_the_controller() {
    let rig = Rig::new(4);
    let image = write_image(&rig.dir().join("images/lab.img"), 32, 43);
    let cfg = layer(
        &rig,
        "relink.conf",
        "fanout = \"chain\"\nrelay_bind = \"127.0.0.1\"\nretries = 0",
        "",
    );
    let mut cmd = imaging(&rig, &cfg);
    cmd.args([
        "load", "--json", "-t", "150", "-b", "2M", "-i", "lab.img", "1-4",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    die_with_test(&mut cmd);
    let mut child = cmd.spawn().expect("spawn imaging");
    let (tx, rx) = std::sync::mpsc::channel();
    let load = Proc {
        stdout: child.stdout.take().map(|o| line_reader(o, tx)),
        stderr: child.stderr.take().map(reader),
        child: Some(child),
    };
    wait_for_data(&rig.nodes()[2].target);
    thread::sleep(Duration::from_secs(1));
    // node03 stops (its relay listener with it), then node02 dies: node01
    // is relinked to node03 and cannot get through the handshake.
    let stopped = agents_of(&rig, 2, 20);
    signal(&stopped, libc::SIGSTOP);
    signal(&agents_of(&rig, 1, 20), libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut detached = None;
    while detached.is_none() && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200))
            && line.contains("node03: out of the relay chain")
        {
            detached = Some(line);
        }
    }
    signal(&stopped, libc::SIGCONT);
    let out = load.finish(200);
    not_a_panic(&out);
    let s = summary(&out);
    let detached =
        detached.unwrap_or_else(|| panic!("node03 never left the chain:\n{}", text(&out)));
    assert!(
        detached.contains("node01 could not forward to it")
            && detached.contains("it gets its data directly from the controller"),
        "{detached}"
    );
    assert_eq!(state(&s, "node02"), "failed", "{s}");
    for i in [0, 2, 3] {
        let n = &rig.nodes()[i];
        assert_eq!(state(&s, &n.name), "done", "{}: {s}", n.name);
        assert_same(&n.target, &image);
    }
    assert!(
        log_texts(&out)
            .iter()
            .any(|l| l.starts_with("node03: catching up on")),
        "{}",
        text(&out)
    );
}

/// A configured agent path that the node lacks fails the node at once,
/// naming the path and the key: no retry can make it appear.
#[test]
fn missing_configured_agent_fails_at_once_naming_agent_path() {
    let rig = Rig::new(1);
    write_image(&rig.dir().join("images/lab.img"), 4, 51);
    let cfg = layer(
        &rig,
        "agent.conf",
        "agent_path = \"/nonexistent/imaging-agent\"\nretries = 3",
        "",
    );
    let (out, took) = run(
        imaging(&rig, &cfg).args(["load", "--json", "-t", "120", "-i", "lab.img", "1"]),
        150,
    );
    not_a_panic(&out);
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(state(&s, "node01"), "failed", "{s}");
    let why = error(&s, "node01");
    assert_eq!(
        why, "no agent at /nonexistent/imaging-agent on the node ([load] agent_path)",
        "{s}"
    );
    assert!(took < Duration::from_secs(20), "took {took:?} to fail");
}

/// An agent that answers in another protocol version fails the node at
/// once, saying so: a retry would meet the same agent.
#[test]
fn agent_of_another_protocol_version_fails_at_once_saying_so() {
    let rig = Rig::new(1);
    write_image(&rig.dir().join("images/lab.img"), 4, 52);
    // A stand-in agent: a Hello of version 999, then it waits for the end.
    let mut body = vec![1u8];
    body.extend_from_slice(b"IMAGING\0");
    body.extend_from_slice(&999u16.to_le_bytes());
    body.extend_from_slice(&(6u32).to_le_bytes());
    body.extend_from_slice(b"future");
    let hello = rig.dir().join("hello999.bin");
    std::fs::write(&hello, frame(&body)).unwrap();
    let agent = rig.dir().join("future-agent");
    std::fs::write(
        &agent,
        format!("#!/bin/sh\ncat '{}'\ncat >/dev/null\n", hello.display()),
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cfg = layer(
        &rig,
        "future.conf",
        &format!("agent_path = \"{}\"\nretries = 3", agent.display()),
        "",
    );
    let (out, took) = run(
        imaging(&rig, &cfg).args(["load", "--json", "-t", "120", "-i", "lab.img", "1"]),
        150,
    );
    not_a_panic(&out);
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(state(&s, "node01"), "failed", "{s}");
    let why = error(&s, "node01");
    assert!(
        why.starts_with("the agent did not start: agent: ") && why.contains("999"),
        "{why}"
    );
    assert!(!why.contains("gave up"), "{why}");
    assert!(took < Duration::from_secs(20), "took {took:?} to fail");
}
