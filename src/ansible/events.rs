//! The event stream: lines of `events.jsonl` written by the callback plugin, and the per-host
//! state they add up to. The final `stats` event carries ansible's own counters (the PLAY RECAP);
//! until it arrives, counters are summed from runner events so a stopped task still shows what ran.

use std::collections::{BTreeMap, HashMap};

use chrono::NaiveDateTime;
use serde::Deserialize;

use crate::store::HostState;
use crate::time;

/// Marker appended to a cut payload.
pub const TRUNCATED: &str = "...[truncated]";
/// Largest failure message kept per host, in characters.
const MAX_MSG: usize = 1000;

/// Ansible's counters for one host, as in PLAY RECAP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Counters {
    pub ok: i32,
    pub changed: i32,
    pub failed: i32,
    pub unreachable: i32,
    pub skipped: i32,
    pub rescued: i32,
    pub ignored: i32,
}

#[derive(Debug, Deserialize)]
struct Raw {
    event: String,
    time: Option<String>,
    host: Option<String>,
    task: Option<String>,
    #[serde(default)]
    changed: bool,
    msg: Option<String>,
    #[serde(default)]
    ignore_errors: bool,
    hosts: Option<BTreeMap<String, Counters>>,
}

/// One decoded event.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: String,
    pub time: NaiveDateTime,
    pub host: Option<String>,
    pub task: Option<String>,
    pub changed: bool,
    pub msg: Option<String>,
    pub ignore_errors: bool,
    pub stats: Option<BTreeMap<String, Counters>>,
    /// The line as written, made to fit `max_event_bytes` by [`fit`] (still JSON).
    pub payload: String,
}

/// Decodes one line, keeping at most `max_payload` bytes of it as the payload; `None` for a line
/// that is not an event of the plugin.
pub fn parse_line(line: &str, max_payload: usize) -> Option<Event> {
    let raw: Raw = serde_json::from_str(line).ok()?;
    let time = raw
        .time
        .as_deref()
        .and_then(time::parse_event_time)
        .unwrap_or_else(time::now);
    Some(Event {
        kind: raw.event,
        time,
        host: raw.host,
        task: raw.task,
        changed: raw.changed,
        msg: raw.msg,
        ignore_errors: raw.ignore_errors,
        stats: raw.hosts,
        payload: fit(line, max_payload),
    })
}

/// `text` cut at a character boundary to at most `max` bytes, with the marker when cut.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub(TRUNCATED.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{TRUNCATED}", &text[..end])
}

/// Length of `s` as a JSON string's contents (escapes counted as serde_json writes them).
fn json_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// `s` cut (at a character) so that its JSON contents, the marker included, take at most
/// `budget` bytes.
fn cut_json_string(s: &str, budget: usize) -> String {
    let room = budget.saturating_sub(TRUNCATED.len());
    let mut used = 0;
    let end = s
        .char_indices()
        .find(|(_, c)| {
            used += json_len(*c);
            used > room
        })
        .map_or(s.len(), |(i, _)| i);
    format!("{}{TRUNCATED}", &s[..end])
}

/// An event's payload: the line as written when it fits in `max` bytes; else still JSON, made to
/// fit. The object gains `"truncated": {"bytes": <the line's length>}`; its `result` becomes
/// `{"_downlink_truncated": {"bytes": <its JSON's length>}}`; then its longest strings (`stdout`
/// first, as a rule) are cut, each ending with [`TRUNCATED`]. A line that is not an object (the
/// plugin writes none) is stored as a JSON string, cut the same way.
pub fn fit(line: &str, max: usize) -> String {
    use serde_json::{json, Value};
    if line.len() <= max {
        return line.to_owned();
    }
    let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(line) else {
        return Value::String(cut_json_string(line, max.saturating_sub(2))).to_string();
    };
    obj.insert("truncated".into(), json!({ "bytes": line.len() }));
    if let Some(result) = obj.get_mut("result") {
        let bytes = result.to_string().len();
        *result = json!({ "_downlink_truncated": { "bytes": bytes } });
    }
    for _ in 0..obj.len() {
        let size = Value::Object(obj.clone()).to_string().len();
        if size <= max {
            break;
        }
        let longest = obj
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "event" | "time"))
            .filter_map(|(k, v)| {
                Some((k.clone(), v.as_str()?.chars().map(json_len).sum::<usize>()))
            })
            .max_by_key(|(_, len)| *len);
        let Some((key, len)) = longest else { break };
        if let Some(Value::String(text)) = obj.get_mut(&key) {
            *text = cut_json_string(text, len.saturating_sub(size - max));
        }
    }
    let out = Value::Object(obj.clone()).to_string();
    if out.len() <= max {
        return out;
    }
    // Only short fields are left, and too many of them: the event's kind and time, and the mark.
    let keep = |k: &str| obj.get(k).cloned().unwrap_or(Value::Null);
    json!({ "event": keep("event"), "time": keep("time"), "truncated": keep("truncated") })
        .to_string()
}

