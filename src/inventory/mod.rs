//! The nodes a run can address: inline `[[node]]` entries from the config
//! and/or an R2LAB-style JSON inventory file.

mod node;
pub mod nodespec;

pub use node::{Inventory, Node, number_of};

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot read inventory {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("inventory {path}: {message}")]
    Parse { path: String, message: String },
}

#[derive(Deserialize)]
struct R2labEntry {
    control: R2labControl,
    #[serde(default)]
    cmc: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    data: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Deserialize)]
struct R2labControl {
    hostname: String,
    ip: Option<String>,
    mac: Option<String>,
}

/// Parse an R2LAB JSON inventory: `[{"control": {"hostname", "ip", "mac"}, "cmc": {…}}, …]`.
///
/// Strict JSON: comments and trailing commas are rejected with the line and
/// column of the offending character (JSON has neither; we don't guess).
pub fn parse_r2lab_json(path: &Path, text: &str) -> Result<Vec<Node>, InventoryError> {
    let shown = path.display().to_string();
    let entries: Vec<R2labEntry> =
        serde_json::from_str(text).map_err(|e| InventoryError::Parse {
            path: shown.clone(),
            message: format!(
                "{e} (expected strict JSON: a list of {{\"control\": {{\"hostname\", \"ip\", \"mac\"}}, \"cmc\": {{…}}}}; comments and trailing commas are not allowed)"
            ),
        })?;
    let mut nodes = Vec::with_capacity(entries.len());
    for (i, e) in entries.into_iter().enumerate() {
        let name = e.control.hostname.trim().to_string();
        if name.is_empty() {
            return Err(InventoryError::Parse {
                path: shown,
                message: format!("entry {} has an empty control.hostname", i + 1),
            });
        }
        if let Some(j) = nodes.iter().position(|n: &Node| n.name == name) {
            let first: &Node = &nodes[j];
            return Err(InventoryError::Parse {
                path: shown,
                message: format!(
                    "entries {} ({name}, {}) and {} ({name}, {}) have the same control.hostname",
                    j + 1,
                    first.address,
                    i + 1,
                    e.control.ip.as_deref().unwrap_or(&name),
                ),
            });
        }
        let mut extra = BTreeMap::new();
        for (k, v) in e.cmc {
            extra.insert(format!("cmc.{k}"), json_scalar(&v));
        }
        if let Some(data) = e.data {
            for (k, v) in data {
                extra.insert(format!("data.{k}"), json_scalar(&v));
            }
        }
        let data_address = extra.get("data.ip").cloned();
        // The CMC by its IP, else by its name (`reboot05`).
        let cmc = ["cmc.ip", "cmc.hostname"]
            .iter()
            .filter_map(|k| extra.get(*k))
            .find(|v| !v.trim().is_empty())
            .cloned();
        nodes.push(Node {
            number: number_of(&name),
            address: e.control.ip.unwrap_or_else(|| name.clone()),
            mac: e.control.mac,
            name,
            data_address,
            cmc,
            extra,
            ..Node::default()
        });
    }
    Ok(nodes)
}

fn json_scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn read_r2lab_json(path: &Path) -> Result<Vec<Node>, InventoryError> {
    let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_r2lab_json(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_is_the_trailing_digits() {
        assert_eq!(number_of("fit05"), Some(5));
        assert_eq!(number_of("reboot12"), Some(12));
        assert_eq!(number_of("37"), Some(37));
        assert_eq!(number_of("hv-west"), None);
        assert_eq!(number_of("a1b"), None);
        assert_eq!(number_of("n99999999999999999999"), None);
    }

    #[test]
    fn r2lab_inventory_is_read() {
        let text = r#"[
          {"control": {"hostname": "fit01", "ip": "192.168.3.1", "mac": "00:03:1d:0e:03:19"},
           "cmc": {"hostname": "reboot01", "ip": "192.168.1.1", "mac": "00:03:1d:0e:03:18"}},
          {"control": {"hostname": "fit02", "ip": "192.168.3.2", "mac": "00:03:1d:0e:03:1a"},
           "cmc": {"hostname": "reboot02", "ip": "192.168.1.2"}}
        ]"#;
        let nodes = parse_r2lab_json(Path::new("inv.json"), text).unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].name, "fit01");
        assert_eq!(nodes[0].number, Some(1));
        assert_eq!(nodes[0].address, "192.168.3.1");
        assert_eq!(nodes[0].mac.as_deref(), Some("00:03:1d:0e:03:19"));
        assert_eq!(nodes[1].extra["cmc.hostname"], "reboot02");
        assert_eq!(nodes[0].cmc.as_deref(), Some("192.168.1.1"));
    }

    #[test]
    fn duplicate_hostnames_are_refused_naming_both_entries() {
        let text = r#"[
          {"control": {"hostname": "fit01", "ip": "192.168.3.1"}},
          {"control": {"hostname": "fit02", "ip": "192.168.3.2"}},
          {"control": {"hostname": "fit01", "ip": "192.168.3.3"}}
        ]"#;
        let err = parse_r2lab_json(Path::new("inv.json"), text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("entries 1 (fit01, 192.168.3.1) and 3"),
            "{err}"
        );
        assert!(err.contains("192.168.3.3"), "{err}");
    }

    #[test]
    fn cmc_is_its_ip_else_its_hostname() {
        let text = r#"[
          {"control": {"hostname": "fit01"}, "cmc": {"hostname": "reboot01"}},
          {"control": {"hostname": "fit02"}, "cmc": {"hostname": "reboot02", "ip": ""}},
          {"control": {"hostname": "fit03"}}
        ]"#;
        let nodes = parse_r2lab_json(Path::new("inv.json"), text).unwrap();
        assert_eq!(nodes[0].cmc.as_deref(), Some("reboot01"));
        assert_eq!(nodes[1].cmc.as_deref(), Some("reboot02"));
        assert_eq!(nodes[2].cmc, None);
    }

    #[test]
    fn trailing_comma_is_rejected_with_position() {
        let text = "[\n {\"control\": {\"hostname\": \"fit01\"}},\n]";
        let err = parse_r2lab_json(Path::new("inv.json"), text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("inv.json"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("trailing commas"), "{err}");
    }

    #[test]
    fn missing_control_is_rejected() {
        let err = parse_r2lab_json(Path::new("inv.json"), r#"[{"cmc": {}}]"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("control"), "{err}");
    }
}
