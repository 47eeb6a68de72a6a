//! Following `events.jsonl` while the task runs: reads on the blocking pool, what they hold
//! handed to [`Ingest`](super::ingest::Ingest), progress sent to Persistence.

use actix::prelude::*;
use slog::{error, warn};

use crate::ansible::rundir::{self};
use crate::ansible::tail::Chunk;
use crate::store::persistence::{Persistence, SaveProgress};
use crate::time;

use super::*;

impl TaskActor {
    /// Reads the next chunk of events.jsonl (and holds output.log to its limit) on the blocking
    /// pool, blocking the actor's other work meanwhile.
    pub(super) fn read_events(&mut self, ctx: &mut Context<Self>) {
        if self.reading {
            return;
        }
        let output = self.dir.output();
        let limit = self.settings.max_output_bytes;
        // An idle task (nothing new in events.jsonl, output.log within its limit) is checked
        // here with an fstat and a stat, without a trip to the blocking pool and back.
        let output_over = std::fs::metadata(&output).map_or(true, |m| m.len() > limit);
        let Some(tail) = self.tail.as_mut() else {
            return;
        };
        if !output_over && !tail.changed().unwrap_or(true) {
            return;
        }
        let Some(tail) = self.tail.take() else {
            return;
        };
        self.reading = true;
        let read = async move {
            tokio::task::spawn_blocking(move || {
                let mut tail = tail;
                let chunk = tail.read(false);
                let cut = rundir::bound_output(&output, limit);
                (tail, chunk, cut)
            })
            .await
        };
        ctx.wait(read.into_actor(self).map(|joined, act, ctx| {
            act.reading = false;
            let Ok((tail, chunk, cut)) = joined else {
                error!(act.log, "the events reader stopped unexpectedly");
                return;
            };
            act.tail = Some(tail);
            act.note_output_cut(cut);
            match chunk {
                Ok(chunk) => {
                    let more = chunk.more;
                    if let Some(save) = act.consume(chunk) {
                        act.saving = true;
                        ctx.spawn(save.into_actor(act).map(move |_, act, ctx| {
                            act.saving = false;
                            // A full chunk: more is waiting; read it now rather than next tick.
                            if more && !act.ending {
                                act.read_events(ctx);
                            }
                        }));
                    }
                }
                Err(e) => warn!(act.log, "cannot read events file"; "error" => %e),
            }
        }));
    }

    pub(super) fn note_output_cut(&mut self, cut: std::io::Result<u64>) {
        match cut {
            Ok(0) => {}
            Ok(n) => {
                if self.output_cut == 0 {
                    warn!(self.log, "output.log reached max_output_bytes; cutting what passes it";
                          "max_output_bytes" => self.settings.max_output_bytes);
                }
                self.output_cut += n;
            }
            Err(e) => warn!(self.log, "cannot check the size of output.log"; "error" => %e),
        }
    }

    /// Hands a chunk to ingestion; the write that stores what is new, if any.
    pub(super) fn consume(&mut self, chunk: Chunk) -> Option<Request<Persistence, SaveProgress>> {
        fail::fail_point!(
            "task-consume",
            self.spec.name.starts_with("failpoint-panic"),
            |_| None
        );
        let skipped_before = self.ingest.skipped();
        let progress = self.ingest.consume(chunk, time::now());
        if skipped_before == 0 && self.ingest.skipped() > 0 {
            warn!(self.log, "events.jsonl holds lines that are not events; each is stored as a line_skipped marker");
        }
        let progress = progress?;
        Some(self.persistence.send(SaveProgress {
            task_id: self.spec.id,
            events: progress.events,
            offset: progress.offset as i64,
            hosts: progress.hosts,
        }))
    }
}
