//! Finding the member that holds a relay chain back.
//!
//! Backpressure travels up a chain: every member before a slow one waits on
//! its successor, every member after it waits for data, and all of them
//! move at the slow one's pace, so their throughputs alone say nothing.
//! What tells the slow member apart is where the waiting stops: each agent
//! reports how long its writes to its successor waited (`RelayStats`), and
//! the member after the last one that waited most of the time is the one
//! that cannot take the stream as fast as the others pass it on. Its
//! predecessors' speed when not waiting on it is what the chain could do
//! without it.

use std::time::{Duration, Instant};

/// How long the pattern must hold before a member is moved. The chain
/// moves at the slow member's pace until then: on the lab, 2 s of it cost
/// the healthy members a fifth of their time alone, and 1 s a tenth.
pub(super) const WINDOW: Duration = Duration::from_millis(500);
/// A member waited on its successor at least this share of the window.
pub(super) const WAITED: f64 = 0.5;
/// Of the members that waited, the last one whose wait is at least this
/// share of the longest wait points at the slow member.
pub(super) const NEARLY: f64 = 0.8;
/// A member is slow below this share of the median speed of the members
/// before it when they are not waiting on it.
pub(super) const SLOWER: f64 = 0.5;
/// At least this much passed to the slow member within the window: a
/// member slower than 1 MiB/s is never judged (too little to judge by).
pub(super) const MIN_DATA: u64 = 512 << 10;

/// A verdict points at a suspect if its rate is at most this many times
/// the first one's: a stream going back through the chain at the link's
/// speed after a move (the replay) is no sign of a slow member.
pub(super) const AGAIN: f64 = 2.0;
/// How long after the move a suspect may be confirmed: the new chain needs
/// a window of its own to be judged, and a later verdict is about
/// something else.
pub(super) const SUSPECT_FOR: Duration = Duration::from_secs(8);

/// The member that waited on one found slow and moved. A member whose own
/// link is slow (both ways, or only out) waits on its successor as a slow
/// successor makes it wait: the two look alike, and the successor is the
/// one moved. If the chain is then held back around the suspect at about
/// the same pace, in looks a whole [`WINDOW`] apart (a new link's first
/// moments can look slow once), the suspect was the slow one.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Suspect {
    pub node: usize,
    /// The first verdict's rate.
    pub rate: f64,
    /// The end of [`SUSPECT_FOR`].
    pub until: Instant,
    /// Since when every look found the chain held back around it.
    since: Option<Instant>,
}

impl Suspect {
    /// The suspect of `verdict`, which moved a member at `at`.
    pub(super) fn of(verdict: &Verdict, at: Instant) -> Suspect {
        Suspect {
            node: verdict.waiter,
            rate: verdict.rate,
            until: at + SUSPECT_FOR,
            since: None,
        }
    }

    /// Whether `verdict` points at the suspect.
    pub(super) fn points_at(&self, verdict: &Verdict) -> bool {
        (verdict.waiter == self.node || verdict.node == self.node)
            && verdict.rate <= AGAIN * self.rate
    }

    /// Take what a look at `at` found (a verdict or none); whether the
    /// suspect is now confirmed: looks a window apart or more pointed at it,
    /// and none in between at another member or pace. A look may find no
    /// verdict while the pattern holds (a member's report comes late).
    pub(super) fn confirmed(&mut self, verdict: Option<&Verdict>, at: Instant) -> bool {
        match verdict {
            _ if self.expired(at) => false,
            Some(v) if self.points_at(v) => {
                let since = *self.since.get_or_insert(at);
                at.saturating_duration_since(since) >= WINDOW
            }
            Some(_) => {
                self.since = None;
                false
            }
            None => false,
        }
    }

    /// Whether it can no longer be confirmed.
    pub(super) fn expired(&self, at: Instant) -> bool {
        at > self.until
    }
}

/// What one member had reported at some moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reading {
    pub node: usize,
    /// Bytes it forwarded to its successor so far.
    pub forwarded: u64,
    /// How long its writes to its successor waited so far.
    pub blocked_ms: u64,
}

