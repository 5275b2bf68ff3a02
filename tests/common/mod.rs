//! Integration-test rig: real `sshd` processes on 127.0.0.1.
//!
//! Every integration test file includes this module with `mod common;`.
//! A [`Rig`] owns a temp dir holding a lab (`imaging::lab::Lab`, the one
//! that `imaging demo` runs on too: a client key, a `known_hosts` file and
//! one `sshd` per node), an `imaging.conf`, and the dirs a run of the binary
//! needs (repository, HOME, XDG); everything is per rig, so tests can
//! run in parallel threads. The only shared state is `/run/sshd`, which sshd
//! needs as its privilege-separation directory.
//!
//! Children are tied to the test: each sshd gets `PR_SET_PDEATHSIG(SIGKILL)`,
//! so it dies when the *thread* that started it exits (Linux semantics), or
//! when the test process is killed. Create and start a rig on the thread that
//! runs the test; don't start nodes from a short-lived helper thread.
//!
//! sshd forks one child per connection and that child calls `setsid()`, so
//! connection children leave the listener's process group. [`Rig::kill`]
//! therefore freezes and kills the whole process tree found through `/proc`,
//! and also the listener's process group.

#![allow(dead_code)]

use std::fs;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub use imaging::lab::Node as RigNode;
use imaging::lab::{Lab, LabError, PORT_TRIES};

pub struct Rig {
    // Dropped first: the sshd processes stop before their files go.
    lab: Lab,
    config: PathBuf,
    dir: tempfile::TempDir,
}

/// Every rig sshd gets its own process group and dies with the test's
/// thread.
fn rig_hook(cmd: &mut Command) {
    cmd.process_group(0);
    die_with_test(cmd);
}

impl Rig {
    /// Start `n` sshd nodes named node01..nodeNN, each on its own free
    /// 127.0.0.1 port with its own ed25519 host key, and wait until each one
    /// sends its "SSH-2.0" banner (10 s per node, then panic with the log).
    /// A node whose port was grabbed by someone else gets a new port (up to
    /// 5 tries) before the rig's files are handed out.
    pub fn new(n: usize) -> Rig {
        let mut rig = Rig::prepare(n);
        for i in 0..n {
            if let Err(e) = rig.lab.start_moving(i) {
                panic!("{e}");
            }
        }
        rig.write_config("");
        rig
    }

    /// Like [`Rig::new`] but no sshd is started: ports are reserved and every
    /// file is written. Start nodes with [`Rig::start`]; their ports never
    /// change.
    pub fn new_stopped(n: usize) -> Rig {
        let rig = Rig::prepare(n);
        rig.write_config("");
        rig
    }

    /// The lab (keys, ports, sshd configs, known_hosts) and the rig's dirs;
    /// no imaging.conf.
    fn prepare(n: usize) -> Rig {
        let dir = tempfile::Builder::new()
            .prefix("rig")
            .tempdir()
            .expect("create rig temp dir");
        let root = dir.path().to_path_buf();
        for sub in ["images", "home"] {
            mkdir(&root.join(sub));
        }
        for sub in ["config", "state", "data", "cache"] {
            mkdir(&root.join("xdg").join(sub));
        }
        let runtime = root.join("xdg").join("runtime");
        mkdir(&runtime);
        fs::set_permissions(&runtime, fs::Permissions::from_mode(0o700))
            .expect("chmod runtime dir");
        let names: Vec<String> = (1..=n).map(|i| format!("node{i:02}")).collect();
        let mut lab = Lab::prepare(&root, &names).unwrap_or_else(|e| panic!("{e}"));
        lab.set_hook(rig_hook);
        Rig {
            lab,
            config: root.join("imaging.conf"),
            dir,
        }
    }

