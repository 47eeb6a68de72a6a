//! Test harness: a real server per test (random port, its own database and run directory), the
//! real PostgreSQL and SSH test hosts started by `scripts/test`, and plain HTTP calls.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::Connection;
use downlink::server;
use downlink::settings::Settings;
use downlink::store::db::{self, DbConnection, Pool, Target};
use downlink::store::{self, HostRow, Task};
use serde_json::Value;

/// The lines of a stream, read to its end (NDJSON), or to the end of the answer (SSE).
pub fn stream(base: &str, path_and_query: &str, headers: &[(&str, &str)]) -> (String, Vec<String>) {
    use std::io::BufRead;
    let mut req = ureq::get(&format!("{base}{path_and_query}"));
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let res = req.call().expect("the stream answers");
    let content_type = res.header("Content-Type").unwrap_or_default().to_owned();
    let lines = std::io::BufReader::new(res.into_reader())
        .lines()
        .map(|l| l.expect("a line"))
        .collect();
    (content_type, lines)
}

/// Which database a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs a test body once per backend: `both_backends!(name)` makes `name::sqlite` and
/// `name::postgres` from `fn name(backend: Backend)`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn sqlite() {
                super::$name($crate::harness::Backend::Sqlite)
            }
            #[test]
            fn postgres() {
                super::$name($crate::harness::Backend::Postgres)
            }
        }
    )*};
}

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the tests with scripts/test, which installs ansible-core, \
             starts PostgreSQL and the SSH test hosts and sets it"
        )
    })
}

/// The SSH test hosts (sshd on 127.0.0.2-4) and an address where nothing listens.
/// The contract's status names, by code (1 to 7).
pub const STATUS_NAMES: [&str; 8] = [
    "",
    "pending",
    "running",
    "failed",
    "success",
    "stopped",
    "timeout",
    "interrupted",
];

pub const HOSTS: [&str; 3] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
pub const DEAD: &str = "127.0.0.9";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// The run directory of task `id` of a server with these settings.
pub fn task_dir(settings: &Settings, id: i64) -> PathBuf {
    settings
        .run_dir
        .canonicalize()
        .expect("run dir exists")
        .join(&settings.agent_name)
        .join(id.to_string())
}

/// Settings that reach the test hosts with the real ansible-playbook.
pub fn test_settings(dir: &Path) -> Settings {
    let mut s = Settings::defaults();
    s.ansible_playbook = required_env("DLTEST_ANSIBLE_PLAYBOOK");
    s.ssh_private_key = required_env("DLTEST_SSH_KEY");
    s.ssh_port = required_env("DLTEST_SSH_PORT")
        .parse()
        .expect("DLTEST_SSH_PORT is a port");
    s.ssh_common_args = "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no".into();
    s.ansible_python_interpreter = "/usr/bin/python3".into();
    s.run_dir = dir.join("runs");
    // Unique per test server: an agent's name is its identity on the machine (it names its
    // cgroups), and tests run many servers side by side.
    s.agent_name = unique("test-agent");
    s.stop_grace_secs = 5;
    s.workers = 2;
    s.log_level = downlink::settings::LogLevel::Warning;
    s
}

/// A fresh, empty database of the backend; dropped with the value.
pub struct TestDb {
    pub url: String,
    admin: Option<(String, String)>,
}

