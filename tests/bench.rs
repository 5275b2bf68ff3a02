//! Benchmarks of `imaging load` against the usual tools, on real sshd nodes
//! on 127.0.0.1 (the test rig). Ignored by default; `scripts/bench.sh` runs
//! them one at a time and collects their tables into `bench/results.md`:
//!
//! ```sh
//! cargo test --release --test bench -- --ignored --nocapture --test-threads=1
//! ```
//!
//! The machine may be shared and noisy, so competitors are interleaved run
//! by run (ours, theirs, ours, theirs, …), every figure is the median of
//! `RUNS` rounds (`SLOW_RUNS` for the four-node and memory cases;
//! `BENCH_RUNS` overrides), and every ratio is computed within one round
//! (then the median of those ratios is shown, with its range). Before each timed run
//! the page cache holds the image and no dirty pages are pending (`sync`),
//! so no run pays for the writeback of the one before.
//!
//! Output: markdown lines prefixed with `md| ` (the prefix keeps them apart
//! from the test harness's own lines; `bench.sh` strips it).

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{Rig, die_with_test};

const MIB: u64 = 1 << 20;
/// Rounds per comparison for the quick cases; the slow ones (four nodes,
/// memory) do `SLOW_RUNS`. `BENCH_RUNS` overrides both (1 to 9).
const RUNS: usize = 5;
const SLOW_RUNS: usize = 3;
/// No single timed command may take longer than this.
const LIMIT: Duration = Duration::from_secs(300);

fn rounds(default: usize) -> usize {
    std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
        .clamp(1, 9)
}

// ---------------------------------------------------------------------------
// output

/// One markdown line of the results.
fn md(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "md| {line}");
    let _ = out.flush();
}

/// Start a section: a newline first, so the harness's `test … ...` line
/// stays apart from ours.
fn section(title: &str) {
    println!();
    md("");
    md(&format!("### {title}"));
    md("");
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    assert!(n > 0, "median of nothing");
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// "1.23× (1.10–1.30)": median ratio and its range over the rounds.
fn ratio_cell(ratios: &[f64]) -> String {
    let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("**{:.2}×** ({lo:.2}–{hi:.2})", median(ratios))
}

fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

// ---------------------------------------------------------------------------
// images

#[derive(Clone, Copy)]
enum Fill {
    Random,
    /// 8 MiB random, 8 MiB zeros, … (zeros written, not holes).
    HalfZero,
}

/// Write `size` bytes of seeded data to `path` and make them durable, so
/// their writeback does not land in a timed run.
fn write_image(path: &Path, size: u64, fill: Fill, seed: u64) {
    const BLOCK: u64 = 8 * MIB;
    assert_eq!(size % BLOCK, 0);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut f = fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0u8; BLOCK as usize];
    for block in 0..size / BLOCK {
        match fill {
            Fill::HalfZero if block % 2 == 1 => buf.fill(0),
            _ => rng.fill(&mut buf),
        }
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

/// Read a file once, so it is in the page cache.
fn warm(path: &Path) {
    let mut f = fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 8 * MIB as usize];
    for _ in 0..1 << 20 {
        if f.read(&mut buf).unwrap() == 0 {
            return;
        }
    }
}

fn assert_same(a: &Path, b: &Path) {
    let read = |p: &Path| fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let (x, y) = (read(a), read(b));
    assert!(
        x.len() == y.len() && x == y,
        "{} differs from {}",
        a.display(),
        b.display()
    );
}

fn remove(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("remove {}: {e}", path.display()),
    }
}

/// No dirty pages pending: each timed run starts from the same state.
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

// ---------------------------------------------------------------------------
// running and timing commands

struct Timed {
    secs: f64,
    statuses: Vec<ExitStatus>,
    /// Each stdout line of each command, with the seconds since the start.
    lines: Vec<(f64, String)>,
    stderr: String,
}

impl Timed {
    fn assert_ok(&self, what: &str) {
        assert!(
            self.statuses.iter().all(ExitStatus::success),
            "{what}: {:?}\nstderr: {}\nstdout: {:?}",
            self.statuses,
            self.stderr,
            self.lines.iter().rev().take(5).collect::<Vec<_>>()
        );
    }
}

