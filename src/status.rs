//! Task status codes (the `task_statuses` table) and the forward-only transitions between them.

/// A task's status, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Pending = 1,
    Running = 2,
    Failed = 3,
    Success = 4,
    Stopped = 5,
    Timeout = 6,
    Interrupted = 7,
}

impl Status {
    /// The codes of a task that has not ended: pending or running.
    pub const LIVE: [i32; 2] = [Status::Pending as i32, Status::Running as i32];

    /// The code stored in `tasks.status`.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The status of a stored code.
    pub fn from_code(code: i32) -> Option<Status> {
        Some(match code {
            1 => Status::Pending,
            2 => Status::Running,
            3 => Status::Failed,
            4 => Status::Success,
            5 => Status::Stopped,
            6 => Status::Timeout,
            7 => Status::Interrupted,
            _ => return None,
        })
    }

    /// The name in `task_statuses.name`.
    pub fn name(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Failed => "failed",
            Status::Success => "success",
            Status::Stopped => "stopped",
            Status::Timeout => "timeout",
            Status::Interrupted => "interrupted",
        }
    }

    /// The name of a stored code (`unknown` for a code this build does not know).
    pub fn name_of(code: i32) -> &'static str {
        Status::from_code(code).map_or("unknown", Status::name)
    }

    /// Whether a stored code is pending or running.
    pub fn is_live(code: i32) -> bool {
        Status::LIVE.contains(&code)
    }

    /// Whether the status never changes again.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Status::Pending | Status::Running)
    }

    /// Codes a task may have right before moving to this status. The same rule is in the database
    /// (trigger `tasks_status_forward`); every transition is an `UPDATE … WHERE status IN (these)`.
    /// Beyond the contract's 1→2→{3..7} and 1→{5,7}: 1→3 (ansible could not be started at all)
    /// and 1→6 (a `parallel_run` deadline passed while the task still waited for forks).
    pub fn predecessors(self) -> &'static [i32] {
        match self {
            Status::Pending => &[],
            Status::Running => &[Status::Pending as i32],
            Status::Success => &[2],
            Status::Failed | Status::Stopped | Status::Timeout | Status::Interrupted => {
                &Status::LIVE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_never_move_back() {
        for code in 1..=7 {
            let s = Status::from_code(code).unwrap();
            assert_eq!(s.code(), code);
            for &p in s.predecessors() {
                assert!(p < code, "{p} -> {code} would move backwards");
                assert!(!Status::from_code(p).unwrap().is_terminal());
            }
        }
        assert_eq!(Status::from_code(0), None);
        assert_eq!(Status::from_code(8), None);
    }
}
