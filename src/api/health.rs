//! `/healthz` (the process answers) and `/readyz` (the database is reachable, its migrations are
//! applied, `ansible-playbook` runs and the run directory's disk has room) for load balancers and systemd. Both are GET, need no
//! headers and answer in the contract's envelope: 200 when fine, 503 with what is wrong.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::{web, HttpResponse};
use diesel::connection::SimpleConnection;
use serde_json::json;

use crate::api::AppState;
use crate::store::db;

/// How long an `ansible-playbook --version` result is trusted.
const ANSIBLE_CHECK_TTL: Duration = Duration::from_secs(30);

/// The routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz));
}

/// Cached result of running `ansible-playbook --version`.
pub struct Checks {
    ansible_playbook: String,
    ansible: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Checks {
    /// Checks for this `ansible-playbook`.
    pub fn new(ansible_playbook: String) -> Checks {
        Checks {
            ansible_playbook,
            ansible: Mutex::new(None),
        }
    }

    async fn ansible(&self) -> Result<(), String> {
        if let Ok(cache) = self.ansible.lock() {
            if let Some((at, result)) = cache.as_ref() {
                if at.elapsed() < ANSIBLE_CHECK_TTL {
                    return result.clone();
                }
            }
        }
        let run = tokio::process::Command::new(&self.ansible_playbook)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .status();
        let result = match tokio::time::timeout(Duration::from_secs(20), run).await {
            Ok(Ok(st)) if st.success() => Ok(()),
            Ok(Ok(st)) => Err(format!(
                "`{} --version` failed ({st})",
                self.ansible_playbook
            )),
            Ok(Err(e)) => Err(format!("cannot run {}: {e}", self.ansible_playbook)),
            Err(_) => Err(format!(
                "`{} --version` took over 20 s",
                self.ansible_playbook
            )),
        };
        if let Ok(mut cache) = self.ansible.lock() {
            *cache = Some((Instant::now(), result.clone()));
        }
        result
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"code": 0, "content": {"status": "alive"}}))
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let pool = state.pool.clone();
    let database = web::block(move || -> Result<(), String> {
        let mut conn = pool
            .get()
            .map_err(|e| format!("database unreachable: {e}"))?;
        conn.batch_execute("SELECT 1")
            .map_err(|e| format!("database unreachable: {e}"))?;
        match db::has_pending_migrations(&mut conn) {
            Ok(false) => Ok(()),
            Ok(true) => Err("migrations not applied".into()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    let ansible = state.health.ansible().await;
    let closing = *state.closing.borrow();
    let mut problems = Vec::new();
    if let Err(e) = &database {
        problems.push(e.clone());
    }
    if let Err(e) = &ansible {
        problems.push(e.clone());
    }
    if closing {
        problems.push("shutting down".into());
    }
    if let Some(why) = state.disk.low() {
        problems.push(why);
    }
    if problems.is_empty() {
        HttpResponse::Ok().json(json!({"code": 0, "content": {
            "database": "ok", "migrations": "ok", "ansible": "ok",
            "db_writes_repaired": state.db_health.repaired(),
            "process_tracking": state.process_tracking}}))
    } else {
        HttpResponse::ServiceUnavailable().json(json!({
            "code": -1, "message": format!("not ready: {}", problems.join("; "))}))
    }
}