/// Run `cmds` at once (stdin as each command set it, null otherwise is the
/// caller's business) and time until the last one exits. Each is killed if
/// the whole takes longer than `LIMIT`.
fn timed(cmds: Vec<Command>) -> Timed {
    let start = Instant::now();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(String::new()));
    let mut children = Vec::new();
    let mut readers = Vec::new();
    for mut cmd in cmds {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        die_with_test(&mut cmd);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let lines = lines.clone();
        readers.push(thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let t = start.elapsed().as_secs_f64();
                lines.lock().unwrap().push((t, line));
            }
        }));
        let stderr = stderr.clone();
        readers.push(thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(err).take(1 << 20).read_to_string(&mut text);
            stderr.lock().unwrap().push_str(&text);
        }));
        children.push(child);
    }
    let pids: Vec<i32> = children.iter().map(|c| c.id() as i32).collect();
    let (done, stop) = mpsc::channel::<()>();
    let watchdog = thread::spawn(move || {
        if stop.recv_timeout(LIMIT) == Err(mpsc::RecvTimeoutError::Timeout) {
            for pid in pids {
                // SAFETY: kill(2) on children not reaped yet.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            true
        } else {
            false
        }
    });
    let statuses: Vec<ExitStatus> = children.iter_mut().map(|c| c.wait().unwrap()).collect();
    let secs = start.elapsed().as_secs_f64();
    let _ = done.send(());
    let killed = watchdog.join().unwrap();
    for r in readers {
        r.join().unwrap();
    }
    assert!(!killed, "killed after {LIMIT:?}");
    let mut lines = std::mem::take(&mut *lines.lock().unwrap());
    lines.sort_by(|a, b| a.0.total_cmp(&b.0));
    let stderr = std::mem::take(&mut *stderr.lock().unwrap());
    Timed {
        secs,
        statuses,
        lines,
        stderr,
    }
}

fn timed1(cmd: Command) -> Timed {
    timed(vec![cmd])
}

/// The ssh options every competitor uses (those imaging uses for the rig).
fn ssh_opts(rig: &Rig) -> Vec<String> {
    let key = rig.client_key().to_str().unwrap().to_string();
    let kh = rig.known_hosts().to_str().unwrap().to_string();
    assert!(
        !key.contains(char::is_whitespace) && !kh.contains(char::is_whitespace),
        "rig paths with spaces"
    );
    vec![
        "-i".into(),
        key,
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        format!("UserKnownHostsFile={kh}"),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
    ]
}

/// `ssh … -p PORT root@127.0.0.1 'cat > TARGET[; sync TARGET]' < IMAGE`
fn ssh_cat(rig: &Rig, port: u16, image: &Path, target: &Path, fsync: bool) -> Command {
    ssh_cat_with(rig, port, image, target, fsync, &[])
}

/// [`ssh_cat`] with more ssh options (`-c CIPHER`).
fn ssh_cat_with(
    rig: &Rig,
    port: u16,
    image: &Path,
    target: &Path,
    fsync: bool,
    options: &[&str],
) -> Command {
    let t = target.to_str().unwrap();
    let remote = if fsync {
        format!("cat > {t} && sync {t}")
    } else {
        format!("cat > {t}")
    };
    let mut c = Command::new("ssh");
    c.args(ssh_opts(rig))
        .args(options)
        .arg("-p")
        .arg(port.to_string())
        .arg("root@127.0.0.1")
        .arg(remote)
        .stdin(fs::File::open(image).unwrap());
    c
}

/// `ssh … -p PORT root@127.0.0.1 true`: one login running one command.
fn ssh_true(rig: &Rig, port: u16) -> Command {
    let mut c = Command::new("ssh");
    c.args(ssh_opts(rig))
        .arg("-p")
        .arg(port.to_string())
        .arg("root@127.0.0.1")
        .arg("true")
        .stdin(Stdio::null());
    c
}

/// `imaging load --json -i IMAGE NODES`, with an extra config layer.
fn imaging_load(rig: &Rig, layer: Option<&Path>, image: &str, nodes: &str) -> Command {
    let mut c = rig.imaging();
    if let Some(layer) = layer {
        c.arg("--config").arg(layer);
    }
    // Star by default: one stream per node, parallel-scp's shape
    // (`BENCH_FANOUT=chain` for the relay chain on loopback).
    let fanout = std::env::var("BENCH_FANOUT").unwrap_or_else(|_| "star".into());
    c.args([
        "load", "--json", "--fanout", &fanout, "-t", "300", "-i", image, nodes,
    ])
    .stdin(Stdio::null());
    c
}

