//! Who may call: bearer tokens, the client allow-list, and the refusal to serve a non-loopback
//! address unprotected.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{request, run_body, test_settings, Backend, TempDir, TestServer, HOSTS};
use downlink::api::auth::hash_token;

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
