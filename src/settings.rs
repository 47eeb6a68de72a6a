//! Typed settings, layered: the compiled-in `config/default.toml`, then an optional file given with
//! `--config`, then `DOWNLINK_<KEY>` environment variables. Every layer is merged as TOML before the
//! struct is decoded once with unknown keys rejected, so a typo in any layer stops the start with the
//! key named instead of being silently ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

/// The defaults, compiled in so the binary runs from any directory.
pub const DEFAULTS: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "DOWNLINK_";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, coloured when the output is a terminal.
    Terminal,
    /// One JSON object per line.
    Json,
}

/// How much is logged, from the most severe only to everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Critical,
    Error,
    #[serde(alias = "warn")]
    Warning,
    Info,
    Debug,
    Trace,
}

/// The SHA-256 of a bearer token, as `auth_token_hashes` holds it: 64 hex digits. The token
/// itself is never configured, logged or stored.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash(pub [u8; 32]);

impl std::str::FromStr for TokenHash {
    type Err = String;

    fn from_str(text: &str) -> Result<TokenHash, String> {
        let mut out = [0u8; 32];
        // The text is not echoed: someone may have pasted the token itself by mistake.
        hex::decode_to_slice(text.trim(), &mut out).map_err(|_| {
            "auth token hashes must be 64 hex digits (SHA-256; see `downlink hash-token`)"
                .to_owned()
        })?;
        Ok(TokenHash(out))
    }
}

impl std::fmt::Display for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenHash({self})")
    }
}

impl<'de> Deserialize<'de> for TokenHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<TokenHash, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a token may do: `read` (the console, `/api/check`, `/api/getlog`, every `GET`,
/// `/metrics`) or `operate` (also run and stop tasks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Operate,
}

/// A token of `auth_tokens`: its name (recorded as who ran or stopped a task), the SHA-256 of the
/// token and its role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedToken {
    pub name: String,
    pub sha256: TokenHash,
    pub role: Role,
}

/// A network of `allow_networks`: CIDR (`10.0.0.0/8`, `2001:db8::/32`) or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowedNetwork(pub ipnet::IpNet);

impl std::str::FromStr for AllowedNetwork {
    type Err = String;

