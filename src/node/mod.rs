//! Reaching a node: the SSH layer, the agent link over it, and the local
//! hooks run around a node's load.

pub mod agent_link;
pub mod ciphers;
pub mod hooks;
pub mod procs;
pub mod splice;
pub mod ssh;
