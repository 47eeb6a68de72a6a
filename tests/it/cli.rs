//! The `downlink` binary: subcommands, `--config`, environment settings, `migrate` on both backends.

use std::process::Command;

use crate::both_backends;
use crate::harness::{Backend, TempDir, TestDb};

fn downlink() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_downlink"));
    cmd.env_remove("DOWNLINK_DATABASE_URL");
    cmd
}

#[test]
fn help_lists_the_subcommands() {
    let out = downlink().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["serve", "migrate", "--config"] {
        assert!(text.contains(word), "--help lacks {word}: {text}");
    }
}

#[test]
fn unknown_settings_are_refused_by_name() {
    let out = downlink()
        .arg("settings")
        .env("DOWNLINK_MAX_FORK", "3")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "downlink: invalid settings: unknown setting in environment variable DOWNLINK_MAX_FORK\n"
    );
    let dir = TempDir::new();
    let file = dir.0.join("bad.toml");
    std::fs::write(&file, "max_forks = 3\nbnid = \"x\"\n").unwrap();
    let out = downlink()
        .args(["--config", file.to_str().unwrap(), "settings"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown key `bnid`"));
}

#[test]
fn config_file_then_environment() {
    let dir = TempDir::new();
    let file = dir.0.join("c.toml");
    std::fs::write(&file, "max_forks = 3\nmax_nodes = 10\n").unwrap();
    let out = downlink()
        .args(["--config", file.to_str().unwrap(), "settings"])
        .env("DOWNLINK_MAX_NODES", "11")
        .env("DOWNLINK_DATABASE_URL", "postgres://u:hunter2@h/db")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("max_forks: 3,"), "{text}");
    assert!(text.contains("max_nodes: 11,"), "{text}");
    assert!(
        !text.contains("hunter2"),
        "the password was printed: {text}"
    );
}

both_backends!(migrate_creates_the_tables);

fn migrate_creates_the_tables(backend: Backend) {
    let dir = TempDir::new();
    let db = TestDb::new(backend, &dir.0);
    for _ in 0..2 {
        let out = downlink()
            .arg("migrate")
            .current_dir(&dir.0)
            .env("DOWNLINK_DATABASE_URL", &db.url)
            .env("DOWNLINK_LOG_FORMAT", "json")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let target = downlink::store::db::Target::parse(&db.url).unwrap();
    let pool = downlink::store::db::pool(
        &target,
        2,
        std::time::Duration::from_secs(5),
        std::time::Duration::from_secs(60),
    )
    .unwrap();
    let mut conn = pool.get().unwrap();
    // The status table is seeded, and the forward-only rule holds in SQL.
    use diesel::connection::SimpleConnection;
    conn.batch_execute(
        "INSERT INTO tasks (name, nodes, remote_user, content, params, fork_num, forks, status, \
         correlation_id, source, created_at, updated_at) VALUES ('x', '[]', 'u', '', '{}', 1, 1, 4, \
         'c', 's', '2026-01-01 00:00:00', '2026-01-01 00:00:00')",
    )
    .unwrap();
    let back = conn.batch_execute("UPDATE tasks SET status = 2 WHERE name = 'x'");
    assert!(back.is_err(), "a finished task moved back to running");
    let unknown = conn.batch_execute("UPDATE tasks SET status = 9 WHERE name = 'x'");
    assert!(unknown.is_err());
}

/// `downlink migrate` on this database; its output.
fn migrate(dir: &std::path::Path, url: &str) -> std::process::Output {
    downlink()
        .arg("migrate")
        .current_dir(dir)
        .env("DOWNLINK_DATABASE_URL", url)
        .output()
        .unwrap()
}

#[test]
fn agents_migrating_at_once_apply_each_migration_once() {
    let dir = TempDir::new();
    let db = TestDb::new(Backend::Postgres, &dir.0);
    let runs: Vec<std::process::Child> = (0..4)
        .map(|_| {
            downlink()
                .arg("migrate")
                .current_dir(&dir.0)
                .env("DOWNLINK_DATABASE_URL", &db.url)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut applied = 0;
    for run in runs {
        let out = run.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{text}");
        applied += text
            .split("applied: ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.trim().parse::<usize>().ok())
            .unwrap_or_else(|| panic!("no count in {text}"));
    }
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .unwrap()
        .count();
    assert_eq!(
        applied, migrations,
        "each migration applied by exactly one of the four"
    );
}

both_backends!(a_database_migrated_by_a_newer_downlink_is_refused);

fn a_database_migrated_by_a_newer_downlink_is_refused(backend: Backend) {
    use diesel::connection::SimpleConnection;
    let dir = TempDir::new();
    let db = TestDb::new(backend, &dir.0);
    assert!(migrate(&dir.0, &db.url).status.success());
    let target = downlink::store::db::Target::parse(&db.url).unwrap();
    let mut conn = downlink::store::db::connect(&target).unwrap();
    conn.batch_execute(
        "INSERT INTO __diesel_schema_migrations (version) VALUES ('29991231000000')",
    )
    .unwrap();
    drop(conn);
    let expected = "the database holds migrations this downlink does not know (29991231000000; the newest it knows is 20261204000000): a newer downlink upgraded it; run that version or a later one against it";
    let out = migrate(&dir.0, &db.url);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains(expected), "{text}");
    let out = downlink()
        .arg("serve")
        .current_dir(&dir.0)
        .env("DOWNLINK_DATABASE_URL", &db.url)
        .env("DOWNLINK_BIND", "127.0.0.1:0")
        .env("DOWNLINK_RUN_DIR", dir.0.join("runs"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains(expected), "{text}");
}