    fn from_str(text: &str) -> Result<AllowedNetwork, String> {
        let trimmed = text.trim();
        trimmed
            .parse::<ipnet::IpNet>()
            .or_else(|_| trimmed.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map(AllowedNetwork)
            .map_err(|_| format!("allow_networks: `{text}` is not an address or network"))
    }
}

impl<'de> Deserialize<'de> for AllowedNetwork {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<AllowedNetwork, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How many heartbeat intervals an agent may miss before it counts as lost.
pub const LEASE_HEARTBEATS: u32 = 3;

/// The longest any duration setting may be: a year.
pub const MAX_DURATION_SECS: u64 = 365 * 24 * 3600;

const MAX_RETENTION_DAYS: u32 = 36_500;

/// Every setting of the server; see `config/default.toml` for what each one means.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub agent_name: String,
    pub bind: String,
    pub workers: usize,
    pub tls_cert_file: String,
    pub tls_key_file: String,
    pub auth_token_hashes: Vec<TokenHash>,
    /// Tokens that may only read.
    pub auth_read_token_hashes: Vec<TokenHash>,
    /// Named tokens with a role.
    pub auth_tokens: Vec<NamedToken>,
    pub auth_token_file: String,
    pub allow_networks: Vec<AllowedNetwork>,
    pub allow_unauthenticated: bool,
    pub database_url: String,
    pub pool_size: u32,
    pub ansible_playbook: String,
    pub ansible_env: BTreeMap<String, String>,
    pub ansible_python_interpreter: String,
    pub ssh_private_key: String,
    pub ssh_port: u16,
    pub ssh_common_args: String,
    pub run_dir: PathBuf,
    /// New tasks are refused while the run directory's disk has less free space (0: never).
    pub run_dir_min_free_bytes: u64,
    /// Ended tasks' run directories past this many bytes go, oldest first (0: no budget).
    pub run_dir_max_bytes: u64,
    /// How often the space budget is checked.
    pub run_dir_check_secs: u64,
    pub run_as_user: String,
    pub run_as_group: String,
    pub max_forks: u32,
    pub max_fork_num: u32,
    pub max_nodes: usize,
    pub task_time_limit_secs: u64,
    pub stop_grace_secs: u64,
    pub cgroup_parent: String,
    pub ssh_idle_secs: u64,
    /// Most SSH masters the agent keeps (least recently used closed first).
    pub max_ssh_masters: usize,
    /// The nice value of every task's processes and of the agent's ssh masters (0..=19).
    pub task_nice: u8,
    /// Each task's weight to the CPU scheduler (`cpu.weight`, 1..=10000) against the agent's 100.
    pub task_cpu_weight: u16,
    pub remote_cleanup_secs: u64,
    pub remote_cleanup_concurrency: usize,
    pub parallel_run_timeout_secs: u64,
    pub body_limit: usize,
    pub max_playbook_bytes: usize,
    pub max_queued: usize,
    pub max_events_per_task: i32,
    pub max_event_bytes: usize,
    pub client_timeout_secs: u64,
    pub store_params: bool,
    /// How often the agent's row in `agents` gets a heartbeat; 3 missed ones and it shows as lost.
    pub heartbeat_secs: u64,
    /// Delete the run directory's `extra_vars.json` (the params, often secrets) once the task has
    /// ended.
    pub remove_extra_vars_at_end: bool,
    /// Serve `/metrics` without the API's token and allow-list.
    pub metrics_open: bool,
    /// A keep-alive line on an event stream after this long without one.
    pub event_stream_keepalive_secs: u64,
    /// Ended tasks older than this lose their events and run directories (0: kept forever).
    pub retention_days: u32,
    /// Keep the `tasks` and `task_hosts` rows of those tasks (the audit trail).
    pub retention_keep_tasks: bool,
    /// How often a retention pass runs.
    pub retention_check_secs: u64,
    /// One queue for every agent on this PostgreSQL database: tasks are claimed from the table.
    pub shared_queue: bool,
    /// With `shared_queue`: most forks in use over all agents (0: only each agent's `max_forks`).
    pub cluster_max_forks: u32,
    /// With `shared_queue`: how long a lost agent's running tasks wait for it before they end 7.
    pub lost_agent_grace_secs: u64,
    pub db_retry_secs: u64,
    pub db_statement_timeout_secs: u64,
    pub reconcile_secs: u64,
    pub max_output_bytes: u64,
    pub max_events_file_bytes: u64,
    pub stop_tasks_on_shutdown: bool,
    pub shutdown_timeout_secs: u64,
    pub log_format: LogFormat,
    pub log_level: LogLevel,
}

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read settings file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("settings file {path} is not valid TOML: {message}")]
    Parse { path: String, message: String },
    #[error("invalid settings: {0}")]
    Invalid(String),
}

impl Settings {
    /// The compiled-in defaults alone.
    pub fn defaults() -> Settings {
        // The defaults are part of the binary and covered by tests; failing here is a build defect.
        Self::load(None, std::iter::empty()).expect("compiled-in config/default.toml is valid")
    }

