//! Ingestion: the lines of a task's `events.jsonl` become numbered events to store and per-host
//! results. A plain struct with no actor, clock or database in it, so every rule here (numbering,
//! markers for lines that are not events, the event budget, skipping what an earlier server
//! already stored) is tested on its own below.

use chrono::NaiveDateTime;
use serde_json::json;

use crate::ansible::events::{parse_line, Event, Hosts};
use crate::ansible::tail::{self, Chunk, Piece};
use crate::store::clean;
use crate::store::{HostState, NewEvent};

/// Longest excerpt of a skipped line kept in its marker event.
const EXCERPT: usize = 200;

/// What one chunk of the file adds: the events to store, the file offset they reach and the
/// hosts whose state changed.
#[derive(Debug, Default)]
pub struct Progress {
    pub events: Vec<NewEvent>,
    pub offset: u64,
    pub hosts: Vec<HostState>,
}

/// The state of one task's ingestion.
#[derive(Debug)]
pub struct Ingest {
    task_id: i64,
    /// Bytes of the file an earlier server already stored (an adopted task): those lines are
    /// numbered and applied again, not stored again.
    stored_offset: u64,
    max_event_bytes: usize,
    max_events_per_task: i32,
    /// Every host's state, rebuilt from every line.
    pub hosts: Hosts,
    /// The sequence number of the last line.
    seq: i32,
    /// Lines that were not events.
    skipped: u64,
}

impl Ingest {
    /// Ingestion of task `task_id` on `nodes`, storing only what lies past `stored_offset`.
    pub fn new(
        task_id: i64,
        nodes: &[String],
        stored_offset: u64,
        max_event_bytes: usize,
        max_events_per_task: i32,
    ) -> Ingest {
        Ingest {
            task_id,
            stored_offset,
            max_event_bytes,
            max_events_per_task,
            hosts: Hosts::new(nodes),
            seq: 0,
            skipped: 0,
        }
    }

    /// Lines so far that were not events.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Applies the pieces read to the host state; what is new to store, if anything.
    ///
    /// Every line gets one sequence number, an event or a `line_skipped` marker for a line that is
    /// not one, so an adopting server numbers the file exactly as the server before it did.
    /// `now` stamps the markers (a line that is not an event has no time of its own).
    pub fn consume(&mut self, chunk: Chunk, now: NaiveDateTime) -> Option<Progress> {
        let mut events = Vec::new();
        let mut offset = 0;
        for (end, piece) in chunk.pieces {
            offset = end;
            let keep = end > self.stored_offset;
            match self.decode_piece(piece) {
                Ok(ev) => {
                    self.hosts.apply(&ev);
                    self.seq += 1;
                    if keep {
                        self.push(ev.host, ev.kind, ev.task, ev.payload, ev.time, &mut events);
                    }
                }
                Err(mut detail) => {
                    self.seq += 1;
                    self.skipped += 1;
                    detail["event"] = json!("line_skipped");
                    if keep {
                        let payload = detail.to_string();
                        self.push(None, "line_skipped".into(), None, payload, now, &mut events);
                    }
                }
            }
        }
        let hosts = self.hosts.take_changed();
        if events.is_empty() && hosts.is_empty() {
            return None;
        }
        Some(Progress {
            events,
            offset: offset.max(self.stored_offset),
            hosts,
        })
    }

    /// A piece as an event, or the details of a `line_skipped` marker.
    fn decode_piece(&self, piece: Piece) -> Result<Event, serde_json::Value> {
        match piece {
            Piece::Line(bytes) | Piece::Cut(bytes) => self
                .decode(&bytes)
                .map_err(|excerpt| json!({"bytes": bytes.len(), "excerpt": excerpt})),
            Piece::TooLong(len) => Err(json!({"bytes": len, "excerpt": null,
                "why": format!("longer than {} bytes", tail::MAX_LINE)})),
            Piece::Truncated(len) => Err(json!({"bytes": 0, "excerpt": null,
                "why": format!("events.jsonl was truncated to {len} bytes while the task ran")})),
        }
    }

    /// One line as an event; an excerpt of it if it is not one.
    fn decode(&self, bytes: &[u8]) -> Result<Event, String> {
        let text = clean::bytes(bytes);
        let line = text.trim();
        let max = self.max_event_bytes;
        parse_line(line, max)
            .or_else(|| clean::repair_json_escapes(line).and_then(|fixed| parse_line(&fixed, max)))
            .ok_or_else(|| line.chars().take(EXCERPT).collect())
    }

