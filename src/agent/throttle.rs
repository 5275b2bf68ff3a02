//! A test-only slow link for one agent (debug builds).

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::proto::Msg;

/// A link's rate (bytes per second) and when it is free again.
type Link = OnceLock<Option<(f64, Mutex<Instant>)>>;

/// Debug builds only: `IMAGING_TEST_INPUT_RATE=BYTES_PER_SECOND` makes the
/// agent take its input (the controller's frames and its predecessors',
/// together) no faster than that, like a node behind a slow link: the
/// tests' way to make one node of a relay chain slow.
pub(crate) fn throttle_input(msg: &Msg) {
    static INPUT: Link = OnceLock::new();
    let len = match msg {
        Msg::Chunk { data, .. } | Msg::StreamChunk { data, .. } | Msg::StreamPiece { data, .. } => {
            data.len()
        }
        _ => return,
    };
    pace(&INPUT, "IMAGING_TEST_INPUT_RATE", len);
}

/// Debug builds only: `IMAGING_TEST_OUTPUT_RATE=BYTES_PER_SECOND` makes the
/// agent pass the stream on to its successor no faster than that, like a
/// node whose link is slow outwards.
pub(crate) fn throttle_output(len: usize) {
    static OUTPUT: Link = OnceLock::new();
    pace(&OUTPUT, "IMAGING_TEST_OUTPUT_RATE", len);
}

/// Wait until `link`, at the rate `var` sets, has carried `len` more bytes.
fn pace(link: &Link, var: &str, len: usize) {
    if !cfg!(debug_assertions) {
        return;
    }
    let link = link.get_or_init(|| {
        let rate: u64 = std::env::var(var).ok()?.parse().ok()?;
        (rate > 0).then(|| (rate as f64, Mutex::new(Instant::now())))
    });
    let Some((rate, free)) = link else { return };
    // When the link is free again: no credit for idle time.
    let until = {
        let mut free = free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *free = (*free).max(Instant::now()) + Duration::from_secs_f64(len as f64 / rate);
        *free
    };
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
}
