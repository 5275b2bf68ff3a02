//! `imaging`: load disk images onto many lab nodes, save them back, wait for them.

pub mod inventory;
pub mod nodespec;
