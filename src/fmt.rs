//! Bytes, rates and durations for people: pure functions any module may
//! use (agent notes, import output); [`crate::ui::fmt`] re-exports them with
//! the bar styles built on them, so every front end shows the same units.

use std::time::Duration;

/// Bytes in binary units: "0 B", "512 B", "1.5 KiB", "512 MiB", "1.0 GiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    // Decide the precision on the value as it will be shown, so that
    // 9.96 KiB is "10 KiB" and 1023.7 KiB is "1.0 MiB".
    if (v * 10.0).round() < 100.0 {
        format!("{v:.1} {}", UNITS[u])
    } else if v.round() < 1024.0 || u == UNITS.len() - 1 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("1.0 {}", UNITS[u + 1])
    }
}

/// A rate in binary units per second: "118 MiB/s".
pub fn human_rate(bytes_per_sec: f64) -> String {
    if !bytes_per_sec.is_finite() || bytes_per_sec <= 0.0 {
        return "0 B/s".into();
    }
    // `as` saturates at u64::MAX.
    format!("{}/s", human_bytes(bytes_per_sec.round() as u64))
}

/// `1m05s`, `3h02m`, `42s`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_uses_binary_units() {
        for (n, s) in [
            (0, "0 B"),
            (1, "1 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (10 * 1024, "10 KiB"),
            (10199, "10 KiB"),
            (512 << 20, "512 MiB"),
            ((1 << 20) - 1, "1.0 MiB"),
            (1 << 30, "1.0 GiB"),
            (3 << 40, "3.0 TiB"),
            (u64::MAX, "16 EiB"),
        ] {
            assert_eq!(human_bytes(n), s, "{n}");
        }
        assert_eq!(human_rate(118.3 * 1048576.0), "118 MiB/s");
        assert_eq!(human_rate(0.0), "0 B/s");
        assert_eq!(human_rate(f64::NAN), "0 B/s");
        assert_eq!(human_rate(500.0), "500 B/s");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(Duration::from_secs(42)), "42s");
        assert_eq!(human_duration(Duration::from_secs(65)), "1m05s");
        assert_eq!(human_duration(Duration::from_secs(3 * 3600 + 120)), "3h02m");
    }
}
