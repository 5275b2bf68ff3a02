//! The run check (`[load] check`, `[save] check`): one local command run
//! before a run touches any node, such as R2LAB's lease check
//! (`rhubarbe leases --check`). It fails the run before anything happens.

use crate::inventory::Node;
use crate::node::hooks::{self, CommandError};

/// Run `template` (`{nodes}`: the selected names, space separated) unless
/// it is empty. The error names the key (`[load] check`) and gives the
/// command's last stderr line, else its exit status.
pub async fn run(key: &str, template: &str, nodes: &[Node]) -> Result<(), String> {
    if template.trim().is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    let command = template.replace("{nodes}", &names.join(" "));
    match hooks::run_command(&command, hooks::HOOK_TIMEOUT).await {
        Ok(_) => Ok(()),
        Err(e @ CommandError::TimedOut(_)) => Err(format!(
            "`{key}` check `{command}`: {}, killed; nothing was touched",
            e.reason()
        )),
        Err(e) => Err(format!(
            "`{key}` check `{command}` failed: {}; nothing was touched",
            e.reason()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_check_sees_the_nodes_and_its_failure_is_told() {
        let nodes = [
            Node {
                name: "fit01".into(),
                ..Node::default()
            },
            Node {
                name: "fit02".into(),
                ..Node::default()
            },
        ];
        assert_eq!(run("[load] check", "", &nodes).await, Ok(()));
        assert_eq!(
            run("[load] check", "test \"{nodes}\" = 'fit01 fit02'", &nodes).await,
            Ok(())
        );
        let err = run(
            "[load] check",
            "echo 'no lease for you' >&2; exit 1",
            &nodes,
        )
        .await
        .unwrap_err();
        assert!(
            err.contains("[load] check") && err.contains("no lease for you"),
            "{err}"
        );
    }
}
