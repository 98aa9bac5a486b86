//! Human-friendly durations ("1h30m") and sizes ("512M") as they appear in
//! policy files and on the command line.
//!
//! Both parsers return a plain `String` error that reads well after a
//! `key: ` prefix, so the same text serves the TOML loader and CLI flags.

use std::time::Duration;

const KIB: u64 = 1024;

/// Duration units, largest first; formatting walks this list in order.
const DURATION_UNITS: &[(&str, u64)] = &[("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)];

/// Size suffixes, largest first; formatting walks this list in order.
const SIZE_UNITS: &[(char, u64)] =
    &[('T', KIB * KIB * KIB * KIB), ('G', KIB * KIB * KIB), ('M', KIB * KIB), ('K', KIB)];

fn duration_error(s: &str) -> String {
    format!(
        "invalid duration {s:?}: expected a number with a unit (d, h, m, s, ms), \
         e.g. \"30s\", \"10m\", \"1h30m\", or a plain number of seconds"
    )
}

fn size_error(s: &str) -> String {
    format!("invalid size {s:?}: expected a number with an optional K/M/G/T suffix, e.g. \"512M\"")
}

/// Parses "30s", "10m", "2h", "1h30m", "1d", "500ms" or a plain number of
/// seconds. Components may be separated by spaces and are summed.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err(duration_error(s));
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| format!("invalid duration {s:?}: number too large"));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(duration_error(s));
        }
        let (number, after) = rest.split_at(digits);
        let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(unit_len);
        let value: u64 = number.parse().map_err(|_| format!("invalid duration {s:?}: number too large"))?;
        let part = if unit == "ms" {
            Some(Duration::from_millis(value))
        } else {
            let (_, secs) =
                DURATION_UNITS.iter().find(|(name, _)| *name == unit).ok_or_else(|| duration_error(s))?;
            value.checked_mul(*secs).map(Duration::from_secs)
        };
        total = part
            .and_then(|p| total.checked_add(p))
            .ok_or_else(|| format!("invalid duration {s:?}: too large"))?;
        rest = after.trim_start();
    }
    Ok(total)
}

/// Formats a duration in the compact form [`parse_duration`] reads back,
/// e.g. 5400s → "1h30m". Precision below a millisecond is dropped.
pub fn format_duration(d: Duration) -> String {
    let mut secs = d.as_secs();
    let millis = d.subsec_millis();
    let mut out = String::new();
    for (name, size) in DURATION_UNITS {
        if secs >= *size {
            out.push_str(&format!("{}{name}", secs / size));
            secs %= size;
        }
    }
    if millis > 0 {
        out.push_str(&format!("{millis}ms"));
    }
    if out.is_empty() {
        out.push_str("0s");
    }
    out
}

/// Parses "512M", "2G", "1024K", "1T" or a plain number of bytes. Suffixes
/// are binary (K = 1024), case-insensitive, and may carry a trailing "B" or
/// "iB" ("512MB", "512MiB").
pub fn parse_size(s: &str) -> Result<u64, String> {
    let text = s.trim().to_ascii_uppercase();
    let mut body = text.as_str();
    if let Some(stripped) = body.strip_suffix("IB") {
        // "iB" is only meaningful after a unit letter: "512MiB", not "512iB".
        if !stripped.ends_with(['K', 'M', 'G', 'T']) {
            return Err(size_error(s));
        }
        body = stripped;
    } else if let Some(stripped) = body.strip_suffix('B') {
        body = stripped;
    }
    let (number, multiplier) = match body.chars().last() {
        Some(last) if last.is_ascii_alphabetic() => {
            let (_, mult) = SIZE_UNITS.iter().find(|(unit, _)| *unit == last).ok_or_else(|| size_error(s))?;
            (&body[..body.len() - 1], *mult)
        }
        _ => (body, 1),
    };
    let number = number.trim_end();
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(size_error(s));
    }
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// Formats a byte count with the largest suffix that divides it exactly,
/// e.g. 536870912 → "512M"; other counts print as bytes ("1000B").
pub fn format_size(n: u64) -> String {
    if n == 0 {
        return "0B".to_string();
    }
    for (unit, size) in SIZE_UNITS {
        if n.is_multiple_of(*size) {
            return format!("{}{unit}", n / size);
        }
    }
    format!("{n}B")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1500ms").unwrap(), Duration::from_millis(1500));
    }

    #[test]
    fn durations_reject_garbage() {
        for bad in ["", "lots", "h", "10x", "1.5h", "-5s", "10 m s", "99999999999999999999d"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("invalid duration"), "{bad}: {err}");
        }
        assert!(parse_duration("lots").unwrap_err().contains("\"lots\""));
    }

    #[test]
    fn durations_format_round_trip() {
        for (secs, text) in [(0, "0s"), (30, "30s"), (600, "10m"), (5400, "1h30m"), (90_061, "1d1h1m1s")] {
            let d = Duration::from_secs(secs);
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text).unwrap(), d);
        }
        let d = Duration::from_millis(2_250);
        assert_eq!(format_duration(d), "2s250ms");
        assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M").unwrap(), 512 * KIB * KIB);
        assert_eq!(parse_size("2G").unwrap(), 2 * KIB * KIB * KIB);
        assert_eq!(parse_size("1024K").unwrap(), KIB * KIB);
        assert_eq!(parse_size("1T").unwrap(), KIB.pow(4));
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512mb").unwrap(), 512 * KIB * KIB);
        assert_eq!(parse_size("512MiB").unwrap(), 512 * KIB * KIB);
        assert_eq!(parse_size("100b").unwrap(), 100);
    }

    #[test]
    fn sizes_reject_garbage() {
        for bad in ["", "lots", "M", "12X", "1.5G", "-1M", "512iB", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(
            parse_size("lots").unwrap_err(),
            "invalid size \"lots\": expected a number with an optional K/M/G/T suffix, e.g. \"512M\""
        );
    }

    #[test]
    fn sizes_format_round_trip() {
        for (n, text) in [
            (0, "0B"),
            (1000, "1000B"),
            (512 * KIB * KIB, "512M"),
            (1536 * KIB * KIB, "1536M"),
            (KIB.pow(4), "1T"),
        ] {
            assert_eq!(format_size(n), text);
            assert_eq!(parse_size(text).unwrap(), n);
        }
    }
}
