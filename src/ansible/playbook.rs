//! The `tasks` (or `content`) field: either a playbook (a list of plays) or a list of tasks, which
//! is run as one play on all nodes. Anything else is refused before a task is stored.

use serde_norway::Value;

/// What the content of a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A YAML list of plays (mappings with `hosts` or `import_playbook`).
    Playbook,
    /// A YAML list of tasks (mappings without `hosts`), wrapped into one play on all nodes.
    TaskList,
}

const PLAY_KEYS: &[&str] = &[
    "hosts",
    "import_playbook",
    "ansible.builtin.import_playbook",
];

/// Decides the shape of `content`, or says why it is neither shape.
pub fn classify(content: &str) -> Result<Shape, String> {
    if content.trim().is_empty() {
        return Err("must not be empty".to_owned());
    }
    let value: Value =
        serde_norway::from_str(content).map_err(|e| format!("not valid YAML: {e}"))?;
    let Value::Sequence(items) = value else {
        return Err("must be a YAML list of plays or of tasks".to_owned());
    };
    if items.is_empty() {
        return Err("must not be an empty list".to_owned());
    }
    let mut plays = 0;
    for (i, item) in items.iter().enumerate() {
        let Value::Mapping(map) = item else {
            return Err(format!("entry {} is not a mapping", i + 1));
        };
        if PLAY_KEYS.iter().any(|k| map.contains_key(*k)) {
            plays += 1;
        }
    }
    match plays {
        0 => Ok(Shape::TaskList),
        n if n == items.len() => Ok(Shape::Playbook),
        _ => Err("mixes plays (entries with hosts) and tasks (entries without)".to_owned()),
    }
}

/// The play that runs a task list (kept verbatim in `tasks.yml` beside it) on every node.
pub const TASK_LIST_WRAPPER: &str = "\
# Written by downlink: the request sent a list of tasks, run here as one play on all nodes.
- hosts: all
  gather_facts: false
  tasks:
    - ansible.builtin.import_tasks: tasks.yml
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_both_shapes() {
        assert_eq!(
            classify("- hosts: all\n  tasks:\n    - ping:\n"),
            Ok(Shape::Playbook)
        );
        assert_eq!(
            classify("- import_playbook: other.yml\n"),
            Ok(Shape::Playbook)
        );
        assert_eq!(classify("- ping:\n- command: id\n"), Ok(Shape::TaskList));
        assert_eq!(classify("[{\"ping\": null}]"), Ok(Shape::TaskList));
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "",
            "   ",
            "ping: {}",
            "[]",
            "- just a string",
            "- hosts: all\n- ping:\n",
            "- {unclosed",
            "---\n- ping:\n---\n- ping:\n",
        ] {
            assert!(classify(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
