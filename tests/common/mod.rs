//! Integration-test rig: real `sshd` processes on 127.0.0.1.
//!
//! Every integration test file includes this module with `mod common;`.
//! A [`Rig`] owns a temp dir holding a client key, a `known_hosts` file, an
//! `imaging.conf` and one `sshd` per node; everything is per rig, so tests can
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

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";
const PRIVSEP_DIR: &str = "/run/sshd";
/// How long a node may take to accept TCP and send its banner.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How many ports `Rig::new` tries per node when the port is taken by
/// someone else between reservation and sshd's bind.
const PORT_TRIES: usize = 5;

pub struct Rig {
    dir: tempfile::TempDir,
    client_key: PathBuf,
    known_hosts: PathBuf,
    config: PathBuf,
    nodes: Vec<RigNode>,
}

pub struct RigNode {
    pub name: String,
    pub port: u16,
    pub target: PathBuf,
    child: Option<Child>,
    sshd_config: PathBuf,
    host_key: PathBuf,
    log: PathBuf,
}

impl RigNode {
    /// Pid of the running sshd listener, if the node is started.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// This node's sshd_config.
    pub fn sshd_config(&self) -> &Path {
        &self.sshd_config
    }

    /// This node's sshd log (stderr of every sshd run of the node, appended).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The node's sshd_config, from the lab's one template
    /// (`assets/sshd_config`, which keeps `SetEnv SHLVL=1`).
    fn write_sshd_config(&self, authorized_keys: &Path) {
        let text = imaging::lab::SshdConfig {
            port: self.port,
            address: "127.0.0.1",
            host_key: &self.host_key,
            authorized_keys,
        }
        .render();
        fs::write(&self.sshd_config, text).expect("write sshd_config");
    }

    /// `[127.0.0.1]:PORT ssh-ed25519 AAAA…`
    fn known_hosts_line(&self) -> String {
        let pubkey = read(&self.host_key.with_extension("pub"));
        let mut fields = pubkey.split_whitespace();
        let (kind, key) = (fields.next(), fields.next());
        let (Some(kind), Some(key)) = (kind, key) else {
            panic!("malformed host public key for {}: {pubkey:?}", self.name);
        };
        format!("[127.0.0.1]:{} {kind} {key}\n", self.port)
    }
}

/// Why one sshd start attempt failed.
enum StartError {
    /// sshd could not bind its port (someone else holds it).
    PortClash(String),
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
            let mut tries = 0;
            loop {
                tries += 1;
                match rig.try_start(i) {
                    Ok(()) => break,
                    Err(StartError::PortClash(_)) if tries < PORT_TRIES => {
                        let port = free_ports(1)[0];
                        rig.nodes[i].port = port;
                        rig.nodes[i].write_sshd_config(&rig.authorized_keys());
                        rig.write_known_hosts();
                    }
                    Err(StartError::PortClash(log)) => panic!(
                        "{}: port clash {tries} times in a row, giving up; last sshd log:\n{log}",
                        rig.nodes[i].name
                    ),
                }
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

    /// Keys, dirs, ports, sshd configs and known_hosts; no imaging.conf.
    fn prepare(n: usize) -> Rig {
        ensure_privsep_dir();
        let dir = tempfile::Builder::new()
            .prefix("rig")
            .tempdir()
            .expect("create rig temp dir");
        let root = dir.path().to_path_buf();
        for sub in ["images", "targets", "hostkeys", "sshd", "home"] {
            mkdir(&root.join(sub));
        }
        for sub in ["config", "state", "data", "cache"] {
            mkdir(&root.join("xdg").join(sub));
        }
        let runtime = root.join("xdg").join("runtime");
        mkdir(&runtime);
        fs::set_permissions(&runtime, fs::Permissions::from_mode(0o700))
            .expect("chmod runtime dir");

        let client_key = root.join("client_key");
        keygen(&client_key);
        let authorized_keys = root.join("authorized_keys");
        fs::write(
            &authorized_keys,
            read(&client_key.with_extension("pub")).as_bytes(),
        )
        .expect("write authorized_keys");

        let ports = free_ports(n);
        let nodes: Vec<RigNode> = ports
            .into_iter()
            .enumerate()
            .map(|(i, port)| {
                let name = format!("node{:02}", i + 1);
                let host_key = root.join("hostkeys").join(format!("{name}_ed25519"));
                keygen(&host_key);
                RigNode {
                    target: root.join("targets").join(format!("{name}.img")),
                    sshd_config: root.join("sshd").join(format!("{name}.sshd_config")),
                    log: root.join("sshd").join(format!("{name}.log")),
                    name,
                    port,
                    child: None,
                    host_key,
                }
            })
            .collect();
        for node in &nodes {
            node.write_sshd_config(&authorized_keys);
        }

        let rig = Rig {
            client_key,
            known_hosts: root.join("known_hosts"),
            config: root.join("imaging.conf"),
            nodes,
            dir,
        };
        rig.write_known_hosts();
        rig
    }

    /// The rig's temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn nodes(&self) -> &[RigNode] {
        &self.nodes
    }

