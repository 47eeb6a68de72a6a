//! Reads on the HTTP workers' own threads, for PostgreSQL.
//!
//! Through the r2d2 pool, every read crosses to a blocking thread that sleeps while PostgreSQL
//! answers: `perf stat` counted 6.2 context switches per `/api/check` against 1.1 per
//! `pgbench -S` transaction, and that was what held `/api/check` to a third of pgbench's rate.
//! Here each HTTP worker keeps a few tokio-postgres connections of its own, driven by that
//! worker's event loop: a read sends its statement and the worker serves other requests until the
//! answer arrives. The statements are prepared once per connection and written here in SQL (diesel
//! writes a statement's SQL again on every run; diesel-async did the same, at a tenth of the
//! server's CPU).
//!
//! Only for URLs tokio-postgres reads the way libpq does (`sslmode` disable, prefer or require,
//! which libpq does not verify either); any other URL, and SQLite, reads through the pool.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::sync::OnceCell;
use tokio_postgres::config::SslMode;

use crate::store::{HostRow, StoreError, TaskSummary};

/// How long a connect may take unless the URL says (`connect_timeout`): the pool's wait.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One read connection and the statements prepared on it, shared by all the reads of its worker
/// at once: tokio-postgres pipelines their statements, so one wake-up of the PostgreSQL backend
/// often answers several.
pub struct ReadConn {
    client: tokio_postgres::Client,
    task_with_hosts: OnceCell<tokio_postgres::Statement>,
    task_hosts: OnceCell<tokio_postgres::Statement>,
}

impl ReadConn {
    /// `sql`'s statement on this connection, prepared on first use.
    async fn prepared(
        &self,
        cell: &OnceCell<tokio_postgres::Statement>,
        sql: &str,
    ) -> Result<tokio_postgres::Statement, StoreError> {
        cell.get_or_try_init(|| self.client.prepare(sql))
            .await
            .cloned()
            .map_err(unavailable)
    }
}

/// How to open a worker's read connections, shared by all workers.
#[derive(Clone)]
pub struct Readers {
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// How many connections each worker thread holds.
    per_worker: usize,
    statement_timeout: Duration,
}

impl std::fmt::Debug for Readers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readers")
            .field("per_worker", &self.per_worker)
            .finish_non_exhaustive()
    }
}

/// A worker's connection slot: reads that find it empty wait for one connect together.
type Slot = Rc<OnceCell<Rc<ReadConn>>>;

/// One worker thread's connections, taken in turn.
struct Local {
    slots: RefCell<Vec<Slot>>,
    next: Cell<usize>,
}

thread_local! {
    static LOCAL: RefCell<Option<Rc<Local>>> = const { RefCell::new(None) };
}

impl Readers {
    /// Readers for this PostgreSQL URL, or why the pool must serve its reads instead.
    pub fn new(url: &str, per_worker: usize, statement_timeout: Duration) -> Result<Self, String> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("tokio-postgres does not read this URL: {e}"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if !matches!(
            config.get_ssl_mode(),
            SslMode::Disable | SslMode::Prefer | SslMode::Require
        ) {
            return Err("an sslmode other than disable, prefer or require".into());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(LikeLibpq(provider)))
            .with_no_client_auth();
        Ok(Readers {
            config,
            tls: tokio_postgres_rustls::MakeRustlsConnect::new(tls),
            per_worker: per_worker.max(1),
            statement_timeout,
        })
    }

