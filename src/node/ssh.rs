//! The one SSH session builder every command uses (on the `openssh` crate).
//!
//! Sessions never prompt (BatchMode), honour the configured user, port,
//! identity, known-hosts policy and connect timeout, and keep their control
//! sockets in a private runtime directory that is emptied when they close.

use std::path::{Path, PathBuf};
use std::time::Duration;

use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder};

use crate::config::{CipherPreference, Config, KnownHostsPolicy, expand_home};
use crate::inventory::Node;

/// Resolved SSH settings (from `[ssh]`), shared by all nodes of a run.
#[derive(Debug, Clone)]
pub struct SshSettings {
    pub user: String,
    pub port: u16,
    pub identity_file: Option<PathBuf>,
    pub known_hosts: KnownHostsPolicy,
    pub known_hosts_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub control_dir: PathBuf,
    /// The ssh configuration carrying imaging's cipher preference
    /// (`-F`; [`super::ciphers`]), None: ssh's own files alone.
    pub config_file: Option<PathBuf>,
}

impl SshSettings {
    pub fn from_config(config: &Config) -> std::io::Result<Self> {
        let ssh = &config.ssh;
        let control_dir = control_dir()?;
        let config_file = match ssh.ciphers {
            CipherPreference::Auto => super::ciphers::write_config(&control_dir)?,
            CipherPreference::Ssh => None,
        };
        Ok(SshSettings {
            user: ssh.user.clone(),
            port: ssh.port,
            identity_file: ssh.identity_file.as_deref().map(expand_home),
            known_hosts: ssh.known_hosts,
            known_hosts_file: ssh.known_hosts_file.as_deref().map(expand_home),
            connect_timeout: Duration::from_secs(ssh.connect_timeout.max(1)),
            control_dir,
            config_file,
        })
    }
}

/// A private directory for control sockets. Unix socket paths are short
/// (108 bytes), so a deep runtime dir falls back to the temp dir.
fn control_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = base_control_dir()?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    remove_stale_run_dirs(&dir);
    // One directory per run, named by our pid, so a run that was killed
    // (and could not clean up) is recognised by the next one.
    let own = dir.join(run_dir_name(std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&own)
        .or_else(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Ok(())
            } else {
                Err(e)
            }
        })?;
    Ok(own)
}

/// The directory holding the per-run control directories.
fn base_control_dir() -> std::io::Result<PathBuf> {
    let preferred = directories::BaseDirs::new()
        .and_then(|b| b.runtime_dir().map(Path::to_path_buf))
        .map(|d| d.join("imaging"))
        .filter(|d| d.as_os_str().len() < 60);
    let dir = preferred.unwrap_or_else(|| {
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        std::env::temp_dir().join(format!("imaging-{uid}"))
    });
    Ok(dir)
}

fn run_dir_name(pid: u32) -> String {
    format!("run-{pid}")
}

/// Remove the per-run control directories whose process is gone (a run
/// killed before it could remove its own).
fn remove_stale_run_dirs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let stale = match name.strip_prefix("run-").map(str::parse::<i32>) {
            Some(Ok(pid)) => !process_alive(pid),
            _ => false,
        };
        if stale {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether `pid` is a live process (of any user: EPERM means it exists).
fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Remove this run's control directory, at the end of the run (its
/// sessions are closed by then).
pub fn remove_own_control_dir() {
    if let Ok(dir) = base_control_dir() {
        let _ = std::fs::remove_dir_all(dir.join(run_dir_name(std::process::id())));
    }
}

/// What kind of SSH failure, as far as ssh's own output tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SshFailure {
    /// The node refused every key offered for the user.
    AuthRefused,
    /// `strict` checking and the node's host key is not in known_hosts.
    HostKeyUnknown,
    /// known_hosts holds a different key for the node.
    HostKeyChanged,
    /// Nothing listens on the port (yet).
    Refused,
    /// No route, unreachable network, unresolvable name.
    Unreachable,
    /// No TCP connection or handshake in time.
    Timeout,
    /// The node closed or reset the connection.
    Closed,
    /// Anything else (a command's exit status, a local error, …).
    Other,
}

