//! `GET /metrics`: what the agent did and holds, in the Prometheus (OpenMetrics) text format.
//!
//! Counters are counted where the thing happens and is committed: a task's end and its hosts'
//! results once the writer's transaction holding them commits, events likewise, kills where the
//! task actor sends its SIGTERM. Gauges of state are read when scraped: tasks by status from the
//! `tasks` table (what a DBA sees, every agent's), the queue and forks from this agent's
//! supervisor.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::status::Status;

/// The `Content-Type` of the answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: String,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: String,
}

/// Why a task actor killed its process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// `/api/stop` (or a stop at shutdown).
    Stop,
    /// `task_time_limit_secs` or `parallel_run_timeout_secs`.
    TimeLimit,
}

/// What is read at each scrape.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// `(status code, tasks)` from the `tasks` table; `None`: not read (those gauges keep their
    /// last values).
    pub tasks_by_status: Option<Vec<(i32, i64)>>,
    /// Age of the oldest pending task in the table, in seconds (0 when none is pending).
    pub oldest_pending_secs: Option<f64>,
    /// This agent's pending queue.
    pub queued: usize,
    pub forks_in_use: u32,
    pub forks_budget: u32,
}

fn http_histogram() -> Histogram {
    // 0.25 ms … about 16 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.00025, 2.0, 17,
    ))
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 86400.0,
    ])
}