/// The members that may take part (in chain order), at one moment.
#[derive(Debug, Clone)]
pub(super) struct Sample {
    pub at: Instant,
    pub members: Vec<Reading>,
}

/// A member found slow.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Verdict {
    pub node: usize,
    /// The member before it, that waited on it.
    pub waiter: usize,
    /// Bytes per second it took over the window.
    pub rate: f64,
    /// The median speed (bytes per second) of the members before it while
    /// they were not waiting on their successor.
    pub median: f64,
}

/// The member that held the chain back between `then` and `now`, if one
/// did: the successor of the last member that waited on its successor for
/// at least [`WAITED`] of the time and [`NEARLY`] as long as any member, if
/// at least [`MIN_DATA`] reached it and
/// it took less than [`SLOWER`] × the median speed of the members up to
/// that one. Samples of different chains (a member moved, cut or gone in
/// between) give nothing.
pub(super) fn bottleneck(then: &Sample, now: &Sample) -> Option<Verdict> {
    let secs = now.at.checked_duration_since(then.at)?.as_secs_f64();
    let same_chain = then.members.len() == now.members.len()
        && then
            .members
            .iter()
            .zip(&now.members)
            .all(|(a, b)| a.node == b.node);
    if secs <= 0.0 || !same_chain || now.members.len() < 2 {
        return None;
    }
    // Per member: bytes forwarded and seconds waited within the window.
    let deltas: Vec<(u64, f64)> = then
        .members
        .iter()
        .zip(&now.members)
        .map(|(a, b)| {
            let bytes = b.forwarded.saturating_sub(a.forwarded);
            let waited = b.blocked_ms.saturating_sub(a.blocked_ms) as f64 / 1000.0;
            (bytes, waited.min(secs))
        })
        .collect();
    // The last member but the tail (which forwards nothing) that waited
    // nearly as long as the one that waited most. A slow member whose link
    // is slow both ways waits on its own successor too, but for part of
    // the time only (it sends at the pace it receives), while the one
    // before it waits nearly all the time: the lesser wait does not count.
    let most = deltas[..deltas.len() - 1]
        .iter()
        .map(|&(_, waited)| waited)
        .fold(0.0, f64::max);
    let k = (0..deltas.len() - 1)
        .rev()
        .find(|&k| deltas[k].1 >= (WAITED * secs).max(NEARLY * most))?;
    let (bytes, _) = deltas[k];
    if bytes < MIN_DATA {
        return None;
    }
    let rate = bytes as f64 / secs;
    let mut speeds: Vec<f64> = deltas[..=k]
        .iter()
        .filter(|(bytes, waited)| *bytes > 0 && secs - waited > 0.0)
        .map(|(bytes, waited)| *bytes as f64 / (secs - waited))
        .collect();
    if speeds.is_empty() {
        return None;
    }
    speeds.sort_by(f64::total_cmp);
    let median = speeds[speeds.len() / 2];
    (rate < SLOWER * median).then(|| Verdict {
        node: now.members[k + 1].node,
        waiter: now.members[k].node,
        rate,
        median,
    })
}

/// The samples of the current stream, enough to look [`WINDOW`] back.
#[derive(Default)]
pub(super) struct Watch {
    samples: std::collections::VecDeque<Sample>,
}

impl Watch {
    /// Record `now`; the verdict over the last [`WINDOW`] or more, if any.
    pub(super) fn observe(&mut self, now: Sample) -> Option<Verdict> {
        // Keep the newest sample that is at least a window old, and later ones.
        while self
            .samples
            .get(1)
            .is_some_and(|s| now.at.saturating_duration_since(s.at) >= WINDOW)
        {
            self.samples.pop_front();
        }
        let verdict = self
            .samples
            .front()
            .filter(|s| now.at.saturating_duration_since(s.at) >= WINDOW)
            .and_then(|then| bottleneck(then, &now));
        self.samples.push_back(now);
        verdict
    }