impl TestDb {
    pub fn new(backend: Backend, dir: &Path) -> TestDb {
        match backend {
            Backend::Sqlite => TestDb {
                url: format!("sqlite://{}", dir.join("downlink.sqlite3").display()),
                admin: None,
            },
            Backend::Postgres => {
                let admin = required_env("DLTEST_PG_URL");
                let name = unique("dl_test");
                let mut conn = diesel::PgConnection::establish(&admin)
                    .unwrap_or_else(|e| panic!("cannot reach the test PostgreSQL: {e}"));
                conn.batch_execute(&format!("CREATE DATABASE {name}"))
                    .expect("create test database");
                let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
                TestDb {
                    url: format!("{base}/{name}"),
                    admin: Some((admin, name)),
                }
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = &self.admin {
            if let Ok(mut conn) = diesel::PgConnection::establish(admin) {
                let _ = conn.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        }
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let dir = std::env::temp_dir().join(unique("dl"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A task row read with plain SQL: what a DBA would see, not what the store's reader makes of it.
#[derive(diesel::QueryableByName, Debug)]
pub struct TaskRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub id: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub name: String,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub status: i32,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    pub err: Option<String>,
}

/// Reads of a test database, retried while the database is away (outage tests).
pub struct DbView {
    pub pool: Pool,
}

impl DbView {
    /// A view of the database at `url`.
    pub fn open(url: &str) -> DbView {
        let target = Target::parse(url).expect("db url");
        DbView {
            pool: db::pool(&target, 2, Duration::from_secs(10), Duration::from_secs(60))
                .expect("test pool"),
        }
    }

    pub fn conn(&self) -> db::PooledConn {
        self.pool.get().expect("test connection")
    }

    /// Runs a read, retrying for up to a minute while the database is away (outage tests).
    pub fn read<T>(&self, f: impl Fn(&mut DbConnection) -> Result<T, store::StoreError>) -> T {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let result = self
                .pool
                .get()
                .map_err(store::StoreError::from)
                .and_then(|mut c| f(&mut c));
            match result {
                Ok(v) => return v,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("test read failed: {e}"),
            }
        }
    }

    /// Every task row, in id order, read with plain SQL.
    pub fn rows(&self) -> Vec<TaskRow> {
        use diesel::RunQueryDsl;
        self.read(|c| {
            Ok(
                diesel::sql_query("SELECT id, name, status, err FROM tasks ORDER BY id")
                    .load::<TaskRow>(c)?,
            )
        })
    }

    pub fn task(&self, id: i64) -> Task {
        self.read(|c| store::get_task(c, id)).expect("task exists")
    }

    /// The id of the task with this name.
    pub fn id_of(&self, name: &str) -> i64 {
        use diesel::prelude::*;
        use downlink::store::schema::tasks;
        self.read(|c| {
            Ok(tasks::table
                .filter(tasks::name.eq(name))
                .select(tasks::id)
                .first(c)?)
        })
    }

    pub fn hosts(&self, id: i64) -> Vec<HostRow> {
        self.read(|c| store::task_hosts(c, id))
    }

    pub fn events(&self, id: i64) -> Vec<store::NewEvent> {
        self.read(|c| store::task_events(c, id))
    }

    pub fn task_count(&self) -> i64 {
        use diesel::prelude::*;
        self.read(|c| {
            Ok(downlink::store::schema::tasks::table
                .count()
                .get_result(c)?)
        })
    }

    /// Waits until the task has one of these statuses; panics after `secs`.
    pub fn wait_status(&self, id: i64, statuses: &[i32], secs: u64) -> Task {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let task = self.task(id);
            if statuses.contains(&task.status) {
                return task;
            }
            assert!(
                Instant::now() < deadline,
                "task {id} still has status {} after {secs} s (wanted {statuses:?})",
                task.status
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for any terminal status.
    pub fn wait_end(&self, id: i64, secs: u64) -> Task {
        self.wait_status(id, &[3, 4, 5, 6, 7], secs)
    }
}

impl std::ops::Deref for TestServer {
    type Target = DbView;
    fn deref(&self) -> &DbView {
        &self.view
    }
}

/// A running server with its own database and run directory.
pub struct TestServer {
    pub base: String,
    pub settings: Settings,
    pub view: DbView,
    server: Option<Spawned>,
    _db: TestDb,
    pub dir: TempDir,
    _log_guard: downlink::logging::LogGuard,
}

impl TestServer {
    pub fn start(backend: Backend) -> TestServer {
        Self::start_with(backend, |_| {})
    }

    pub fn start_with(backend: Backend, tweak: impl FnOnce(&mut Settings)) -> TestServer {
        let dir = TempDir::new();
        let db = TestDb::new(backend, &dir.0);
        let mut settings = test_settings(&dir.0);
        settings.database_url = db.url.clone();
        tweak(&mut settings);
        let (log, log_guard) = downlink::logging::root(&settings);
        let server = spawn(settings.clone(), log).expect("server starts");
        TestServer {
            base: format!("http://{}", server.addr),
            view: DbView::open(&db.url),
            settings,
            server: Some(server),
            _db: db,
            dir,
            _log_guard: log_guard,
        }
    }

    /// The URL of the server's database.
    pub fn db_url(&self) -> &str {
        &self._db.url
    }

    /// POST with the two contract headers; (HTTP status, body).
    pub fn post(&self, path: &str, body: &str) -> (u16, String) {
        self.post_with(
            path,
            &[("X-CORRELATION-ID", "1-1"), ("X-RESOURCE", "orion")],
            body,
        )
    }

    /// POST with exactly these headers.
    pub fn post_with(&self, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
        request("POST", &format!("{}{path}", self.base), headers, body)
    }

    /// POST and decode the JSON answer.
    pub fn call(&self, path: &str, body: Value) -> Value {
        let (status, text) = self.post(path, &body.to_string());
        assert_eq!(status, 200, "{path}: {text}");
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path} answered non-JSON {text:?}: {e}"))
    }

    /// Starts a task through /api/run; its id.
    pub fn run(&self, body: Value) -> i64 {
        let answer = self.call("/api/run", body);
        answer["content"]["id"]
            .as_i64()
            .unwrap_or_else(|| panic!("run refused: {answer}"))
    }

    /// The run directory of a task.
    pub fn run_dir(&self, id: i64) -> PathBuf {
        task_dir(&self.settings, id)
    }

    /// Asserts that the stored per-host counters of a task equal ansible's own PLAY RECAP in its
    /// output.log, host by host.
    pub fn assert_hosts_match_recap(&self, id: i64) {
        let output = std::fs::read_to_string(self.run_dir(id).join("output.log")).unwrap();
        let recap = play_recap(&output);
        let hosts = self.hosts(id);
        assert_eq!(recap.len(), hosts.len(), "task {id}: {output}");
        for h in hosts {
            let (_, c) = recap
                .iter()
                .find(|(host, _)| *host == h.host)
                .unwrap_or_else(|| panic!("{} not in PLAY RECAP", h.host));
            let stored = [
                h.ok,
                h.changed,
                h.unreachable,
                h.failed,
                h.skipped,
                h.rescued,
                h.ignored,
            ];
            assert_eq!(stored, *c, "task {id} host {}", h.host);
        }
    }

    /// Stops the server (its tasks' processes are not touched).
    pub fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `downlink` binary as a separate process (for crash and signal tests), configured through
/// `DOWNLINK_*` variables, logging JSON lines to `<dir>/server-N.log`.
pub struct BinServer {
    pub child: std::process::Child,
    pub base: String,
    pub log_path: PathBuf,
    /// When the process was spawned (wall clock, to compare with its log lines).
    pub started: chrono::DateTime<chrono::Utc>,
}

/// The `DOWNLINK_*` variables for these settings.
pub fn settings_env(s: &Settings) -> Vec<(String, String)> {
    let mut env = vec![
        ("DOWNLINK_DATABASE_URL", s.database_url.clone()),
        ("DOWNLINK_AGENT_NAME", s.agent_name.clone()),
        ("DOWNLINK_ANSIBLE_PLAYBOOK", s.ansible_playbook.clone()),
        ("DOWNLINK_SSH_PRIVATE_KEY", s.ssh_private_key.clone()),
        ("DOWNLINK_SSH_PORT", s.ssh_port.to_string()),
        ("DOWNLINK_SSH_COMMON_ARGS", s.ssh_common_args.clone()),
        (
            "DOWNLINK_ANSIBLE_PYTHON_INTERPRETER",
            s.ansible_python_interpreter.clone(),
        ),
        ("DOWNLINK_RUN_DIR", s.run_dir.to_string_lossy().into_owned()),
        ("DOWNLINK_MAX_FORKS", s.max_forks.to_string()),
        ("DOWNLINK_STOP_GRACE_SECS", s.stop_grace_secs.to_string()),
        (
            "DOWNLINK_STOP_TASKS_ON_SHUTDOWN",
            s.stop_tasks_on_shutdown.to_string(),
        ),
        ("DOWNLINK_STORE_PARAMS", s.store_params.to_string()),
        ("DOWNLINK_HEARTBEAT_SECS", s.heartbeat_secs.to_string()),
        (
            "DOWNLINK_REMOVE_EXTRA_VARS_AT_END",
            s.remove_extra_vars_at_end.to_string(),
        ),
        ("DOWNLINK_DB_RETRY_SECS", s.db_retry_secs.to_string()),
        ("DOWNLINK_SHARED_QUEUE", s.shared_queue.to_string()),
        (
            "DOWNLINK_PARALLEL_RUN_TIMEOUT_SECS",
            s.parallel_run_timeout_secs.to_string(),
        ),
        (
            "DOWNLINK_LOST_AGENT_GRACE_SECS",
            s.lost_agent_grace_secs.to_string(),
        ),
        (
            "DOWNLINK_CLUSTER_MAX_FORKS",
            s.cluster_max_forks.to_string(),
        ),
        (
            "DOWNLINK_EVENT_STREAM_KEEPALIVE_SECS",
            s.event_stream_keepalive_secs.to_string(),
        ),
        ("DOWNLINK_RECONCILE_SECS", s.reconcile_secs.to_string()),
        ("DOWNLINK_WORKERS", s.workers.to_string()),
        ("DOWNLINK_LOG_FORMAT", "json".to_owned()),
        ("DOWNLINK_LOG_LEVEL", "info".to_owned()),
    ];
    env.sort();
    env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

impl BinServer {
    /// Starts the binary on a free port and waits until `/healthz` answers.
    pub fn start(settings: &Settings, dir: &Path) -> BinServer {
        Self::start_in(settings, dir, dir)
    }

    /// The same, with `cwd` as the server's working directory (relative settings resolve there).
    pub fn start_in(settings: &Settings, dir: &Path, cwd: &Path) -> BinServer {
        Self::start_with_env(settings, dir, cwd, &[])
    }

    /// The same, with these environment variables besides the settings.
    pub fn start_with_env(
        settings: &Settings,
        dir: &Path,
        cwd: &Path,
        extra: &[(&str, String)],
    ) -> BinServer {
        Self::spawn(settings, dir, cwd, extra, false)
    }

    /// Starts the binary with descriptors 0, 1 and 2 closed (as a careless supervisor or a
    /// `nohup … <&- >&- 2>&-` would): nothing of it is logged.
    pub fn start_with_stdio_closed(settings: &Settings, dir: &Path) -> BinServer {
        Self::spawn(settings, dir, dir, &[], true)
    }

    fn spawn(
        settings: &Settings,
        dir: &Path,
        cwd: &Path,
        extra: &[(&str, String)],
        closed_stdio: bool,
    ) -> BinServer {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        let log_path = dir.join(format!("server-{}.log", unique("run")));
        let log = std::fs::File::create(&log_path).expect("log file");
        let started = chrono::Utc::now();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_downlink"));
        if closed_stdio {
            use std::os::unix::process::CommandExt;
            // SAFETY: close is async-signal-safe; the child closes its own standard streams.
            unsafe {
                cmd.pre_exec(|| {
                    for fd in 0..3 {
                        nix::libc::close(fd);
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .arg("serve")
            .current_dir(cwd)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .envs(settings_env(settings))
            .env("DOWNLINK_BIND", format!("127.0.0.1:{port}"))
            .envs(extra.iter().map(|(k, v)| (*k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("downlink binary starts");
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(2))
            .build();
        while agent.get(&format!("{base}/healthz")).call().is_err() {
            assert!(Instant::now() < deadline, "server did not answer /healthz");
            std::thread::sleep(Duration::from_millis(50));
        }
        BinServer {
            child,
            base,
            log_path,
            started,
        }
    }

    pub fn post(&self, path: &str, body: &str) -> (u16, String) {
        request(
            "POST",
            &format!("{}{path}", self.base),
            &[("X-CORRELATION-ID", "1-1"), ("X-RESOURCE", "orion")],
            body,
        )
    }

    /// Sends a signal to the server process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal)
            .expect("signal the server");
    }

    /// Waits for the process to exit; its exit code and how long it took.
    pub fn wait_exit(&mut self, secs: u64) -> (Option<i32>, Duration) {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status.code(), t.elapsed());
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "server still running after {secs} s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The JSON log lines written so far.
    pub fn log_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for BinServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP request; (status, body) whatever the status.
pub fn request(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build();
    let mut req = agent.request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let result = if method == "GET" {
        req.call()
    } else {
        req.send_string(body)
    };
    match result {
        Ok(res) => (res.status(), res.into_string().expect("body")),
        Err(ureq::Error::Status(code, res)) => (code, res.into_string().expect("body")),
        Err(e) => panic!("{method} {url}: {e}"),
    }
}

/// A /api/run body.
pub fn run_body(name: &str, nodes: &[&str], tasks: &str) -> Value {
    serde_json::json!({
        "nodes": nodes, "user": "root", "name": name, "tasks": tasks,
        "params": "", "fork_num": 5
    })
}

/// Live processes of a task, as the tests' own /proc reader sees them (`procwatch`).
pub fn task_processes(run_dir: &Path) -> Vec<i32> {
    crate::procwatch::of_task(run_dir)
        .into_iter()
        .map(|p| p.pid)
        .collect()
}

/// PLAY RECAP counters of an output.log: host -> (ok, changed, unreachable, failed, skipped,
/// rescued, ignored).
pub fn play_recap(output: &str) -> Vec<(String, [i32; 7])> {
    let mut out = Vec::new();
    let mut in_recap = false;
    for line in output.lines() {
        if line.starts_with("PLAY RECAP") {
            in_recap = true;
            continue;
        }
        if !in_recap || line.trim().is_empty() {
            continue;
        }
        let Some((host, rest)) = line.split_once(':') else {
            continue;
        };
        let mut counts = [0; 7];
        for (i, key) in [
            "ok",
            "changed",
            "unreachable",
            "failed",
            "skipped",
            "rescued",
            "ignored",
        ]
        .iter()
        .enumerate()
        {
            counts[i] = rest
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or(-1);
        }
        out.push((host.trim().to_owned(), counts));
    }
    out
}

/// Records a measured figure: printed, and appended to `target/tmp/figures.txt`, which
/// `scripts/test` shows at the end of the run.
pub fn figure(name: &str, value: impl std::fmt::Display) {
    use std::io::Write;
    let line = format!("{name} = {value}");
    println!("FIGURE {line}");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("figures.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// A server running on its own thread and actix system, as `downlink serve` runs it.
pub struct Spawned {
    pub addr: std::net::SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Spawned {
    /// Shuts the server down gracefully and waits for its thread to end.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            // A server that already ended has nothing to hear.
            tx.send(()).ok();
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                eprintln!("the server thread panicked");
            }
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Prepares and starts a server on `127.0.0.1:0` in a thread of its own.
pub fn spawn(settings: Settings, log: slog::Logger) -> anyhow::Result<Spawned> {
    let prepared = server::prepare(settings, &log)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let system = actix_web::rt::System::new();
        let shutdown = async move {
            shutdown_rx.await.ok();
        };
        let result = system.block_on(server::run(prepared, listener, log, shutdown, move |h| {
            started_tx.send(h).ok();
        }));
        if let Err(e) = result {
            eprintln!("server thread ended with an error: {e}");
        }
    });
    started_rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|e| anyhow::anyhow!("server did not start: {e}"))?;
    Ok(Spawned {
        addr,
        shutdown: Some(shutdown_tx),
        thread: Some(thread),
    })
}

/// Waits until `done` answers true, checking every 50 ms; fails the test after `secs`, naming
/// `what` it waited for.
pub fn wait_until(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(50));
    }
}