/// How a task ended, as far as host results are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// ansible-playbook exited by itself.
    Exited,
    Stopped,
    Timeout,
    Interrupted,
    /// Ended by the agent for a fault where it runs (its run directory's disk cannot be written).
    Failed,
}

#[derive(Debug, Default, Clone)]
struct Tracked {
    counters: Counters,
    msg: Option<String>,
    first: Option<NaiveDateTime>,
    last: Option<NaiveDateTime>,
    final_stats: bool,
    dirty: bool,
}

/// Per-host state of one task, fed event by event.
#[derive(Debug, Clone)]
pub struct Hosts {
    order: Vec<String>,
    by_host: HashMap<String, Tracked>,
    stats_seen: bool,
}

impl Hosts {
    /// Tracks exactly these nodes; events about other hosts are ignored here.
    pub fn new(nodes: &[String]) -> Hosts {
        Hosts {
            order: nodes.to_vec(),
            by_host: nodes
                .iter()
                .map(|n| (n.clone(), Tracked::default()))
                .collect(),
            stats_seen: false,
        }
    }

    /// Adds one event.
    pub fn apply(&mut self, ev: &Event) {
        if let Some(stats) = &ev.stats {
            self.stats_seen = true;
            for (host, counters) in stats {
                if let Some(t) = self.by_host.get_mut(host) {
                    t.counters = *counters;
                    t.final_stats = true;
                    t.dirty = true;
                }
            }
            return;
        }
        let Some(t) = ev.host.as_ref().and_then(|h| self.by_host.get_mut(h)) else {
            return;
        };
        t.first.get_or_insert(ev.time);
        t.last = Some(ev.time);
        t.dirty = true;
        if t.final_stats {
            return;
        }
        let c = &mut t.counters;
        match ev.kind.as_str() {
            "runner_ok" => {
                c.ok += 1;
                c.changed += i32::from(ev.changed);
            }
            "runner_failed" if ev.ignore_errors => {
                c.ok += 1;
                c.ignored += 1;
            }
            "runner_failed" => c.failed += 1,
            "runner_unreachable" => c.unreachable += 1,
            "runner_skipped" => c.skipped += 1,
            _ => {}
        }
        if matches!(ev.kind.as_str(), "runner_failed" | "runner_unreachable")
            && !ev.ignore_errors
            && t.msg.is_none()
        {
            t.msg = Some(
                ev.msg
                    .as_deref()
                    .unwrap_or("failed without a message")
                    .chars()
                    .take(MAX_MSG)
                    .collect(),
            );
        }
    }

    /// States of the hosts changed since the last call (result still open).
    pub fn take_changed(&mut self) -> Vec<HostState> {
        let mut out = Vec::new();
        for host in &self.order {
            if let Some(t) = self.by_host.get_mut(host) {
                if t.dirty {
                    t.dirty = false;
                    out.push(state(host, t, None));
                }
            }
        }
        out
    }

    /// Final states of every node, in node order, for a task that ended as `ending`.
    pub fn finish(&mut self, ending: Ending) -> Vec<HostState> {
        self.order
            .iter()
            .filter_map(|host| {
                let t = self.by_host.get_mut(host)?;
                t.dirty = false;
                let result = result_of(t, ending);
                Some(state(host, t, Some(result)))
            })
            .collect()
    }

    /// Hosts that failed or were unreachable, with their message, in node order.
    pub fn failures(&self) -> Vec<(String, &'static str, Option<String>)> {
        self.order
            .iter()
            .filter_map(|h| {
                let t = self.by_host.get(h)?;
                let kind = if t.counters.failed > 0 {
                    "failed"
                } else if t.counters.unreachable > 0 {
                    "unreachable"
                } else {
                    return None;
                };
                Some((h.clone(), kind, t.msg.clone()))
            })
            .collect()
    }

    /// Nodes not found unreachable: those the task may have started processes on.
    pub fn reachable(&self) -> Vec<String> {
        self.order
            .iter()
            .filter(|h| {
                self.by_host
                    .get(*h)
                    .is_some_and(|t| t.counters.unreachable == 0)
            })
            .cloned()
            .collect()
    }