    /// Defaults, then `file`, then the `DOWNLINK_*` variables among `env`. Every `DOWNLINK_*`
    /// variable given must name a setting: the caller leaves out variables of its own (the CLI's).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, SettingsError> {
        let mut table = parse_table("config/default.toml (built in)", DEFAULTS)?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
                path: path.to_owned(),
                source,
            })?;
            let layer = parse_table(&path.display().to_string(), &text)?;
            for (key, value) in layer {
                if !table.contains_key(&key) {
                    return Err(SettingsError::Invalid(format!(
                        "unknown key `{key}` in {}",
                        path.display()
                    )));
                }
                table.insert(key, value);
            }
        }
        for (name, raw) in env {
            let Some(key) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            let Some(current) = table.get(&key) else {
                return Err(SettingsError::Invalid(format!(
                    "unknown setting in environment variable {name}"
                )));
            };
            let value = env_value(current, &raw).map_err(|message| {
                SettingsError::Invalid(format!("environment variable {name}: {message}"))
            })?;
            table.insert(key, value);
        }
        let mut settings: Settings = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| SettingsError::Invalid(e.message().to_owned()))?;
        if settings.agent_name.is_empty() {
            settings.agent_name = host_name();
        }
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let bad = |m: &str| Err(SettingsError::Invalid(m.to_owned()));
        if self.max_forks == 0 {
            return bad("max_forks must be at least 1");
        }
        if self.max_ssh_masters == 0 {
            return bad("max_ssh_masters must be at least 1");
        }
        if self.task_nice > 19 {
            return bad("task_nice must be 0 to 19");
        }
        if !(1..=10000).contains(&self.task_cpu_weight) {
            return bad("task_cpu_weight must be 1 to 10000");
        }
        for t in &self.auth_tokens {
            let printable = t.name.chars().all(|c| c.is_ascii_graphic());
            if t.name.is_empty() || t.name.len() > 64 || !printable {
                return bad("auth_tokens: a name is 1 to 64 printable ASCII characters, no spaces");
            }
        }
        if !is_agent_name(&self.agent_name) {
            return bad("agent_name must be 1 to 64 of A-Z a-z 0-9 . _ - (not starting with '.' or '-'); it names the agent's run directory");
        }
        if self.remote_cleanup_secs == 0 || self.remote_cleanup_concurrency == 0 {
            return bad("remote_cleanup_secs and remote_cleanup_concurrency must be at least 1");
        }
        if self.cgroup_parent.split('/').any(|part| part == "..") {
            return bad("cgroup_parent must not contain ..");
        }
        if self.db_statement_timeout_secs == 0 {
            return bad("db_statement_timeout_secs must be at least 1");
        }
        if self.reconcile_secs == 0 {
            return bad("reconcile_secs must be at least 1");
        }
        if self.max_output_bytes < 4096 || self.max_events_file_bytes < 65536 {
            return bad(
                "max_output_bytes must be at least 4096 and max_events_file_bytes at least 65536",
            );
        }
        if self.max_fork_num == 0 {
            return bad("max_fork_num must be at least 1");
        }
        if self.max_nodes == 0 {
            return bad("max_nodes must be at least 1");
        }
        if self.pool_size < 2 {
            return bad("pool_size must be at least 2 (one writer, one reader)");
        }
        if self.task_time_limit_secs == 0 || self.parallel_run_timeout_secs == 0 {
            return bad("time limits must be at least 1 second");
        }
        if self.max_queued == 0 || self.max_events_per_task < 1 || self.client_timeout_secs == 0 {
            return bad(
                "max_queued, max_events_per_task and client_timeout_secs must be at least 1",
            );
        }
        if self.max_event_bytes < 256 {
            return bad("max_event_bytes must be at least 256");
        }
        if self.body_limit < 1024 {
            return bad("body_limit must be at least 1024 bytes");
        }
        if self.ansible_playbook.is_empty() {
            return bad("ansible_playbook must not be empty");
        }
        if self.run_as_user.is_empty() && !self.run_as_group.is_empty() {
            return bad("run_as_group needs run_as_user");
        }
        if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
            return bad("tls_cert_file and tls_key_file go together: set both or neither");
        }
        if shlex::split(&self.ssh_common_args).is_none() {
            return bad("ssh_common_args has an unclosed quote or a trailing backslash");
        }
        for (name, secs) in self.durations() {
            if secs > MAX_DURATION_SECS {
                return Err(SettingsError::Invalid(format!(
                    "{name} must be at most {MAX_DURATION_SECS} (a year)"
                )));
            }
        }
        if self.retention_days > MAX_RETENTION_DAYS {
            return bad("retention_days must be at most 36500 (a hundred years)");
        }
        Ok(())
    }

    /// Every duration setting, by name: each one is added to clocks and multiplied, so each is
    /// bounded (a year) here rather than overflowing where it is used.
    fn durations(&self) -> [(&'static str, u64); 15] {
        [
            ("run_dir_check_secs", self.run_dir_check_secs),
            ("task_time_limit_secs", self.task_time_limit_secs),
            ("stop_grace_secs", self.stop_grace_secs),
            ("ssh_idle_secs", self.ssh_idle_secs),
            ("remote_cleanup_secs", self.remote_cleanup_secs),
            ("parallel_run_timeout_secs", self.parallel_run_timeout_secs),
            ("client_timeout_secs", self.client_timeout_secs),
            ("heartbeat_secs", self.heartbeat_secs),
            (
                "event_stream_keepalive_secs",
                self.event_stream_keepalive_secs,
            ),
            ("retention_check_secs", self.retention_check_secs),
            ("lost_agent_grace_secs", self.lost_agent_grace_secs),
            ("db_retry_secs", self.db_retry_secs),
            ("db_statement_timeout_secs", self.db_statement_timeout_secs),
            ("reconcile_secs", self.reconcile_secs),
            ("shutdown_timeout_secs", self.shutdown_timeout_secs),
        ]
    }

    /// How often the agent's heartbeat is written (at least a second).
    pub fn heartbeat(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.heartbeat_secs.max(1))
    }

    /// An agent whose heartbeat is older than this is lost to the others ([`LEASE_HEARTBEATS`]
    /// heartbeats).
    pub fn lease(&self) -> std::time::Duration {
        self.heartbeat() * LEASE_HEARTBEATS
    }

    /// With `shared_queue`, how long after its last heartbeat other agents end a lost agent's
    /// live tasks as interrupted: the lease, then `lost_agent_grace_secs`.
    pub fn lost_after(&self) -> std::time::Duration {
        self.lease() + std::time::Duration::from_secs(self.lost_agent_grace_secs)
    }

    /// Fencing: an agent whose heartbeat has not been renewed for this long stops its own tasks,
    /// safely before [`Settings::lost_after`]: a margin of a tenth of it, at least two heartbeats
    /// (and at most half of it, for very short settings).
    pub fn fence_after(&self) -> std::time::Duration {
        let lost = self.lost_after();
        let margin = (lost / 10).max(self.heartbeat() * 2).min(lost / 2);
        lost - margin
    }

    /// The task's own watchdog (in the callback plugin, inside `ansible-playbook`) ends the run
    /// when the agent's lease file is older than this: a heartbeat after [`Settings::fence_after`],
    /// so an agent that can still act stops its tasks itself first (and cleans their nodes),
    /// while a frozen one's tasks still end before [`Settings::lost_after`].
    pub fn watchdog_after(&self) -> std::time::Duration {
        let lost = self.lost_after();
        (self.fence_after() + self.heartbeat()).min(lost - (lost - self.fence_after()) / 2)
    }

    /// The database URL actually used: the setting, or the embedded SQLite file.
    pub fn effective_database_url(&self) -> String {
        if self.database_url.is_empty() {
            "sqlite://data/downlink.sqlite3".to_owned()
        } else {
            self.database_url.clone()
        }
    }
}

