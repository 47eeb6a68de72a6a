//! Request fields: reading them out of a JSON object with the contract's
//! `param error, error: <field>: <reason>` for anything missing, mistyped or out of range.

use std::collections::HashSet;
use std::net::IpAddr;

use serde_json::{Map, Value};

use super::ApiError;
use crate::ansible::{params, playbook};
use crate::settings::Settings;

/// Longest task name, in characters.
pub const MAX_NAME: usize = 255;
/// Largest `limit` of `/api/getlog`.
pub const MAX_LOG_LIMIT: i64 = 10_000;
/// `limit` of `/api/getlog` when none is given.
pub const DEFAULT_LOG_LIMIT: i64 = 1000;

fn get<'a>(map: &'a Map<String, Value>, field: &str) -> Result<&'a Value, ApiError> {
    map.get(field)
        .ok_or_else(|| ApiError::param(field, "is required"))
}

/// A required string field.
pub fn string<'a>(map: &'a Map<String, Value>, field: &str) -> Result<&'a str, ApiError> {
    get(map, field)?
        .as_str()
        .ok_or_else(|| ApiError::param(field, "must be a string"))
}

/// A required string compared with stored text: no NUL (no database stores one in text, so the
/// query would fail as if the database were away).
pub fn search_text<'a>(map: &'a Map<String, Value>, field: &str) -> Result<&'a str, ApiError> {
    let text = string(map, field)?;
    if text.contains('\0') {
        return Err(ApiError::param(field, "holds a NUL character"));
    }
    Ok(text)
}

/// A required task name: 1..=255 characters, none of them control characters.
pub fn task_name(map: &Map<String, Value>) -> Result<String, ApiError> {
    let name = string(map, "name")?;
    if name.is_empty() {
        return Err(ApiError::param("name", "must not be empty"));
    }
    if name.chars().count() > MAX_NAME {
        return Err(ApiError::param(
            "name",
            format!("longer than {MAX_NAME} characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(ApiError::param("name", "holds control characters"));
    }
    Ok(name.to_owned())
}

/// A required task id: a positive integer.
pub fn task_id(map: &Map<String, Value>) -> Result<i64, ApiError> {
    get(map, "id")?
        .as_i64()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::param("id", "must be a positive integer"))
}

/// `id` and `name` of `/api/stop` and `/api/check`.
pub fn id_and_name(map: &Map<String, Value>) -> Result<(i64, String), ApiError> {
    Ok((task_id(map)?, task_name(map)?))
}

/// `limit` of `/api/getlog`.
pub fn log_limit(map: &Map<String, Value>) -> Result<i64, ApiError> {
    match map.get("limit") {
        None | Some(Value::Null) => Ok(DEFAULT_LOG_LIMIT),
        Some(v) => v
            .as_i64()
            .filter(|n| (1..=MAX_LOG_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::param(
                    "limit",
                    format!("must be an integer from 1 to {MAX_LOG_LIMIT}"),
                )
            }),
    }
}

/// A validated `/api/run` (or `/api/parallel_run`) body.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRequest {
    pub nodes: Vec<String>,
    pub user: String,
    pub name: String,
    pub content: String,
    pub params: Map<String, Value>,
    pub fork_num: u32,
}

impl RunRequest {
    /// Checks every field, in the order of the contract's table.
    pub fn from_json(
        map: &Map<String, Value>,
        settings: &Settings,
    ) -> Result<RunRequest, ApiError> {
        let nodes = nodes(map, settings.max_nodes)?;
        let user = string(map, "user")?;
        if !is_user_name(user) {
            return Err(ApiError::param(
                "user",
                "must be a POSIX user name (letters, digits, '.', '_', '-'; at most 32)",
            ));
        }
        let name = task_name(map)?;
        let (key, content) = match (map.get("tasks"), map.get("content")) {
            (Some(_), Some(_)) => {
                return Err(ApiError::param("tasks", "give tasks or content, not both"))
            }
            (Some(_), None) => ("tasks", string(map, "tasks")?),
            (None, Some(_)) => ("content", string(map, "content")?),
            (None, None) => return Err(ApiError::param("tasks", "is required")),
        };
        if content.len() > settings.max_playbook_bytes {
            return Err(ApiError::param(
                key,
                format!("larger than {} bytes", settings.max_playbook_bytes),
            ));
        }
        if content.contains('\0') {
            // No database stores it in text, and no YAML parser needs it: a literal NUL in a
            // playbook is a mistake (YAML's own "\0" escape is fine; it is text until ansible runs).
            return Err(ApiError::param(key, "holds a NUL character"));
        }
        playbook::classify(content).map_err(|why| ApiError::param(key, why))?;
        let params =
            params::parse(get(map, "params")?).map_err(|why| ApiError::param("params", why))?;
        let fork_num = fork_num(get(map, "fork_num")?, settings.max_fork_num)?;
        Ok(RunRequest {
            nodes,
            user: user.to_owned(),
            name,
            content: content.to_owned(),
            params,
            fork_num,
        })
    }

    /// Forks the task runs with and is charged: `min(fork_num, nodes, max_forks)`.
    pub fn forks(&self, max_forks: u32) -> u32 {
        let nodes = u32::try_from(self.nodes.len()).unwrap_or(u32::MAX);
        self.fork_num.min(nodes).min(max_forks).max(1)
    }
}

fn nodes(map: &Map<String, Value>, max: usize) -> Result<Vec<String>, ApiError> {
    let not_strings = || ApiError::param("nodes", "must be an array of strings");
    let list = get(map, "nodes")?.as_array().ok_or_else(not_strings)?;
    if list.is_empty() {
        return Err(ApiError::param("nodes", "must not be empty"));
    }
    if list.len() > max {
        return Err(ApiError::param("nodes", format!("more than {max} nodes")));
    }
    let mut seen = HashSet::new();
    let mut nodes = Vec::with_capacity(list.len());
    for value in list {
        let node = value.as_str().ok_or_else(not_strings)?;
        if RESERVED_NODES.contains(&node) {
            return Err(ApiError::param(
                "nodes",
                format!("`{node}` is the name of an ansible group, not a host"),
            ));
        }
        if !is_node(node) {
            let shown: String = node.chars().take(64).collect();
            return Err(ApiError::param(
                "nodes",
                format!("`{shown}` is not an IP address or host name"),
            ));
        }
        if seen.insert(node) {
            nodes.push(node.to_owned());
        }
    }
    Ok(nodes)
}

fn fork_num(value: &Value, max: u32) -> Result<u32, ApiError> {
    let n = match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    n.filter(|n| (1..=u64::from(max)).contains(n))
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| ApiError::param("fork_num", format!("must be an integer from 1 to {max}")))
}