    /// Keeps an event (already numbered) for storing, within `max_events_per_task`; the first
    /// one past the limit is replaced by an `events_truncated` marker.
    fn push(
        &self,
        host: Option<String>,
        kind: String,
        task_name: Option<String>,
        payload: String,
        created_at: NaiveDateTime,
        out: &mut Vec<NewEvent>,
    ) {
        let limit = self.max_events_per_task;
        let event = |host, kind, task_name, payload| NewEvent {
            task_id: self.task_id,
            seq: self.seq,
            host,
            kind,
            task_name,
            payload,
            created_at,
        };
        if self.seq == limit + 1 {
            out.push(event(None, "events_truncated".into(), None, format!(
                "{{\"event\":\"events_truncated\",\"stored\":{limit},\"note\":\"later events are not stored; host results still count them; all are in events.jsonl\"}}"
            )));
        } else if self.seq <= limit {
            out.push(event(host, kind, task_name, payload));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "2026-12-02T10:00:00.000000";

    fn now() -> NaiveDateTime {
        chrono::DateTime::from_timestamp(1_800_000_000, 0)
            .unwrap()
            .naive_utc()
    }

    fn ok_line(host: &str) -> Vec<u8> {
        format!("{{\"event\":\"runner_ok\",\"time\":\"{T}\",\"host\":\"{host}\",\"task\":\"ping\",\"changed\":false}}\n").into_bytes()
    }

    /// A chunk of these pieces, each ending where the previous one's bytes end.
    fn chunk(pieces: Vec<Piece>) -> Chunk {
        let mut at = 0u64;
        let pieces = pieces
            .into_iter()
            .map(|p| {
                at += match &p {
                    Piece::Line(b) | Piece::Cut(b) => b.len() as u64,
                    Piece::TooLong(n) => *n,
                    Piece::Truncated(_) => 0,
                };
                (at, p)
            })
            .collect();
        Chunk {
            pieces,
            more: false,
        }
    }

    fn nodes() -> Vec<String> {
        vec!["10.0.0.1".into(), "10.0.0.2".into()]
    }

    #[test]
    fn every_line_gets_one_number_and_what_is_not_an_event_a_marker() {
        let mut ingest = Ingest::new(7, &nodes(), 0, 4096, 100);
        let progress = ingest
            .consume(
                chunk(vec![
                    Piece::Line(ok_line("10.0.0.1")),
                    Piece::Line(b"not json at all\n".to_vec()),
                    Piece::TooLong(5_000_000),
                    Piece::Line(ok_line("10.0.0.2")),
                ]),
                now(),
            )
            .unwrap();
        let seqs: Vec<(i32, &str)> = progress
            .events
            .iter()
            .map(|e| (e.seq, e.kind.as_str()))
            .collect();
        assert_eq!(
            seqs,
            [
                (1, "runner_ok"),
                (2, "line_skipped"),
                (3, "line_skipped"),
                (4, "runner_ok")
            ]
        );
        assert!(progress.events.iter().all(|e| e.task_id == 7));
        assert!(progress.events[1]
            .payload
            .contains("\"excerpt\":\"not json at all\""));
        assert!(progress.events[2].payload.contains("\"bytes\":5000000"));
        assert_eq!(progress.events[1].created_at, now());
        assert_eq!(ingest.skipped(), 2);
        let bytes = 2 * ok_line("10.0.0.1").len() as u64 + 16 + 5_000_000;
        assert_eq!(progress.offset, bytes);
        let hosts: Vec<&str> = progress.hosts.iter().map(|h| h.host.as_str()).collect();
        assert_eq!(hosts, ["10.0.0.1", "10.0.0.2"]);
    }

    #[test]
    fn lines_an_earlier_server_stored_are_counted_but_not_stored_again() {
        let first = ok_line("10.0.0.1");
        let stored = first.len() as u64;
        let mut ingest = Ingest::new(1, &nodes(), stored, 4096, 100);
        let progress = ingest
            .consume(
                chunk(vec![Piece::Line(first), Piece::Line(ok_line("10.0.0.2"))]),
                now(),
            )
            .unwrap();
        assert_eq!(progress.events.len(), 1);
        assert_eq!(progress.events[0].seq, 2);
        assert_eq!(progress.events[0].host.as_deref(), Some("10.0.0.2"));
    }

    #[test]
    fn past_the_budget_one_marker_then_nothing_but_hosts_still_count() {
        let mut ingest = Ingest::new(1, &nodes(), 0, 4096, 2);
        let lines = (0..5).map(|_| Piece::Line(ok_line("10.0.0.1"))).collect();
        let progress = ingest.consume(chunk(lines), now()).unwrap();
        let kinds: Vec<&str> = progress.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["runner_ok", "runner_ok", "events_truncated"]);
        assert!(progress.events[2].payload.contains("\"stored\":2"));
        let host = &progress.hosts[0];
        assert_eq!((host.host.as_str(), host.ok), ("10.0.0.1", 5));
    }

    #[test]
    fn nothing_new_is_nothing_to_store() {
        let mut ingest = Ingest::new(1, &nodes(), 0, 4096, 10);
        assert!(ingest.consume(chunk(Vec::new()), now()).is_none());
    }

    #[test]
    fn a_cut_last_line_and_a_truncated_file_are_markers_that_say_so() {
        let mut ingest = Ingest::new(1, &nodes(), 0, 4096, 10);
        let progress = ingest
            .consume(
                chunk(vec![
                    Piece::Cut(b"{\"event\":\"runner_on_o".to_vec()),
                    Piece::Truncated(10),
                ]),
                now(),
            )
            .unwrap();
        assert_eq!(progress.events.len(), 2);
        assert!(progress.events[1].payload.contains("truncated to 10 bytes"));
    }
}
