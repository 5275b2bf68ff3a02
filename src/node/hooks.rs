//! `before` / `after` hooks: local shell commands with node placeholders.

use std::time::Duration;

use crate::inventory::Node;

/// Replace `{name} {number} {address} {mac} {image} {target}` in `template`.
pub fn expand(template: &str, node: &Node, image: &str, target: &str) -> String {
    template
        .replace("{name}", &node.name)
        .replace(
            "{number}",
            &node.number.map(|n| n.to_string()).unwrap_or_default(),
        )
        .replace("{address}", &node.address)
        .replace("{mac}", node.mac.as_deref().unwrap_or(""))
        .replace("{image}", image)
        .replace("{target}", target)
}

/// Longest a hook may run before it is killed and counted as failed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(300);

/// Run a hook through `sh -c`, in its own process group so that a Ctrl-C at
/// the terminal does not kill an `after` hook that is cleaning up.
pub async fn run(command: &str) -> Result<(), String> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start `{command}`: {e}"))?;
    let stderr = child.stderr.take();
    let tail = tokio::spawn(async move {
        let mut text = String::new();
        if let Some(mut s) = stderr {
            use tokio::io::AsyncReadExt;
            let _ = s.read_to_string(&mut text).await;
        }
        text
    });
    let status = match tokio::time::timeout(HOOK_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(format!("`{command}`: {e}")),
        Err(_) => {
            let _ = child.kill().await;
            return Err(format!(
                "`{command}` still running after {}s, killed",
                HOOK_TIMEOUT.as_secs()
            ));
        }
    };
    if status.success() {
        return Ok(());
    }
    let text = tail.await.unwrap_or_default();
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    Err(if last.is_empty() {
        format!("`{command}` exited with {status}")
    } else {
        format!("`{command}` exited with {status}: {last}")
    })
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
            mac: Some("aa:bb".into()),
            ..Node::default()
        };
        assert_eq!(
            expand(
                "pxe {name} {number} {address} {mac} {image} {target}",
                &node,
                "u.img",
                "/dev/sda"
            ),
            "pxe fit07 7 192.168.3.7 aa:bb u.img /dev/sda"
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
