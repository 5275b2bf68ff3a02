//! A running `imaging agent` and the pipes to it: over SSH for remote nodes,
//! as a local child process for `local = true` nodes. Either way the
//! controller speaks the same protocol.

use std::path::PathBuf;
use std::sync::Arc;

use openssh::Session;
use tokio::io::{AsyncRead, BufReader, BufWriter};
use tokio::task::JoinHandle;

use crate::node::ssh::{self, SshError};
use crate::proto::{self, Msg};

/// Where the agent comes from on a node.
#[derive(Debug, Clone)]
pub struct AgentSource {
    /// A configured path on the nodes (`[load] agent_path`), used as is.
    pub configured: Option<String>,
    /// This executable, uploaded to nodes that lack it.
    pub exe: PathBuf,
    /// Digest of `exe`: names the cached copy on the node.
    pub digest_hex: String,
}

/// The running executable: `/proc/self/exe` is its own file even after a
/// package upgrade replaced the path it was started from.
const SELF_EXE: &str = "/proc/self/exe";

impl AgentSource {
    pub fn new(configured: &str) -> std::io::Result<Self> {
        let exe = std::env::current_exe()?;
        let (digest_hex, _) = file_digest(&open_self(&exe)?)?;
        Ok(AgentSource {
            configured: (!configured.is_empty()).then(|| configured.to_string()),
            digest_hex,
            exe,
        })
    }

    /// The agent's path on the node (relative paths are from the login directory).
    fn remote_path(&self) -> String {
        match &self.configured {
            Some(p) => p.clone(),
            None => format!(".cache/imaging/agent-{}", &self.digest_hex[..16]),
        }
    }

    /// Start the agent on the node and exchange Hellos. The cached copy is
    /// started directly (one SSH channel); if it is missing, or there but
    /// does not start (a copy a killed run of an older version left cut
    /// short), this executable is uploaded into the user's cache there (to
    /// a temporary name, renamed only once all of it arrived) and started
    /// again.
    pub async fn start(&self, session: Session) -> Result<AgentLink, StartError> {
        let session = Arc::new(session);
        let path = self.remote_path();
        let mut link = AgentLink::over_ssh(session.clone(), &path)
            .await
            .map_err(|e| StartError::Failed(e.to_string()))?;
        let first = match link.handshake().await {
            Ok(()) => return Ok(link),
            Err(e) => e,
        };
        let (missing, stderr) = link.end_quietly().await;
        if let StartError::Incompatible(_) = first {
            return Err(StartError::Incompatible(format!(
                "the agent did not start: {first}"
            )));
        }
        if self.configured.is_some() {
            return Err(if missing {
                StartError::Missing(format!(
                    "no agent at {path} on the node ([load] agent_path)"
                ))
            } else {
                start_failed(&first, &stderr)
            });
        }
        self.upload(&session, &path)
            .await
            .map_err(StartError::Failed)?;
        let mut link = AgentLink::over_ssh(session, &path)
            .await
            .map_err(|e| StartError::Failed(e.to_string()))?;
        match link.handshake().await {
            Ok(()) => Ok(link),
            Err(StartError::Failed(_)) if !missing => {
                // The fresh copy fails like the cached one did: say why.
                let second = link.end_quietly().await.1;
                Err(start_failed(&first, &second))
            }
            Err(e) => Err(e),
        }
    }

    /// Send this executable (the bytes its digest names) to `path` on the
    /// node. The node renames it into place only when every byte arrived, so
    /// a cut upload (a killed run, a dropped link) never leaves a broken
    /// agent under the name later runs trust.
    async fn upload(&self, session: &Session, path: &str) -> Result<(), String> {
        let (file, size) = self.checked_file()?;
        let status = session
            .shell(upload_script(path, size))
            .stdin(openssh::Stdio::from(file))
            .stdout(openssh::Stdio::null())
            .stderr(openssh::Stdio::null())
            .status()
            .await
            .map_err(|e| ssh::describe(&e).to_string())?;
        if !status.success() {
            return Err(format!("uploading the agent to {path} failed ({status})"));
        }
        Ok(())
    }

    /// This executable, opened and checked again: an executable changed in
    /// place since the run started is refused rather than sent under the
    /// old name; its size. ssh reads it from the start (the digest is taken
    /// with positioned reads).
    fn checked_file(&self) -> Result<(std::fs::File, usize), String> {
        let cannot = |e: std::io::Error| format!("cannot read {}: {e}", self.exe.display());
        let file = open_self(&self.exe).map_err(cannot)?;
        let (digest, size) = file_digest(&file).map_err(cannot)?;
        if digest != self.digest_hex {
            return Err(format!(
                "{} changed on disk since this run started (rebuilt in place?): run again",
                self.exe.display()
            ));
        }
        Ok((file, size))
    }
}