    /// The chain changed: start over.
    pub(super) fn reset(&mut self) {
        self.samples.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn sample(at: Instant, members: &[(usize, u64, u64)]) -> Sample {
        Sample {
            at,
            members: members
                .iter()
                .map(|&(node, forwarded, blocked_ms)| Reading {
                    node,
                    forwarded,
                    blocked_ms,
                })
                .collect(),
        }
    }

    #[test]
    fn the_member_after_the_last_that_waited_is_slow() {
        let t = Instant::now();
        let then = sample(t, &[(0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0)]);
        // 6 MiB in 3 s through every hop (2 MiB/s); node 0 waited 2.7 s on
        // node 1, which waited on nothing: node 1 is slow.
        let now = sample(
            t + Duration::from_secs(3),
            &[
                (0, 6 * MIB, 2700),
                (1, 6 * MIB, 20),
                (2, 6 * MIB, 10),
                (3, 6 * MIB, 0),
                (4, 0, 0),
            ],
        );
        let v = bottleneck(&then, &now).unwrap();
        assert_eq!(v.node, 1);
        assert!((v.rate - 2.0 * MIB as f64).abs() < 1.0, "{v:?}");
        // Node 0 moves 6 MiB in the 0.3 s it does not wait: 20 MiB/s.
        assert!((v.median - 20.0 * MIB as f64).abs() < 1.0, "{v:?}");

        // Members 0 to 2 all wait (backpressure): the last of them points
        // at node 3; the ones before do not count.
        let now = sample(
            t + Duration::from_secs(3),
            &[
                (0, 6 * MIB, 2900),
                (1, 6 * MIB, 2800),
                (2, 6 * MIB, 2600),
                (3, 6 * MIB, 0),
                (4, 0, 0),
            ],
        );
        assert_eq!(bottleneck(&then, &now).unwrap().node, 3);
        // The tail can be the slow one.
        let now = sample(
            t + Duration::from_secs(3),
            &[
                (0, 6 * MIB, 2900),
                (1, 6 * MIB, 2800),
                (2, 6 * MIB, 2600),
                (3, 6 * MIB, 2500),
                (4, 0, 0),
            ],
        );
        assert_eq!(bottleneck(&then, &now).unwrap().node, 4);
        // Node 3 is slow both ways: it waits on node 4 part of the time
        // (60%), its predecessor nearly all of it. Node 3 is the slow one,
        // not node 4.
        let now = sample(
            t + Duration::from_secs(3),
            &[
                (0, 6 * MIB, 2900),
                (1, 6 * MIB, 2800),
                (2, 6 * MIB, 2900),
                (3, 6 * MIB, 1800),
                (4, 0, 0),
            ],
        );
        assert_eq!(bottleneck(&then, &now).unwrap().node, 3);
    }

    #[test]
    fn no_verdict_without_a_clear_slow_member() {
        let t = Instant::now();
        let later = t + Duration::from_secs(3);
        let then = sample(t, &[(0, 0, 0), (1, 0, 0), (2, 0, 0)]);
        let none = |members: &[(usize, u64, u64)]| bottleneck(&then, &sample(later, members));
        // Nobody waits: the controller (or the head) sets the pace.
        assert_eq!(
            none(&[(0, 30 * MIB, 100), (1, 30 * MIB, 50), (2, 0, 0)]),
            None
        );
        // Waiting a little, not most of the time.
        assert_eq!(
            none(&[(0, 30 * MIB, 1400), (1, 30 * MIB, 0), (2, 0, 0)]),
            None
        );
        // Too little data to judge.
        assert_eq!(
            none(&[(0, MIB / 4, 2900), (1, MIB / 4, 0), (2, 0, 0)]),
            None
        );
        // Waiting half the time: 3 MiB/s against 6 MiB/s is not below half.
        assert_eq!(
            none(&[(0, 9 * MIB, 1500), (1, 9 * MIB, 0), (2, 0, 0)]),
            None
        );
        assert!(none(&[(0, 9 * MIB, 1600), (1, 9 * MIB, 0), (2, 0, 0)]).is_some());
        // Another chain (a member moved in between): no comparison.
        assert_eq!(
            none(&[(0, 6 * MIB, 2900), (2, 6 * MIB, 0), (1, 0, 0)]),
            None
        );
        assert_eq!(none(&[(0, 6 * MIB, 2900), (1, 6 * MIB, 0)]), None);
        // A single member has no successor to wait on.
        let one = sample(t, &[(0, 0, 0)]);
        assert_eq!(bottleneck(&one, &sample(later, &[(0, 0, 0)])), None);
    }

    #[test]
    fn the_watch_judges_only_a_full_window() {
        let t = Instant::now();
        let mut watch = Watch::default();
        let at = |ms: u64, fwd: u64, blocked: u64| {
            sample(
                t + Duration::from_millis(ms),
                &[(0, fwd, blocked), (1, fwd, 0), (2, 0, 0)],
            )
        };
        assert_eq!(WINDOW, Duration::from_millis(500));
        // 2 MiB/s, node 0 waiting 90% of the time.
        for ms in (0..500).step_by(125) {
            assert_eq!(
                watch.observe(at(ms, ms * 2 * MIB / 1000, ms * 9 / 10)),
                None
            );
        }
        let v = watch.observe(at(500, MIB, 450)).unwrap();
        assert_eq!(v.node, 1);
        // After a reset it needs another full window.
        watch.reset();
        assert_eq!(watch.observe(at(625, 5 * MIB / 4, 562)), None);
        assert_eq!(watch.observe(at(1000, 2 * MIB, 900)), None);
        assert!(watch.observe(at(1125, 9 * MIB / 4, 1012)).is_some());
    }

    #[test]
    fn a_suspect_is_confirmed_only_by_the_same_slow_pace_around_it_for_a_window() {
        let first = Verdict {
            node: 5,
            waiter: 4,
            rate: 2.0 * MIB as f64,
            median: 12.0 * MIB as f64,
        };
        let t = Instant::now();
        let mut suspect = Suspect::of(&first, t);
        assert_eq!(suspect.node, 4);
        let again = |node, waiter, mib: f64| Verdict {
            node,
            waiter,
            rate: mib * MIB as f64,
            median: 20.0 * MIB as f64,
        };
        // Node 4 still waits at that pace on its new successor, or its
        // predecessor on it.
        assert!(suspect.points_at(&again(6, 4, 2.2)));
        assert!(suspect.points_at(&again(4, 3, 2.9)));
        // The replay after a right move goes at the link's speed.
        assert!(!suspect.points_at(&again(6, 4, 8.0)));
        // Somewhere else in the chain.
        assert!(!suspect.points_at(&again(7, 6, 2.0)));

        // Confirmed by looks a window apart that point at it.
        let ms = |n: u64| t + Duration::from_millis(n);
        let held = again(6, 4, 2.2);
        assert!(!suspect.confirmed(Some(&held), ms(700)));
        assert!(!suspect.confirmed(None, ms(800)));
        assert!(!suspect.confirmed(Some(&held), ms(1000)));
        // A look that points elsewhere starts over.
        assert!(!suspect.confirmed(Some(&again(6, 4, 9.0)), ms(1100)));
        assert!(!suspect.confirmed(Some(&held), ms(1400)));
        assert!(!suspect.confirmed(None, ms(1600)));
        assert!(!suspect.confirmed(Some(&held), ms(1800)));
        assert!(suspect.confirmed(Some(&held), ms(1900)));
        // Long after the move, nothing confirms it.
        let mut late = Suspect::of(&first, t);
        for n in (0..10).map(|k| SUSPECT_FOR.as_millis() as u64 + 100 * k) {
            assert!(!late.confirmed(Some(&held), ms(n)));
        }
        assert!(late.expired(ms(SUSPECT_FOR.as_millis() as u64 + 1)));
    }
}
