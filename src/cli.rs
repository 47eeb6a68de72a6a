//! `downlink tasks …`: list, show, watch and stop tasks through the HTTP API of a running agent
//! (any agent, through its auth), never through the database directly.
//!
//! The server is `--server URL` (or `DOWNLINK_SERVER`), by default the `bind` of the settings on
//! loopback. The token is the first line of `--token-file`, or `DOWNLINK_TOKEN`. The binary's
//! command line reads both variables (clap's `env`); this module is handed the values.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::check::HostRecord;
use crate::api::events::{read_line, EventLine, ReadLine};
use crate::api::tasks::{Detail, TaskItem};
use crate::settings::Settings;

/// The API's envelope: `{"code":0,"content":…}` or `{"code":-1,"message":…}`.
#[derive(Deserialize)]
struct Envelope<T> {
    code: i32,
    message: Option<String>,
    content: Option<T>,
}

/// A task as `GET /api/tasks/{id}` answers it.
type Task = Detail<'static>;

/// Environment variables of the CLI. They share the settings' `DOWNLINK_` prefix but are not
/// settings: the binary leaves them out of what it gives the settings loader.
pub const SERVER_VAR: &str = "DOWNLINK_SERVER";
pub const TOKEN_VAR: &str = "DOWNLINK_TOKEN";
/// Both of them.
pub const ENV_VARS: [&str; 2] = [SERVER_VAR, TOKEN_VAR];
/// Most hosts `watch` gives a line of their own; the rest share one.
const MAX_HOST_LINES: usize = 30;
/// How often `watch` opens the stream again (from the last event it saw) before giving up.
const RECONNECTS: u32 = 10;

/// How the CLI reaches the API.
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

/// Where a `downlink tasks` command goes.
pub struct Target {
    pub server: Option<String>,
    /// The token itself (from `DOWNLINK_TOKEN`); `token_file` wins over it.
    pub token: Option<String>,
    pub token_file: Option<std::path::PathBuf>,
    pub ca_file: Option<std::path::PathBuf>,
}

impl Client {
    pub fn new(settings: &Settings, target: &Target) -> anyhow::Result<Client> {
        let base = match &target.server {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => default_server(settings),
        };
        let token = match (&target.token_file, &target.token) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the token file {}", path.display()))?;
                Some(text.lines().next().unwrap_or_default().trim().to_owned())
            }
            (None, Some(token)) => Some(token.trim().to_owned()),
            (None, None) => None,
        }
        .filter(|t| !t.is_empty());
        let mut builder = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(120));
        if let Some(ca) = &target.ca_file {
            builder = builder.tls_config(Arc::new(tls_with_ca(ca)?));
        }
        Ok(Client {
            base,
            token,
            agent: builder.build(),
        })
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let mut req = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set(crate::api::VIA_HEADER, "cli");
        if let Some(token) = &self.token {
            req = req.set("Authorization", &format!("Bearer {token}"));
        }
        req
    }

    /// A GET or POST answered with the API's envelope; its `content`.
    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<T> {
        let req = self.request(method, path);
        let result = match body {
            Some(body) => req
                .set("X-CORRELATION-ID", &format!("cli-{}", std::process::id()))
                .set("X-RESOURCE", "downlink-cli")
                .send_json(body),
            None => req.call(),
        };
        let answer: Envelope<T> = match result {
            Ok(res) => res
                .into_json()
                .context("the answer is not what the API answers")?,
            Err(ureq::Error::Status(code, res)) => {
                let text = res.into_string().unwrap_or_default();
                let message = serde_json::from_str::<Envelope<Value>>(&text)
                    .ok()
                    .and_then(|v| v.message)
                    .unwrap_or(text);
                bail!("{} answered HTTP {code}: {message}", self.base)
            }
            Err(e) => bail!("cannot reach {}: {e}", self.base),
        };
        match answer {
            Envelope {
                code: 0,
                content: Some(content),
                ..
            } => Ok(content),
            Envelope { message, .. } => {
                bail!("{}", message.as_deref().unwrap_or("the server refused"))
            }
        }
    }

    fn task(&self, id: i64) -> anyhow::Result<Task> {
        self.call("GET", &format!("/api/tasks/{id}"), None)
    }
}