    /// The rig's temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn nodes(&self) -> &[RigNode] {
        self.lab.nodes()
    }

    /// The imaging.conf the rig wrote.
    pub fn config_path(&self) -> PathBuf {
        self.config.clone()
    }

    /// Private key authorized on every node.
    pub fn client_key(&self) -> &Path {
        self.lab.client_key()
    }

    /// known_hosts holding every node's host key.
    pub fn known_hosts(&self) -> &Path {
        self.lab.known_hosts()
    }

    /// (Re)start node `i`'s sshd on its port and wait for its banner. A
    /// running node is killed first. Panics (with the sshd log) when sshd
    /// does not come up within 10 s or its port stays taken.
    pub fn start(&mut self, i: usize) {
        // The port is fixed once handed out: retry it briefly if taken.
        let mut tries = 0;
        loop {
            tries += 1;
            match self.lab.start_node(i) {
                Ok(()) => return,
                Err(LabError::PortTaken { node, port, log }) => {
                    if tries >= PORT_TRIES {
                        panic!("{node}: port {port} stays taken; sshd log:\n{log}");
                    }
                    thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// SIGKILL node `i`'s sshd, its connection children and their sessions
    /// (they leave the process group through `setsid()`, so the tree is
    /// frozen and killed through `/proc`), kill the process group, and reap
    /// the listener. Existing connections to the node are cut. A stopped node
    /// is left alone.
    pub fn kill(&mut self, i: usize) {
        self.lab.kill(i);
    }

    /// Rewrite imaging.conf, appending `extra` TOML (e.g. more `[[node]]`
    /// entries or keys in new tables).
    pub fn write_config(&self, extra: &str) {
        let dir = self.dir();
        let mut text = format!(
            "[ssh]\n\
             user = \"root\"\n\
             identity_file = {}\n\
             known_hosts = \"strict\"\n\
             known_hosts_file = {}\n\
             connect_timeout = 5\n\
             \n\
             [repository]\n\
             dir = {}\n\
             \n\
             [load]\n\
             target = {}\n\
             \n\
             [nodes]\n",
            toml_str(self.client_key()),
            toml_str(self.known_hosts()),
            toml_str(&dir.join("images")),
            toml_str(&dir.join("targets").join("{name}.img")),
        );
        if !self.nodes().is_empty() {
            text.push_str(&format!("all = \"1-{}\"\n", self.nodes().len()));
        }
        for node in self.nodes() {
            text.push_str(&format!(
                "\n[[node]]\nname = \"{}\"\naddress = \"127.0.0.1\"\nport = {}\n",
                node.name, node.port
            ));
        }
        if !extra.is_empty() {
            text.push('\n');
            text.push_str(extra);
            if !extra.ends_with('\n') {
                text.push('\n');
            }
        }
        fs::write(&self.config, text).expect("write imaging.conf");
    }

    /// A command running the imaging binary inside the rig: current dir is
    /// the rig dir, `IMAGING_CONFIG` is the rig's imaging.conf, `HOME` and
    /// the XDG dirs point into the rig dir, `NODES` is removed and
    /// `NO_COLOR=1`.
    ///
    /// Note: OpenSSH's `ssh` takes `~` from the password database, not from
    /// `HOME`, so the invoking user's real `~/.ssh/config` still applies to
    /// ssh processes the binary spawns.
    pub fn imaging(&self) -> Command {
        self.imaging_at(Path::new(env!("CARGO_BIN_EXE_imaging")))
    }

    /// [`Rig::imaging`] with another copy of the binary (named `imaging`).
    pub fn imaging_at(&self, exe: &Path) -> Command {
        let dir = self.dir();
        let xdg = dir.join("xdg");
        let mut cmd = Command::new(exe);
        cmd.current_dir(dir)
            .env("IMAGING_CONFIG", &self.config)
            .env("HOME", dir.join("home"))
            .env("XDG_CONFIG_HOME", xdg.join("config"))
            .env("XDG_STATE_HOME", xdg.join("state"))
            .env("XDG_DATA_HOME", xdg.join("data"))
            .env("XDG_CACHE_HOME", xdg.join("cache"))
            .env("XDG_RUNTIME_DIR", xdg.join("runtime"))
            .env_remove("NODES")
            .env("NO_COLOR", "1");
        cmd
    }
}

/// A TCP listener on 127.0.0.1 that accepts connections and never sends a
/// byte. Connections are held open until the guard drops; dropping it stops
/// the accept thread (within a few ms) and closes everything.
pub struct SilentListener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    port: u16,
}

impl SilentListener {
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for SilentListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A hung SSH server: returns its port and the guard keeping it alive.
pub fn silent_listener() -> (u16, SilentListener) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind silent listener");
    let port = listener.local_addr().expect("local_addr").port();
    listener
        .set_nonblocking(true)
        .expect("nonblocking silent listener");
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = Arc::clone(&stop);
        thread::Builder::new()
            .name(format!("silent-listener-{port}"))
            .spawn(move || {
                let mut held: Vec<TcpStream> = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => held.push(stream),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
                for stream in held {
                    let _ = stream.shutdown(Shutdown::Both);
                }
            })
            .expect("spawn silent listener thread")
    };
    (
        port,
        SilentListener {
            stop,
            thread: Some(thread),
            port,
        },
    )
}

/// A 127.0.0.1 port with nothing listening on it.
pub fn closed_port() -> u16 {
    imaging::lab::free_ports(1).expect("a free port")[0]
}

// ---------------------------------------------------------------------------
// helpers

fn mkdir(path: &Path) {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
}

/// A TOML basic string holding `path`.
fn toml_str(path: &Path) -> String {
    let s = path.to_str().expect("rig paths are UTF-8");
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Make `cmd`'s process get SIGKILL when the spawning *thread* exits or the
/// test process dies, even by SIGKILL (`PR_SET_PDEATHSIG`). The rig does this
/// for sshd; tests may opt in for other long-lived children (the imaging
/// binary, ssh clients) when they spawn and wait on the same thread.
pub fn die_with_test(cmd: &mut Command) {
    imaging::lab::die_with_this_thread(cmd);
}

// ---- Reading a run's output ---------------------------------------------

/// The imaging binary with an extra config layer on top of the rig's
/// (`./imaging.conf` in the rig dir is the rig's own file too).
pub fn imaging(rig: &Rig, layer: &Path) -> Command {
    let mut c = rig.imaging();
    c.arg("--config").arg(layer);
    c
}

/// A command's stdout and stderr, labelled, for assertion messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An 8 MiB image at `path`: random data in MiB 0-2 and 6-7, zeros in 3-5.
pub fn write_8mib_image(path: &Path, seed: u64) -> Vec<u8> {
    const MIB: usize = 1 << 20;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut data = vec![0u8; 8 * MIB];
    rng.fill(&mut data[..3 * MIB]);
    rng.fill(&mut data[6 * MIB..]);
    fs::write(path, &data).unwrap();
    data
}

/// A `--json` run exited 0; else fail, showing its output.
pub fn assert_success(out: &Output) {
    assert_eq!(out.status.code(), Some(0), "{}", output_text(out));
}

/// The last line of a `--json` run: the summary.
pub fn summary(out: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_else(|| {
        panic!(
            "no output; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["event"], "summary", "{last}");
    v
}

/// One node's entry in a summary.
pub fn node<'a>(s: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap()
}

/// Wait (bounded) until a target holds some data: the load reached it.
pub fn wait_for_data(target: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let blocks = std::fs::metadata(target)
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m))
            .unwrap_or(0);
        if blocks > 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no data reached {} in 30 s", target.display());
}

/// The target holds exactly the image's bytes.
pub fn assert_same(target: &Path, image: &[u8]) {
    let got = std::fs::read(target).unwrap_or_else(|e| panic!("{}: {e}", target.display()));
    assert_eq!(got.len(), image.len(), "{} size", target.display());
    assert!(got == image, "{} differs from the image", target.display());
}

/// Every line of a `--json` run.
pub fn lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

// ---- A terminal for the binary: tmux -------------------------------------

/// A private tmux server, killed when dropped (also when a test fails).
pub struct Tmux {
    socket: String,
}

impl Tmux {
    pub fn new(tag: &str) -> Tmux {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        Tmux {
            socket: format!("imaging-{tag}-{}-{nanos}", std::process::id()),
        }
    }

    pub fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn capture(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "dash"])
    }

    pub fn keys(&self, keys: &str) {
        self.run(&["send-keys", "-t", "dash", keys]);
    }

    /// Poll (every 100 ms, at most `secs`) until `done` holds for the pane.
    pub fn wait_for(&self, what: &str, secs: u64, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let screen = self.capture();
            if done(&screen) {
                return screen;
            }
            let dead = self.run(&["display", "-p", "-t", "dash", "#{pane_dead}"]);
            assert!(
                dead.trim() != "1",
                "the command ended while waiting for {what}; the pane shows:\n{screen}"
            );
            assert!(
                Instant::now() < deadline,
                "no {what} within {secs}s; the pane shows:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Tmux {
    /// Run `cmd` in a detached `width`x`height` session named `dash` that
    /// stays after the command ends; its exit code lands in `rc`.
    pub fn start(&self, dir: &Path, cmd: &Command, rc: &Path, width: u16, height: u16) {
        let line = format!(
            "{}; echo $? > {}",
            shell_line(cmd),
            sh_quote(&rc.to_string_lossy())
        );
        let conf = dir.join("tmux.conf");
        fs::write(&conf, "set -g remain-on-exit on\nset -g status off\n").expect("tmux.conf");
        let (w, h) = (width.to_string(), height.to_string());
        self.run(&[
            "-f",
            &conf.to_string_lossy(),
            "new-session",
            "-d",
            "-s",
            "dash",
            "-x",
            &w,
            "-y",
            &h,
            &line,
        ]);
    }

    /// Wait (bounded) for the command to end; its exit code.
    pub fn exit_code(&self, rc: &Path, secs: u64) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !rc.exists() {
            assert!(
                Instant::now() < deadline,
                "the command did not exit; the pane shows:\n{}",
                self.capture()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(100));
        fs::read_to_string(rc)
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or(-1)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
    }
}

pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// `cmd` (program, args, env, current dir) as one shell command line.
pub fn shell_line(cmd: &Command) -> String {
    let mut line = String::new();
    if let Some(dir) = cmd.get_current_dir() {
        line.push_str(&format!("cd {} && ", sh_quote(&dir.to_string_lossy())));
    }
    line.push_str("env");
    // env takes its options (-u) before the first assignment.
    for (k, v) in cmd.get_envs() {
        if v.is_none() {
            line.push_str(&format!(" -u {}", sh_quote(&k.to_string_lossy())));
        }
    }
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            let kv = format!("{}={}", k.to_string_lossy(), v.to_string_lossy());
            line.push_str(&format!(" {}", sh_quote(&kv)));
        }
    }
    line.push(' ');
    line.push_str(&sh_quote(&cmd.get_program().to_string_lossy()));
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&sh_quote(&arg.to_string_lossy()));
    }
    line
}