/// The write end of the agent's stdin as tokio's pipe (non-blocking,
/// registered), widened to 1 MiB.
fn sender(fd: std::os::fd::OwnedFd) -> std::io::Result<tokio::net::unix::pipe::Sender> {
    use std::os::fd::AsFd;
    crate::proto::pipes::widen(fd.as_fd());
    tokio::net::unix::pipe::Sender::from_owned_fd(fd)
}

/// This executable: the running file, else `exe`.
fn open_self(exe: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::File::open(SELF_EXE).or_else(|_| std::fs::File::open(exe))
}

/// The file's digest as 32 hex digits, and its size.
fn file_digest(file: &std::fs::File) -> std::io::Result<(String, usize)> {
    let (digest, size) = crate::image::digest::file_digest(file)?;
    let size = usize::try_from(size).map_err(std::io::Error::other)?;
    Ok((format!("{digest:032x}"), size))
}

/// The node's side of an upload of `size` bytes to `path` (relative to the
/// login directory): into a temporary file, which becomes `path` only if it
/// holds exactly `size` bytes; otherwise it is removed and the script fails.
fn upload_script(path: &str, size: usize) -> String {
    format!(
        "umask 077 && mkdir -p .cache/imaging && t={path}.$$ && cat > \"$t\" \
         && [ \"$(wc -c < \"$t\")\" -eq {size} ] && chmod 700 \"$t\" && mv -f \"$t\" {path} \
         || {{ rm -f \"$t\"; exit 1; }}"
    )
}

/// The agent did not answer: its last words on stderr, else what the
/// handshake saw.
fn start_failed(first: &StartError, stderr: &str) -> StartError {
    let why = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    if why.is_empty() {
        StartError::Failed(format!("the agent did not start: {first}"))
    } else {
        StartError::Failed(format!("the agent did not start: {why}"))
    }
}

/// Why the agent could not be started on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartError {
    /// The configured agent (`[load] agent_path`) is not on the node: no
    /// use trying again.
    Missing(String),
    /// It did not start or answer (the upload, the session, its Hello).
    Failed(String),
    /// It answered, in another version of the protocol.
    Incompatible(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Missing(s) | StartError::Failed(s) | StartError::Incompatible(s) => {
                f.write_str(s)
            }
        }
    }
}

enum Process {
    Ssh(openssh::Child<Arc<Session>>),
    Local(tokio::process::Child),
}

/// The controller's side of the agent's stdin: a pipe (to ssh, or to a
/// local agent), so chunk data can be spliced into it from the image file
/// ([`crate::node::splice`]).
pub type Tx = BufWriter<tokio::net::unix::pipe::Sender>;
/// The controller's side of the agent's stdout.
pub type Rx = BufReader<Box<dyn AsyncRead + Unpin + Send>>;

pub struct AgentLink {
    pub tx: Tx,
    pub rx: Rx,
    pub end: LinkEnd,
}

/// What keeps the agent running; closed once the pipes are dropped.
pub struct LinkEnd {
    stderr: JoinHandle<String>,
    process: Process,
    session: Option<Arc<Session>>,
}

const PIPE_BUFFER: usize = 256 << 10;

/// The exit code of a POSIX shell asked to run a command that does not
/// exist.
const COMMAND_NOT_FOUND: i32 = 127;

fn stderr_collector<R: AsyncRead + Unpin + Send + 'static>(r: Option<R>) -> JoinHandle<String> {
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut text = String::new();
        if let Some(mut r) = r {
            let mut buf = Vec::new();
            let _ = (&mut r).take(64 << 10).read_to_end(&mut buf).await;
            text = String::from_utf8_lossy(&buf).into_owned();
        }
        text
    })
}

