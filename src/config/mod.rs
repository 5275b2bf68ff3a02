//! Layered TOML configuration.
//!
//! Layers, lowest first: built-in defaults, `/etc/imaging.conf`,
//! `~/.imaging.conf`, the user config dir (`~/.config/imaging/imaging.conf` on
//! Linux), `./imaging.conf`, then `--config FILE` / `IMAGING_CONFIG`. Each layer
//! overrides single keys of the ones before; a `[[node]]` list replaces the
//! lists of lower layers as a whole (an inventory is not merged node by node).
//! Every layer is checked on its own, so an unknown key or a wrong type is
//! reported with the file, line and key that hold it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::inventory::{self, Inventory, Node};

/// Where a value came from.
pub const BUILTIN: &str = "built-in default";

/// The longest timeout or wait accepted anywhere, in seconds (10 years):
/// larger values would overflow the clock arithmetic.
pub const MAX_SECONDS: u64 = 315_360_000;

/// The most nodes or commands handled at once.
pub const MAX_CONCURRENCY: usize = 4096;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub ssh: SshConfig,
    pub repository: RepositoryConfig,
    pub load: LoadConfig,
    pub save: SaveConfig,
    pub wait: WaitConfig,
    pub nodes: NodesConfig,
    pub power: PowerConfig,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub node: Vec<NodeEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KnownHostsPolicy {
    /// The host key must already be in the known_hosts file.
    Strict,
    /// Unknown hosts are added; a changed key is refused.
    AcceptNew,
    /// No host key checking at all (throwaway labs only).
    Off,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SshConfig {
    pub user: String,
    pub port: u16,
    pub identity_file: Option<String>,
    pub known_hosts: KnownHostsPolicy,
    pub known_hosts_file: Option<String>,
    /// Seconds allowed for TCP connect plus the SSH handshake.
    pub connect_timeout: u64,
    /// Which cipher ssh offers first.
    pub ciphers: CipherPreference,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CipherPreference {
    /// AES-GCM first when this machine has AES instructions (ssh's own
    /// files still win: `crate::node::ciphers`).
    Auto,
    /// ssh's own choice: imaging passes no configuration of its own.
    Ssh,
}

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            user: "root".into(),
            port: 22,
            identity_file: None,
            known_hosts: KnownHostsPolicy::AcceptNew,
            known_hosts_file: None,
            connect_timeout: 5,
            ciphers: CipherPreference::Auto,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepositoryConfig {
    pub dir: String,
    pub default_image: String,
    /// Further repositories searched after `dir`, in order (written only
    /// by `imaging share`, into the first).
    pub shared: Vec<String>,
}

impl Default for RepositoryConfig {
    fn default() -> Self {
        RepositoryConfig {
            dir: "/var/lib/imaging/images".into(),
            default_image: "default.img".into(),
            shared: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Fanout {
    Star,
    Chain,
    Auto,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadConfig {
    /// Default target on every node; placeholders `{name}` `{number}` allowed.
    pub target: String,
    pub fanout: Fanout,
    /// Seconds for the whole load (0: no deadline).
    pub timeout: u64,
    /// Nodes handled at once.
    pub concurrency: usize,
    /// Chunk size in bytes (a power of two, 64 KiB..=64 MiB).
    pub chunk_size: u64,
    /// zstd level on the wire; 0 turns compression off.
    pub compression: i32,
    /// Total bandwidth cap in bytes per second over all nodes (0: none).
    pub bandwidth: u64,
    /// Reconnections per node after a dropped connection.
    pub retries: u32,
    /// Seconds a reconnection waits for the node's SSH to come back.
    pub reconnect_wait: u64,
    /// Star fan-out: seconds a node's agent may go without acknowledging
    /// data it was sent before the attempt counts as stalled and is retried.
    pub stall_timeout: u64,
    /// Path of the agent on the nodes; empty: upload our own executable.
    pub agent_path: String,
    /// Address relay listeners bind on the nodes ("": all); a node's
    /// `data_address` is where its predecessor connects.
    pub relay_bind: String,
    /// Port range for relay listeners (0, 0: any free port).
    pub relay_port_min: u16,
    pub relay_port_max: u16,
    /// Local command run before a node is loaded.
    pub before: String,
    /// Local command run after, whenever `before` ran.
    pub after: String,
    /// Local command run once before the run touches any node (a lease
    /// check); non-zero ends the run with exit 2. Placeholder: `{nodes}`.
    pub check: String,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            target: "/dev/sda".into(),
            fanout: Fanout::Auto,
            timeout: 1800,
            concurrency: 32,
            chunk_size: 4 << 20,
            compression: 3,
            bandwidth: 0,
            retries: 3,
            reconnect_wait: 60,
            stall_timeout: 30,
            agent_path: String::new(),
            relay_bind: String::new(),
            relay_port_min: 0,
            relay_port_max: 0,
            before: String::new(),
            after: String::new(),
            check: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SaveConfig {
    pub timeout: u64,
    /// Like `[load] check`, before a save.
    pub check: String,
}

impl Default for SaveConfig {
    fn default() -> Self {
        SaveConfig {
            timeout: 1800,
            check: String::new(),
        }
    }
}

/// `imaging on|off|reset|power`: local command templates per action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PowerConfig {
    pub on: String,
    pub off: String,
    pub reset: String,
    /// Prints the power state: `on` or `off` somewhere in its last line.
    pub status: String,
    /// Seconds each command may run before its process group is killed.
    pub timeout: u64,
    /// Commands run at once.
    pub concurrency: usize,
}

impl Default for PowerConfig {
    fn default() -> Self {
        PowerConfig {
            on: String::new(),
            off: String::new(),
            reset: String::new(),
            status: String::new(),
            timeout: 10,
            concurrency: 32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WaitConfig {
    /// Seconds `wait` waits for all nodes.
    pub timeout: u64,
}

impl Default for WaitConfig {
    fn default() -> Self {
        WaitConfig { timeout: 60 }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodesConfig {
    /// Optional R2LAB JSON inventory.
    pub inventory: Option<String>,
    /// The scope of `-a`.
    pub all: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    pub name: String,
    pub address: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub target: Option<String>,
    pub mac: Option<String>,
    /// The node's power controller address, for `{cmc}`.
    pub cmc: Option<String>,
    pub data_address: Option<String>,
    #[serde(default)]
    pub local: bool,
}

/// A config problem; always reported with exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {file}, line {line}: {message}")]
    Invalid {
        file: String,
        line: usize,
        message: String,
    },
    #[error("config {file}: {message}")]
    File { file: String, message: String },
    #[error(transparent)]
    Inventory(#[from] inventory::InventoryError),
}

/// One config file that was read.
#[derive(Debug, Clone)]
pub struct Layer {
    pub source: String,
    pub table: toml::Table,
}

/// The effective configuration and, for every key, the layer it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// Dotted key (`ssh.port`, `node`) → source (a file path or [`BUILTIN`]).
    pub origin: BTreeMap<String, String>,
    /// The files that were read, lowest first.
    pub files: Vec<String>,
}

/// The implicit config files, lowest first.
pub fn default_paths() -> Vec<PathBuf> {
    let mut paths = vec![PathBuf::from("/etc/imaging.conf")];
    if let Some(home) = std::env::var_os("HOME") {
        paths.push(PathBuf::from(home).join(".imaging.conf"));
    }
    if let Some(dirs) = directories::ProjectDirs::from("", "", "imaging") {
        paths.push(dirs.config_dir().join("imaging.conf"));
    }
    paths.push(PathBuf::from("imaging.conf"));
    paths
}

/// Read the standard layers plus `explicit` (which must exist).
pub fn load(explicit: Option<&Path>) -> Result<Loaded, ConfigError> {
    let mut layers = Vec::new();
    for path in default_paths() {
        match std::fs::read_to_string(&path) {
            Ok(text) => layers.push(parse_layer(&path.display().to_string(), &text)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ConfigError::File {
                    file: path.display().to_string(),
                    message: e.to_string(),
                });
            }
        }
    }
    if let Some(path) = explicit {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            file: path.display().to_string(),
            message: e.to_string(),
        })?;
        layers.push(parse_layer(&path.display().to_string(), &text)?);
    }
    merge(layers)
}

/// Parse and check one layer on its own, so errors point into its text.
pub fn parse_layer(source: &str, text: &str) -> Result<Layer, ConfigError> {
    let located = |e: toml::de::Error| {
        let at = e.span().map(|s| s.start.min(text.len())).unwrap_or(0);
        let line = text[..at].matches('\n').count() + 1;
        ConfigError::Invalid {
            file: source.to_string(),
            line,
            message: match key_at(text, line) {
                Some(key) => format!("`{key}`: {}", e.message().trim()),
                None => e.message().trim().to_string(),
            },
        }
    };
    let table: toml::Table = toml::from_str(text).map_err(located)?;
    // Checked against the schema for unknown keys and wrong types.
    let _: Config = toml::from_str(text).map_err(located)?;
    Ok(Layer {
        source: source.to_string(),
        table,
    })
}

/// The dotted key defined on 1-based `line` of a TOML text (`load.concurrency`).
fn key_at(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let here = lines.get(line.checked_sub(1)?)?;
    let key = here.split_once('=')?.0.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('[') {
        return None;
    }
    let section = lines[..line - 1]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    Some(match section {
        Some(s) if !s.is_empty() => format!("{s}.{key}"),
        _ => key.to_string(),
    })
}

/// Merge layers over the built-in defaults, keeping each key's origin.
pub fn merge(layers: Vec<Layer>) -> Result<Loaded, ConfigError> {
    let mut merged = toml::Table::try_from(Config::default()).map_err(|e| ConfigError::File {
        file: BUILTIN.into(),
        message: e.to_string(),
    })?;
    let mut origin = BTreeMap::new();
    record_origin(&merged, "", BUILTIN, &mut origin);
    let mut files = Vec::new();
    for layer in layers {
        overlay(&mut merged, &layer.table, "", &layer.source, &mut origin);
        files.push(layer.source);
    }
    let config: Config = merged
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::File {
            file: files.last().cloned().unwrap_or_else(|| BUILTIN.into()),
            message: e.message().to_string(),
        })?;
    config.validate()?;
    Ok(Loaded {
        config,
        origin,
        files,
    })
}

fn record_origin(
    table: &toml::Table,
    prefix: &str,
    source: &str,
    origin: &mut BTreeMap<String, String>,
) {
    for (k, v) in table {
        let key = join(prefix, k);
        match v {
            toml::Value::Table(t) => record_origin(t, &key, source, origin),
            _ => {
                origin.insert(key, source.to_string());
            }
        }
    }
}

fn overlay(
    base: &mut toml::Table,
    top: &toml::Table,
    prefix: &str,
    source: &str,
    origin: &mut BTreeMap<String, String>,
) {
    for (k, v) in top {
        let key = join(prefix, k);
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => {
                overlay(b, t, &key, source, origin)
            }
            _ => {
                match v {
                    toml::Value::Table(t) => record_origin(t, &key, source, origin),
                    _ => {
                        origin.insert(key, source.to_string());
                    }
                }
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

impl Config {
    /// Checks that span keys (a value that is well typed but unusable).
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::File {
            file: "effective configuration".into(),
            message: format!("`{key}`: {message}"),
        };
        let cs = self.load.chunk_size;
        if !u32::try_from(cs).is_ok_and(crate::image::chunk_size_ok) {
            use crate::image::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
            return Err(bad(
                "load.chunk_size",
                format!("{cs} is not a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"),
            ));
        }
        if self.load.relay_port_min > self.load.relay_port_max {
            return Err(bad(
                "load.relay_port_min",
                format!(
                    "{} is above relay_port_max {}",
                    self.load.relay_port_min, self.load.relay_port_max
                ),
            ));
        }
        for (key, secs) in [
            ("load.timeout", self.load.timeout),
            ("load.reconnect_wait", self.load.reconnect_wait),
            ("save.timeout", self.save.timeout),
            ("wait.timeout", self.wait.timeout),
            ("power.timeout", self.power.timeout),
            ("ssh.connect_timeout", self.ssh.connect_timeout),
        ] {
            if secs > MAX_SECONDS {
                return Err(bad(
                    key,
                    format!("{secs} seconds is above the maximum {MAX_SECONDS} (10 years)"),
                ));
            }
        }
        for (key, n) in [
            ("load.concurrency", self.load.concurrency),
            ("power.concurrency", self.power.concurrency),
        ] {
            if n > MAX_CONCURRENCY {
                return Err(bad(
                    key,
                    format!("{n} is above the maximum {MAX_CONCURRENCY}"),
                ));
            }
        }
        if !(1..=86_400).contains(&self.load.stall_timeout) {
            return Err(bad(
                "load.stall_timeout",
                format!("{} is not 1 to 86400 seconds", self.load.stall_timeout),
            ));
        }
        if self.load.concurrency == 0 {
            return Err(bad("load.concurrency", "must be at least 1".into()));
        }
        if self.power.concurrency == 0 {
            return Err(bad("power.concurrency", "must be at least 1".into()));
        }
        if self.power.timeout == 0 {
            return Err(bad("power.timeout", "must be at least 1 second".into()));
        }
        if !(0..=22).contains(&self.load.compression) {
            return Err(bad(
                "load.compression",
                "zstd level must be 0 (off) to 22".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for n in &self.node {
            if n.name.trim().is_empty() {
                return Err(bad("node.name", "a [[node]] has an empty name".into()));
            }
            if !seen.insert(n.name.as_str()) {
                return Err(bad(
                    "node.name",
                    format!("node `{}` is defined twice", n.name),
                ));
            }
        }
        Ok(())
    }

    /// The inventory: the JSON inventory's nodes, then inline `[[node]]`
    /// entries (an inline entry with the name of a JSON node overrides it).
    pub fn inventory(&self) -> Result<Inventory, ConfigError> {
        let mut nodes: Vec<Node> = match &self.nodes.inventory {
            Some(path) if !path.is_empty() => inventory::read_r2lab_json(&expand_home(path))?,
            _ => Vec::new(),
        };
        for e in &self.node {
            let node = Node {
                name: e.name.clone(),
                number: inventory::number_of(&e.name),
                address: e.address.clone().unwrap_or_else(|| e.name.clone()),
                port: e.port,
                user: e.user.clone(),
                target: e.target.clone(),
                mac: e.mac.clone(),
                cmc: e.cmc.clone(),
                data_address: e.data_address.clone(),
                local: e.local,
                extra: BTreeMap::new(),
            };
            match nodes.iter_mut().find(|n| n.name == e.name) {
                Some(existing) => {
                    let extra = std::mem::take(&mut existing.extra);
                    let mac = existing.mac.take();
                    let cmc = existing.cmc.take();
                    let address = if e.address.is_none() {
                        existing.address.clone()
                    } else {
                        node.address.clone()
                    };
                    *existing = Node {
                        address,
                        mac: node.mac.clone().or(mac),
                        cmc: node.cmc.clone().or(cmc),
                        extra,
                        ..node
                    };
                }
                None => nodes.push(node),
            }
        }
        Ok(Inventory::new(nodes))
    }
}

/// `~/x` → `$HOME/x`.
pub fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ if path == "~" => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default(),
        _ => PathBuf::from(path),
    }
}

/// The documented example, whose commented `# key = value` lines name the
/// keys that have no default (shown commented when unset).
const EXAMPLE: &str = include_str!("../../imaging.conf.example");

/// A source as a full path (files), or as it is ([`BUILTIN`]).
fn full(source: &str) -> String {
    if source == BUILTIN {
        return source.to_string();
    }
    std::path::absolute(source)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| source.to_string())
}

/// Optional keys of the example (`ssh.identity_file`), with its sample value.
fn optional_keys() -> Vec<(String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in EXAMPLE.lines() {
        let t = line.trim();
        if t.trim_start_matches(['#', ' ']).starts_with("[[") {
            section.clear(); // [[node]] fields are per node, not keys
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            section = name.to_string();
        } else if let Some(rest) = t.strip_prefix("# ")
            && !section.is_empty()
            && let Some((k, v)) = rest.split_once(" = ")
            && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            let v = v.split("  #").next().unwrap_or(v).trim();
            out.push((format!("{section}.{k}"), v.to_string()));
        }
    }
    out
}

/// The effective configuration: the files read and looked for, then
/// `key = value  # source` lines, aligned; unset optional keys commented;
/// one line per `[[node]]`.
pub fn describe(loaded: &Loaded, looked_for: &[PathBuf]) -> String {
    let table = toml::Table::try_from(&loaded.config).unwrap_or_default();
    let mut out = String::new();
    let read: Vec<String> = loaded.files.iter().map(|f| full(f)).collect();
    for f in &read {
        out.push_str(&format!("# read:        {f}\n"));
    }
    for p in looked_for {
        let p = full(&p.display().to_string());
        if !read.contains(&p) {
            out.push_str(&format!("# not found:   {p}\n"));
        }
    }
    if read.is_empty() {
        out.push_str("# no config file: built-in defaults only (see imaging.conf.example)\n");
    }
    out.push('\n');
    let mut rows = Vec::new();
    flatten(&table, "", &mut rows);
    let source_of = |key: &str| {
        loaded
            .origin
            .get(key)
            .or_else(|| loaded.origin.get(key.split('.').next().unwrap_or("")))
            .map(|s| full(s))
            .unwrap_or_else(|| BUILTIN.to_string())
    };
    let mut lines: Vec<(String, String)> = rows
        .iter()
        .map(|(k, v)| (format!("{k} = {v}"), source_of(k)))
        .collect();
    for (key, sample) in optional_keys() {
        if !rows.iter().any(|(k, _)| *k == key) {
            lines.push((
                format!("# {key} = {sample}"),
                "unset (example value)".into(),
            ));
        }
    }
    // Keys of a section together, in the schema's order.
    let order: Vec<String> = rows
        .iter()
        .map(|(k, _)| k.split('.').next().unwrap_or("").to_string())
        .fold(Vec::new(), |mut v, s| {
            if !v.contains(&s) {
                v.push(s);
            }
            v
        });
    let section_rank = |line: &str| {
        let key = line.trim_start_matches("# ");
        let section = key.split('.').next().unwrap_or("");
        order
            .iter()
            .position(|s| s == section)
            .unwrap_or(order.len())
    };
    lines.sort_by_key(|(l, _)| section_rank(l));
    let mut nodes = Vec::new();
    if let Some(toml::Value::Array(list)) = table.get("node") {
        let source = source_of("node");
        for (i, n) in list.iter().enumerate() {
            let inline = match n {
                toml::Value::Table(t) => {
                    let fields: Vec<String> = t.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                    format!("{{ {} }}", fields.join(", "))
                }
                other => other.to_string(),
            };
            nodes.push((format!("node[{i}] = {inline}"), source.clone()));
        }
    }
    lines.retain(|(l, _)| !l.starts_with("node = "));
    lines.extend(nodes);
    let width = lines
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0);
    for (line, source) in lines {
        let pad = width - line.chars().count();
        out.push_str(&format!("{line}{}  # {source}\n", " ".repeat(pad)));
    }
    out
}

fn flatten(table: &toml::Table, prefix: &str, rows: &mut Vec<(String, String)>) {
    for (k, v) in table {
        let key = join(prefix, k);
        match v {
            toml::Value::Table(t) => flatten(t, &key, rows),
            other => rows.push((key, other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(source: &str, text: &str) -> Layer {
        parse_layer(source, text).unwrap()
    }

    #[test]
    fn example_file_documents_exactly_the_defaults() {
        let text = include_str!("../../imaging.conf.example");
        let parsed: Config = toml::from_str(text).unwrap();
        assert_eq!(parsed, Config::default());
        // Every key with a default is written out (or shown commented) in the example.
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        let mut rows = Vec::new();
        flatten(&defaults, "", &mut rows);
        for (key, _) in rows {
            let leaf = key.rsplit('.').next().unwrap();
            assert!(
                text.contains(&format!("\n{leaf} = ")),
                "example lacks {key}"
            );
        }
        for optional in [
            "identity_file",
            "known_hosts_file",
            "inventory",
            "all",
            "data_address",
            "mac",
            "cmc",
        ] {
            assert!(
                text.contains(&format!("# {optional} = ")),
                "example lacks {optional}"
            );
        }
    }

    #[test]
    fn later_layers_override_single_keys() {
        let loaded = merge(vec![
            layer("/etc/imaging.conf", "[ssh]\nuser = \"etc\"\nport = 2222\n"),
            layer("home", "[ssh]\nuser = \"home\"\n"),
            layer("explicit", "[wait]\ntimeout = 9\n"),
        ])
        .unwrap();
        assert_eq!(loaded.config.ssh.user, "home");
        assert_eq!(loaded.config.ssh.port, 2222);
        assert_eq!(loaded.config.wait.timeout, 9);
        assert_eq!(loaded.config.load.concurrency, 32);
        assert_eq!(loaded.origin["ssh.user"], "home");
        assert_eq!(loaded.origin["ssh.port"], "/etc/imaging.conf");
        assert_eq!(loaded.origin["wait.timeout"], "explicit");
        assert_eq!(loaded.origin["load.concurrency"], BUILTIN);
        let shown = describe(&loaded, &[]);
        assert!(shown.contains("ssh.port"), "{shown}");
        assert!(
            shown
                .lines()
                .any(|l| l.starts_with("ssh.user") && l.ends_with("/home")),
            "{shown}"
        );
    }

    #[test]
    fn node_list_of_a_higher_layer_replaces_the_lower_one() {
        let loaded = merge(vec![
            layer("a", "[[node]]\nname = \"a1\"\n[[node]]\nname = \"a2\"\n"),
            layer("b", "[[node]]\nname = \"b7\"\naddress = \"10.0.0.7\"\n"),
        ])
        .unwrap();
        let inv = loaded.config.inventory().unwrap();
        let names: Vec<_> = inv.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["b7"]);
        assert_eq!(inv.nodes[0].number, Some(7));
        assert_eq!(inv.nodes[0].address, "10.0.0.7");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse_layer("./imaging.conf", "[ssh]\nuser = \"x\"\nprot = 22\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("./imaging.conf"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("prot"), "{err}");
    }

    #[test]
    fn wrong_type_names_file_line_and_key() {
        let err = parse_layer("site.conf", "[load]\n\nconcurrency = \"many\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("site.conf, line 3"), "{err}");
        assert!(err.contains("`load.concurrency`"), "{err}");
        assert!(err.contains("concurrency"), "{err}");
        let err = parse_layer("site.conf", "[ssh]\nknown_hosts = \"maybe\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2") && err.contains("maybe"), "{err}");
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let err = parse_layer("bad.conf", "[ssh]\nuser = \n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.conf, line 2"), "{err}");
    }

    #[test]
    fn unusable_values_are_refused() {
        let err = merge(vec![layer("x", "[load]\nchunk_size = 1000\n")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("load.chunk_size"), "{err}");
        let err = merge(vec![layer(
            "x",
            "[[node]]\nname = \"a\"\n[[node]]\nname = \"a\"\n",
        )])
        .unwrap_err()
        .to_string();
        assert!(err.contains("defined twice"), "{err}");
    }
}
