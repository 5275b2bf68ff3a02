//! Local shell commands with node placeholders: the `before` / `after`
//! hooks around a node's load, the `[power]` commands and the lease check.

use std::time::Duration;

use crate::inventory::Node;

/// Replace `{name} {number} {address} {mac} {pxe_mac} {cmc} {image}
/// {target}` in `template`.
pub fn expand(template: &str, node: &Node, image: &str, target: &str) -> String {
    template
        .replace("{name}", &node.name)
        .replace(
            "{number}",
            &node.number.map(|n| n.to_string()).unwrap_or_default(),
        )
        .replace("{address}", &node.address)
        .replace("{mac}", node.mac.as_deref().unwrap_or(""))
        .replace(
            "{pxe_mac}",
            &node.mac.as_deref().map(pxe_mac).unwrap_or_default(),
        )
        .replace("{cmc}", node.cmc.as_deref().unwrap_or(""))
        .replace("{image}", image)
        .replace("{target}", target)
}

/// The name pxelinux looks up in `pxelinux.cfg/` for a MAC address: `01-`
/// (the Ethernet hardware type) and the address in lowercase, dashed
/// (`00:03:1D:0E:03:19` → `01-00-03-1d-0e-03-19`).
pub fn pxe_mac(mac: &str) -> String {
    format!("01-{}", mac.trim().to_ascii_lowercase().replace(':', "-"))
}

/// The first placeholder of `template` that `node` has no value for
/// (`{mac}`, `{pxe_mac}`, `{cmc}`), so a run can refuse before it starts
/// rather than run `curl http:///reset`.
pub fn missing_placeholder(template: &str, node: &Node) -> Option<&'static str> {
    let lacks_mac = node.mac.as_deref().is_none_or(|m| m.trim().is_empty());
    let lacks_cmc = node.cmc.as_deref().is_none_or(|c| c.trim().is_empty());
    [
        ("{mac}", lacks_mac),
        ("{pxe_mac}", lacks_mac),
        ("{cmc}", lacks_cmc),
    ]
    .into_iter()
    .find(|(p, lacks)| *lacks && template.contains(p))
    .map(|(p, _)| p)
}

/// Longest a hook may run before it is killed and counted as failed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(300);

/// How a local command ended, when not well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// `sh` could not be started.
    Start(String),
    /// It exited non-zero (or died of a signal).
    Failed {
        /// `exit status: 3`, `signal: 9 (SIGKILL)`.
        status: String,
        /// Its last non-empty stderr line, if any.
        last_line: Option<String>,
    },
    /// Still running after the timeout: its process group was killed.
    TimedOut(Duration),
}

impl CommandError {
    /// The reason in a few words: the last stderr line, else the exit status.
    pub fn reason(&self) -> String {
        match self {
            CommandError::Start(e) => format!("cannot start sh: {e}"),
            CommandError::Failed {
                last_line: Some(line),
                ..
            } => line.clone(),
            CommandError::Failed { status, .. } => status.clone(),
            CommandError::TimedOut(t) => format!("timeout after {}", secs(*t)),
        }
    }
}

/// `10s`, `0.5s`.
pub fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}s")
    } else {
        format!("{s}s")
    }
}

/// Kills a command's whole process group unless disarmed: on a timeout, and
/// when the future running it is dropped (Ctrl-C), so that nothing it
/// started (a `curl`, a `sleep`) outlives the run.
struct GroupKill {
    pgid: Option<i32>,
}