/// `http(s)://` the settings' `bind`, an unspecified address replaced by loopback.
fn default_server(settings: &Settings) -> String {
    let scheme = if settings.tls_cert_file.is_empty() {
        "http"
    } else {
        "https"
    };
    let bind = match settings.bind.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => format!("127.0.0.1:{}", a.port()),
        _ => settings.bind.clone(),
    };
    format!("{scheme}://{bind}")
}

fn tls_with_ca(path: &std::path::Path) -> anyhow::Result<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
    {
        roots
            .add(cert.with_context(|| format!("reading {}", path.display()))?)
            .context("a certificate of --ca-file")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// `2026-12-01T16:13:40Z` as `2026-12-01 16:13:40`.
fn shown_time(t: Option<&str>) -> String {
    t.map(|t| t.replace('T', " ").trim_end_matches('Z').to_owned())
        .unwrap_or_else(|| "-".into())
}

/// `downlink tasks list`.
pub fn list(
    client: &Client,
    status: Option<&str>,
    source: Option<&str>,
    limit: u32,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("limit", &limit.to_string());
    if let Some(s) = status {
        query.append_pair("status", s);
    }
    if let Some(s) = source {
        query.append_pair("source", s);
    }
    let tasks: Vec<TaskItem> =
        client.call("GET", &format!("/api/tasks?{}", query.finish()), None)?;
    writeln!(
        out,
        "{:>8}  {:<11}  {:<16}  {:<20}  {:>5}  {:<19}  NAME",
        "ID", "STATUS", "SOURCE", "AGENT", "NODES", "CREATED (UTC)"
    )?;
    for t in &tasks {
        writeln!(
            out,
            "{:>8}  {:<11}  {:<16}  {:<20}  {:>5}  {:<19}  {}",
            t.id,
            t.status_name,
            t.source,
            t.agent.as_deref().unwrap_or("-"),
            t.nodes,
            shown_time(Some(&t.created_time)),
            t.name
        )?;
    }
    Ok(())
}

/// The task's head and its per-host table.
fn print_task(detail: &Task, out: &mut impl Write) -> anyhow::Result<()> {
    let task = &detail.task;
    writeln!(
        out,
        "task {} {:?}: {} ({})",
        task.id, task.name, task.status_name, task.status
    )?;
    writeln!(
        out,
        "source {} · agent {} · {} nodes · created {} · started {} · ended {}",
        task.source,
        task.agent.as_deref().unwrap_or("-"),
        task.nodes,
        shown_time(Some(&task.created_time)),
        shown_time(task.started_time.as_deref()),
        shown_time(task.end_time.as_deref())
    )?;
    if let Some(err) = &task.err {
        writeln!(out, "err: {err}")?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<24}  {:<11}  {:>4}  {:>7}  {:>6}  {:>11}  {:>7}  {:>7}  {:>7}  MSG",
        "HOST", "RESULT", "OK", "CHANGED", "FAILED", "UNREACHABLE", "SKIPPED", "RESCUED", "IGNORED"
    )?;
    for h in &detail.hosts {
        writeln!(
            out,
            "{:<24}  {:<11}  {:>4}  {:>7}  {:>6}  {:>11}  {:>7}  {:>7}  {:>7}  {}",
            h.host,
            h.result,
            h.ok,
            h.changed,
            h.failed,
            h.unreachable,
            h.skipped,
            h.rescued,
            h.ignored,
            h.msg.as_deref().unwrap_or("")
        )?;
    }
    Ok(())
}

/// `downlink tasks show ID`.
pub fn show(client: &Client, id: i64, out: &mut impl Write) -> anyhow::Result<()> {
    print_task(&client.task(id)?, out)
}

