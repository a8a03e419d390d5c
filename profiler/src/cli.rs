//! Pure helpers for parsing command-line values (no I/O), shared by the
//! `hvprof` binary and tests.

use std::time::Duration;

/// Parses `500ms`, `10s`, `2m`, `1h`, `250us`, `100ns`; a bare number is
/// seconds.
/// A duration, or `forever` (`None`).
#[derive(Clone, Copy, Debug)]
pub struct DurationOrForever(pub Option<Duration>);

/// Parses a [`DurationOrForever`].
pub fn parse_duration_or_forever(text: &str) -> Result<DurationOrForever, String> {
    if text.trim() == "forever" {
        return Ok(DurationOrForever(None));
    }
    parse_duration(text).map(|d| DurationOrForever(Some(d)))
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (try 500ms, 10s, 2m)"))?;
    let scale = match unit.trim() {
        "" | "s" | "sec" => 1e9,
        "ms" => 1e6,
        "us" | "\u{b5}s" => 1e3,
        "ns" => 1.0,
        "m" | "min" => 60e9,
        "h" => 3600e9,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use ns, us, ms, s, m, h)"
            ));
        }
    };
    let ns = value * scale;
    if !ns.is_finite() || ns < 0.0 || ns > 1.8e19 {
        return Err(format!("{text:?} is out of range"));
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "range checked above"
    )]
    Ok(Duration::from_nanos(ns as u64))
}

/// Parses `-p 12,34`.
pub fn parse_pids(text: &str) -> Result<Vec<u32>, String> {
    text.split(',')
        .map(|p| {
            p.trim()
                .parse::<u32>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| format!("{p:?} is not a pid"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 fortnights").is_err());
    }

    #[test]
    fn pids() {
        assert_eq!(parse_pids("1,22, 333"), Ok(vec![1, 22, 333]));
        assert!(parse_pids("0").is_err());
        assert!(parse_pids("x").is_err());
    }
}
