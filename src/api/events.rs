//! `GET /api/tasks/{id}/events?after=SEQ&host=H`: a task's event stream, resumable.
//!
//! Every stored event after `SEQ`, then the live ones as they are stored, then one closing line
//! with the task's final status. The database is the buffer: the stream reads a page of at most
//! [`PAGE`] events, and the next page only once the client has taken the last one (actix polls
//! the body only when the socket drains), so a slow client is never dropped and never makes the
//! server hold more than a page for it. A commit of this server's writer wakes the stream at once;
//! otherwise it reads again every [`POLL`] (events another agent stores, a lost wake-up).
//!
//! The closing line is sent only after a page read *after* the terminal status was seen came back
//! empty: a task's events are committed before its end, so a client that saw the end saw every
//! event.
//!
//! NDJSON by default (`{"type":"event",…}`, `{"type":"keepalive"}`, `{"type":"end",…}`), or
//! Server-Sent Events with `Accept: text/event-stream` (`id:` = seq, so `Last-Event-ID` resumes;
//! the end is `event: end`, keep-alives are comments). A keep-alive goes after
//! `event_stream_keepalive_secs` without a line.

use std::time::{Duration, Instant};

use actix_web::http::header::{ACCEPT, CACHE_CONTROL};
use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use slog::{warn, Logger};

use super::{ApiError, AppState};
use crate::status::Status;
use crate::store::{self, EventPage, NewEvent};
use crate::time;

/// Most events read (and held) at once for one client.
pub const PAGE: i64 = 500;
/// How often a stream reads again without a wake-up.
const POLL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Ndjson,
    Sse,
}

/// What the request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Want {
    id: i64,
    after: i32,
    host: Option<String>,
    format: Format,
}

fn want(req: &HttpRequest) -> Result<Want, ApiError> {
    let id = super::path_id(req)?;
    let format = match req.headers().get(ACCEPT).map(|v| v.as_bytes()) {
        Some(accept) if contains(accept, b"text/event-stream") => Format::Sse,
        _ => Format::Ndjson,
    };
    let mut after = None;
    let mut host = None;
    for (key, value) in url::form_urlencoded::parse(req.query_string().as_bytes()) {
        match key.as_ref() {
            "after" => after = Some(seq(&value, "after")?),
            "host" if !value.is_empty() => host = Some(value.into_owned()),
            _ => {}
        }
    }
    // A reconnecting EventSource sends the last id it saw; it wins over the URL's `after`.
    if format == Format::Sse {
        if let Some(last) = req.headers().get("Last-Event-ID") {
            let last = last
                .to_str()
                .map_err(|_| ApiError::param("Last-Event-ID", "must be a sequence number"))?;
            after = Some(seq(last, "Last-Event-ID")?);
        }
    }
    Ok(Want {
        id,
        after: after.unwrap_or(0),
        host,
        format,
    })
}

fn seq(s: &str, field: &str) -> Result<i32, ApiError> {
    s.trim()
        .parse::<i32>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| ApiError::param(field, "must be a non-negative integer"))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// One line of the stream as the server writes it: an event (`"type": "event"`) or the end
/// (`"type": "end"`); keep-alives are `{"type":"keepalive"}`. Readers read it with
/// [`read_line`]: serde buffers an internally tagged enum before it reads the variant, and a
/// `RawValue` payload cannot pass through that buffer.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum StreamLine<'a> {
    Event(EventLine<'a>),
    End(EndLine<'a>),
}

/// A line of the stream read back (by the CLI): its `type` first, then the line as that type.
/// A line of a type this reader does not know (a newer server's) is `None`, as is one that is
/// not a line of the stream.
pub fn read_line(line: &str) -> Option<ReadLine> {
    #[derive(Deserialize)]
    struct Kind<'a> {
        #[serde(rename = "type", borrow)]
        kind: Cow<'a, str>,
    }
    match serde_json::from_str::<Kind>(line).ok()?.kind.as_ref() {
        "event" => serde_json::from_str(line).ok().map(ReadLine::Event),
        "end" => serde_json::from_str(line).ok().map(ReadLine::End),
        "keepalive" => Some(ReadLine::KeepAlive),
        _ => None,
    }
}

/// What [`read_line`] read.
#[derive(Debug)]
pub enum ReadLine {
    Event(EventLine<'static>),
    End(EndLine<'static>),
    KeepAlive,
}

/// An event of the stream.
#[derive(Debug, Serialize, Deserialize)]
pub struct EventLine<'a> {
    pub seq: i32,
    pub host: Option<Cow<'a, str>>,
    pub kind: Cow<'a, str>,
    pub task_name: Option<Cow<'a, str>>,
    pub time: String,
    /// The stored JSON as it is; a payload the database holds cut (not JSON) as a string.
    pub payload: Cow<'a, RawValue>,
}

/// The last line of a stream: the task has ended and this is its end.
#[derive(Debug, Serialize, Deserialize)]
pub struct EndLine<'a> {
    pub task_id: i64,
    pub status: i32,
    pub status_name: Cow<'static, str>,
    pub err: Option<Cow<'a, str>>,
    pub end_time: Option<String>,
}

