//! Who may call: bearer tokens, the client allow-list, and the refusal to serve a non-loopback
//! address unprotected.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use diesel::sql_types::{Nullable, Text};
use diesel::{QueryableByName, RunQueryDsl};

use crate::harness::{request, run_body, test_settings, Backend, TempDir, TestServer, HOSTS};
use downlink::api::auth::hash_token;
use downlink::settings::{NamedToken, Role};

const UNAUTHORIZED: &str = "{\"code\":-1,\"message\":\"unauthorized\"}";
const NOT_FOUND: &str = "{\"code\":-1,\"message\":\"task not found...\"}";

#[test]
fn bearer_tokens_are_required_when_configured() {
    let server = TestServer::start_with(Backend::Sqlite, |s| {
        s.auth_token_hashes = vec![hash_token("s3cret"), hash_token("second")];
    });
    let check = json!({"id": 1, "name": "x"}).to_string();
    let h = |auth: Option<&'static str>| {
        let mut v = vec![("X-CORRELATION-ID", "1-1"), ("X-RESOURCE", "orion")];
        if let Some(a) = auth {
            v.push(("Authorization", a));
        }
        v
    };
    assert_eq!(
        server.post_with("/api/check", &h(None), &check),
        (401, UNAUTHORIZED.into())
    );
    assert_eq!(
        server.post_with("/api/check", &h(Some("Bearer wrong")), &check),
        (401, UNAUTHORIZED.into())
    );
    assert_eq!(
        server.post_with("/api/check", &h(Some("s3cret")), &check),
        (401, UNAUTHORIZED.into())
    );
    assert_eq!(
        server.post_with("/api/check", &h(Some("Bearer s3cret")), &check),
        (200, NOT_FOUND.into())
    );
    assert_eq!(
        server.post_with("/api/check", &h(Some("Bearer second")), &check),
        (200, NOT_FOUND.into())
    );
    // A refused run stores nothing.
    let body = run_body("refused", &[HOSTS[0]], "- ping:\n").to_string();
    assert_eq!(
        server.post_with("/api/run", &h(None), &body),
        (401, UNAUTHORIZED.into())
    );
    assert_eq!(server.task_count(), 0);
    // Health stays open.
    assert_eq!(
        request("GET", &format!("{}/healthz", server.base), &[], "").0,
        200
    );
    assert_eq!(
        request("GET", &format!("{}/readyz", server.base), &[], "").0,
        200
    );
}

#[derive(QueryableByName)]
struct WhoAsked {
    #[diesel(sql_type = Nullable<Text>)]
    requested_by: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    requested_via: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    stop_requested_by: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    stop_requested_via: Option<String>,
}

/// Who ran task `id` and who asked to stop it, and through what, as plain SQL reads the row.
pub fn who_asked(server: &TestServer, id: i64) -> [Option<String>; 4] {
    let sql = format!(
        "SELECT requested_by, requested_via, stop_requested_by, stop_requested_via FROM tasks WHERE id = {id}"
    );
    let rows: Vec<WhoAsked> = server
        .view
        .read(move |c| Ok(diesel::sql_query(sql.clone()).load(c)?));
    let w = rows.into_iter().next().expect("the task's row");
    [
        w.requested_by,
        w.requested_via,
        w.stop_requested_by,
        w.stop_requested_via,
    ]
}

/// A read token sees everything (check, getlog, every GET, /metrics) and is refused run,
/// parallel_run and stop with HTTP 403 and a message that says why, leaving the task running; an
/// operate token's name is what the row records as who ran the task and who stopped it, and what
/// `GET /api/tasks/{id}` shows.
#[test]
fn a_read_token_only_looks_and_an_operate_token_is_recorded_by_name() {
    let server = TestServer::start_with(Backend::Postgres, |s| {
        s.auth_tokens = vec![NamedToken {
            name: "orchestrator".into(),
            sha256: hash_token("op-s3cret"),
            role: Role::Operate,
        }];
        s.auth_read_token_hashes = vec![hash_token("look")];
    });
    let (op, look) = ("Bearer op-s3cret", "Bearer look");
    let h = |auth: &'static str| {
        [
            ("X-CORRELATION-ID", "1-1"),
            ("X-RESOURCE", "orion"),
            ("Authorization", auth),
        ]
    };
    let body = run_body("who", &[HOSTS[0]], "- command: sleep 60\n").to_string();
    let (code, text) = server.post_with("/api/run", &h(op), &body);
    assert_eq!(code, 200, "{text}");
    let id = serde_json::from_str::<serde_json::Value>(&text).unwrap()["content"]["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("{text}"));
    server.view.wait_status(id, &[2], 60);

    let forbidden = (
        403,
        "{\"code\":-1,\"message\":\"forbidden: this token may only read; running and stopping tasks need a token with the operate role\"}".to_owned(),
    );
    let other = run_body("sneaky", &[HOSTS[1]], "- ping:\n").to_string();
    assert_eq!(server.post_with("/api/run", &h(look), &other), forbidden);
    assert_eq!(
        server.post_with("/api/parallel_run", &h(look), &other),
        forbidden
    );
    let target = json!({"id": id, "name": "who"}).to_string();
    assert_eq!(server.post_with("/api/stop", &h(look), &target), forbidden);
    assert_eq!(
        server.view.task_count(),
        1,
        "nothing was stored for the read token"
    );
    assert_eq!(server.view.task(id).status, 2, "the task still runs");

    // What it may do.
    let (code, checked) = server.post_with("/api/check", &h(look), &target);
    assert_eq!(code, 200);
    assert!(checked.starts_with("{\"code\":0"), "{checked}");
    assert_eq!(
        server
            .post_with(
                "/api/getlog",
                &h(look),
                &json!({"ip": HOSTS[0]}).to_string()
            )
            .0,
        200
    );
    for path in [
        format!("/api/tasks/{id}"),
        "/api/tasks".into(),
        "/metrics".into(),
    ] {
        let (code, text) = request("GET", &format!("{}{path}", server.base), &h(look), "");
        assert_eq!(code, 200, "{path}: {text}");
    }

    let (code, text) = server.post_with("/api/stop", &h(op), &target);
    assert_eq!((code, text.as_str()), (200, "{\"code\":0,\"content\":{}}"));
    assert_eq!(server.view.task(id).status, 5);
    let named = |s: &str| Some(s.to_owned());
    assert_eq!(
        who_asked(&server, id),
        [
            named("orchestrator"),
            named("api"),
            named("orchestrator"),
            named("api")
        ]
    );
    let (_, shown) = request(
        "GET",
        &format!("{}/api/tasks/{id}", server.base),
        &h(look),
        "",
    );
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["content"]["requested_by"], "orchestrator");
    assert_eq!(shown["content"]["stop_requested_by"], "orchestrator");
    assert_eq!(shown["content"]["stop_requested_via"], "api");
}

