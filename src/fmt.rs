//! The one place that turns bytes, rates, durations and times into text:
//! pure functions any module may use (agent notes, import output, `list`);
//! [`crate::ui::fmt`] re-exports them with the bar styles built on them, so
//! a number reads the same wherever it appears.

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

/// A rate in binary units per second: "118 MiB/s", "0 B/s".
pub fn human_rate(bytes_per_sec: f64) -> String {
    if !bytes_per_sec.is_finite() || bytes_per_sec <= 0.0 {
        return "0 B/s".into();
    }
    // `as` saturates at u64::MAX.
    format!("{}/s", human_bytes(bytes_per_sec.round() as u64))
}

/// A bandwidth cap: "40 MiB/s", or "no cap" for 0.
pub fn human_cap(bytes_per_sec: u64) -> String {
    if bytes_per_sec == 0 {
        "no cap".into()
    } else {
        human_rate(bytes_per_sec as f64)
    }
}

/// `42s`, `1m05s`, `3h02m`: rounded to the nearest unit shown, so a run
/// cut by `-t 20` after 19.99 s reads `20s`, not `19s`.
pub fn human_duration(d: Duration) -> String {
    let s = ((d.as_millis() + 500) / 1000) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => {
            let m = (s + 30) / 60;
            format!("{}h{:02}m", m / 60, m % 60)
        }
    }
}

/// Seconds for JSON: milliseconds are enough (`12.345`, not `12.345678901`).
pub fn json_seconds(secs: f64) -> f64 {
    (secs * 1000.0).round() / 1000.0
}

/// Now, for JSON events and the log: RFC 3339 with the zone offset.
pub fn timestamp() -> String {
    chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, false)
}

/// Now, for plain lines: `14:05:09`.
pub fn clock() -> String {
    chrono::Local::now().format("%H:%M:%S").to_string()
}

/// A date for tables, with its zone: `2026-11-20 10:12 +01:00`.
pub fn local_date(t: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Local>::from(t)
        .format("%Y-%m-%d %H:%M %:z")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_use_binary_units() {
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
        assert_eq!(human_cap(0), "no cap");
        assert_eq!(human_cap(40 << 20), "40 MiB/s");
    }

    #[test]
    fn durations_round_to_what_is_shown() {
        let s = Duration::from_secs_f64;
        assert_eq!(human_duration(s(4.4)), "4s");
        assert_eq!(human_duration(s(19.99)), "20s");
        assert_eq!(human_duration(s(42.0)), "42s");
        assert_eq!(human_duration(s(65.0)), "1m05s");
        assert_eq!(human_duration(s(3.0 * 3600.0 + 120.0)), "3h02m");
        assert_eq!(json_seconds(1.234_567_891), 1.235);
    }

    #[test]
    fn times_carry_their_zone() {
        let ts = timestamp();
        assert!(
            ts.contains('T') && (ts.ends_with('Z') || ts[19..].contains(['+', '-'])),
            "{ts}"
        );
        let date = local_date(std::time::SystemTime::UNIX_EPOCH);
        assert!(date.rsplit(' ').next().unwrap().contains(':'), "{date}");
    }
}