/// Whether `name` can name an agent (and its run directory: one safe path component).
pub fn is_agent_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The machine's host name as an agent name (characters outside the allowed set become `-`).
fn host_name() -> String {
    let raw = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let name: String = raw
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name.trim_start_matches(['.', '-']).to_owned();
    if name.is_empty() {
        "downlink".to_owned()
    } else {
        name
    }
}

fn parse_table(origin: &str, text: &str) -> Result<toml::Table, SettingsError> {
    text.parse::<toml::Table>()
        .map_err(|e| SettingsError::Parse {
            path: origin.to_owned(),
            message: e.message().to_owned(),
        })
}

/// An environment value takes the type of the default it replaces: strings are used verbatim,
/// anything else is read as a TOML value (`20`, `true`, `{ A = "b" }`).
fn env_value(current: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    if current.is_str() {
        return Ok(toml::Value::String(raw.to_owned()));
    }
    let doc = format!("v = {raw}");
    let mut table = doc
        .parse::<toml::Table>()
        .map_err(|_| format!("`{raw}` is not a valid {}", current.type_str()))?;
    table
        .remove("v")
        .ok_or_else(|| format!("`{raw}` is not a valid value"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_decode() {
        let s = Settings::defaults();
        assert_eq!(s.bind, "127.0.0.1:8080");
        assert_eq!(s.max_fork_num, 500);
        assert_eq!(s.log_format, LogFormat::Terminal);
    }

    #[test]
    fn environment_overrides_with_types() {
        let s = Settings::load(
            None,
            env(&[
                ("DOWNLINK_MAX_FORKS", "7"),
                ("DOWNLINK_BIND", "127.0.0.1:9"),
                ("DOWNLINK_ANSIBLE_ENV", "{ A = \"b\" }"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(s.max_forks, 7);
        assert_eq!(s.bind, "127.0.0.1:9");
        assert_eq!(s.ansible_env.get("A").map(String::as_str), Some("b"));
    }

    #[test]
    fn unknown_environment_key_is_named() {
        let err = Settings::load(None, env(&[("DOWNLINK_MAX_FORK", "7")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid settings: unknown setting in environment variable DOWNLINK_MAX_FORK"
        );
    }

    #[test]
    fn unknown_file_key_is_named() {
        let dir = std::env::temp_dir().join(format!("dl-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.toml");
        std::fs::write(&path, "max_forsk = 3\n").unwrap();
        let err = Settings::load(Some(&path), Vec::new()).unwrap_err();
        assert!(err.to_string().contains("unknown key `max_forsk`"), "{err}");
    }

    #[test]
    fn agent_name_defaults_to_the_host_name_and_must_be_one_path_component() {
        let s = Settings::defaults();
        assert!(is_agent_name(&s.agent_name), "{}", s.agent_name);
        for bad in ["../x", "a/b", ".hidden", "-x", "a b"] {
            let err = Settings::load(None, env(&[("DOWNLINK_AGENT_NAME", bad)])).unwrap_err();
            assert!(err.to_string().contains("agent_name"), "{bad}: {err}");
        }
        let s = Settings::load(None, env(&[("DOWNLINK_AGENT_NAME", "dc1-agent_2.x")])).unwrap();
        assert_eq!(s.agent_name, "dc1-agent_2.x");
    }

    #[test]
    fn typed_values_are_read_and_bad_ones_named() {
        let s = Settings::load(
            None,
            env(&[
                ("DOWNLINK_ALLOW_NETWORKS", "[\"10.0.0.0/8\", \"::1\"]"),
                ("DOWNLINK_LOG_LEVEL", "warn"),
                (
                    "DOWNLINK_AUTH_TOKEN_HASHES",
                    &format!("[\"{}\"]", "ab".repeat(32)),
                ),
            ]),
        )
        .unwrap();
        assert_eq!(s.allow_networks[0].0.to_string(), "10.0.0.0/8");
        assert_eq!(s.allow_networks[1].0.to_string(), "::1/128");
        assert_eq!(s.log_level, LogLevel::Warning);
        assert_eq!(s.auth_token_hashes[0].0, [0xab; 32]);
        let bad = |k: &str, v: &str| {
            Settings::load(None, env(&[(k, v)]))
                .unwrap_err()
                .to_string()
        };
        assert!(bad("DOWNLINK_ALLOW_NETWORKS", "[\"10.0.0.0/33\"]")
            .contains("not an address or network"));
        assert!(bad("DOWNLINK_LOG_LEVEL", "loud").contains("unknown variant `loud`"));
        let err = bad("DOWNLINK_AUTH_TOKEN_HASHES", "[\"s3cret-token\"]");
        assert!(
            err.contains("64 hex digits") && !err.contains("s3cret"),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_is_rejected() {
        let err = Settings::load(None, env(&[("DOWNLINK_MAX_FORKS", "many")])).unwrap_err();
        assert!(err.to_string().contains("DOWNLINK_MAX_FORKS"), "{err}");
    }

    #[test]
    fn durations_are_bounded_by_name() {
        let huge = i64::MAX.to_string();
        for key in [
            "DOWNLINK_HEARTBEAT_SECS",
            "DOWNLINK_STOP_GRACE_SECS",
            "DOWNLINK_RETENTION_CHECK_SECS",
        ] {
            let err = Settings::load(None, env(&[(key, &huge)]))
                .unwrap_err()
                .to_string();
            let name = key.trim_start_matches("DOWNLINK_").to_lowercase();
            assert!(
                err.contains(&format!("{name} must be at most 31536000")),
                "{err}"
            );
        }
        let year = MAX_DURATION_SECS.to_string();
        assert!(Settings::load(None, env(&[("DOWNLINK_HEARTBEAT_SECS", &year)])).is_ok());
    }
}
