//! A lab node as the inventory describes it, and the inventory: every
//! node, in order.

use std::collections::BTreeMap;

/// One lab node as the inventory describes it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Node {
    /// Full inventory name, e.g. `fit05` or `hv-west`.
    pub name: String,
    /// The digits ending the name (`fit05` → 5), if any.
    pub number: Option<u32>,
    /// Host name or IP the controller reaches it at over SSH.
    pub address: String,
    /// SSH port override (else `[ssh] port`).
    pub port: Option<u16>,
    /// SSH user override (else `[ssh] user`).
    pub user: Option<String>,
    /// Target override (else `[load] target`); may hold placeholders.
    pub target: Option<String>,
    /// MAC address, for hooks (`{mac}`, `{pxe_mac}`).
    pub mac: Option<String>,
    /// Address of the node's power controller (R2LAB's CMC card, a BMC), for
    /// `[power]` commands and hooks (`{cmc}`).
    pub cmc: Option<String>,
    /// Address on a separate data network, for relays between nodes.
    pub data_address: Option<String>,
    /// Loaded in-process on the controller, without SSH.
    pub local: bool,
    /// Other attributes (R2LAB `cmc.*` and the like), usable in hooks.
    pub extra: BTreeMap<String, String>,
}

/// The digits that end `name`, as a node number: `fit05` → 5, `hv-west` → None.
pub fn number_of(name: &str) -> Option<u32> {
    let digits_start = name
        .char_indices()
        .rev()
        .take_while(|(_, c)| c.is_ascii_digit())
        .last()
        .map(|(i, _)| i)?;
    name[digits_start..].parse().ok()
}

/// All nodes, in inventory order.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub nodes: Vec<Node>,
}

impl Inventory {
    pub fn new(nodes: Vec<Node>) -> Self {
        Inventory { nodes }
    }

    pub fn by_name(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }
}