/// The summary of an `imaging … --json` run; panics unless it succeeded.
fn summary(t: &Timed) -> serde_json::Value {
    t.assert_ok("imaging");
    let last = &t.lines.last().expect("no output from imaging").1;
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["event"], "summary", "{last}");
    assert_eq!(v["ok"], true, "{last}");
    v
}

fn bytes_sent(s: &serde_json::Value) -> u64 {
    s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["bytes_sent"].as_u64().unwrap())
        .sum()
}

/// When `node` first entered each state of a load, in seconds from the
/// start: where the time of one run went.
fn phases(t: &Timed, node: &str) -> String {
    let mut parts = Vec::new();
    for (at, line) in &t.lines {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["event"] == "state" && v["node"] == node {
            let state = v["state"].as_str().unwrap_or("?").to_string();
            if !parts.iter().any(|(s, _)| *s == state) {
                parts.push((state, *at));
            }
        }
    }
    let mut text: Vec<String> = parts.iter().map(|(s, at)| format!("{s} {at:.2}")).collect();
    text.push(format!("exit {:.2}", t.secs));
    text.join(" → ")
}

/// The node whose load ended last.
fn last_node(t: &Timed) -> String {
    let mut last = (f64::NEG_INFINITY, String::new());
    for (at, line) in &t.lines {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["event"] == "state" && v["state"] == "done" && *at >= last.0 {
            last = (*at, v["node"].as_str().unwrap_or("?").to_string());
        }
    }
    last.1
}

/// A config layer holding `text`.
fn layer(rig: &Rig, name: &str, text: &str) -> PathBuf {
    let path = rig.dir().join(name);
    fs::write(&path, text).unwrap();
    path
}

fn describe_machine(runs: usize) {
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    md(&format!(
        "_{cores} cores; every figure is the median of {runs} interleaved rounds; ratios are per round (median, range)._"
    ));
    md("");
}

// ---------------------------------------------------------------------------
// a. one node: imaging load vs ssh cat

