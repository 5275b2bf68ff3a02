//! What one sshd node needs, whichever lab runs it: the sshd and SFTP
//! server paths, the one configuration template and its values, keys,
//! free ports, the privilege-separation directory, and the lab's errors.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};

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
    pub(super) fn io(path: &Path, e: std::io::Error) -> LabError {
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
pub(super) fn keygen(path: &Path) -> Result<(), LabError> {
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

pub(super) fn mkdir(path: &Path) -> Result<(), LabError> {
    std::fs::create_dir_all(path).map_err(|e| LabError::io(path, e))
}

pub(super) fn ensure_privsep_dir() -> Result<(), LabError> {
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