/// Why an SSH connection failed: its kind, and the reason in words for
/// the user (naming the user, key and known_hosts file where they matter).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct SshError {
    pub kind: SshFailure,
    pub reason: String,
}

impl SshError {
    pub fn new(kind: SshFailure, reason: impl Into<String>) -> Self {
        SshError {
            kind,
            reason: reason.into(),
        }
    }

    pub fn other(reason: impl Into<String>) -> Self {
        Self::new(SshFailure::Other, reason)
    }

    /// Whether another attempt may succeed: a node still booting refuses,
    /// times out or drops; a refused key or a wrong host key stays so.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self.kind,
            SshFailure::AuthRefused | SshFailure::HostKeyUnknown | SshFailure::HostKeyChanged
        )
    }
}

/// Open a session to `node`. `limit` caps the connect timeout (a deadline
/// that is closer than `connect_timeout`), so a hung handshake never outlives it.
pub async fn connect(
    settings: &SshSettings,
    node: &Node,
    limit: Option<Duration>,
) -> Result<Session, SshError> {
    let mut timeout = settings.connect_timeout;
    if let Some(limit) = limit {
        timeout = timeout.min(limit.max(Duration::from_secs(1)));
    }
    let mut b = SessionBuilder::default();
    b.user(node.user.clone().unwrap_or_else(|| settings.user.clone()))
        .port(node.port.unwrap_or(settings.port))
        .connect_timeout(timeout)
        .server_alive_interval(Duration::from_secs(5))
        .control_directory(&settings.control_dir)
        // A safety net: a master orphaned by a killed controller exits on its own.
        .control_persist(ControlPersist::IdleFor(
            std::num::NonZeroUsize::new(30).expect("30 is not zero"),
        ));
    if let Some(id) = &settings.identity_file {
        b.keyfile(id);
    }
    if let Some(file) = &settings.config_file {
        b.config_file(file);
    }
    match settings.known_hosts {
        KnownHostsPolicy::Strict => {
            b.known_hosts_check(KnownHosts::Strict);
        }
        KnownHostsPolicy::AcceptNew => {
            b.known_hosts_check(KnownHosts::Add);
        }
        KnownHostsPolicy::Off => {
            b.known_hosts_check(KnownHosts::Accept);
            b.user_known_hosts_file("/dev/null");
        }
    }
    if let (Some(file), false) = (
        &settings.known_hosts_file,
        settings.known_hosts == KnownHostsPolicy::Off,
    ) {
        b.user_known_hosts_file(file);
    }
    let attempt = b.connect(&node.address);
    // ssh's own ConnectTimeout covers TCP and the handshake; this outer bound
    // is for anything it doesn't (it is whole seconds, we allow one more).
    match tokio::time::timeout(timeout + Duration::from_secs(1), attempt).await {
        Ok(Ok(session)) => Ok(session),
        Ok(Err(e)) => Err(explain(settings, node, describe(&e))),
        Err(_) => Err(SshError::new(
            SshFailure::Timeout,
            format!("no SSH handshake within {}s", timeout.as_secs()),
        )),
    }
}

/// Run `command` (a shell command line) and require exit status 0.
pub async fn run_ok(session: &Session, command: &str) -> Result<(), SshError> {
    let status = session
        .shell(command)
        .stdin(openssh::Stdio::null())
        .stdout(openssh::Stdio::null())
        .stderr(openssh::Stdio::null())
        .status()
        .await
        .map_err(|e| describe(&e))?;
    if status.success() {
        Ok(())
    } else {
        Err(SshError::other(format!("`{command}` exited with {status}")))
    }
}

