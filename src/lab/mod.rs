//! A throwaway lab on this machine: real `sshd` nodes on 127.0.0.1 (when
//! sshd is installed and we are root), each with its own port, host key,
//! sshd_config (from the one template, `assets/sshd_config`) and log, a
//! client key authorized on every node and a known_hosts file holding every
//! host key. `imaging demo` runs on one, and so does the integration-test
//! rig (`tests/common`), which adds its test conveniences on top.
//! Everything lives in one directory; the sshd processes stop when the
//! [`Lab`] drops.
//!
//! Layout of the directory: `client_key` (and `.pub`), `authorized_keys`,
//! `known_hosts`, `hostkeys/NAME_ed25519`, `sshd/NAME.sshd_config`,
//! `sshd/NAME.log` and `targets/` (each node's target is
//! `targets/NAME.img`).

mod node;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub use node::{Node, START_TIMEOUT};

pub const SSHD: &str = "/usr/sbin/sshd";
/// Where Debian and Ubuntu install OpenSSH's SFTP server.
pub const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";

/// The sshd configuration of every lab node, with placeholders.
pub const SSHD_CONFIG_TEMPLATE: &str = include_str!("../../assets/sshd_config");

/// What makes one node's sshd configuration.
pub struct SshdConfig<'a> {
    pub port: u16,
    pub address: &'a str,
    pub host_key: &'a Path,
    pub authorized_keys: &'a Path,
}

impl SshdConfig<'_> {
    /// The template with this node's values filled in.
    pub fn render(&self) -> String {
        SSHD_CONFIG_TEMPLATE
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
            .replace("{port}", &self.port.to_string())
            .replace("{address}", self.address)
            .replace("{host_key}", &self.host_key.display().to_string())
            .replace(
                "{authorized_keys}",
                &self.authorized_keys.display().to_string(),
            )
            .replace("{sftp_server}", SFTP_SERVER)
            .replace("{set_env}", "")
    }
}

/// Sshd's privilege-separation directory, which it needs to exist.
pub const PRIVSEP_DIR: &str = "/run/sshd";
/// How many times a node is started when its port turns out to be taken.
pub const PORT_TRIES: usize = 5;

/// What went wrong starting a lab.
#[derive(Debug)]
pub enum LabError {
    /// A node's sshd could not bind its port: someone else holds it.
    PortTaken {
        node: String,
        port: u16,
        log: String,
    },
    /// Anything else, said in full (sshd's log included where it helps).
    Other(String),
}

impl LabError {
    fn io(path: &Path, e: std::io::Error) -> LabError {
        LabError::Other(format!("{}: {e}", path.display()))
    }
}

impl std::fmt::Display for LabError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LabError::PortTaken { node, port, log } => {
                write!(f, "{node}: port {port} is taken; sshd log:\n{log}")
            }
            LabError::Other(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for LabError {}

/// Why real sshd nodes cannot be used here (None: they can).
pub fn sshd_unavailable() -> Option<String> {
    if !Path::new(SSHD).exists() {
        return Some(format!("{SSHD} is not installed"));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("sshd nodes need root (sshd's privilege separation)".into());
    }
    for tool in ["ssh-keygen", "ssh"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

/// A fresh ed25519 key pair at `path` and `path.pub`.
fn keygen(path: &Path) -> Result<(), LabError> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "lab", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::Other(format!("ssh-keygen: {e}")))?;
    out.status.success().then_some(()).ok_or_else(|| {
        LabError::Other(format!(
            "ssh-keygen failed for {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    })
}

/// `n` distinct free 127.0.0.1 ports: all are bound at once, then released.
pub fn free_ports(n: usize) -> Result<Vec<u16>, LabError> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| LabError::Other(format!("no free port: {e}")))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(|e| LabError::Other(format!("no free port: {e}")))
}

fn mkdir(path: &Path) -> Result<(), LabError> {
    std::fs::create_dir_all(path).map_err(|e| LabError::io(path, e))
}

fn ensure_privsep_dir() -> Result<(), LabError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o755).create(PRIVSEP_DIR) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(LabError::io(Path::new(PRIVSEP_DIR), e))
        }
        _ => Ok(()),
    }
}

