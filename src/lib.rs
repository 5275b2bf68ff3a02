//! `imaging`: load disk images onto many lab nodes, save them back, wait for
//! them to come up.
//!
//! The engine ([`engine`], [`node`], [`image`], [`inventory`], [`proto`])
//! never touches the terminal; it reports through
//! [`engine::report::Reporter`] and the front ends in [`ui`] draw. The node
//! side, [`agent`], shares only [`proto`] and [`image`] with the controller.

pub mod agent;
pub mod app;
pub mod config;
pub mod engine;
pub mod fmt;
pub mod image;
pub mod inventory;
pub mod lab;
pub mod node;
pub mod proto;
pub mod ui;

pub use app::{Exit, UsageError, main_with_args};
