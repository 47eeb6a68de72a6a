//! Dates as the API writes them: `/api/check` answers 2 + 2 × hosts HTTP dates, the task and
//! event endpoints an RFC 3339 date per row. Each way of writing one, timed over the same
//! 1,000,000 times (nanoseconds per date, one run):
//!
//! - HTTP date: `httpdate::fmt_http_date` (what downlink uses) against chrono's `format` with the
//!   pattern, the way to do it without a crate of its own.
//! - RFC 3339 seconds: `downlink::time::rfc3339` (chrono's `to_rfc3339_opts(Secs, true)`)
//!   against chrono's `format("%Y-%m-%dT%H:%M:%SZ")`.
//!
//! Measured when `time.rs` gave up its hand-written dates (2 cores, busy): httpdate 213 ns, chrono
//! format 986 ns (4.6×); the hand-written RFC 3339 105 ns, to_rfc3339_opts 148 ns (1.4×: 43 ns a
//! date, not worth code of our own), chrono format 1,120 ns.
//!
//! `cargo bench --bench dates` runs it.

use std::hint::black_box;
use std::time::Instant;

use chrono::{DateTime, NaiveDateTime};

const N: i64 = 1_000_000;

fn times() -> impl Iterator<Item = NaiveDateTime> {
    // One date a second and a bit apart, over about 12 days from 2026-12-01.
    (0..N).filter_map(|i| DateTime::from_timestamp(1_795_000_000 + i, 0).map(|t| t.naive_utc()))
}

fn per_date(name: &str, f: impl Fn(NaiveDateTime) -> String) -> f64 {
    let started = Instant::now();
    let mut bytes = 0usize;
    for t in times() {
        bytes += black_box(f(black_box(t))).len();
    }
    let ns = started.elapsed().as_nanos() as f64 / N as f64;
    println!("{name:<44} {ns:>7.1} ns/date ({bytes} bytes)");
    ns
}

fn main() {
    println!("HTTP dates");
    let ours = per_date(
        "httpdate::fmt_http_date (downlink)",
        downlink::time::http_date,
    );
    let chrono = per_date("chrono format(\"%a, %d %b %Y %H:%M:%S GMT\")", |t| {
        t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
    });
    println!("  chrono / httpdate = {:.2}", chrono / ours);
    println!("RFC 3339 dates");
    let ours = per_date(
        "to_rfc3339_opts(Secs, true) (downlink)",
        downlink::time::rfc3339,
    );
    let fmt = per_date("chrono format(\"%Y-%m-%dT%H:%M:%SZ\")", |t| {
        t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    });
    println!("  format / to_rfc3339_opts = {:.2}", fmt / ours);
}
