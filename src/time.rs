//! Times: stored as UTC `NaiveDateTime` cut to microseconds (PostgreSQL keeps microseconds, SQLite
//! more, so both backends hold the same value), shown as HTTP dates in `/api/check` and as RFC 3339
//! seconds in log lines.

use std::time::UNIX_EPOCH;

use chrono::{DateTime, Datelike, NaiveDateTime, SecondsFormat, SubsecRound, Utc};

/// Now, in UTC, to the microsecond.
pub fn now() -> NaiveDateTime {
    Utc::now().naive_utc().trunc_subsecs(6)
}

/// `Wed, 17 Aug 2016 18:38:17 GMT`, by `httpdate` (IMF-fixdate, RFC 9110). A check answer holds
/// 2 + 2 × hosts of them: chrono's `format` would read its pattern again on every call
/// (`benches/dates.rs`). A time httpdate cannot write (before 1970 or after 9999: a row a DBA
/// edited) is written by chrono instead.
pub fn http_date(t: NaiveDateTime) -> String {
    let since_epoch = t.and_utc().timestamp();
    match u64::try_from(since_epoch) {
        Ok(secs) if t.year() <= 9999 => {
            httpdate::fmt_http_date(UNIX_EPOCH + std::time::Duration::from_secs(secs))
        }
        _ => t.format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
    }
}

/// `2017-07-27T16:37:04Z`, by chrono's `to_rfc3339_opts` (no pattern to read again per call).
pub fn rfc3339(t: NaiveDateTime) -> String {
    t.and_utc().to_rfc3339_opts(SecondsFormat::Secs, true)
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
    fn times_httpdate_cannot_write_are_written_alike() {
        for (y, text) in [
            (1969, "Wed, 31 Dec 1969 23:59:59 GMT"),
            (10000, "Sun, 31 Dec +10000 23:59:59 GMT"),
        ] {
            let t = NaiveDate::from_ymd_opt(y, 12, 31)
                .unwrap()
                .and_hms_opt(23, 59, 59)
                .unwrap();
            assert_eq!(http_date(t), text);
        }
    }

    #[test]
    fn formats_equal_chrono_s_patterns() {
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
