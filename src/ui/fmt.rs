//! Formatting for people: the formatters of [`crate::fmt`], re-exported,
//! and the bar styles built on them, so the dashboard, the plain lines, the
//! bars and `imaging list` show the same units.

use indicatif::{ProgressState, ProgressStyle};

pub use crate::fmt::*;

/// A bar style whose `{written}`, `{total}` and `{rate}` keys are
/// [`human_bytes`] of the position and length and [`human_rate`] of the
/// speed, where indicatif's own `{bytes}` keys use other units.
pub fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key(
            "written",
            |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = w.write_str(&human_bytes(s.pos()));
            },
        )
        .with_key("total", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = w.write_str(&human_bytes(s.len().unwrap_or(0)));
        })
        .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = w.write_str(&human_rate(s.per_sec()));
        })
}