/// Make `cmd`'s process get SIGKILL when the spawning *thread* exits or
/// this process dies, even by SIGKILL (`PR_SET_PDEATHSIG`).
pub fn die_with_this_thread(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and
    // exec, and no allocation.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Sshd nodes on 127.0.0.1 sharing one client key and one known_hosts.
pub struct Lab {
    dir: PathBuf,
    client_key: PathBuf,
    known_hosts: PathBuf,
    nodes: Vec<Node>,
    /// Adjusts every sshd command before it is spawned.
    hook: Option<fn(&mut Command)>,
}

impl Lab {
    /// Keys, ports, sshd configs and known_hosts for one node per name, in
    /// `dir`; no sshd is started yet.
    pub fn prepare(dir: &Path, names: &[String]) -> Result<Lab, LabError> {
        ensure_privsep_dir()?;
        for sub in ["hostkeys", "sshd", "targets"] {
            mkdir(&dir.join(sub))?;
        }
        let client_key = dir.join("client_key");
        keygen(&client_key)?;
        let authorized_keys = dir.join("authorized_keys");
        std::fs::copy(client_key.with_extension("pub"), &authorized_keys)
            .map_err(|e| LabError::io(&authorized_keys, e))?;
        let ports = free_ports(names.len())?;
        let nodes = names
            .iter()
            .zip(ports)
            .map(|(name, port)| Node::create(dir, name, port, &authorized_keys))
            .collect::<Result<Vec<_>, _>>()?;
        let lab = Lab {
            dir: dir.to_path_buf(),
            known_hosts: dir.join("known_hosts"),
            client_key,
            nodes,
            hook: None,
        };
        lab.write_known_hosts()?;
        Ok(lab)
    }

    /// Start `n` sshd nodes named `{prefix}01`…, in `dir`.
    pub fn start(dir: &Path, prefix: &str, n: usize) -> Result<Lab, LabError> {
        let names: Vec<String> = (1..=n).map(|i| format!("{prefix}{i:02}")).collect();
        let mut lab = Lab::prepare(dir, &names)?;
        for i in 0..n {
            lab.start_moving(i)?;
        }
        Ok(lab)
    }

    /// Every sshd command goes through `hook` before it is spawned (the
    /// test rig ties sshd to the test's thread and gives it its own
    /// process group).
    pub fn set_hook(&mut self, hook: fn(&mut Command)) {
        self.hook = Some(hook);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
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
        self.dir.join("authorized_keys")
    }

    fn write_known_hosts(&self) -> Result<(), LabError> {
        let text = self
            .nodes
            .iter()
            .map(Node::known_hosts_line)
            .collect::<Result<String, _>>()?;
        std::fs::write(&self.known_hosts, text).map_err(|e| LabError::io(&self.known_hosts, e))
    }

    /// Start node `i` on its port, once; a running node is killed first.
    /// Returns when sshd accepts SSH (within [`START_TIMEOUT`]).
    pub fn start_node(&mut self, i: usize) -> Result<(), LabError> {
        self.kill(i);
        let hook = self.hook;
        self.nodes[i].start(hook)
    }

    /// Start node `i`, giving it a new free port (and rewriting its config
    /// and known_hosts) when its port turns out to be taken, up to
    /// [`PORT_TRIES`] times.
    pub fn start_moving(&mut self, i: usize) -> Result<(), LabError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.start_node(i) {
                Err(LabError::PortTaken { .. }) if tries < PORT_TRIES => {
                    self.nodes[i].port = free_ports(1)?[0];
                    self.nodes[i].write_sshd_config(&self.authorized_keys())?;
                    self.write_known_hosts()?;
                }
                Err(LabError::PortTaken { node, log, .. }) => {
                    return Err(LabError::Other(format!(
                        "{node}: port clash {tries} times in a row, giving up; last sshd log:\n{log}"
                    )));
                }
                other => return other,
            }
        }
    }

    /// SIGKILL node `i`'s sshd with every connection and session it serves,
    /// and reap it. A stopped node is left alone.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}
