//! The controller's engine: loads, saves and waits over many nodes, their
//! events and the report the front ends read.

pub mod backoff;
pub mod cancel;
pub mod events;
pub mod holder;
pub mod load;
pub mod report;
pub mod save;
pub mod source;
pub mod wait;
