//! A test-only slow link for one agent (debug builds).

use crate::proto::Msg;

/// Debug builds only: `IMAGING_TEST_INPUT_RATE=BYTES_PER_SECOND` makes the
/// agent take its input (the controller's frames and its predecessors',
/// together) no faster than that, like a node behind a slow link: the
/// tests' way to make one node of a relay chain slow.
pub(crate) fn throttle_input(msg: &Msg) {
    use std::sync::{Mutex, OnceLock};
    use std::time::{Duration, Instant};
    static LINK: OnceLock<Option<(f64, Mutex<Instant>)>> = OnceLock::new();
    if !cfg!(debug_assertions) {
        return;
    }
    let len = match msg {
        Msg::Chunk { data, .. } | Msg::StreamChunk { data, .. } | Msg::StreamPiece { data, .. } => {
            data.len()
        }
        _ => return,
    };
    let link = LINK.get_or_init(|| {
        let rate: u64 = std::env::var("IMAGING_TEST_INPUT_RATE")
            .ok()?
            .parse()
            .ok()?;
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