/// Add what the user needs to fix a permanent failure: the user and key
/// the node refused, the known_hosts file that disagrees.
fn explain(settings: &SshSettings, node: &Node, e: SshError) -> SshError {
    let user = node.user.as_deref().unwrap_or(&settings.user);
    let port = node.port.unwrap_or(settings.port);
    let host = &node.address;
    let known_hosts = match &settings.known_hosts_file {
        Some(f) => f.display().to_string(),
        None => "~/.ssh/known_hosts".to_string(),
    };
    let reason = match e.kind {
        SshFailure::AuthRefused => {
            let key = match &settings.identity_file {
                Some(k) => format!("key {}", k.display()),
                None => "ssh's default keys and agent".to_string(),
            };
            format!(
                "authentication refused: {host} port {port} did not let user {user} in with {key} (permission denied)"
            )
        }
        SshFailure::HostKeyUnknown => format!(
            "host key of {host} port {port} is not in {known_hosts} and known_hosts = \"strict\": add it there (ssh-keyscan -p {port} {host}) or use known_hosts = \"accept-new\""
        ),
        SshFailure::HostKeyChanged => {
            let entry = if port == 22 {
                host.clone()
            } else {
                format!("[{host}]:{port}")
            };
            format!(
                "host key of {host} port {port} has changed from the one recorded in {known_hosts}: if the node was reinstalled, remove the old key with `ssh-keygen -R '{entry}' -f {known_hosts}`"
            )
        }
        _ => return e,
    };
    SshError::new(e.kind, reason)
}

/// Classify openssh's error (ssh's own stderr when ssh failed) — the one
/// place ssh's output is read — into a kind and one short reason.
pub fn describe(e: &openssh::Error) -> SshError {
    let mut text = e.to_string();
    let mut all = text.clone();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = s.to_string();
        all.push('\n');
        all.push_str(&text);
        source = s.source();
    }
    let lower = all.to_lowercase();
    use SshFailure::*;
    let known = [
        (
            "remote host identification has changed",
            HostKeyChanged,
            "host key changed",
        ),
        ("offending", HostKeyChanged, "host key changed"),
        ("connection refused", Refused, "connection refused"),
        (
            "connection timed out during banner exchange",
            Timeout,
            "no SSH handshake (timed out during banner exchange)",
        ),
        ("operation timed out", Timeout, "connection timed out"),
        ("connection timed out", Timeout, "connection timed out"),
        (
            "host key verification failed",
            HostKeyUnknown,
            "host key verification failed (unknown host key)",
        ),
        (
            "permission denied",
            AuthRefused,
            "authentication refused (permission denied)",
        ),
        ("no route to host", Unreachable, "no route to host"),
        (
            "network is unreachable",
            Unreachable,
            "network is unreachable",
        ),
        (
            "could not resolve hostname",
            Unreachable,
            "could not resolve host name",
        ),
        (
            "connection closed by",
            Closed,
            "connection closed by the node",
        ),
        ("connection reset", Closed, "connection reset by the node"),
    ];
    for (needle, kind, reason) in known {
        if lower.contains(needle) {
            return SshError::new(kind, reason);
        }
    }
    SshError::other(
        text.lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("Warning: Permanently added"))
            .unwrap_or("ssh failed"),
    )
}

/// Become the parent of orphaned processes (ssh masters daemonize with `-f`),
/// so [`end_orphans`] can find any that a cancelled connect left behind.
pub fn adopt_orphans() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer flag only.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

/// Terminate `ssh` processes that are still our children (an attempt that
/// was cancelled mid-connect), so none outlives the run.
pub fn end_orphans() {
    let me = std::process::id() as i32;
    for p in crate::node::procs::processes() {
        if p.comm == "ssh" && p.ppid == me {
            // SAFETY: sending a signal to a pid we just read; worst case it is gone.
            unsafe {
                libc::kill(p.pid, libc::SIGTERM);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_dirs_of_dead_runs_are_removed_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        // A pid that surely is gone: a child that has been reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let mine = std::process::id();
        for name in [
            run_dir_name(dead),
            run_dir_name(mine),
            "unrelated".to_string(),
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        std::fs::write(dir.path().join(run_dir_name(dead)).join("master"), b"").unwrap();
        remove_stale_run_dirs(dir.path());
        assert!(!dir.path().join(run_dir_name(dead)).exists());
        assert!(dir.path().join(run_dir_name(mine)).exists());
        assert!(dir.path().join("unrelated").exists());
    }
}
