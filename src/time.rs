//! Times: stored as UTC `NaiveDateTime` cut to microseconds (PostgreSQL keeps microseconds, SQLite
//! more, so both backends hold the same value), shown as HTTP dates in `/api/check` and as RFC 3339
//! seconds in log lines.

use chrono::{DateTime, NaiveDateTime, SubsecRound, Utc};

/// Now, in UTC, to the microsecond.
pub fn now() -> NaiveDateTime {
    Utc::now().naive_utc().trunc_subsecs(6)
}

/// `Wed, 17 Aug 2016 18:38:17 GMT`.
pub fn http_date(t: NaiveDateTime) -> String {
    t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

/// `2017-07-27T16:37:04Z`.
pub fn rfc3339(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
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
}