/// Names ansible gives to its implicit groups: a host of that name would be mistaken for them.
const RESERVED_NODES: &[&str] = &["all", "ungrouped"];

/// An IPv4 or IPv6 literal, or a DNS host name.
pub fn is_node(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok() || is_host_name(s)
}

fn is_host_name(s: &str) -> bool {
    if s.is_empty() || s.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = s.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    // An all-numeric last label is a mistyped address (1.2.3.999), not a name.
    labels.iter().all(label_ok)
        && labels
            .last()
            .is_some_and(|l| !l.bytes().all(|b| b.is_ascii_digit()))
}

/// POSIX portable user name: letters, digits, `.`, `_`, `-`, not starting with `-`, 1..=32.
pub fn is_user_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(body: Value) -> Result<RunRequest, ApiError> {
        RunRequest::from_json(body.as_object().unwrap(), &Settings::defaults())
    }

    fn ok_body() -> Value {
        json!({"nodes": ["127.0.0.2", "web-1.example.com", "::1", "127.0.0.2"],
               "user": "root", "name": "t1", "tasks": "- ping:\n", "params": "", "fork_num": "5"})
    }

    #[test]
    fn accepts_the_contract_forms() {
        let r = run(ok_body()).unwrap();
        assert_eq!(r.nodes, ["127.0.0.2", "web-1.example.com", "::1"]);
        assert_eq!(r.fork_num, 5);
        assert_eq!(r.forks(50), 3);
        assert_eq!(r.forks(2), 2);
        let mut b = ok_body();
        b.as_object_mut().unwrap().remove("tasks");
        b["content"] = json!("- hosts: all\n  tasks: []\n");
        b["fork_num"] = json!(7);
        b["params"] = json!({"a": 1});
        assert_eq!(run(b).unwrap().fork_num, 7);
    }

    #[test]
    fn names_the_bad_field() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("nodes", json!([]), "param error, error: nodes: must not be empty"),
            ("nodes", json!("127.0.0.2"), "param error, error: nodes: must be an array of strings"),
            ("nodes", json!(["a b"]), "param error, error: nodes: `a b` is not an IP address or host name"),
            ("nodes", json!(["1.2.3.999"]), "param error, error: nodes: `1.2.3.999` is not an IP address or host name"),
            ("nodes", json!(["all"]), "param error, error: nodes: `all` is the name of an ansible group, not a host"),
            ("user", json!("root;id"), "param error, error: user: must be a POSIX user name (letters, digits, '.', '_', '-'; at most 32)"),
            ("user", json!(1), "param error, error: user: must be a string"),
            ("name", json!(""), "param error, error: name: must not be empty"),
            ("name", json!("a\nb"), "param error, error: name: holds control characters"),
            ("fork_num", json!(0), "param error, error: fork_num: must be an integer from 1 to 500"),
            ("fork_num", json!("501"), "param error, error: fork_num: must be an integer from 1 to 500"),
            ("fork_num", json!(1.5), "param error, error: fork_num: must be an integer from 1 to 500"),
            ("params", json!(3), "param error, error: params: must be a JSON object or a string"),
            ("tasks", json!("{a: 1}"), "param error, error: tasks: must be a YAML list of plays or of tasks"),
        ];
        for (field, value, want) in cases {
            let mut b = ok_body();
            b[field] = value;
            assert_eq!(run(b).unwrap_err().to_string(), want, "{field}");
        }
        let mut b = ok_body();
        b["content"] = json!("- ping:\n");
        assert_eq!(
            run(b).unwrap_err().to_string(),
            "param error, error: tasks: give tasks or content, not both"
        );
        let mut b = ok_body();
        b.as_object_mut().unwrap().remove("user");
        assert_eq!(
            run(b).unwrap_err().to_string(),
            "param error, error: user: is required"
        );
    }
}