/// Every metric of one server.
pub struct Metrics {
    registry: Registry,
    tasks: Family<StatusLabel, Gauge>,
    oldest_pending: Gauge<f64, AtomicU64>,
    queued: Gauge,
    forks_in_use: Gauge,
    forks_budget: Gauge,
    finished: Family<StatusLabel, Counter>,
    host_results: Family<ResultLabel, Counter>,
    events_stored: Counter,
    events_truncated: Counter,
    write_queue: Gauge,
    write_retries: Counter,
    kills: Family<ReasonLabel, Counter>,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<EndpointLabel, Histogram, fn() -> Histogram>,
    queue_wait: Histogram,
    run_duration: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("downlink"),
            tasks: Family::default(),
            oldest_pending: Gauge::default(),
            queued: Gauge::default(),
            forks_in_use: Gauge::default(),
            forks_budget: Gauge::default(),
            finished: Family::default(),
            host_results: Family::default(),
            events_stored: Counter::default(),
            events_truncated: Counter::default(),
            write_queue: Gauge::default(),
            write_retries: Counter::default(),
            kills: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(http_histogram),
            queue_wait: duration_histogram(),
            run_duration: duration_histogram(),
        };
        let r = &mut m.registry;
        r.register(
            "tasks",
            "Tasks in the tasks table by status (every agent's)",
            m.tasks.clone(),
        );
        r.register_with_unit(
            "oldest_pending_task_age",
            "Age of the oldest pending task in the tasks table (0 when none is pending)",
            Unit::Seconds,
            m.oldest_pending.clone(),
        );
        r.register(
            "queue_length",
            "Tasks waiting in this agent's queue for forks",
            m.queued.clone(),
        );
        r.register(
            "forks_in_use",
            "Forks held by this agent's running tasks",
            m.forks_in_use.clone(),
        );
        r.register(
            "forks_budget",
            "This agent's forks budget (max_forks)",
            m.forks_budget.clone(),
        );
        r.register(
            "tasks_finished",
            "Task ends recorded by this agent, by final status",
            m.finished.clone(),
        );
        r.register(
            "host_results",
            "Host results recorded by this agent at the end of its tasks, by result",
            m.host_results.clone(),
        );
        r.register(
            "events_stored",
            "Events stored in task_events by this agent",
            m.events_stored.clone(),
        );
        r.register(
            "events_truncated",
            "Tasks whose stored events stopped at max_events_per_task (events_truncated markers stored)",
            m.events_truncated.clone(),
        );
        r.register(
            "db_write_queue_depth",
            "Writes waiting for the database writer",
            m.write_queue.clone(),
        );
        r.register(
            "db_write_retries",
            "Writes tried again because the database was away",
            m.write_retries.clone(),
        );
        r.register(
            "task_kills",
            "Task processes this agent killed, by reason (stop, time_limit)",
            m.kills.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests answered, by endpoint (route pattern) and status code",
            m.requests.clone(),
        );
        r.register_with_unit(
            "http_request_duration",
            "Time to answer an HTTP request, by endpoint",
            Unit::Seconds,
            m.request_duration.clone(),
        );
        r.register_with_unit(
            "task_queue_wait",
            "Time from a task's creation to its start, for tasks this agent started",
            Unit::Seconds,
            m.queue_wait.clone(),
        );
        r.register_with_unit(
            "task_run_duration",
            "Time from a task's start to its end, for tasks this agent ran",
            Unit::Seconds,
            m.run_duration.clone(),
        );
        m
    }

    /// A task's end has been committed: its status and its hosts' results.
    pub fn finished<'a>(&self, status: Status, results: impl IntoIterator<Item = &'a str>) {
        self.finished
            .get_or_create(&StatusLabel {
                status: status.name(),
            })
            .inc();
        for result in results {
            self.host_results
                .get_or_create(&ResultLabel {
                    result: result.to_owned(),
                })
                .inc();
        }
    }

    /// Events have been committed: how many, and how many of them were truncation markers.
    pub fn events(&self, stored: usize, truncated: usize) {
        self.events_stored.inc_by(stored as u64);
        if truncated > 0 {
            self.events_truncated.inc_by(truncated as u64);
        }
    }

    pub fn write_queue(&self, depth: usize) {
        self.write_queue.set(depth as i64);
    }

    pub fn write_retry(&self) {
        self.write_retries.inc();
    }

    pub fn kill(&self, why: Kill) {
        let reason = match why {
            Kill::Stop => "stop",
            Kill::TimeLimit => "time_limit",
        };
        self.kills.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// An HTTP request was answered; `endpoint` is its route pattern.
    pub fn request(&self, endpoint: &str, code: u16, secs: f64) {
        let endpoint = endpoint.to_owned();
        self.request_duration
            .get_or_create(&EndpointLabel {
                endpoint: endpoint.clone(),
            })
            .observe(secs);
        self.requests
            .get_or_create(&RequestLabels { endpoint, code })
            .inc();
    }

    /// A task waited `secs` from its creation to its start.
    pub fn waited(&self, secs: f64) {
        self.queue_wait.observe(secs.max(0.0));
    }

    /// A task ran `secs`.
    pub fn ran(&self, secs: f64) {
        self.run_duration.observe(secs.max(0.0));
    }

    /// The text of a scrape, with the state gauges set from `now`.
    pub fn render(&self, now: &Snapshot) -> String {
        let all = [
            Status::Pending,
            Status::Running,
            Status::Failed,
            Status::Success,
            Status::Stopped,
            Status::Timeout,
            Status::Interrupted,
        ];
        if let Some(counts) = &now.tasks_by_status {
            for status in all {
                let n = counts
                    .iter()
                    .filter(|(code, _)| *code == status.code())
                    .map(|(_, n)| *n)
                    .sum();
                self.tasks
                    .get_or_create(&StatusLabel {
                        status: status.name(),
                    })
                    .set(n);
            }
        }
        if let Some(age) = now.oldest_pending_secs {
            self.oldest_pending.set(age.max(0.0));
        }
        self.queued.set(now.queued as i64);
        self.forks_in_use.set(i64::from(now.forks_in_use));
        self.forks_budget.set(i64::from(now.forks_budget));
        let mut out = String::new();
        // Writing into a String cannot fail.
        prometheus_client::encoding::text::encode(&mut out, &self.registry).ok();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new();
        m.kill(Kill::Stop);
        m.request("/api/check", 200, 0.001);
        let text = m.render(&Snapshot {
            tasks_by_status: Some(vec![(2, 3)]),
            oldest_pending_secs: Some(0.0),
            ..Snapshot::default()
        });
        assert!(
            text.contains("downlink_tasks{status=\"running\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("downlink_tasks{status=\"pending\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("downlink_task_kills_total{reason=\"stop\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE downlink_http_request_duration_seconds histogram"));
        assert!(
            text.contains("downlink_oldest_pending_task_age_seconds 0.0\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
