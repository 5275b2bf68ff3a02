//! One sshd node of a lab: its host key, sshd_config and log, and the
//! sshd process: start it, wait until it accepts SSH, kill it with every
//! connection it serves.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::sshd::{LabError, SSHD, SshdConfig, keygen};
use crate::node::procs::processes;

/// How long a node may take to accept TCP and send its banner.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// One sshd on 127.0.0.1.
pub struct Node {
    pub name: String,
    pub port: u16,
    /// The file that stands for the node's disk.
    pub target: PathBuf,
    host_key: PathBuf,
    sshd_config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// A stopped node: its host key made, its sshd_config written.
    pub(super) fn create(
        root: &Path,
        name: &str,
        port: u16,
        authorized_keys: &Path,
    ) -> Result<Node, LabError> {
        let host_key = root.join("hostkeys").join(format!("{name}_ed25519"));
        keygen(&host_key)?;
        let node = Node {
            target: root.join("targets").join(format!("{name}.img")),
            sshd_config: root.join("sshd").join(format!("{name}.sshd_config")),
            log: root.join("sshd").join(format!("{name}.log")),
            name: name.to_string(),
            port,
            child: None,
            host_key,
        };
        node.write_sshd_config(authorized_keys)?;
        Ok(node)
    }

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
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The node's sshd_config, from the lab's one template.
    pub(super) fn write_sshd_config(&self, authorized_keys: &Path) -> Result<(), LabError> {
        let text = SshdConfig {
            port: self.port,
            address: "127.0.0.1",
            host_key: &self.host_key,
            authorized_keys,
        }
        .render();
        std::fs::write(&self.sshd_config, text).map_err(|e| LabError::io(&self.sshd_config, e))
    }

    /// `[127.0.0.1]:PORT ssh-ed25519 AAAA…`
    pub(super) fn known_hosts_line(&self) -> Result<String, LabError> {
        let path = self.host_key.with_extension("pub");
        let public = std::fs::read_to_string(&path).map_err(|e| LabError::io(&path, e))?;
        let mut fields = public.split_whitespace();
        match (fields.next(), fields.next()) {
            (Some(kind), Some(key)) => Ok(format!("[127.0.0.1]:{} {kind} {key}\n", self.port)),
            _ => Err(LabError::Other(format!(
                "malformed host public key for {}: {public:?}",
                self.name
            ))),
        }
    }

    /// One attempt: spawn sshd (after `hook` adjusted the command), wait
    /// until it owns its listening socket and sends its banner.
    pub(super) fn start(&mut self, hook: Option<fn(&mut Command)>) -> Result<(), LabError> {
        if self.child.is_some() {
            return Err(LabError::Other(format!("{} is already running", self.name)));
        }
        let log_offset = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| LabError::io(&self.log, e))?;
        let log_err = log.try_clone().map_err(|e| LabError::io(&self.log, e))?;
        let mut cmd = Command::new(SSHD);
        cmd.arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&self.sshd_config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        if let Some(hook) = hook {
            hook(&mut cmd);
        }
        let child = cmd
            .spawn()
            .map_err(|e| LabError::Other(format!("cannot start sshd: {e}")))?;
        let pid = child.id();
        self.child = Some(child);

        let new_log = |node: &Node| {
            let all = std::fs::read(&node.log).unwrap_or_default();
            let start = (log_offset as usize).min(all.len());
            String::from_utf8_lossy(&all[start..]).into_owned()
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let exited = match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(status)) => status,
                Some(Err(e)) => return Err(LabError::Other(format!("waiting for sshd: {e}"))),
                None => None,
            };
            if let Some(status) = exited {
                self.child = None;
                let log = new_log(self);
                if log.contains("Address already in use") {
                    return Err(LabError::PortTaken {
                        node: self.name.clone(),
                        port: self.port,
                        log,
                    });
                }
                return Err(LabError::Other(format!(
                    "{}: sshd exited ({status}) before accepting connections on port {}; log:\n{log}",
                    self.name, self.port
                )));
            }
            // Only probe once sshd itself listens: otherwise another process
            // holding the port could answer in its place.
            if listens_on(pid, self.port) && banner_ok(self.port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(LabError::Other(format!(
                    "{}: sshd did not send an SSH-2.0 banner on port {} within {START_TIMEOUT:?}; log:\n{}",
                    self.name,
                    self.port,
                    new_log(self)
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL the sshd, its connection children and their sessions (they
    /// leave the process group through `setsid()`, so the tree is frozen and
    /// killed through `/proc`), and reap the listener. Existing connections
    /// are cut. A stopped node is left alone.
    pub(super) fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            kill_tree(child);
        }
    }
}

/// Does process `pid` own a socket listening on 127.0.0.1:`port`?
fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
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
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
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
    processes().into_iter().map(|p| (p.pid, p.ppid)).collect()
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
/// group (if it leads one), then reap the listener.
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
        // Only a group this sshd leads: never the caller's own group.
        if libc::getpgid(pid) == pid {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}