/// `downlink tasks stop ID`: answers once the stop is recorded (status 5).
pub fn stop(client: &Client, id: i64, out: &mut impl Write) -> anyhow::Result<()> {
    let name = client.task(id)?.task.name;
    client.call::<Value>("POST", "/api/stop", Some(json!({"id": id, "name": name})))?;
    let task = client.task(id)?.task;
    writeln!(
        out,
        "task {id} {name:?}: {} ({})",
        task.status_name, task.status
    )?;
    Ok(())
}

/// What `watch` counts of one host from its events.
#[derive(Default)]
struct HostProgress {
    ok: u64,
    changed: u64,
    failed: u64,
    unreachable: u64,
    skipped: u64,
    last_task: String,
}

impl HostProgress {
    fn line(&self) -> String {
        format!(
            "ok {:<4} changed {:<3} failed {:<3} unreachable {:<3} skipped {:<3} {}",
            self.ok, self.changed, self.failed, self.unreachable, self.skipped, self.last_task
        )
    }
}

/// The display of `watch`: lines that change in place on a terminal, a log otherwise.
enum Display {
    Terminal(Box<Lines>),
    Plain,
}

/// The terminal's lines: the task's, one per host (the first [`MAX_HOST_LINES`] seen), and one
/// for the rest.
struct Lines {
    multi: MultiProgress,
    style: ProgressStyle,
    head: ProgressBar,
    hosts: BTreeMap<String, ProgressBar>,
    rest: Option<ProgressBar>,
}

impl Lines {
    fn bar(&self, prefix: String, message: String) -> ProgressBar {
        let b = self.multi.add(ProgressBar::new_spinner());
        b.set_style(self.style.clone());
        b.set_prefix(prefix);
        b.set_message(message);
        b.enable_steady_tick(Duration::from_millis(120));
        b
    }

    /// The line of `host`, added if there is room; `None`: it is one of the rest.
    fn host(&mut self, host: &str) -> Option<&ProgressBar> {
        if !self.hosts.contains_key(host) && self.hosts.len() < MAX_HOST_LINES {
            let b = self.bar(host.to_owned(), "waiting".into());
            self.hosts.insert(host.to_owned(), b);
        }
        self.hosts.get(host)
    }
}

