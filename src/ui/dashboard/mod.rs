//! `-c`: the full-screen dashboard. A header, an overall gauge, one row per
//! node, the latest log lines and a key help line, redrawn at 10 fps from
//! the shared [`View`](crate::ui::view::View); events only update the view, so a flood of them
//! costs no drawing. `q` (or Esc, Ctrl-C) asks before cancelling the run;
//! the engines then stop their transfers and still run their `after` hooks.
//!
//! The terminal is set up and given back by ratatui (`try_init`/`restore`):
//! a guard restores it when dropped, and ratatui's panic hook restores it
//! before the panic is reported.
//! Rendering ([`render`]) is a pure function of the view and the
//! [`UiState`], and the loop ([`run_app`]) takes any ratatui backend, so
//! tests drive both on a `TestBackend`.

mod counts;
mod dialogs;
mod event_loop;
mod footer;
mod gauge;
mod header;
mod keys;
mod layout;
mod log_pane;
mod progress;
mod render;
mod state;
mod style;
mod table;

pub use event_loop::{FRAME, run, run_app};
pub use keys::{Input, KeyAction};
pub use render::render;
pub use state::{UiState, color_from_env};
