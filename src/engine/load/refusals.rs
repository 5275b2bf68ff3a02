//! Relay refusals as the log shows them: an agent reports every incoming
//! relay connection it refused, and a flood of strangers would make
//! thousands of log lines. Per node and per source address, the first
//! refusal is logged at once, later ones at most every
//! [`REPORT_EVERY`] with a count, and what is left at the end in one line.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

/// The shortest time between two log lines about one address.
pub(super) const REPORT_EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
pub(super) struct Refusals {
    /// Per address: when last logged, refusals since, the last reason.
    seen: HashMap<String, (Instant, u64, String)>,
}

impl Refusals {
    /// The log line for this refusal, if one is due.
    pub(super) fn note(&mut self, peer: &str, reason: String, now: Instant) -> Option<String> {
        // Per address, not per connection: a flood comes from many ports.
        let addr = peer
            .parse::<SocketAddr>()
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|_| peer.to_string());
        match self.seen.get_mut(&addr) {
            Some((last, since, last_reason)) if now.duration_since(*last) < REPORT_EVERY => {
                *since += 1;
                *last_reason = reason;
                None
            }
            Some((last, since, _)) => {
                let count = std::mem::take(since) + 1;
                *last = now;
                Some(format!(
                    "relay {addr}: refused {count} connections since the last report (last: {reason})"
                ))
            }
            None => {
                self.seen.insert(addr.clone(), (now, 0, String::new()));
                Some(format!("refused a relay connection from {addr}: {reason}"))
            }
        }
    }

    /// One line per address with refusals not yet logged.
    pub(super) fn rest(&mut self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .seen
            .iter_mut()
            .filter(|(_, (_, since, _))| *since > 0)
            .map(|(addr, (_, since, reason))| {
                let n = std::mem::take(since);
                format!("relay {addr}: refused {n} more connections (last: {reason})")
            })
            .collect();
        lines.sort();
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_address_and_interval_with_a_count() {
        let mut r = Refusals::default();
        let t0 = Instant::now();
        let why = || "handshake timed out".to_string();
        let first = r
            .note("10.0.0.5:4000", why(), t0)
            .expect("first one logged");
        assert!(
            first.contains("10.0.0.5") && first.contains("timed out"),
            "{first}"
        );
        for port in 4001..4037 {
            assert!(r.note(&format!("10.0.0.5:{port}"), why(), t0).is_none());
        }
        assert!(
            r.note("10.0.0.6:4000", why(), t0).is_some(),
            "another address"
        );
        let later = r
            .note("10.0.0.5:5000", why(), t0 + REPORT_EVERY)
            .expect("logged again after the interval");
        assert!(later.contains("refused 37 connections"), "{later}");
        assert!(r.rest().is_empty());
        r.note("10.0.0.5:5001", why(), t0 + REPORT_EVERY);
        assert_eq!(
            r.rest(),
            vec!["relay 10.0.0.5: refused 1 more connections (last: handshake timed out)"]
        );
    }
}
