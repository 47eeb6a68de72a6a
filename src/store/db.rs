//! Connections: one diesel code path over PostgreSQL (production) and SQLite (the embedded default)
//! through `#[derive(MultiConnection)]`, an r2d2 pool, and the two embedded migration trees.
//!
//! The backend is chosen from the URL scheme here rather than by `MultiConnection::establish`,
//! which tries every variant in turn and throws the real error away (a wrong PostgreSQL password
//! would read "Invalid connection url for multiconnection").

use std::path::PathBuf;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{self, CustomizeConnection, ManageConnection};
use diesel::{PgConnection, SqliteConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

/// A connection to either backend.
#[derive(diesel::MultiConnection)]
pub enum DbConnection {
    Pg(PgConnection),
    Sqlite(SqliteConnection),
}

/// Runs `$body` with `$c` bound to the connection of whichever backend `$conn` holds.
///
/// Through `DbConnection` itself, diesel wraps each statement so that its SQL text is written
/// again on every run and found in the statement cache by that text (the profile of
/// `/api/check` showed a third of the server's CPU in it); written through this macro, a statement
/// of static shape is prepared once per connection and found again by its type.
#[macro_export]
macro_rules! on_backend {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::store::db::DbConnection::Pg($c) => $body,
            $crate::store::db::DbConnection::Sqlite($c) => $body,
        }
    };
}

/// The connection pool shared by the writer and the readers.
pub type Pool = r2d2::Pool<Manager>;
/// A connection checked out of the pool.
pub type PooledConn = r2d2::PooledConnection<Manager>;

const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// Which database a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A PostgreSQL connection URL.
    Postgres(String),
    /// A SQLite database file.
    Sqlite(PathBuf),
}

/// Why the database could not be opened or migrated.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database URL must start with postgres://, postgresql:// or sqlite:// (got `{0}`)")]
    Scheme(String),
    #[error("cannot create directory {0} for the SQLite database: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error("cannot apply migrations: {0}")]
    Migrate(String),
    #[error(
        "the database holds migrations this downlink does not know ({unknown}; the newest it knows is {newest}): a newer downlink upgraded it; run that version or a later one against it"
    )]
    NewerSchema { unknown: String, newest: String },
}

impl Target {
    /// Reads a database URL.
    pub fn parse(url: &str) -> Result<Target, DbError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Target::Postgres(url.to_owned()))
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            Ok(Target::Sqlite(PathBuf::from(path)))
        } else {
            Err(DbError::Scheme(redact(url)))
        }
    }

    /// A description safe to log (no password).
    pub fn describe(&self) -> String {
        match self {
            Target::Postgres(url) => format!("postgresql {}", redact(url)),
            Target::Sqlite(path) => format!("sqlite {}", path.display()),
        }
    }
}