    /// Whether ansible's final stats (its PLAY RECAP) have arrived: the run reached its end.
    pub fn has_final_stats(&self) -> bool {
        self.stats_seen
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

fn result_of(t: &Tracked, ending: Ending) -> &'static str {
    let c = &t.counters;
    if c.failed > 0 {
        "failed"
    } else if c.unreachable > 0 {
        "unreachable"
    } else if !t.final_stats && ending != Ending::Exited {
        match ending {
            Ending::Stopped => "stopped",
            Ending::Timeout => "timeout",
            _ => "interrupted",
        }
    } else if c.ok > 0 || c.rescued > 0 || c.ignored > 0 {
        "ok"
    } else {
        "skipped"
    }
}

fn state(host: &str, t: &Tracked, result: Option<&str>) -> HostState {
    let c = t.counters;
    HostState {
        host: host.to_owned(),
        result: result.map(str::to_owned),
        ok: c.ok,
        changed: c.changed,
        failed: c.failed,
        unreachable: c.unreachable,
        skipped: c.skipped,
        rescued: c.rescued,
        ignored: c.ignored,
        msg: t.msg.clone(),
        created_at: t.first,
        ended_at: t.last,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(line: &str) -> Event {
        parse_line(line, 8192).unwrap()
    }

    #[test]
    fn results_follow_counters_and_ending() {
        let nodes: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let mut hosts = Hosts::new(&nodes);
        hosts.apply(&ev(
            r#"{"event":"runner_ok","host":"a","changed":true,"time":"2026-01-01T00:00:01.5Z"}"#,
        ));
        hosts.apply(&ev(
            r#"{"event":"runner_failed","host":"b","msg":"boom","time":"2026-01-01T00:00:02Z"}"#,
        ));
        hosts.apply(&ev(
            r#"{"event":"runner_unreachable","host":"c","msg":"no route"}"#,
        ));
        hosts.apply(&ev(r#"{"event":"runner_ok","host":"zzz"}"#));
        let changed = hosts.take_changed();
        assert_eq!(changed.len(), 3);
        assert!(changed.iter().all(|s| s.result.is_none()));
        let fin = hosts.finish(Ending::Stopped);
        let results: Vec<_> = fin.iter().map(|s| s.result.clone().unwrap()).collect();
        assert_eq!(results, ["stopped", "failed", "unreachable", "stopped"]);
        assert_eq!(fin[0].ok, 1);
        assert_eq!(fin[0].changed, 1);
        assert_eq!(fin[1].msg.as_deref(), Some("boom"));
        assert_eq!(hosts.failures().len(), 2);
    }

    #[test]
    fn stats_are_authoritative() {
        let nodes = vec!["a".to_string(), "b".to_string()];
        let mut hosts = Hosts::new(&nodes);
        hosts.apply(&ev(r#"{"event":"runner_ok","host":"a"}"#));
        hosts.apply(&ev(
            r#"{"event":"stats","hosts":{"a":{"ok":3,"changed":1,"failed":0,"unreachable":0,"skipped":2,"rescued":0,"ignored":0}}}"#,
        ));
        let fin = hosts.finish(Ending::Exited);
        assert_eq!(fin[0].ok, 3);
        assert_eq!(fin[0].skipped, 2);
        assert_eq!(fin[0].result.as_deref(), Some("ok"));
        assert_eq!(fin[1].result.as_deref(), Some("skipped"));
    }

    #[test]
    fn a_payload_that_fits_is_the_line_itself() {
        let line =
            r#"{"event":"runner_ok","host":"h","stdout":"ok: [h]","result":{"changed":false}}"#;
        assert_eq!(fit(line, 256), line);
    }

    #[test]
    fn a_long_payload_stays_json_and_says_what_was_cut() {
        let stdout = "fatal: [h]: \"quoted\"\n\u{1}é".repeat(2000);
        let line =
            serde_json::json!({"event": "runner_failed", "time": "2026-12-04T10:00:00.000000Z",
            "host": "h", "stdout": stdout, "result": {"msg": "x".repeat(5000)}})
            .to_string();
        let cut = fit(&line, 1024);
        assert!(cut.len() <= 1024, "{} bytes", cut.len());
        let v: serde_json::Value = serde_json::from_str(&cut).expect("still JSON");
        assert_eq!(v["event"], "runner_failed");
        assert_eq!(v["host"], "h");
        assert_eq!(v["truncated"]["bytes"], line.len());
        assert!(v["result"]["_downlink_truncated"]["bytes"].as_u64() > Some(5000));
        let kept = v["stdout"].as_str().expect("stdout kept, cut");
        assert!(kept.ends_with(TRUNCATED));
        assert!(stdout.starts_with(kept.trim_end_matches(TRUNCATED)));
        // Not cut further than needed: the cut stdout fills most of the room.
        assert!(cut.len() > 900, "{} bytes", cut.len());
    }

    #[test]
    fn a_line_that_is_not_an_object_is_stored_as_a_json_string() {
        let cut = fit(&"\"x".repeat(1000), 300);
        assert!(cut.len() <= 300);
        let v: serde_json::Value = serde_json::from_str(&cut).unwrap();
        assert!(v.as_str().unwrap().ends_with(TRUNCATED));
    }

    proptest::proptest! {
        #[test]
        fn any_cut_payload_is_json_within_the_limit(
            text in "(?s).{0,3000}",
            other in "[a-z\"\\\\]{0,600}",
            max in 256usize..4096,
        ) {
            let line = serde_json::json!({"event": "runner_ok", "time": "t", "host": other,
                "task": other, "stdout": text, "result": {"stdout": text}}).to_string();
            let cut = fit(&line, max);
            proptest::prop_assert!(cut.len() <= max);
            let v: serde_json::Value = serde_json::from_str(&cut).unwrap();
            proptest::prop_assert_eq!(&v["event"], "runner_ok");
        }
    }

    #[test]
    fn payloads_are_bounded_with_a_marker() {
        let long = "é".repeat(10_000);
        let cut = bounded(&long, 101);
        assert!(cut.len() <= 101);
        assert!(cut.ends_with(TRUNCATED));
        assert_eq!(bounded("short", 101), "short");
    }
}
