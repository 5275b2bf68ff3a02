//! A throwaway lab on this machine for `imaging demo`: real `sshd` nodes on
//! 127.0.0.1 (when sshd is installed and we are root), each with its own
//! port and host key, an authorized client key and a known_hosts file.
//! Everything lives in one directory and stops when the [`Lab`] drops.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";
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

pub struct Lab {
    dir: PathBuf,
    sshd: Vec<Child>,
    pub ports: Vec<u16>,
}

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

fn keygen(path: &Path) -> Result<(), String> {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("ssh-keygen: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("ssh-keygen failed for {}", path.display()))
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

impl Lab {
    /// Start `n` sshd nodes; the client key is `dir/client_key`.
    pub fn start(dir: &Path, n: usize) -> Result<Lab, String> {
        let io = |e: std::io::Error| e.to_string();
        std::fs::create_dir_all("/run/sshd").map_err(io)?;
        let keys = dir.join("keys");
        std::fs::create_dir_all(&keys).map_err(io)?;
        let client = dir.join("client_key");
        keygen(&client)?;
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).map_err(io)?;
        let mut lab = Lab {
            dir: dir.to_path_buf(),
            sshd: Vec::new(),
            ports: Vec::new(),
        };
        let mut known_hosts = String::new();
        for i in 0..n {
            let key = keys.join(format!("host{i}"));
            keygen(&key)?;
            let port = free_port()?;
            let config = keys.join(format!("sshd{i}.conf"));
            let text = SshdConfig {
                port,
                address: "127.0.0.1",
                host_key: &key,
                authorized_keys: &dir.join("authorized_keys"),
            }
            .render();
            std::fs::write(&config, text).map_err(io)?;
            let child = Command::new(SSHD)
                .args(["-D", "-e", "-f"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start sshd: {e}"))?;
            lab.sshd.push(child);
            lab.ports.push(port);
            let public = std::fs::read_to_string(key.with_extension("pub")).map_err(io)?;
            let mut parts = public.split_whitespace();
            if let (Some(kind), Some(blob)) = (parts.next(), parts.next()) {
                known_hosts.push_str(&format!("[127.0.0.1]:{port} {kind} {blob}\n"));
            }
        }
        std::fs::write(dir.join("known_hosts"), known_hosts).map_err(io)?;
        for &port in &lab.ports {
            lab.wait_listening(port)?;
        }
        Ok(lab)
    }

    fn wait_listening(&self, port: u16) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("sshd on port {port} did not start"))
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client_key")
    }

    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.sshd {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