#[test]
fn the_allow_list_admits_only_its_networks() {
    let inside = TestServer::start_with(Backend::Sqlite, |s| {
        s.allow_networks = vec!["127.0.0.0/8".parse().unwrap()]
    });
    let check = json!({"id": 1, "name": "x"}).to_string();
    assert_eq!(inside.post("/api/check", &check), (200, NOT_FOUND.into()));
    let outside = TestServer::start_with(Backend::Sqlite, |s| {
        s.allow_networks = vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
    });
    assert_eq!(
        outside.post("/api/check", &check),
        (403, UNAUTHORIZED.into())
    );
    assert_eq!(
        request("GET", &format!("{}/healthz", outside.base), &[], "").0,
        200
    );
}

fn serve_binary(env: &[(&str, &str)]) -> std::process::Child {
    let dir = TempDir::new();
    let settings = test_settings(&dir.0);
    Command::new(env!("CARGO_BIN_EXE_downlink"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "DOWNLINK_DATABASE_URL",
            format!("sqlite://{}/db.sqlite3", dir.0.display()),
        )
        .env("DOWNLINK_RUN_DIR", settings.run_dir)
        .env("DOWNLINK_LOG_FORMAT", "json")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("downlink starts")
}

#[test]
fn a_public_address_needs_protection_or_explicit_consent() {
    let out = serve_binary(&[("DOWNLINK_BIND", "0.0.0.0:0")])
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("downlink: refusing to serve 0.0.0.0:0 without authentication: set auth_token_hashes, auth_token_file or allow_networks, or allow_unauthenticated = true"),
        "{stderr}"
    );
    // With consent it serves, and says so at start.
    let mut child = serve_binary(&[
        ("DOWNLINK_BIND", "0.0.0.0:0"),
        ("DOWNLINK_ALLOW_UNAUTHENTICATED", "true"),
    ]);
    let mut stderr = child.stderr.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = String::new();
    while !seen.contains("\"msg\":\"listening\"") {
        assert!(Instant::now() < deadline, "did not start: {seen}");
        let mut buf = [0u8; 4096];
        let n = std::io::Read::read(&mut stderr, &mut buf).unwrap_or(0);
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        seen.contains("with no authentication (allow_unauthenticated = true)"),
        "{seen}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn https_round_trip_with_a_certificate_made_here() {
    let dir = TempDir::new();
    let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-days",
            "1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is installed (apt-get install openssl)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let server = TestServer::start_with(Backend::Sqlite, |s| {
        s.tls_cert_file = cert.to_string_lossy().into_owned();
        s.tls_key_file = key.to_string_lossy().into_owned();
    });
    let url = server.base.replace("http://", "https://");
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&cert)
        .args(["-H", "X-CORRELATION-ID: 1-1", "-H", "X-RESOURCE: orion"])
        .args(["-d", "{\"id\": 1, \"name\": \"x\"}"])
        .arg(format!("{url}/api/check"))
        .output()
        .expect("curl is installed (apt-get install curl)");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        NOT_FOUND,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Plain HTTP to the TLS port gets no answer of the API.
    let plain = Command::new("curl")
        .args(["-sS", "-m", "5", "-d", "{}"])
        .arg(format!("{}/api/check", server.base))
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("\"code\""));
}

#[test]
fn run_as_runs_the_playbook_as_that_user() {
    let user = std::env::var("DLTEST_RUN_AS_USER")
        .expect("DLTEST_RUN_AS_USER is not set: run scripts/test");
    let ansible = std::env::var("DLTEST_RUN_AS_ANSIBLE")
        .expect("DLTEST_RUN_AS_ANSIBLE is not set: run scripts/test");
    let server = TestServer::start_with(Backend::Sqlite, |s| {
        s.run_as_user = user.clone();
        s.ansible_playbook = ansible;
    });
    let play = "- hosts: all\n  gather_facts: false\n  tasks:\n    - command: whoami\n      delegate_to: localhost\n";
    let id = server.run(run_body("as-runner", &[HOSTS[0]], play));
    let task = server.wait_end(id, 60);
    assert_eq!(task.status, 4, "{task:?}");
    let ran = server
        .events(id)
        .into_iter()
        .find(|e| e.kind == "runner_ok")
        .expect("the command ran");
    let event: serde_json::Value = serde_json::from_str(&ran.payload).unwrap();
    assert_eq!(event["result"]["stdout"], json!(user));
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(server.run_dir(id)).unwrap();
    let uid = nix::unistd::User::from_name(&user)
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o700));
}
