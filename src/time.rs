//! Times: stored as UTC `NaiveDateTime` cut to microseconds (PostgreSQL keeps microseconds, SQLite
//! more, so both backends hold the same value), shown as HTTP dates in `/api/check` and as RFC 3339
//! seconds in log lines.

use chrono::{DateTime, Datelike, NaiveDateTime, SubsecRound, Timelike, Utc};

/// Now, in UTC, to the microsecond.
pub fn now() -> NaiveDateTime {
    Utc::now().naive_utc().trunc_subsecs(6)
}

/// `Wed, 17 Aug 2016 18:38:17 GMT`. Written by hand: chrono's `format` reads its pattern again
/// on every call, and a check answer holds 2 + 2 × hosts dates (a tenth of the server's CPU under
/// `/api/check` load).
pub fn http_date(t: NaiveDateTime) -> String {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mut out = String::with_capacity(29);
    out.push_str(DAYS[t.weekday().num_days_from_monday() as usize]);
    out.push_str(", ");
    push_digits(&mut out, t.day(), 2);
    out.push(' ');
    out.push_str(MONTHS[t.month0() as usize]);
    out.push(' ');
    push_year(&mut out, t.year());
    out.push(' ');
    push_clock(&mut out, t);
    out.push_str(" GMT");
    out
}

/// `2017-07-27T16:37:04Z`.
pub fn rfc3339(t: NaiveDateTime) -> String {
    let mut out = String::with_capacity(20);
    push_year(&mut out, t.year());
    out.push('-');
    push_digits(&mut out, t.month(), 2);
    out.push('-');
    push_digits(&mut out, t.day(), 2);
    out.push('T');
    push_clock(&mut out, t);
    out.push('Z');
    out
}

/// `HH:MM:SS`.
fn push_clock(out: &mut String, t: NaiveDateTime) {
    push_digits(out, t.hour(), 2);
    out.push(':');
    push_digits(out, t.minute(), 2);
    out.push(':');
    push_digits(out, t.second(), 2);
}

/// Four digits, as chrono's `%Y` writes years 0 to 9999 (others as it does too).
fn push_year(out: &mut String, year: i32) {
    match u32::try_from(year) {
        Ok(y) if y <= 9999 => push_digits(out, y, 4),
        _ => out.push_str(&format!("{year:+}")),
    }
}

/// `n` in exactly `width` decimal digits (`n` below 10^width).
fn push_digits(out: &mut String, n: u32, width: u32) {
    for i in (0..width).rev() {
        out.push(char::from(b'0' + (n / 10u32.pow(i) % 10) as u8));
    }
}

/// Reads the callback plugin's `2017-07-27T16:37:04.123456Z`.
pub fn parse_event_time(s: &str) -> Option<NaiveDateTime> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.naive_utc().trunc_subsecs(6))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    #[test]
    fn formats_match_the_contract() {
        let t = NaiveDate::from_ymd_opt(2016, 8, 17)
            .unwrap()
            .and_hms_micro_opt(18, 38, 17, 999_999)
            .unwrap();
        assert_eq!(http_date(t), "Wed, 17 Aug 2016 18:38:17 GMT");
        assert_eq!(rfc3339(t), "2016-08-17T18:38:17Z");
        assert_eq!(parse_event_time("2016-08-17T18:38:17.999999Z"), Some(t));
    }

    #[test]
    fn hand_written_formats_equal_chrono_s() {
        // Every day from 1999 to 2101 (leap days, every weekday and month), at varying times.
        let mut t = NaiveDate::from_ymd_opt(1999, 1, 1)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap();
        let step = chrono::Duration::seconds(86_400 + 3_661);
        while t.year() < 2101 {
            assert_eq!(
                http_date(t),
                t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
            );
            assert_eq!(rfc3339(t), t.format("%Y-%m-%dT%H:%M:%SZ").to_string());
            t += step;
        }
    }
}