fn event_line(e: &NewEvent) -> String {
    let payload = match serde_json::from_str::<&RawValue>(&e.payload) {
        Ok(raw) => Cow::Borrowed(raw),
        // Cut by the database (no longer JSON): sent as a string.
        Err(_) => match serde_json::value::to_raw_value(&e.payload) {
            Ok(raw) => Cow::Owned(raw),
            Err(_) => Cow::Owned(RawValue::NULL.to_owned()),
        },
    };
    let line = StreamLine::Event(EventLine {
        seq: e.seq,
        host: e.host.as_deref().map(Cow::Borrowed),
        kind: Cow::Borrowed(&e.kind),
        task_name: e.task_name.as_deref().map(Cow::Borrowed),
        time: time::rfc3339(e.created_at),
        payload,
    });
    serde_json::to_string(&line).unwrap_or_default()
}

/// The lines of a page of events, in the wire format.
fn page_bytes(format: Format, events: &[NewEvent]) -> Bytes {
    let mut out = String::with_capacity(events.len() * 256);
    for e in events {
        let json = event_line(e);
        match format {
            Format::Ndjson => {
                out.push_str(&json);
                out.push('\n');
            }
            Format::Sse => {
                out.push_str("id: ");
                out.push_str(&e.seq.to_string());
                out.push_str("\ndata: ");
                out.push_str(&json);
                out.push_str("\n\n");
            }
        }
    }
    Bytes::from(out)
}

fn end_bytes(
    format: Format,
    id: i64,
    status: i32,
    err: Option<&str>,
    ended: Option<chrono::NaiveDateTime>,
) -> Bytes {
    let line = StreamLine::End(EndLine {
        task_id: id,
        status,
        status_name: Cow::Borrowed(Status::from_code(status).map_or("unknown", Status::name)),
        err: err.map(Cow::Borrowed),
        end_time: ended.map(time::rfc3339),
    });
    let json = serde_json::to_string(&line).unwrap_or_default();
    Bytes::from(match format {
        Format::Ndjson => format!("{json}\n"),
        Format::Sse => format!("event: end\ndata: {json}\n\n"),
    })
}

fn keepalive_bytes(format: Format) -> Bytes {
    Bytes::from_static(match format {
        Format::Ndjson => b"{\"type\":\"keepalive\"}\n",
        Format::Sse => b": keep-alive\n\n",
    })
}

/// Where one client's stream stands.
struct Cursor {
    state: web::Data<AppState>,
    log: Logger,
    want: Want,
    /// The first page, read before the answer's head was sent.
    first: Option<EventPage>,
    done: bool,
    last_line: Instant,
    /// A read failed; logged once until one succeeds.
    failing: bool,
}

impl Cursor {
    async fn read(&mut self) -> Result<EventPage, store::StoreError> {
        let (id, after, host) = (self.want.id, self.want.after, self.want.host.clone());
        let pool = self.state.pool.clone();
        web::block(move || {
            let mut conn = pool.get()?;
            store::events_after(&mut conn, id, after, host.as_deref(), PAGE)
        })
        .await
        .unwrap_or_else(|e| Err(store::StoreError::Unavailable(e.to_string())))
    }

    /// The next chunk of the answer; `None` once the closing line has gone (or at shutdown).
    async fn next(&mut self) -> Option<Bytes> {
        let mut wake = self.state.committed.clone();
        let mut closing = self.state.closing.clone();
        loop {
            if self.done || *closing.borrow() {
                return None;
            }
            // Marked seen before the read: a commit during the read wakes the wait below.
            wake.borrow_and_update();
            let page = match self.first.take() {
                Some(page) => Ok(page),
                None => self.read().await,
            };
            match page {
                Ok(page) => {
                    self.failing = false;
                    if let Some(last) = page.events.last() {
                        self.want.after = last.seq;
                        self.last_line = Instant::now();
                        return Some(page_bytes(self.want.format, &page.events));
                    }
                    match page.task {
                        Some((status, err, ended)) if is_terminal(status) => {
                            self.done = true;
                            let id = self.want.id;
                            return Some(end_bytes(
                                self.want.format,
                                id,
                                status,
                                err.as_deref(),
                                ended,
                            ));
                        }
                        Some(_) => {}
                        // Deleted while streamed (by a DBA): nothing more will come.
                        None => return None,
                    }
                }
                Err(e) => {
                    if !self.failing {
                        warn!(self.log, "event stream: read failed, retrying"; "task_id" => self.want.id, "error" => %e);
                    }
                    self.failing = true;
                }
            }
            let keepalive =
                Duration::from_secs(self.state.settings.event_stream_keepalive_secs.max(1));
            let until_keepalive = keepalive.saturating_sub(self.last_line.elapsed());
            if until_keepalive.is_zero() {
                self.last_line = Instant::now();
                return Some(keepalive_bytes(self.want.format));
            }
            tokio::select! {
                _ = wake.changed() => {}
                _ = closing.changed() => {}
                _ = tokio::time::sleep(POLL.min(until_keepalive)) => {}
            }
        }
    }
}