/// The URL with any password replaced by `***`: in the user information and in a `password`
/// query parameter (libpq accepts both). A URL that does not parse is not shown at all.
pub fn redact(url: &str) -> String {
    // libpq's several hosts (`h1:5432,h2:5432`, for failover) are no authority the url crate
    // reads: they stand aside while the rest is redacted.
    if let Some((scheme, rest)) = url.split_once("://") {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (user, hosts) = match authority.rsplit_once('@') {
            Some((user, hosts)) => (Some(user), hosts),
            None => (None, authority),
        };
        if hosts.contains(',') {
            const STAND_IN: &str = "several-hosts.invalid";
            let user = user.map(|u| format!("{u}@")).unwrap_or_default();
            let one = redact(&format!("{scheme}://{user}{STAND_IN}{tail}"));
            return one.replacen(STAND_IN, hosts, 1);
        }
    }
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "(a database URL that does not parse)".to_owned();
    };
    if parsed.password().is_some() {
        // Refused only by URLs that cannot hold a password: then there is none to hide.
        parsed.set_password(Some("***")).ok();
    }
    if parsed.query_pairs().any(|(k, _)| k == "password") {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "password" {
                    "***".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    // `***` is written percent-encoded in the query; show it as typed.
    parsed.to_string().replace("%2A%2A%2A", "***")
}

/// Opens connections of the backend the URL names, keeping the backend's own error.
#[derive(Debug)]
pub struct Manager {
    target: Target,
}

impl ManageConnection for Manager {
    type Connection = DbConnection;
    type Error = r2d2::Error;

    fn connect(&self) -> Result<DbConnection, r2d2::Error> {
        match &self.target {
            Target::Postgres(url) => PgConnection::establish(url).map(DbConnection::Pg),
            Target::Sqlite(path) => {
                SqliteConnection::establish(&path.to_string_lossy()).map(DbConnection::Sqlite)
            }
        }
        .map_err(r2d2::Error::ConnectionError)
    }

    fn is_valid(&self, conn: &mut DbConnection) -> Result<(), r2d2::Error> {
        conn.batch_execute("SELECT 1")
            .map_err(r2d2::Error::QueryError)
    }

    /// Called when a connection goes back to the pool. Connections are not tested when taken out
    /// (that was a `SELECT 1` round trip before every read and write); instead, one that saw an
    /// error (see [`suspect`]) is tested here and dropped if it no longer answers, and one left in
    /// a broken transaction is dropped.
    fn has_broken(&self, conn: &mut DbConnection) -> bool {
        use diesel::r2d2::R2D2Connection;
        if std::thread::panicking() || conn.is_broken() {
            return true;
        }
        SUSPECT.with(|s| s.replace(false)) && conn.batch_execute("SELECT 1").is_err()
    }
}

thread_local! {
    static SUSPECT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Notes that a statement failed on this thread: the connection it used is tested when it goes
/// back to the pool. Every diesel error that becomes a `StoreError` calls this.
pub fn suspect() {
    SUSPECT.with(|s| s.set(true));
}

/// Every new connection: on SQLite WAL (readers beside the writer), a busy timeout and foreign
/// keys; on PostgreSQL a statement timeout, so no statement holds a connection (and the writer)
/// for ever.
#[derive(Debug)]
struct Prepare {
    statement_timeout: Duration,
}

impl CustomizeConnection<DbConnection, r2d2::Error> for Prepare {
    fn on_acquire(&self, conn: &mut DbConnection) -> Result<(), r2d2::Error> {
        match conn {
            DbConnection::Sqlite(c) => c.batch_execute(
                "PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 10000; \
                 PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;",
            ),
            DbConnection::Pg(c) => c.batch_execute(&format!(
                "SET statement_timeout = {}",
                self.statement_timeout.as_millis()
            )),
        }
        .map_err(r2d2::Error::QueryError)
    }
}

/// Builds the pool, creating the SQLite file's directory when needed; `timeout` is how long a
/// `get` waits for a connection, `statement_timeout` the longest a PostgreSQL statement may run.
pub fn pool(
    target: &Target,
    size: u32,
    timeout: Duration,
    statement_timeout: Duration,
) -> Result<Pool, DbError> {
    if let Target::Sqlite(path) = target {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| DbError::Dir(dir.to_owned(), e))?;
        }
    }
    Ok(r2d2::Pool::builder()
        .max_size(size)
        .min_idle(Some(1))
        .connection_timeout(timeout)
        .test_on_check_out(false)
        .connection_customizer(Box::new(Prepare { statement_timeout }))
        // Unchecked: connections are made on first use, so the caller decides how long to wait
        // for a database that is still starting.
        .build_unchecked(Manager {
            target: target.clone(),
        }))
}

/// One connection outside any pool (for `downlink migrate`: no pool threads outlive it).
pub fn connect(target: &Target) -> Result<DbConnection, DbError> {
    Manager {
        target: target.clone(),
    }
    .connect()
    .map_err(|e| DbError::Migrate(format!("cannot connect: {e}")))
}

