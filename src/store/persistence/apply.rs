//! Applying writes: one write, a batch of them in one transaction, and the repair of a write the
//! database refused (written again part by part, each part it still refuses dropped or replaced by
//! a marker).

use super::classify::{class_of, Class};
use super::{MarkRunning, Truth, Write, MAX_REASON};
use crate::status::Status;
use crate::store::db::{DbConnection, Pool};
use crate::store::{self, Finish, HostState, NewEvent, StoreError};

/// What became of one write.
pub(super) struct Applied {
    pub(super) result: Result<bool, StoreError>,
    /// The database was away: worth retrying.
    pub(super) away: bool,
    /// Parts the database refused, dropped or replaced by a marker (one line each).
    pub(super) repairs: Vec<String>,
}

impl Applied {
    pub(super) fn away(e: StoreError) -> Applied {
        Applied {
            result: Err(e),
            away: true,
            repairs: Vec::new(),
        }
    }
}

fn reason(e: &StoreError) -> String {
    crate::store::clean::text(&e.to_string())
        .chars()
        .take(MAX_REASON)
        .collect()
}

pub(super) fn apply(pool: &Pool, write: &Write, notify: bool) -> Applied {
    let mut conn = match pool.get() {
        Ok(conn) => conn,
        Err(e) => return Applied::away(e.into()),
    };
    let c: &mut DbConnection = &mut conn;
    let mut repairs = Vec::new();
    let result = match run(c, write, notify) {
        Ok(v) => Ok(v),
        Err(e) if class_of(c, &e) == Class::Away => return Applied::away(e),
        Err(e) => repair(c, write, &e, &mut repairs),
    };
    let away = match &result {
        Err(e) => class_of(c, e) == Class::Away,
        Ok(_) => false,
    };
    Applied {
        result,
        away,
        repairs,
    }
}

/// Every write in one transaction; `None` if any of them (or the commit) failed, and then none
/// of them is stored.
pub(super) fn apply_batch(pool: &Pool, writes: &[Write], notify: bool) -> Option<Vec<bool>> {
    let mut conn = pool.get().ok()?;
    store::in_one_transaction(&mut conn, |c| {
        writes.iter().map(|w| run(c, w, notify)).collect()
    })
    .ok()
}

fn run(c: &mut DbConnection, write: &Write, notify: bool) -> Result<bool, StoreError> {
    match write {
        Write::Running(m) => store::mark_running(
            c,
            m.task_id,
            &m.nodes,
            m.started_at,
            m.pid,
            m.pid_start_time,
            &m.instance,
            m.forks,
            m.remote_mark.as_deref(),
        ),
        Write::Progress(p) => {
            store::insert_events(c, p.task_id, &p.events, p.offset)?;
            if !p.hosts.is_empty() {
                store::update_hosts(c, p.task_id, &p.hosts)?;
            }
            Ok(true)
        }
        Write::Finish(f) => {
            let ended = store::finish(c, f)?;
            if ended && notify {
                // In the batch's transaction (sent at its commit), else right after the end's.
                crate::store::notify::queue(c)?;
            }
            Ok(ended)
        }
        Write::Repair(truths) => {
            for truth in truths {
                repair_row(c, truth)?;
            }
            Ok(true)
        }
        Write::Barrier => Ok(true),
    }
}