    /// The imaging.conf the rig wrote.
    pub fn config_path(&self) -> PathBuf {
        self.config.clone()
    }

    /// Private key authorized on every node.
    pub fn client_key(&self) -> &Path {
        &self.client_key
    }

    /// known_hosts holding every node's host key.
    pub fn known_hosts(&self) -> &Path {
        &self.known_hosts
    }

    fn authorized_keys(&self) -> PathBuf {
        self.dir().join("authorized_keys")
    }

    /// (Re)start node `i`'s sshd on its port and wait for its banner. A
    /// running node is killed first. Panics (with the sshd log) when sshd
    /// does not come up within 10 s or its port stays taken.
    pub fn start(&mut self, i: usize) {
        if self.nodes[i].is_running() {
            self.kill(i);
        }
        // The port is fixed once handed out: retry it briefly if taken.
        let mut tries = 0;
        loop {
            tries += 1;
            match self.try_start(i) {
                Ok(()) => return,
                Err(StartError::PortClash(log)) => {
                    if tries >= PORT_TRIES {
                        panic!(
                            "{}: port {} stays taken; sshd log:\n{log}",
                            self.nodes[i].name, self.nodes[i].port
                        );
                    }
                    thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    /// One attempt: spawn sshd, wait until it owns its listening socket and
    /// sends its banner.
    fn try_start(&mut self, i: usize) -> Result<(), StartError> {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "{} is already running", node.name);
        let log_offset = fs::metadata(&node.log).map(|m| m.len()).unwrap_or(0);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("open sshd log");
        let mut cmd = Command::new(SSHD);
        cmd.arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&node.sshd_config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup sshd log"))
            .stderr(log)
            .process_group(0);
        die_with_test(&mut cmd);
        let child = cmd.spawn().expect("spawn sshd");
        let pid = child.id();
        node.child = Some(child);

        let new_log = |node: &RigNode| {
            let all = fs::read(&node.log).unwrap_or_default();
            let start = (log_offset as usize).min(all.len());
            String::from_utf8_lossy(&all[start..]).into_owned()
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let exited = node
                .child
                .as_mut()
                .expect("child")
                .try_wait()
                .expect("try_wait sshd");
            if let Some(status) = exited {
                node.child = None;
                let log = new_log(node);
                if log.contains("Address already in use") {
                    return Err(StartError::PortClash(log));
                }
                panic!(
                    "{}: sshd exited ({status}) before accepting connections on port {}; log:\n{log}",
                    node.name, node.port
                );
            }
            // Only probe once sshd itself listens: otherwise another process
            // holding the port could answer in its place.
            if listens_on(pid, node.port) && banner_ok(node.port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let name = node.name.clone();
                let port = node.port;
                self.kill(i);
                panic!(
                    "{name}: sshd did not send an SSH-2.0 banner on port {port} within {START_TIMEOUT:?}; log:\n{}",
                    new_log(&self.nodes[i])
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL node `i`'s sshd, its connection children and their sessions
    /// (they leave the process group through `setsid()`, so the tree is
    /// frozen and killed through `/proc`), kill the process group, and reap
    /// the listener. Existing connections to the node are cut. A stopped node
    /// is left alone.
    pub fn kill(&mut self, i: usize) {
        if let Some(child) = self.nodes[i].child.take() {
            kill_tree(child);
        }
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
            toml_str(&self.client_key),
            toml_str(&self.known_hosts),
            toml_str(&dir.join("images")),
            toml_str(&dir.join("targets").join("{name}.img")),
        );
        if !self.nodes.is_empty() {
            text.push_str(&format!("all = \"1-{}\"\n", self.nodes.len()));
        }
        for node in &self.nodes {
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

    fn write_known_hosts(&self) {
        let text: String = self.nodes.iter().map(RigNode::known_hosts_line).collect();
        fs::write(&self.known_hosts, text).expect("write known_hosts");
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
        let dir = self.dir();
        let xdg = dir.join("xdg");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_imaging"));
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

impl Drop for Rig {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
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
    free_ports(1)[0]
}

// ---------------------------------------------------------------------------
// helpers

/// `n` distinct free ports: all are bound at once, then released.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local_addr").port())
        .collect()
}

fn ensure_privsep_dir() {
    match fs::DirBuilder::new().mode(0o755).create(PRIVSEP_DIR) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => panic!("create {PRIVSEP_DIR}: {e}"),
    }
}

fn mkdir(path: &Path) {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "rig", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh-keygen");
    assert!(
        out.status.success(),
        "ssh-keygen {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
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
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and
    // exec, and no allocation.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Does process `pid` own a socket listening on 127.0.0.1:`port`?
fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let local = format!("0100007F:{port:04X}");
    let inodes: HashSet<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... uid timeout inode
            (f.len() > 9 && f[1] == local && f[3] == "0A").then(|| f[9].to_string())
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_link(fd.path())
            .ok()
            .and_then(|t| t.to_str().map(str::to_owned))
            .and_then(|t| {
                t.strip_prefix("socket:[")
                    .and_then(|r| r.strip_suffix(']'))
                    .map(str::to_owned)
            })
            .is_some_and(|inode| inodes.contains(&inode))
    })
}

/// Does 127.0.0.1:`port` accept TCP and send an "SSH-2.0" banner?
fn banner_ok(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 1024 {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    buf.starts_with(b"SSH-2.0")
}

/// Parent pid of every process, from `/proc/*/stat`.
fn process_parents() -> HashMap<i32, i32> {
    let mut parents = HashMap::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return parents;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parens.
        let Some(rest) = stat.rfind(')').map(|at| &stat[at + 1..]) else {
            continue;
        };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
            parents.insert(pid, ppid);
        }
    }
    parents
}

fn descendants(root: i32) -> HashSet<i32> {
    let parents = process_parents();
    let mut found = HashSet::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (&child, &parent) in &parents {
            if parent == p && found.insert(child) {
                frontier.push(child);
            }
        }
    }
    found
}

/// Freeze the listener and all its descendants (stopped processes cannot
/// fork, so the walk converges), SIGKILL them and the listener's process
/// group, then reap the listener.
fn kill_tree(mut child: Child) {
    let pid = child.id() as i32;
    // SAFETY: plain kill(2) on a pid we have not reaped yet (so not reused)
    // and on processes just found as its descendants.
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
        let mut frozen: HashSet<i32> = HashSet::new();
        for _ in 0..50 {
            let fresh: Vec<i32> = descendants(pid)
                .into_iter()
                .filter(|p| !frozen.contains(p))
                .collect();
            if fresh.is_empty() {
                break;
            }
            for p in fresh {
                libc::kill(p, libc::SIGSTOP);
                frozen.insert(p);
            }
        }
        for &p in &frozen {
            libc::kill(p, libc::SIGKILL);
        }
        libc::kill(-pid, libc::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

// ---- Reading a run's output ---------------------------------------------

/// The imaging binary with an extra config layer on top of the rig's
/// (`./imaging.conf` in the rig dir is the rig's own file too).
pub fn imaging(rig: &Rig, layer: &Path) -> Command {
    let mut c = rig.imaging();
    c.arg("--config").arg(layer);
    c
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
