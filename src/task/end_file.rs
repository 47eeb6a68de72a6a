//! `end.json`: the verdict, written to the run directory before it is sent to the database, so an
//! agent restarted before the database took it records the same end; and the host results after
//! a stop, with what cleaning each node found.

use serde::{Deserialize, Serialize};

use crate::ansible::events::Ending;
use crate::ansible::rundir::RunDir;
use crate::exec::remote::Cleaned;
use crate::store::HostState;

/// The verdict as written to `end.json` before it is sent to the database.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndFile {
    pub status: i32,
    pub err: Option<String>,
    pub exit_code: Option<i32>,
}

impl EndFile {
    /// How host results close for this status.
    pub fn ending(&self) -> Ending {
        match self.status {
            5 => Ending::Stopped,
            6 => Ending::Timeout,
            7 => Ending::Interrupted,
            _ => Ending::Exited,
        }
    }
}

/// What the cleanup found on each node.
pub(super) type HashMapCleaned = std::collections::HashMap<String, Cleaned>;

/// Host results after a stop or time limit, with what cleaning each node found: a host that
/// could not be cleaned says so in its message (a failure message it already has is kept).
pub(super) fn with_cleanup(mut hosts: Vec<HostState>, cleaned: &HashMapCleaned) -> Vec<HostState> {
    if cleaned.is_empty() {
        return hosts;
    }
    for h in &mut hosts {
        let ended = h.result.as_deref().unwrap_or("stopped").to_owned();
        let note = match cleaned.get(&h.host) {
            Some(Cleaned::Clean { .. }) => continue,
            Some(Cleaned::Left { left, .. }) => format!(
                "{ended}; {left} processes of this task could not be killed on the node"
            ),
            Some(Cleaned::Failed(why)) => format!(
                "{ended}; the node could not be cleaned ({why}): processes this task started there may still run"
            ),
            None if matches!(ended.as_str(), "failed" | "unreachable") => continue,
            None => format!(
                "{ended}; cleaning the node did not finish in time: processes this task started there may still run"
            ),
        };
        h.msg.get_or_insert(note);
    }
    hosts
}

/// Reads a run directory's `end.json`, if it has a readable one.
pub fn read_end_file(dir: &RunDir) -> Option<EndFile> {
    let text = std::fs::read(dir.verdict()).ok()?;
    serde_json::from_slice(&text).ok()
}

impl EndFile {
    /// Writes it as the run directory's `end.json` (creating the directory for a task that never
    /// ran). Blocking.
    pub fn write(&self, dir: &RunDir) -> std::io::Result<()> {
        std::fs::create_dir_all(&dir.path)?;
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.verdict(), json)
    }
}
