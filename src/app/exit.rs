//! How a run ends: its exit codes, and the errors a user causes before
//! anything is touched (exit 2).

use std::process::ExitCode;

use crate::config;
use crate::inventory::nodespec;

/// Every way a run can end, with its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success = 0,
    NodesFailed = 1,
    Usage = 2,
    Interrupted = 130,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// Errors a user causes before anything is touched: exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Spec(#[from] nodespec::SpecError),
    #[error("{0}")]
    Other(String),
}