    /// Runs `f` on the next of this thread's connections, connecting it first when it is new or
    /// was lost (a lost one is replaced on the next read).
    pub async fn read<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Rc<ReadConn>) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let local = LOCAL.with(|l| {
            l.borrow_mut()
                .get_or_insert_with(|| {
                    Rc::new(Local {
                        slots: RefCell::new(
                            (0..self.per_worker).map(|_| Slot::default()).collect(),
                        ),
                        next: Cell::new(0),
                    })
                })
                .clone()
        });
        let i = local.next.get() % self.per_worker;
        local.next.set(i + 1);
        let mut slot = local.slots.borrow()[i].clone();
        if slot.get().is_some_and(|c| c.client.is_closed()) {
            // Lost since its last read (the server restarted, say): open another before sending.
            slot = Slot::default();
            local.slots.borrow_mut()[i] = slot.clone();
        }
        let conn = slot.get_or_try_init(|| self.connect()).await?.clone();
        let result = f(conn.clone()).await;
        if conn.client.is_closed() {
            let mut slots = local.slots.borrow_mut();
            if Rc::ptr_eq(&slots[i], &slot) {
                slots[i] = Slot::default();
            }
        }
        result
    }

    /// Listens on `channels` on a connection of its own, calling `on_notify` with the channel of
    /// each notification (and with every channel once it listens again, for what it missed), until
    /// the future is dropped; a lost connection is opened again after a second (and logged).
    pub async fn listen(
        self,
        channels: &'static [&'static str],
        on_notify: impl Fn(&str),
        log: slog::Logger,
    ) {
        let mut lost = false;
        loop {
            match self.config.connect(self.tls.clone()).await {
                Ok((client, mut connection)) => {
                    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
                    // Drives the connection: the LISTEN's answer and every notification.
                    let driver = actix_web::rt::spawn(async move {
                        loop {
                            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                                    if tx.send(n.channel().to_owned()).is_err() {
                                        // Nobody listens any more.
                                        return;
                                    }
                                }
                                Some(Ok(_)) => {}
                                Some(Err(_)) | None => return,
                            }
                        }
                    });
                    let listen: String = channels.iter().map(|c| format!("LISTEN {c};")).collect();
                    if client.batch_execute(&listen).await.is_ok() {
                        if lost {
                            slog::info!(log, "listening for the shared queue's wake-ups again");
                        }
                        lost = false;
                        // Anything sent while not listening.
                        for channel in channels {
                            on_notify(channel);
                        }
                        while let Some(channel) = rx.recv().await {
                            on_notify(&channel);
                        }
                    }
                    driver.abort();
                }
                Err(e) if !lost => {
                    slog::warn!(log, "cannot listen for the shared queue's wake-ups; claiming every second meanwhile"; "error" => %e);
                }
                Err(_) => {}
            }
            if !lost {
                slog::warn!(log, "lost the connection that listens for the shared queue's wake-ups; opening it again");
            }
            lost = true;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn connect(&self) -> Result<Rc<ReadConn>, StoreError> {
        let (client, connection) = self
            .config
            .connect(self.tls.clone())
            .await
            .map_err(unavailable)?;
        // Ends when the client is dropped or the connection fails (the next read then sees it).
        actix_web::rt::spawn(connection);
        client
            .batch_execute(&format!(
                "SET statement_timeout = {}",
                self.statement_timeout.as_millis()
            ))
            .await
            .map_err(unavailable)?;
        Ok(Rc::new(ReadConn {
            client,
            task_with_hosts: OnceCell::new(),
            task_hosts: OnceCell::new(),
        }))
    }
}

fn unavailable(e: tokio_postgres::Error) -> StoreError {
    // A data exception (SQLSTATE class 22: a NUL or a value out of range) is the request's
    // fault, not the database's: retrying cannot help.
    if e.code().is_some_and(|c| c.code().starts_with("22")) {
        return StoreError::Refused(e.to_string());
    }
    // tokio-postgres keeps the cause (the server's message, a column's type) in `source`.
    match std::error::Error::source(&e) {
        Some(cause) => StoreError::Unavailable(format!("{e}: {cause}")),
        None => StoreError::Unavailable(e.to_string()),
    }
}

/// The columns of `HostRow`, in its order, for a table aliased `h`.
macro_rules! host_columns {
    () => {
        "h.id, h.task_id, h.host, h.result, h.ok, h.changed, h.failed, h.unreachable, h.skipped, \
         h.rescued, h.ignored, h.msg, h.correlation_id, h.source, h.created_at, h.ended_at"
    };
}

/// `store::task_with_hosts`'s first statement, in the columns of `TaskSummary` (its hosts are
/// [`TASK_HOSTS`]: a join would repeat `nodes` on every host's row).
const TASK_SUMMARY: &str = "SELECT t.id, t.name, t.nodes, t.status, t.err, t.created_at, \
     t.updated_at, t.started_at, t.ended_at, t.agent FROM tasks t WHERE t.id = $1 AND t.name = $2";

/// `store::task_hosts`'s statement.
const TASK_HOSTS: &str = concat!(
    "SELECT ",
    host_columns!(),
    " FROM task_hosts h WHERE h.task_id = $1 ORDER BY h.id"
);

