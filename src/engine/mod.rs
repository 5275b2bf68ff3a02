//! The controller's engine: loads, saves, waits and power actions over many
//! nodes, their events and the report the front ends read.

pub mod backoff;
pub mod cancel;
pub mod check;
pub mod clean;
pub mod error;
pub mod events;
pub mod holder;
pub mod load;
pub mod power;
pub mod report;
pub mod save;
pub mod source;
pub mod status;
pub mod wait;