/// Applies every pending migration of the connection's backend; returns the versions applied.
///
/// On PostgreSQL this holds an advisory lock meanwhile, so agents that start at once apply each
/// migration once (the others wait, then find nothing pending). A database holding a migration
/// this binary does not know (a newer downlink applied it) is refused, not run against.
pub fn migrate(conn: &mut DbConnection) -> Result<Vec<String>, DbError> {
    match conn {
        DbConnection::Pg(c) => {
            let lock = |c: &mut PgConnection, f: &str| {
                c.batch_execute(&format!("SELECT {f}({MIGRATION_LOCK})"))
                    .map_err(|e| DbError::Migrate(e.to_string()))
            };
            lock(c, "pg_advisory_lock")?;
            let applied = migrate_from(c, PG_MIGRATIONS);
            // Also released when the connection closes.
            let unlocked = lock(c, "pg_advisory_unlock");
            let applied = applied?;
            unlocked?;
            Ok(applied)
        }
        // SQLite: the file's own lock keeps a second writer out, and each migration is a
        // transaction.
        DbConnection::Sqlite(c) => migrate_from(c, SQLITE_MIGRATIONS),
    }
}

/// The advisory lock key held while migrating: "downlink" in ASCII, as a bigint.
const MIGRATION_LOCK: i64 = 0x646f_776e_6c69_6e6b;

fn migrate_from<DB, C>(conn: &mut C, source: EmbeddedMigrations) -> Result<Vec<String>, DbError>
where
    DB: diesel::backend::Backend,
    C: MigrationHarness<DB>,
    EmbeddedMigrations: diesel::migration::MigrationSource<DB>,
{
    let failed = |e: Box<dyn std::error::Error + Send + Sync>| DbError::Migrate(e.to_string());
    let known: Vec<String> = diesel::migration::MigrationSource::<DB>::migrations(&source)
        .map_err(failed)?
        .iter()
        .map(|m| m.name().version().to_string())
        .collect();
    let unknown: Vec<String> = conn
        .applied_migrations()
        .map_err(failed)?
        .iter()
        .map(ToString::to_string)
        .filter(|v| !known.contains(v))
        .collect();
    if !unknown.is_empty() {
        return Err(DbError::NewerSchema {
            unknown: unknown.join(", "),
            newest: known.iter().max().cloned().unwrap_or_default(),
        });
    }
    let applied = conn.run_pending_migrations(source).map_err(failed)?;
    Ok(applied.into_iter().map(|v| v.to_string()).collect())
}

/// Whether migrations embedded in this binary are still to be applied.
pub fn has_pending_migrations(conn: &mut DbConnection) -> Result<bool, DbError> {
    match conn {
        DbConnection::Pg(c) => c.has_pending_migration(PG_MIGRATIONS),
        DbConnection::Sqlite(c) => c.has_pending_migration(SQLITE_MIGRATIONS),
    }
    .map_err(|e| DbError::Migrate(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://dl:secret@127.0.0.1/db"),
            "postgres://dl:***@127.0.0.1/db"
        );
        assert_eq!(redact("postgres://127.0.0.1/db"), "postgres://127.0.0.1/db");
        // An `@` in the password (percent-encoded, as URLs require) and a password parameter.
        assert_eq!(
            redact("postgres://dl:p%40ss@db.example:5432/x"),
            "postgres://dl:***@db.example:5432/x"
        );
        assert_eq!(
            redact("postgresql://dl@h/db?sslmode=require&password=s3cret"),
            "postgresql://dl@h/db?sslmode=require&password=***"
        );
        assert!(!redact("postgres://dl:s3cret@h:notaport/db").contains("s3cret"));
        // Several hosts (libpq failover).
        assert_eq!(
            redact("postgres://dl:s3cret@10.0.0.1:5432,10.0.0.2:5433/db?target_session_attrs=read-write&password=x"),
            "postgres://dl:***@10.0.0.1:5432,10.0.0.2:5433/db?target_session_attrs=read-write&password=***"
        );
        assert_eq!(redact("postgres://a,b/db"), "postgres://a,b/db");
    }

    #[test]
    fn scheme_decides_backend() {
        assert_eq!(
            Target::parse("sqlite://data/x.db").unwrap(),
            Target::Sqlite(PathBuf::from("data/x.db"))
        );
        assert!(matches!(
            Target::parse("postgresql://h/db").unwrap(),
            Target::Postgres(_)
        ));
        assert!(Target::parse("mysql://h/db").is_err());
    }
}