impl AgentLink {
    /// Start the agent over an open SSH session.
    pub async fn over_ssh(session: Arc<Session>, agent_path: &str) -> Result<Self, SshError> {
        let mut child = session
            .clone()
            .arc_command(agent_path)
            .arg("agent")
            .stdin(openssh::Stdio::piped())
            .stdout(openssh::Stdio::piped())
            .stderr(openssh::Stdio::piped())
            .spawn()
            .await
            .map_err(|e| ssh::describe(&e))?;
        let (Some(stdin), Some(stdout)) = (child.stdin().take(), child.stdout().take()) else {
            return Err(SshError::other("the agent's pipes are missing"));
        };
        {
            use std::os::fd::AsFd;
            crate::proto::pipes::widen(stdout.as_fd());
        }
        let stdin = stdin
            .into_owned_fd()
            .and_then(sender)
            .map_err(|e| SshError::other(format!("the agent's stdin: {e}")))?;
        let stderr = stderr_collector(child.stderr().take());
        Ok(AgentLink {
            tx: BufWriter::with_capacity(PIPE_BUFFER, stdin),
            rx: BufReader::with_capacity(PIPE_BUFFER, Box::new(stdout)),
            end: LinkEnd {
                stderr,
                process: Process::Ssh(child),
                session: Some(session),
            },
        })
    }

    /// Start this executable's agent locally (a `local = true` node).
    pub fn local() -> Result<Self, SshError> {
        let exe = std::env::current_exe()
            .map_err(|e| SshError::other(format!("cannot find this executable: {e}")))?;
        let mut child = tokio::process::Command::new(exe)
            .arg("agent")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| SshError::other(format!("cannot start the local agent: {e}")))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(SshError::other("the agent's pipes are missing"));
        };
        {
            use std::os::fd::AsFd;
            crate::proto::pipes::widen(stdout.as_fd());
        }
        let stdin = stdin
            .into_owned_fd()
            .and_then(sender)
            .map_err(|e| SshError::other(format!("the local agent's stdin: {e}")))?;
        let stderr = stderr_collector(child.stderr.take());
        Ok(AgentLink {
            tx: BufWriter::with_capacity(PIPE_BUFFER, stdin),
            rx: BufReader::with_capacity(PIPE_BUFFER, Box::new(stdout)),
            end: LinkEnd {
                stderr,
                process: Process::Local(child),
                session: None,
            },
        })
    }

    /// Exchange Hellos. An agent of another protocol version is
    /// [`StartError::Incompatible`].
    pub async fn handshake(&mut self) -> Result<(), StartError> {
        use tokio::io::AsyncWriteExt;
        let failed = |e: proto::ProtocolError| StartError::Failed(e.to_string());
        proto::write_msg(&mut self.tx, &Msg::hello())
            .await
            .map_err(failed)?;
        self.tx
            .flush()
            .await
            .map_err(|e| StartError::Failed(e.to_string()))?;
        let hello = proto::read_msg(&mut self.rx).await.map_err(failed)?;
        proto::check_hello(&hello).map_err(|e| StartError::Incompatible(format!("agent: {e}")))
    }

    /// Close the pipes and wait for the agent, keeping the SSH session for
    /// another command; returns whether the node had no such command (the
    /// shell's exit code 127, which openssh reports as a remote `NotFound`)
    /// and what it wrote on stderr.
    async fn end_quietly(self) -> (bool, String) {
        let AgentLink { tx, rx, end } = self;
        drop(tx);
        drop(rx);
        let LinkEnd {
            stderr, process, ..
        } = end;
        let missing = match process {
            Process::Ssh(child) => {
                match tokio::time::timeout(std::time::Duration::from_secs(5), child.wait()).await {
                    Ok(Ok(status)) => status.code() == Some(COMMAND_NOT_FOUND),
                    Ok(Err(openssh::Error::Remote(e))) => e.kind() == std::io::ErrorKind::NotFound,
                    _ => false,
                }
            }
            Process::Local(_) => false,
        };
        let text = tokio::time::timeout(std::time::Duration::from_secs(2), stderr)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        (missing, text)
    }

    /// Start this executable's agent locally and exchange Hellos.
    pub async fn local_ready() -> Result<Self, StartError> {
        let mut link = AgentLink::local().map_err(|e| StartError::Failed(e.to_string()))?;
        link.handshake().await?;
        Ok(link)
    }

    /// Close the pipes, wait for the agent, close the SSH session; returns
    /// what the agent wrote on stderr (its last words, if it failed).
    pub async fn close(self) -> String {
        let AgentLink { tx, rx, end } = self;
        drop(tx);
        drop(rx);
        end.close().await
    }
}