#[test]
#[ignore = "benchmark: scripts/bench.sh"]
fn bench_a_one_node_vs_ssh_cat() {
    let rig = Rig::new(1);
    let size = 256 * MIB;
    let port = rig.nodes()[0].port;
    let target = rig.nodes()[0].target.clone();
    section("a. One node, 256 MiB: `imaging load` vs `ssh … 'cat > TARGET' < IMAGE`");
    let runs = rounds(RUNS);
    describe_machine(runs);
    md(
        "| image | imaging MB/s | ssh cat MB/s | ssh cat + fsync MB/s | imaging / ssh cat | imaging / ssh cat + fsync | imaging / ssh -c aes128-gcm cat | imaging sent |",
    );
    md("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut notes = Vec::new();
    for (name, fill, seed) in [
        ("random.img", Fill::Random, 1),
        ("halfzero.img", Fill::HalfZero, 2),
    ] {
        let image = rig.dir().join("images").join(name);
        write_image(&image, size, fill, seed);
        warm(&image);
        // Untimed: builds and caches the manifest, uploads the agent, warms ssh.
        remove(&target);
        summary(&timed1(imaging_load(&rig, None, name, "1")));
        assert_same(&target, &image);
        remove(&target);
        timed1(ssh_cat(&rig, port, &image, &target, false)).assert_ok("ssh cat");
        assert_same(&target, &image);

        let (mut ours, mut cat, mut catsync) = (vec![], vec![], vec![]);
        let (mut r_cat, mut r_sync, mut login) = (vec![], vec![], vec![]);
        let (mut gcm, mut r_gcm) = (vec![], vec![]);
        let mut sent = 0;
        let mut runs_ours = Vec::new();
        for _ in 0..runs {
            remove(&target);
            settle();
            let t = timed1(imaging_load(&rig, None, name, "1"));
            sent = bytes_sent(&summary(&t));
            ours.push(t.secs);
            runs_ours.push(t);

            remove(&target);
            settle();
            let t = timed1(ssh_cat(&rig, port, &image, &target, false));
            t.assert_ok("ssh cat");
            cat.push(t.secs);

            remove(&target);
            settle();
            let t = timed1(ssh_cat(&rig, port, &image, &target, true));
            t.assert_ok("ssh cat; sync");
            catsync.push(t.secs);

            // The cipher imaging offers first on a CPU with AES
            // instructions ([ssh] ciphers = "auto"): what is left is
            // imaging's own cost.
            remove(&target);
            settle();
            let gcm_only = ["-c", "aes128-gcm@openssh.com"];
            let t = timed1(ssh_cat_with(&rig, port, &image, &target, false, &gcm_only));
            t.assert_ok("ssh -c aes128-gcm cat");
            gcm.push(t.secs);

            let t = timed1(ssh_true(&rig, port));
            t.assert_ok("ssh true");
            login.push(t.secs);

            let i = ours.len() - 1;
            r_cat.push(cat[i] / ours[i]);
            r_sync.push(catsync[i] / ours[i]);
            r_gcm.push(gcm[i] / ours[i]);
        }
        md(&format!(
            "| {name} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} MiB |",
            mb_per_s(size, median(&ours)),
            mb_per_s(size, median(&cat)),
            mb_per_s(size, median(&catsync)),
            ratio_cell(&r_cat),
            ratio_cell(&r_sync),
            ratio_cell(&r_gcm),
            sent / MIB,
        ));
        let mid = ours.iter().position(|&s| s == median(&ours));
        if let Some(mid) = mid {
            notes.push(format!(
                "- {name}, imaging phases of the median run (s): {}; imaging {:.2} s, ssh cat {:.2} s, ssh -c aes128-gcm cat {:.2} s, a fresh `ssh … true` {:.2} s (medians).",
                phases(&runs_ours[mid], "node01"),
                median(&ours),
                median(&cat),
                median(&gcm),
                median(&login)
            ));
        }
    }
    md("");
    for n in notes {
        md(&n);
    }
    md(
        "- Ratios are throughput ours / theirs (= their time / our time): above 1, imaging is faster.",
    );
    md(
        "- The target is deleted before every run; the image's manifest is cached and the agent already on the node (one untimed warm-up load).",
    );
    md(
        "- `ssh cat` runs with ssh's defaults (chacha20-poly1305 first). imaging's default `[ssh] ciphers = \"auto\"` offers AES-GCM first on a CPU with AES instructions, so the last ratio column compares it with `ssh cat` on that cipher: what is left is imaging's own cost.",
    );
}

// ---------------------------------------------------------------------------
// b. four nodes: imaging load 1-4 vs parallel-scp and 4 × ssh cat

#[test]
#[ignore = "benchmark: scripts/bench.sh"]
fn bench_b_four_nodes_vs_parallel_scp() {
    let mut rig = Rig::new(4);
    let size = 256 * MIB;
    let name = "random.img";
    let image = rig.dir().join("images").join(name);
    write_image(&image, size, Fill::Random, 3);
    warm(&image);

    // parallel-scp copies to one remote path on every host, and all nodes
    // are this machine: give each node's sftp-server (scp speaks SFTP) its
    // own start directory, so the relative remote path lands in distinct
    // places.
    let pscp_dirs: Vec<PathBuf> = rig
        .nodes()
        .iter()
        .map(|n| rig.dir().join("pscp").join(&n.name))
        .collect();
    for (i, dir) in pscp_dirs.iter().enumerate() {
        fs::create_dir_all(dir).unwrap();
        let conf = rig.nodes()[i].sshd_config().to_path_buf();
        let text: String = fs::read_to_string(&conf)
            .unwrap()
            .lines()
            .map(|l| {
                if l.starts_with("Subsystem sftp ") {
                    format!("{l} -d {}\n", dir.display())
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        fs::write(&conf, text).unwrap();
        rig.start(i);
    }
    let pscp = |rig: &Rig| {
        let mut c = Command::new("parallel-scp");
        c.args(["-t", "0", "-p", "4", "-x"])
            .arg(ssh_opts(rig).join(" "));
        for n in rig.nodes() {
            c.arg("-H").arg(format!("root@127.0.0.1:{}", n.port));
        }
        c.arg(&image).arg(name).stdin(Stdio::null());
        c
    };
    let cats = |rig: &Rig| -> Vec<Command> {
        rig.nodes()
            .iter()
            .map(|n| ssh_cat(rig, n.port, &image, &n.target, false))
            .collect()
    };
    let clear = |rig: &Rig| {
        for (n, d) in rig.nodes().iter().zip(&pscp_dirs) {
            remove(&n.target);
            remove(&d.join(name));
        }
    };
    let check = |paths: Vec<PathBuf>| {
        for p in paths {
            assert_same(&p, &image);
        }
    };
    let targets: Vec<PathBuf> = rig.nodes().iter().map(|n| n.target.clone()).collect();
    let pscp_targets: Vec<PathBuf> = pscp_dirs.iter().map(|d| d.join(name)).collect();

    // Untimed warm-up, checking that each tool writes what it should.
    clear(&rig);
    summary(&timed1(imaging_load(&rig, None, name, "1-4")));
    check(targets.clone());
    clear(&rig);
    let t = timed1(pscp(&rig));
    t.assert_ok("parallel-scp");
    check(pscp_targets);
    clear(&rig);
    timed(cats(&rig)).assert_ok("4 × ssh cat");
    check(targets.clone());

    section(
        "b. Four nodes, 256 MiB random: `imaging load 1-4` vs `parallel-scp` and 4 × `ssh cat`",
    );
    let runs = rounds(SLOW_RUNS);
    describe_machine(runs);
    let (mut ours, mut ps, mut sc) = (vec![], vec![], vec![]);
    let (mut r_ps, mut r_sc) = (vec![], vec![]);
    let mut runs_ours = Vec::new();
    for _ in 0..runs {
        clear(&rig);
        settle();
        let t = timed1(imaging_load(&rig, None, name, "1-4"));
        summary(&t);
        ours.push(t.secs);
        runs_ours.push(t);

        clear(&rig);
        settle();
        let t = timed1(pscp(&rig));
        t.assert_ok("parallel-scp");
        ps.push(t.secs);

        clear(&rig);
        settle();
        let t = timed(cats(&rig));
        t.assert_ok("4 × ssh cat");
        sc.push(t.secs);

        let i = ours.len() - 1;
        r_ps.push(ps[i] / ours[i]);
        r_sc.push(sc[i] / ours[i]);
    }
    clear(&rig);
    md("| tool | wall time (s) | aggregate MB/s | speedup of imaging |");
    md("|---|---:|---:|---:|");
    md(&format!(
        "| `imaging load 1-4` | {:.2} | {:.0} | — |",
        median(&ours),
        mb_per_s(4 * size, median(&ours))
    ));
    md(&format!(
        "| `parallel-scp` (4 hosts; pssh runs `scp -qC`) | {:.2} | {:.0} | {} |",
        median(&ps),
        mb_per_s(4 * size, median(&ps)),
        ratio_cell(&r_ps)
    ));
    md(&format!(
        "| 4 × `ssh … 'cat > TARGET'` at once | {:.2} | {:.0} | {} |",
        median(&sc),
        mb_per_s(4 * size, median(&sc)),
        ratio_cell(&r_sc)
    ));
    md("");
    if let Some(mid) = ours.iter().position(|&s| s == median(&ours)) {
        let last = last_node(&runs_ours[mid]);
        md(&format!(
            "- imaging phases of the median run, {last} (the last to finish; s): {}",
            phases(&runs_ours[mid], &last)
        ));
    }
    md("- Speedup = their wall time / ours, per round: above 1, imaging is faster.");
    md(
        "- parallel-scp writes the same remote path on every host; here every node is this machine, so each node's sftp-server got its own start directory (`-d`) and the remote path is relative. pssh always passes `-C` to scp (zlib in SSH, which cannot be turned off with `-o Compression=no` after it).",
    );
}

// ---------------------------------------------------------------------------
// c. reload with 2 % of the chunks changed: imaging vs rsync --inplace

#[test]
#[ignore = "benchmark: scripts/bench.sh"]
fn bench_c_reload_two_percent_vs_rsync() {
    let rig = Rig::new(1);
    let target = rig.nodes()[0].target.clone();
    let port = rig.nodes()[0].port;
    // 1 MiB chunks: 2 % of a 256 MiB image's 256 chunks = 5 chunks changed.
    let cfg = layer(&rig, "chunks.conf", "[load]\nchunk_size = 1048576\n");

    section("c. Reload with 2 % of the 1 MiB chunks changed: `imaging load` vs `rsync --inplace`");
    let runs = rounds(RUNS);
    describe_machine(runs);
    md(
        "| image | chunks changed | imaging (s) | rsync (s) | speedup of imaging | imaging sent | ssh login + `true` (s) |",
    );
    md("|---|---:|---:|---:|---:|---:|---:|");
    let mut notes = Vec::new();
    for (name, size, seed) in [
        ("random.img", 256 * MIB, 4),
        ("random1g.img", 1024 * MIB, 8),
    ] {
        let image = rig.dir().join("images").join(name);
        write_image(&image, size, Fill::Random, seed);
        warm(&image);
        let chunks = size / MIB;
        let n_changed = (chunks * 2 + 50) / 100;
        let changed = rig.dir().join("changed.img");
        fs::copy(&image, &changed).unwrap();
        {
            let f = fs::OpenOptions::new().write(true).open(&changed).unwrap();
            for k in 0..n_changed {
                let c = (k * chunks / n_changed + 3) % chunks;
                f.write_all_at(&[0x5a; 64], c * MIB + 1234).unwrap();
            }
            f.sync_all().unwrap();
        }
        warm(&changed);
        // Before each timed run: the target holds the changed image (new
        // mtime, so imaging cannot trust its stamp and compares digests).
        let restore = || {
            fs::copy(&changed, &target).unwrap();
            settle();
        };
        let rsync = || {
            let mut c = Command::new("rsync");
            c.arg("--inplace")
                .arg("-e")
                .arg(format!("ssh {} -p {port}", ssh_opts(&rig).join(" ")))
                .arg(&image)
                .arg(format!("root@127.0.0.1:{}", target.display()))
                .stdin(Stdio::null());
            c
        };

        // Warm-up: the manifest (1 MiB chunks) and the agent; rsync once.
        restore();
        summary(&timed1(imaging_load(&rig, Some(&cfg), name, "1")));
        assert_same(&target, &image);
        restore();
        timed1(rsync()).assert_ok("rsync");
        assert_same(&target, &image);

        let (mut ours, mut theirs, mut ratios, mut login) = (vec![], vec![], vec![], vec![]);
        let mut sent = 0;
        let mut runs_ours = Vec::new();
        for _ in 0..runs {
            restore();
            let t = timed1(imaging_load(&rig, Some(&cfg), name, "1"));
            let s = summary(&t);
            sent = bytes_sent(&s);
            assert_eq!(s["nodes"][0]["state"], "done", "{s}");
            ours.push(t.secs);
            runs_ours.push(t);
            assert_same(&target, &image);

            restore();
            let t = timed1(rsync());
            t.assert_ok("rsync");
            theirs.push(t.secs);
            assert_same(&target, &image);
            ratios.push(theirs[theirs.len() - 1] / ours[ours.len() - 1]);

            let t = timed1(ssh_true(&rig, port));
            t.assert_ok("ssh true");
            login.push(t.secs);
        }
        md(&format!(
            "| {name} ({} MiB) | {n_changed} of {chunks} | {:.2} | {:.2} | {} | {} MiB | {:.2} |",
            size / MIB,
            median(&ours),
            median(&theirs),
            ratio_cell(&ratios),
            sent / MIB,
            median(&login),
        ));
        if let Some(mid) = ours.iter().position(|&s| s == median(&ours)) {
            notes.push(format!(
                "- {name}, imaging phases of the median run (s): {}",
                phases(&runs_ours[mid], "node01")
            ));
        }
        remove(&changed);
        remove(&target);
    }
    md("");
    for n in notes {
        md(&n);
    }
    md(
        "- Goal: imaging at least 3× faster. Both read the whole target from the page cache; the target's mtime is new before every run, so imaging compares digests instead of trusting its stamp. rsync (3.2) negotiates xxh128 block checksums.",
    );
    md(
        "- Last column: a fresh `ssh … root@127.0.0.1 true`, the floor of any tool that logs in and runs one remote command.",
    );
}

// ---------------------------------------------------------------------------
// d. manifest build rate vs sha256sum and xxhsum

#[test]
#[ignore = "benchmark: scripts/bench.sh"]
fn bench_d_manifest_build_vs_sha256sum_and_xxhsum() {
    let rig = Rig::new(1);
    let size = 1024 * MIB;
    let name = "big.img";
    let image = rig.dir().join("images").join(name);
    write_image(&image, size, Fill::Random, 5);
    warm(&image);
    let cached = rig.dir().join("images").join(format!(".{name}.manifest"));
    let xxh128 = Command::new("xxhsum")
        .args(["-H2", "/dev/null"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let xxh_label = if xxh128 {
        "`xxhsum -H2` (XXH128)"
    } else {
        "`xxhsum` (XXH64)"
    };
    let ours_cmd = || {
        let mut c = rig.imaging();
        c.args(["load", "-n", "-i", name, "1"]).stdin(Stdio::null());
        c
    };
    let tool = |prog: &str, args: &[&str]| {
        let mut c = Command::new(prog);
        c.args(args).arg(&image).stdin(Stdio::null());
        c
    };
    let xxh_args: &[&str] = if xxh128 { &["-H2"] } else { &[] };

    section(
        "d. Manifest build of a 1 GiB random image (page cache warm) vs `sha256sum` and `xxhsum`",
    );
    let runs = rounds(RUNS);
    describe_machine(runs);
    let (mut ours, mut sha, mut xxh) = (vec![], vec![], vec![]);
    let (mut r_sha, mut r_xxh) = (vec![], vec![]);
    for _ in 0..runs {
        remove(&cached);
        settle();
        let t = timed1(ours_cmd());
        t.assert_ok("imaging load -n");
        assert!(cached.exists(), "no manifest cached at .{name}.manifest");
        ours.push(t.secs);

        settle();
        let t = timed1(tool("sha256sum", &[]));
        t.assert_ok("sha256sum");
        sha.push(t.secs);

        settle();
        let t = timed1(tool("xxhsum", xxh_args));
        t.assert_ok("xxhsum");
        xxh.push(t.secs);

        let i = ours.len() - 1;
        r_sha.push(sha[i] / ours[i]);
        r_xxh.push(xxh[i] / ours[i]);
    }
    md("| tool | MB/s | imaging / tool |");
    md("|---|---:|---:|");
    md(&format!(
        "| `imaging load -n` (manifest: xxh3-128 per 4 MiB chunk + zero flags, cached) | {:.0} | — |",
        mb_per_s(size, median(&ours))
    ));
    md(&format!(
        "| `sha256sum` | {:.0} | {} |",
        mb_per_s(size, median(&sha)),
        ratio_cell(&r_sha)
    ));
    md(&format!(
        "| {xxh_label} | {:.0} | {} |",
        mb_per_s(size, median(&xxh)),
        ratio_cell(&r_xxh)
    ));
    md("");
    md(
        "- Wall time of whole processes (imaging includes start-up, config and writing the cache). imaging builds with 2 threads; sha256sum and xxhsum use one.",
    );
}

// ---------------------------------------------------------------------------
// e. peak memory

/// Peak RSS in MiB written by `/usr/bin/time -f %M -o FILE`.
fn read_rss(path: &Path) -> f64 {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let kib: f64 = text
        .lines()
        .rev()
        .find_map(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no RSS in {text:?}"));
    kib / 1024.0
}

#[test]
#[ignore = "benchmark: scripts/bench.sh"]
fn bench_e_peak_memory() {
    let rig = Rig::new(1);
    let target = rig.nodes()[0].target.clone();
    let images = [
        ("m256.img", 256 * MIB, 6),
        ("m1g.img", 1024 * MIB, 7),
        ("m2g.img", 2048 * MIB, 9),
    ];
    for (name, size, seed) in images {
        let path = rig.dir().join("images").join(name);
        write_image(&path, size, Fill::Random, seed);
        warm(&path);
    }
    // The agent on the node, measured too: `[load] agent_path` names a
    // wrapper that runs this very binary's agent under /usr/bin/time.
    let agent_rss = rig.dir().join("agent.rss");
    let wrapper = rig.dir().join("agent-under-time.sh");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec /usr/bin/time -f %M -o '{}' '{}' \"$@\"\n",
            agent_rss.display(),
            env!("CARGO_BIN_EXE_imaging")
        ),
    )
    .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = layer(
        &rig,
        "agent.conf",
        &format!("[load]\nagent_path = \"{}\"\n", wrapper.display()),
    );
    let client_rss = rig.dir().join("client.rss");
    let under_time = |name: &str| {
        let inner = imaging_load(&rig, Some(&cfg), name, "1");
        let mut c = Command::new("/usr/bin/time");
        c.args(["-f", "%M", "-o"])
            .arg(&client_rss)
            .arg(inner.get_program())
            .args(inner.get_args())
            .stdin(Stdio::null());
        if let Some(dir) = inner.get_current_dir() {
            c.current_dir(dir);
        }
        for (k, v) in inner.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    };
    // Warm-up: manifests.
    for (name, ..) in images {
        remove(&target);
        summary(&timed1(under_time(name)));
    }

    section("e. Peak memory (max RSS) of `imaging load` onto one node, random images");
    let runs = rounds(SLOW_RUNS);
    describe_machine(runs);
    let mut rows: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> =
        vec![(vec![], vec![], vec![]); images.len()];
    for _ in 0..runs {
        for (k, (name, size, _)) in images.iter().enumerate() {
            remove(&target);
            remove(&client_rss);
            remove(&agent_rss);
            settle();
            let t = timed1(under_time(name));
            summary(&t);
            rows[k].0.push(read_rss(&client_rss));
            rows[k].1.push(read_rss(&agent_rss));
            rows[k].2.push(mb_per_s(*size, t.secs));
        }
    }
    md("| image | imaging (controller) max RSS MiB | agent (on the node) max RSS MiB | MB/s |");
    md("|---|---:|---:|---:|");
    for (k, (name, size, _)) in images.iter().enumerate() {
        md(&format!(
            "| {name} ({} MiB) | {:.1} | {:.1} | {:.0} |",
            size / MIB,
            median(&rows[k].0),
            median(&rows[k].1),
            median(&rows[k].2)
        ));
    }
    md("");
    md(
        "- `/usr/bin/time -f %M`; the controller's figure covers imaging and the ssh processes it waits for (the largest of them). The agent ran under its own `/usr/bin/time` through `[load] agent_path`.",
    );
    md(
        "- Bounded by design, not by image size: the controller keeps a 128 MiB cache of prepared chunks (shared by all nodes); the agent holds at most its 4-chunk receive queue plus the chunk being read and the one being written (4 MiB chunks), so its peak depends on how full that queue got, not on the image.",
    );
    remove(&target);
}

// ---------------------------------------------------------------------------
// f. status of 20 nodes vs 20 parallel `ssh … true`

#[test]
#[ignore = "benchmark: scripts/bench.sh"]
fn bench_f_status_twenty_nodes_vs_parallel_ssh_true() {
    const NODES: usize = 20;
    let runs = rounds(SLOW_RUNS);
    let rig = Rig::new(NODES);
    let dir = rig.dir().to_path_buf();
    let image = dir.join("images").join("base.img");
    write_image(&image, 8 * MIB, Fill::Random, 11);
    // Every node holds the image, stamped: the status a lab sees.
    let out = imaging_load(&rig, None, "base.img", "1-20")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    section("f. `status` of 20 nodes vs 20 parallel `ssh … true`");
    describe_machine(runs);
    md("| round | imaging status | 20 × ssh true | ratio |");
    md("|---:|---:|---:|---:|");
    let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=runs {
        let mut status = rig.imaging();
        status.args(["status", "--json", "1-20"]);
        let t = timed1(status);
        t.assert_ok("imaging status");
        let s = summary(&t);
        let intact = s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["targets"][0]["state"] == "intact" && n["targets"][0]["current"] == true)
            .count();
        assert_eq!(intact, NODES, "{s}");
        let ssh = timed(rig.nodes().iter().map(|n| ssh_true(&rig, n.port)).collect());
        ssh.assert_ok("ssh true");
        md(&format!(
            "| {round} | {:.2} s | {:.2} s | {:.2}× |",
            t.secs,
            ssh.secs,
            t.secs / ssh.secs
        ));
        ours.push(t.secs);
        theirs.push(ssh.secs);
        ratios.push(t.secs / ssh.secs);
    }
    md(&format!(
        "| median | {:.2} s | {:.2} s | {} |",
        median(&ours),
        median(&theirs),
        ratio_cell(&ratios)
    ));
}