impl Display {
    fn new(detail: &Task) -> Display {
        if !std::io::stdout().is_terminal() {
            return Display::Plain;
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let style = ProgressStyle::with_template("{spinner} {prefix:<24} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let head = multi.add(ProgressBar::new_spinner());
        head.set_style(style.clone());
        head.set_prefix(format!("task {}", detail.task.id));
        head.set_message(format!(
            "{:?} {}",
            detail.task.name, detail.task.status_name
        ));
        head.enable_steady_tick(Duration::from_millis(120));
        let mut lines = Lines {
            multi,
            style,
            head,
            hosts: BTreeMap::new(),
            rest: None,
        };
        for h in &detail.hosts {
            lines.host(&h.host);
        }
        Display::Terminal(Box::new(lines))
    }

    fn event(
        &mut self,
        ev: &EventLine,
        progress: &BTreeMap<String, HostProgress>,
        out: &mut impl Write,
    ) -> std::io::Result<()> {
        let host = ev.host.as_deref();
        match self {
            Display::Plain => {
                writeln!(
                    out,
                    "{:>6} {:<20} {:<18} {}",
                    ev.seq,
                    host.unwrap_or("-"),
                    ev.kind,
                    ev.task_name.as_deref().unwrap_or("")
                )?;
            }
            Display::Terminal(lines) => {
                if let Some(name) = ev.task_name.as_deref().filter(|_| host.is_none()) {
                    lines.head.set_message(format!("running · {name}"));
                }
                let Some(h) = host else { return Ok(()) };
                if let Some(bar) = lines.host(h) {
                    if let Some(p) = progress.get(h) {
                        bar.set_message(p.line());
                    }
                    return Ok(());
                }
                let (mut n, mut ok, mut failed, mut unreachable) = (0, 0, 0, 0);
                for (name, p) in progress {
                    if !lines.hosts.contains_key(name) {
                        n += 1;
                        ok += p.ok;
                        failed += p.failed;
                        unreachable += p.unreachable;
                    }
                }
                let message = format!("ok {ok} failed {failed} unreachable {unreachable}");
                match &lines.rest {
                    Some(rest) => {
                        rest.set_prefix(format!("{n} more hosts"));
                        rest.set_message(message);
                    }
                    None => lines.rest = Some(lines.bar(format!("{n} more hosts"), message)),
                }
            }
        }
        Ok(())
    }

    fn end(self, detail: &Task) {
        if let Display::Terminal(mut lines) = self {
            for h in &detail.hosts {
                if let Some(bar) = lines.host(&h.host) {
                    bar.finish_with_message(host_end(h));
                }
            }
            for bar in lines.hosts.values() {
                if !bar.is_finished() {
                    bar.finish();
                }
            }
            if let Some(rest) = &lines.rest {
                rest.finish();
            }
            let task = &detail.task;
            lines.head.finish_with_message(format!(
                "{:?} ended {} ({})",
                task.name, task.status_name, task.status
            ));
            // The finished lines stay on the screen.
            drop(lines);
        }
    }
}

/// A host's last line in `watch`.
fn host_end(h: &HostRecord) -> String {
    format!(
        "{:<11} ok {:<4} changed {:<3} failed {:<3} unreachable {:<3} {}",
        h.result,
        h.ok,
        h.changed,
        h.failed,
        h.unreachable,
        h.msg.as_deref().unwrap_or("")
    )
}

/// What an event counts for its host.
fn count(p: &mut HostProgress, ev: &EventLine) {
    match ev.kind.as_ref() {
        "runner_ok" => {
            p.ok += 1;
            #[derive(Deserialize)]
            struct Changed {
                #[serde(default)]
                changed: bool,
            }
            if serde_json::from_str::<Changed>(ev.payload.get()).is_ok_and(|c| c.changed) {
                p.changed += 1;
            }
        }
        "runner_failed" => p.failed += 1,
        "runner_unreachable" => p.unreachable += 1,
        "runner_skipped" => p.skipped += 1,
        _ => {}
    }
    if let Some(t) = &ev.task_name {
        p.last_task = t.to_string();
    }
}

/// `downlink tasks watch ID`: follows the task's event stream to its end, a line per host with
/// what its events counted, then the task's final per-host table. Answers the final status.
pub fn watch(client: &Client, id: i64, out: &mut impl Write) -> anyhow::Result<i32> {
    let task = client.task(id)?;
    let mut display = Display::new(&task);
    let mut progress: BTreeMap<String, HostProgress> = BTreeMap::new();
    let (mut after, mut failures) = (0i64, 0u32);
    let end = loop {
        let res = client
            .request("GET", &format!("/api/tasks/{id}/events?after={after}"))
            .call();
        let reader = match res {
            Ok(res) => res.into_reader(),
            Err(e) if failures < RECONNECTS => {
                failures += 1;
                if let Display::Plain = display {
                    writeln!(out, "stream lost ({e}); again from event {after}")?;
                }
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            Err(e) => return Err(anyhow!("cannot follow task {id} on {}: {e}", client.base)),
        };
        let mut end = None;
        for line in std::io::BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            // Lines this CLI does not know (a newer server's) are passed over.
            let Some(line) = read_line(&line) else {
                continue;
            };
            match line {
                ReadLine::Event(ev) => {
                    after = i64::from(ev.seq);
                    failures = 0;
                    if let Some(host) = &ev.host {
                        count(progress.entry(host.to_string()).or_default(), &ev);
                    }
                    display.event(&ev, &progress, out)?;
                }
                ReadLine::End(e) => {
                    end = Some(e.status);
                    break;
                }
                ReadLine::KeepAlive => {}
            }
        }
        match end {
            Some(end) => break end,
            None if failures < RECONNECTS => {
                failures += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
            None => bail!("the stream of task {id} keeps ending before the task does"),
        }
    };
    let task = client.task(id)?;
    let terminal = matches!(display, Display::Terminal(_));
    display.end(&task);
    if terminal {
        if let Some(err) = &task.task.err {
            writeln!(out, "err: {err}")?;
        }
    } else {
        print_task(&task, out)?;
    }
    Ok(end)
}