impl GroupKill {
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            // SAFETY: kill(2) has no memory effects; the group's leader is
            // our unreaped child, so its id cannot have been reused.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Run `command` through `sh -c` in its own process group (so that a Ctrl-C
/// at the terminal does not kill an `after` hook that is cleaning up), with
/// `timeout`; returns its stdout. On a timeout the whole group is killed.
pub async fn run_command(command: &str, timeout: Duration) -> Result<String, CommandError> {
    use tokio::io::AsyncReadExt;
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| CommandError::Start(e.to_string()))?;
    let mut group = GroupKill {
        pgid: child.id().and_then(|id| i32::try_from(id).ok()),
    };
    let read = |pipe: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>| {
        tokio::spawn(async move {
            let mut bytes = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut bytes).await;
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(CommandError::Start(e.to_string())),
        Err(_) => {
            group.kill();
            let _ = child.wait().await;
            return Err(CommandError::TimedOut(timeout));
        }
    };
    // Exited: the group is left alone (its id may be reused once empty).
    group.pgid = None;
    // Something it left in the background may hold the pipes open: don't wait
    // for it longer than a moment.
    let collect = |h: tokio::task::JoinHandle<String>| async move {
        tokio::time::timeout(Duration::from_secs(1), h)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    };
    if status.success() {
        return Ok(collect(stdout).await);
    }
    let text = collect(stderr).await;
    let last_line = text
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string);
    Err(CommandError::Failed {
        status: status.to_string(),
        last_line,
    })
}

/// Run a hook (timeout [`HOOK_TIMEOUT`]); the error names the command.
pub async fn run(command: &str) -> Result<(), String> {
    match run_command(command, HOOK_TIMEOUT).await {
        Ok(_) => Ok(()),
        Err(CommandError::Start(e)) => Err(format!("cannot start `{command}`: {e}")),
        Err(CommandError::TimedOut(t)) => Err(format!(
            "`{command}` still running after {}, killed",
            secs(t)
        )),
        Err(CommandError::Failed {
            status,
            last_line: None,
        }) => Err(format!("`{command}` exited with {status}")),
        Err(CommandError::Failed {
            status,
            last_line: Some(last),
        }) => Err(format!("`{command}` exited with {status}: {last}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled() {
        let node = Node {
            name: "fit07".into(),
            number: Some(7),
            address: "192.168.3.7".into(),
            mac: Some("00:03:1D:0e:03:19".into()),
            cmc: Some("192.168.1.7".into()),
            ..Node::default()
        };
        assert_eq!(
            expand(
                "pxe {name} {number} {address} {mac} {image} {target} {cmc} {pxe_mac}",
                &node,
                "u.img",
                "/dev/sda"
            ),
            "pxe fit07 7 192.168.3.7 00:03:1D:0e:03:19 u.img /dev/sda 192.168.1.7 01-00-03-1d-0e-03-19"
        );
    }

    #[test]
    fn placeholders_a_node_lacks_are_named() {
        let node = Node {
            name: "hv-west".into(),
            mac: Some("aa:bb".into()),
            ..Node::default()
        };
        assert_eq!(
            missing_placeholder("curl http://{cmc}/on", &node),
            Some("{cmc}")
        );
        assert_eq!(missing_placeholder("ln -s x {pxe_mac}", &node), None);
        let bare = Node::default();
        assert_eq!(
            missing_placeholder("ln -s x {pxe_mac}", &bare),
            Some("{pxe_mac}")
        );
        assert_eq!(missing_placeholder("echo {name}", &bare), None);
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let started = std::time::Instant::now();
        let err = run_command(
            &format!("sleep 60 & echo $! > {}; wait", pidfile.display()),
            Duration::from_millis(500),
        )
        .await
        .unwrap_err();
        assert_eq!(err, CommandError::TimedOut(Duration::from_millis(500)));
        assert_eq!(err.reason(), "timeout after 0.5s");
        assert!(started.elapsed() < Duration::from_secs(5));
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        // A SIGKILLed process may take a moment to go on a busy machine.
        let alive = || {
            let cmdline =
                std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).starts_with("sleep")
        };
        let gone_by = std::time::Instant::now() + Duration::from_secs(2);
        while alive() && std::time::Instant::now() < gone_by {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(), "the background sleep {pid} survived");
    }

    #[tokio::test]
    async fn stdout_is_returned() {
        assert_eq!(
            run_command("echo Chassis Power is on", HOOK_TIMEOUT).await,
            Ok("Chassis Power is on\n".to_string())
        );
    }

    #[tokio::test]
    async fn failure_reports_status_and_last_stderr_line() {
        assert!(run("true").await.is_ok());
        let err = run("echo first >&2; echo 'power switch unreachable' >&2; exit 3")
            .await
            .unwrap_err();
        assert!(
            err.contains("exit status: 3") && err.contains("power switch unreachable"),
            "{err}"
        );
    }
}