/// What `store::task_with_hosts` answers, read on a worker's own connection: the task, then its
/// hosts, pipelined on the connection in that order (the hosts are at least as recent).
pub async fn task_with_hosts(
    conn: &ReadConn,
    id: i64,
    name: &str,
) -> Result<Option<(TaskSummary, Vec<HostRow>)>, StoreError> {
    let statement = conn.prepared(&conn.task_with_hosts, TASK_SUMMARY).await?;
    let (rows, hosts) = tokio::try_join!(
        async {
            conn.client
                .query(&statement, &[&id, &name])
                .await
                .map_err(unavailable)
        },
        task_hosts(conn, id),
    )?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let task = TaskSummary {
        id: first.try_get(0).map_err(unavailable)?,
        name: first.try_get(1).map_err(unavailable)?,
        nodes: first.try_get(2).map_err(unavailable)?,
        status: first.try_get(3).map_err(unavailable)?,
        err: first.try_get(4).map_err(unavailable)?,
        created_at: first.try_get(5).map_err(unavailable)?,
        updated_at: first.try_get(6).map_err(unavailable)?,
        started_at: first.try_get(7).map_err(unavailable)?,
        ended_at: first.try_get(8).map_err(unavailable)?,
        agent: first.try_get(9).map_err(unavailable)?,
    };
    Ok(Some((task, hosts)))
}

/// What `store::task_hosts` answers, read on a worker's own connection.
pub async fn task_hosts(conn: &ReadConn, task_id: i64) -> Result<Vec<HostRow>, StoreError> {
    let statement = conn.prepared(&conn.task_hosts, TASK_HOSTS).await?;
    let rows = conn
        .client
        .query(&statement, &[&task_id])
        .await
        .map_err(unavailable)?;
    rows.iter().map(|row| host_row(row, 0)).collect()
}

/// The `HostRow` in `row`'s columns from `at` on (`host_columns!`).
fn host_row(row: &tokio_postgres::Row, at: usize) -> Result<HostRow, StoreError> {
    let get = |i: usize| at + i;
    Ok(HostRow {
        id: row.try_get(get(0)).map_err(unavailable)?,
        task_id: row.try_get(get(1)).map_err(unavailable)?,
        host: row.try_get(get(2)).map_err(unavailable)?,
        result: row.try_get(get(3)).map_err(unavailable)?,
        ok: row.try_get(get(4)).map_err(unavailable)?,
        changed: row.try_get(get(5)).map_err(unavailable)?,
        failed: row.try_get(get(6)).map_err(unavailable)?,
        unreachable: row.try_get(get(7)).map_err(unavailable)?,
        skipped: row.try_get(get(8)).map_err(unavailable)?,
        rescued: row.try_get(get(9)).map_err(unavailable)?,
        ignored: row.try_get(get(10)).map_err(unavailable)?,
        msg: row.try_get(get(11)).map_err(unavailable)?,
        correlation_id: row.try_get(get(12)).map_err(unavailable)?,
        source: row.try_get(get(13)).map_err(unavailable)?,
        created_at: row.try_get(get(14)).map_err(unavailable)?,
        ended_at: row.try_get(get(15)).map_err(unavailable)?,
    })
}

/// Accepts the server's certificate as libpq does for `sslmode` prefer and require (it checks
/// nothing there either), while still checking the handshake's signatures.
#[derive(Debug)]
struct LikeLibpq(Arc<CryptoProvider>);

impl ServerCertVerifier for LikeLibpq {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_libpq_and_tokio_postgres_read_alike_are_taken_others_left_to_the_pool() {
        let timeout = Duration::from_secs(60);
        for url in [
            "postgres://dl:secret@127.0.0.1:5432/downlink",
            "postgresql://dl@db1,db2/downlink?target_session_attrs=read-write",
            "postgres://dl@127.0.0.1/downlink?sslmode=require",
        ] {
            assert!(Readers::new(url, 2, timeout).is_ok(), "{url}");
        }
        let why = Readers::new("postgres://dl@h/db?sslmode=verify-full", 2, timeout)
            .err()
            .unwrap_or_default();
        assert!(
            why.starts_with("tokio-postgres does not read this URL"),
            "{why}"
        );
        let why = Readers::new("postgres://dl@h/db?sslrootcert=/etc/ca.pem", 2, timeout)
            .err()
            .unwrap_or_default();
        assert!(
            why.starts_with("tokio-postgres does not read this URL"),
            "{why}"
        );
    }
}
