//! Test harness: a real server per test (random port, its own database and run directory), the
//! real PostgreSQL and SSH test hosts started by `scripts/test`, and plain HTTP calls.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::Connection;
use downlink::db::{self, DbConnection, Pool, Target};
use downlink::server::{self, Spawned};
use downlink::settings::Settings;
use downlink::store::{self, HostRow, Task};
use serde_json::Value;

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
    s.stop_grace_secs = 5;
    s.workers = 2;
    s.log_level = "warning".into();
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

/// A running server with its own database and run directory.
pub struct TestServer {
    pub base: String,
    pub settings: Settings,
    pub pool: Pool,
    server: Option<Spawned>,
    _db: TestDb,
    pub dir: TempDir,
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
        let log = downlink::logging::root(&settings);
        let server = server::spawn(settings.clone(), log).expect("server starts");
        let target = Target::parse(&db.url).expect("db url");
        let pool = db::pool(&target, 2, Duration::from_secs(10)).expect("test pool");
        TestServer {
            base: format!("http://{}", server.addr),
            settings,
            pool,
            server: Some(server),
            _db: db,
            dir,
        }
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

    pub fn conn(&self) -> db::PooledConn {
        self.pool.get().expect("test connection")
    }

    pub fn task(&self, id: i64) -> Task {
        store::get_task(&mut self.conn(), id)
            .expect("read task")
            .expect("task exists")
    }

    /// The id of the task with this name.
    pub fn id_of(&self, name: &str) -> i64 {
        use diesel::prelude::*;
        use downlink::schema::tasks;
        tasks::table
            .filter(tasks::name.eq(name))
            .select(tasks::id)
            .first(&mut self.conn() as &mut DbConnection)
            .expect("task by name")
    }

    pub fn hosts(&self, id: i64) -> Vec<HostRow> {
        store::task_hosts(&mut self.conn(), id).expect("read hosts")
    }

    pub fn task_count(&self) -> i64 {
        use diesel::prelude::*;
        downlink::schema::tasks::table
            .count()
            .get_result(&mut self.conn() as &mut DbConnection)
            .expect("count")
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

    /// The run directory of a task.
    pub fn run_dir(&self, id: i64) -> PathBuf {
        self.settings
            .run_dir
            .canonicalize()
            .expect("run dir exists")
            .join(id.to_string())
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

/// Live processes of a task: those carrying its marker in their environment.
pub fn task_processes(run_dir: &Path) -> Vec<i32> {
    downlink::procs::marked(&run_dir.to_string_lossy())
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