/// Writes a refused write again in smaller parts, dropping (or replacing with a marker) each part
/// the database still refuses. An error here is returned as the write's result.
fn repair(
    c: &mut DbConnection,
    write: &Write,
    first: &StoreError,
    repairs: &mut Vec<String>,
) -> Result<bool, StoreError> {
    match write {
        Write::Progress(p) => {
            for event in &p.events {
                let one = std::slice::from_ref(event);
                let Err(e) = store::insert_events(c, p.task_id, one, p.offset) else {
                    continue;
                };
                if class_of(c, &e) == Class::Away {
                    return Err(e);
                }
                let marker = NewEvent {
                    kind: "event_dropped".into(),
                    host: None,
                    task_name: None,
                    payload: serde_json::json!({
                        "event": "event_dropped", "kind": &event.kind, "reason": reason(&e),
                    })
                    .to_string(),
                    ..event.clone()
                };
                repairs.push(format!(
                    "task {} event {} ({}): {}",
                    p.task_id,
                    event.seq,
                    event.kind,
                    reason(&e)
                ));
                if let Err(e) = store::insert_events(c, p.task_id, &[marker], p.offset) {
                    repairs.push(format!(
                        "task {} event {} marker: {}",
                        p.task_id,
                        event.seq,
                        reason(&e)
                    ));
                }
            }
            store::insert_events(c, p.task_id, &[], p.offset)?;
            for host in &p.hosts {
                if let Err(e) = store::update_hosts(c, p.task_id, std::slice::from_ref(host)) {
                    if class_of(c, &e) == Class::Away {
                        return Err(e);
                    }
                    repairs.push(format!(
                        "task {} host {} progress: {}",
                        p.task_id,
                        host.host,
                        reason(&e)
                    ));
                    let bare = HostState {
                        msg: None,
                        ..host.clone()
                    };
                    if let Err(e) = store::update_hosts(c, p.task_id, &[bare]) {
                        repairs.push(format!(
                            "task {} host {} counters: {}",
                            p.task_id,
                            host.host,
                            reason(&e)
                        ));
                    }
                }
            }
            Ok(true)
        }
        Write::Running(m) => {
            repairs.push(format!(
                "task {} host rows at start: {}",
                m.task_id,
                reason(first)
            ));
            let bare = MarkRunning {
                nodes: Vec::new(),
                ..m.clone()
            };
            run(c, &Write::Running(bare), false)
        }
        Write::Finish(f) => {
            let plain = plain_end(f, first);
            repairs.push(format!("task {} end details: {}", f.id, reason(first)));
            match store::finish(c, &plain) {
                Err(e) if class_of(c, &e) == Class::Refused => {
                    repairs.push(format!("task {} host rows at end: {}", f.id, reason(&e)));
                    store::finish(
                        c,
                        &Finish {
                            hosts: Vec::new(),
                            ..plain
                        },
                    )
                }
                other => other,
            }
        }
        Write::Repair(truths) => {
            for truth in truths {
                if let Err(e) = repair_row(c, truth) {
                    if class_of(c, &e) == Class::Away {
                        return Err(e);
                    }
                    let (id, plain) = match truth {
                        Truth::Running(m) => (
                            m.task_id,
                            Truth::Running(MarkRunning {
                                nodes: Vec::new(),
                                ..m.clone()
                            }),
                        ),
                        Truth::Ended(f) => (
                            f.id,
                            Truth::Ended(Finish {
                                hosts: Vec::new(),
                                ..plain_end(f, &e)
                            }),
                        ),
                    };
                    repairs.push(format!("task {id} repair: {}", reason(&e)));
                    if let Err(e) = repair_row(c, &plain) {
                        repairs.push(format!("task {id} plain repair: {}", reason(&e)));
                    }
                }
            }
            Ok(true)
        }
        Write::Barrier => Ok(true),
    }
}

/// The end of a task without what the database refused: host messages dropped and `err` replaced
/// by a sentence that says so.
fn plain_end(f: &Finish, refused: &StoreError) -> Finish {
    Finish {
        err: f.err.as_ref().map(|_| {
            format!(
                "{}; the details of this end could not be stored: {}",
                f.status.name(),
                reason(refused)
            )
        }),
        hosts: f
            .hosts
            .iter()
            .map(|h| HostState {
                msg: None,
                ..h.clone()
            })
            .collect(),
        ..f.clone()
    }
}

/// Brings one row up to what the supervisor knows, if it is behind.
fn repair_row(c: &mut DbConnection, truth: &Truth) -> Result<bool, StoreError> {
    match truth {
        Truth::Running(m) => {
            let behind =
                store::get_task(c, m.task_id)?.is_some_and(|t| t.status == Status::Pending.code());
            if !behind {
                return Ok(false);
            }
            run(c, &Write::Running(m.clone()), false)
        }
        Truth::Ended(f) => store::finish(c, f),
    }
}