fn is_terminal(status: i32) -> bool {
    Status::from_code(status).is_some_and(Status::is_terminal)
}

/// GET /api/tasks/{id}/events
pub async fn handle(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let want = want(&req)?;
    let log = state.log.new(slog::o!("task_id" => want.id));
    let mut cursor = Cursor {
        state: state.clone(),
        log,
        want,
        first: None,
        done: false,
        last_line: Instant::now(),
        failing: false,
    };
    // The first page before the head: an unknown task or an unreachable database is answered as
    // an error, not as an empty stream.
    let first = cursor.read().await.map_err(|e| {
        warn!(cursor.log, "database read failed"; "error" => %e);
        ApiError::from(e)
    })?;
    if first.task.is_none() {
        return Err(ApiError::NotFound);
    }
    cursor.first = Some(first);
    let content_type = match cursor.want.format {
        Format::Ndjson => "application/x-ndjson",
        Format::Sse => "text/event-stream",
    };
    let body = futures_util::stream::unfold(cursor, |mut cursor| async move {
        let chunk = cursor.next().await?;
        Some((Ok::<_, actix_web::Error>(chunk), cursor))
    });
    Ok(HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((CACHE_CONTROL, "no-cache"))
        // Proxies (nginx) would otherwise hold the stream back.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

#[cfg(test)]
mod tests {
    #[test]
    fn lines_written_by_the_server_are_read_back_with_their_payload() {
        let event = event_line(&NewEvent {
            task_id: 7,
            seq: 3,
            host: Some("h1".into()),
            kind: "runner_ok".into(),
            task_name: Some("a \"quoted\" task".into()),
            payload: r#"{"changed":true,"msg":"x"}"#.into(),
            created_at: chrono::DateTime::from_timestamp(1_795_000_000, 0)
                .unwrap()
                .naive_utc(),
        });
        match super::read_line(&event) {
            Some(super::ReadLine::Event(e)) => {
                assert_eq!((e.seq, e.kind.as_ref()), (3, "runner_ok"));
                assert_eq!(e.task_name.as_deref(), Some("a \"quoted\" task"));
                assert_eq!(e.payload.get(), r#"{"changed":true,"msg":"x"}"#);
            }
            other => panic!("{other:?} from {event}"),
        }
        let cut = event_line(&NewEvent {
            task_id: 7,
            seq: 4,
            host: None,
            kind: "events_truncated".into(),
            task_name: None,
            payload: "{\"cut".into(),
            created_at: chrono::DateTime::from_timestamp(1_795_000_000, 0)
                .unwrap()
                .naive_utc(),
        });
        assert!(
            matches!(super::read_line(&cut), Some(super::ReadLine::Event(e)) if e.payload.get() == r#""{\"cut""#)
        );
        let end = String::from_utf8(end_bytes(Format::Ndjson, 7, 4, None, None).to_vec()).unwrap();
        assert!(
            matches!(super::read_line(end.trim()), Some(super::ReadLine::End(e)) if e.status == 4 && e.task_id == 7)
        );
        assert!(matches!(
            super::read_line(r#"{"type":"keepalive"}"#),
            Some(super::ReadLine::KeepAlive)
        ));
        assert!(super::read_line(r#"{"type":"something-new"}"#).is_none());
    }

    use super::*;

    #[test]
    fn a_cut_payload_is_sent_as_a_string_and_json_as_it_is() {
        let mut e = NewEvent {
            task_id: 1,
            seq: 7,
            host: Some("h".into()),
            kind: "runner_ok".into(),
            task_name: None,
            payload: "{\"a\": 1}".into(),
            created_at: chrono::DateTime::from_timestamp(0, 0).unwrap().naive_utc(),
        };
        assert_eq!(
            event_line(&e),
            r#"{"type":"event","seq":7,"host":"h","kind":"runner_ok","task_name":null,"time":"1970-01-01T00:00:00Z","payload":{"a": 1}}"#
        );
        e.payload = "{\"a\": ...[truncated]".into();
        assert!(event_line(&e).ends_with(r#""payload":"{\"a\": ...[truncated]"}"#));
        let sse = page_bytes(Format::Sse, std::slice::from_ref(&e));
        assert!(sse.starts_with(b"id: 7\ndata: {"));
        assert!(sse.ends_with(b"}\n\n"));
    }
}