/// How long [`last_word`] waits for the agent's `Error` frame.
const LAST_WORD_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// After the link failed (a write the agent did not take, say): the kind
/// and message of the `Error` frame the agent sent before it ended, if one
/// is still waiting on its stdout (frames before it are skipped). Bounded:
/// at most a couple of seconds, and nothing once the stream ends.
pub async fn last_word(rx: &mut Rx) -> Option<(proto::ErrorKind, String)> {
    let read = async {
        loop {
            match proto::read_msg(rx).await {
                Ok(Msg::Error { kind, message }) => return Some((kind, message)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    };
    tokio::time::timeout(LAST_WORD_WAIT, read)
        .await
        .ok()
        .flatten()
}

impl LinkEnd {
    /// Wait for the agent (its pipes must be dropped first), close the SSH
    /// session; returns what the agent wrote on stderr.
    pub async fn close(self) -> String {
        let LinkEnd {
            stderr,
            process,
            session,
        } = self;
        match process {
            Process::Ssh(child) => {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), child.wait()).await;
            }
            Process::Local(mut child) => {
                if tokio::time::timeout(std::time::Duration::from_secs(5), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
            }
        }
        let text = tokio::time::timeout(std::time::Duration::from_secs(2), stderr)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        if let Some(session) = session
            && let Ok(session) = Arc::try_unwrap(session)
        {
            let _ = session.close().await;
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ErrorKind;

    fn rx_of(msgs: &[Msg], tail: &[u8]) -> Rx {
        let mut bytes = Vec::new();
        for m in msgs {
            proto::write_msg_sync(&mut bytes, m).unwrap();
        }
        bytes.extend_from_slice(tail);
        BufReader::new(Box::new(std::io::Cursor::new(bytes)))
    }

    #[tokio::test]
    async fn last_word_is_the_error_frame_after_what_was_still_unread() {
        let mut rx = rx_of(
            &[
                Msg::Written {
                    index: 3,
                    bytes_written: 4096,
                },
                Msg::Error {
                    kind: ErrorKind::Target,
                    message: "No space left on device".into(),
                },
            ],
            &[],
        );
        assert_eq!(
            last_word(&mut rx).await,
            Some((ErrorKind::Target, "No space left on device".into()))
        );
    }

    #[tokio::test]
    async fn no_error_frame_no_last_word() {
        let written = Msg::Written {
            index: 0,
            bytes_written: 1,
        };
        assert_eq!(last_word(&mut rx_of(&[written], &[])).await, None);
        // A frame cut short by the end of the stream.
        assert_eq!(last_word(&mut rx_of(&[], &[9, 0, 0])).await, None);
    }

    #[tokio::test]
    async fn a_silent_agent_is_waited_for_only_so_long() {
        let (_keep, quiet) = tokio::io::duplex(64);
        let mut rx: Rx = BufReader::new(Box::new(quiet));
        let started = std::time::Instant::now();
        assert_eq!(last_word(&mut rx).await, None);
        let took = started.elapsed();
        assert!(
            took >= LAST_WORD_WAIT && took < LAST_WORD_WAIT * 3,
            "{took:?}"
        );
    }

    /// The node's side of an upload, run by a real shell in a directory of
    /// its own: all the bytes become the agent; fewer (the controller was
    /// killed, the link dropped) leave nothing under the agent's name.
    #[test]
    fn an_upload_is_renamed_into_place_only_when_every_byte_arrived() {
        let path = ".cache/imaging/agent-0123456789abcdef";
        let run = |dir: &std::path::Path, sent: &[u8], size: usize| {
            use std::io::Write;
            let mut child = std::process::Command::new("sh")
                .arg("-c")
                .arg(upload_script(path, size))
                .current_dir(dir)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(sent).unwrap();
            child.wait().unwrap()
        };
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();

        let dir = tempfile::tempdir().unwrap();
        assert!(!run(dir.path(), &data[..60_000], data.len()).success());
        let left: Vec<_> = std::fs::read_dir(dir.path().join(".cache/imaging"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "a cut upload left {left:?}");

        assert!(run(dir.path(), &data, data.len()).success());
        assert_eq!(std::fs::read(dir.path().join(path)).unwrap(), data);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(path))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    /// The bytes uploaded are the ones the digest (the agent's name on the
    /// node) was taken of: a file that changed since is refused.
    #[test]
    fn the_agent_is_read_from_the_running_file_and_checked_against_its_digest() {
        let mut source = AgentSource::new("").unwrap();
        let bytes = std::fs::read(&source.exe).unwrap();
        assert_eq!(
            source.digest_hex,
            format!("{:032x}", crate::image::digest::chunk_digest(&bytes))
        );
        let (_, size) = source.checked_file().unwrap();
        assert_eq!(size, bytes.len());
        source.digest_hex = format!("{:032x}", 1);
        let e = source.checked_file().unwrap_err();
        assert!(e.contains("changed on disk since this run started"), "{e}");
    }
}
