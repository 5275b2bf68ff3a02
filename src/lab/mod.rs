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
mod sshd;

use std::path::{Path, PathBuf};
use std::process::Command;

pub use node::{Node, START_TIMEOUT};
pub use sshd::{
    LabError, PORT_TRIES, PRIVSEP_DIR, SFTP_SERVER, SSHD, SSHD_CONFIG_TEMPLATE, SshdConfig,
    die_with_this_thread, free_ports, sshd_unavailable,
};
use sshd::{ensure_privsep_dir, keygen, mkdir};

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
