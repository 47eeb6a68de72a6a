//! The console's pages as a client reads them, through the stable hooks they promise
//! (`tr[data-task-id]` with `[data-field=status]`, `tr[data-host]` with `[data-counter=…]`,
//! `[data-role=output]`), judged against rows read with plain SQL and ansible's own output.

use diesel::sql_types::{BigInt, Integer, Nullable, Text};
use diesel::{QueryableByName, RunQueryDsl};

use crate::harness::{request, run_body, Backend, TestServer, HOSTS, STATUS_NAMES};

fn get(server: &TestServer, path: &str) -> (u16, String) {
    request("GET", &format!("{}{path}", server.base), &[], "")
}

/// Text as the page means it: tags dropped, the escapes askama writes undone.
fn text(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match (c, in_tag) {
            ('<', _) => in_tag = true,
            ('>', true) => in_tag = false,
            (c, false) => out.push(c),
            _ => {}
        }
    }
    unescape(&out)
}

/// `&lt;`, `&#60;`, `&#x3c;` and the like, undone.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let Some(end) = rest.find(';').filter(|e| *e <= 10) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..end];
        let c = match entity {
            "lt" => Some('<'),
            "gt" => Some('>'),
            "amp" => Some('&'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            e => e
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| e.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The inside of each `<tr attr="…">` row, with the attribute's value.
fn rows<'a>(html: &'a str, attr: &str) -> Vec<(String, &'a str)> {
    let start = format!("<tr {attr}=\"");
    html.match_indices(&start)
        .filter_map(|(i, _)| {
            let rest = &html[i + start.len()..];
            let (value, rest) = rest.split_once('"')?;
            let end = rest.find("</tr>")?;
            Some((text(value), &rest[..end]))
        })
        .collect()
}

/// The text of the element of a row that carries `attr="value"`.
fn cell(row: &str, attr: &str, value: &str) -> Option<String> {
    let at = row.find(&format!("{attr}=\"{value}\""))?;
    let rest = &row[at..];
    let open = rest.find('>')? + 1;
    let close = rest.find("</td>").or_else(|| rest.find("</pre>"))?;
    Some(text(&rest[open..close]).trim().to_owned())
}

#[derive(QueryableByName, Debug)]
struct TaskStatus {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Integer)]
    status: i32,
}

fn status_name(code: i32) -> &'static str {
    STATUS_NAMES[code as usize]
}

/// Every task's row shows the status its row holds; a filter keeps only its tasks; names are
/// escaped; 70 tasks are two keyset pages, newest first, each task once.
#[test]
fn the_list_shows_every_task_with_its_status_filters_and_pages() {
    let server = TestServer::start(Backend::Sqlite);
    let ok = server.run(run_body("<i>ok&</i>", &[HOSTS[0]], "- ping:\n"));
    let bad = server.run(run_body("bad", &[HOSTS[1]], "- command: \"false\"\n"));
    server.wait_end(ok, 60);
    server.wait_end(bad, 60);
    // More ended tasks, written with plain SQL as another agent's would be.
    for i in 0..68 {
        let sql = format!(
            "INSERT INTO tasks (name, nodes, remote_user, content, params, fork_num, forks, status, correlation_id, source, created_at, updated_at, events_offset) \
             VALUES ('bulk-{i}', '[\"10.0.0.1\"]', 'root', '- ping:', '{{}}', 1, 1, 4, 'c', 'bulk', '2026-12-01 10:00:00', '2026-12-01 10:00:00', 0)"
        );
        server
            .view
            .read(move |c| Ok(diesel::sql_query(sql.clone()).execute(c)?));
    }

    let res = ureq::get(&format!("{}/ui/", server.base))
        .call()
        .expect("the list");
    assert_eq!(res.content_type(), "text/html");
    let csp = res
        .header("Content-Security-Policy")
        .unwrap_or_default()
        .to_owned();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    let first = res.into_string().unwrap();

    let truth: Vec<TaskStatus> = server
        .view
        .read(|c| Ok(diesel::sql_query("SELECT id, status FROM tasks ORDER BY id DESC").load(c)?));
    assert_eq!(truth.len(), 70);
    // Page one, then the page its "older" link leads to.
    let mut seen = Vec::new();
    let mut page = first.clone();
    loop {
        for (id, row) in rows(&page, "data-task-id") {
            let id: i64 = id.parse().unwrap();
            let want = truth.iter().find(|t| t.id == id).expect("a stored task");
            assert_eq!(
                cell(row, "data-field", "status").as_deref(),
                Some(status_name(want.status)),
                "task {id}"
            );
            seen.push(id);
        }
        let Some(at) = page.find("rel=\"next\" href=\"") else {
            break;
        };
        let href = unescape(page[at + 17..].split('"').next().unwrap());
        let (code, next) = get(&server, &href);
        assert_eq!(code, 200, "{href}");
        page = next;
    }
    assert_eq!(
        seen,
        truth.iter().map(|t| t.id).collect::<Vec<_>>(),
        "newest first, each once"
    );

    let (_, failed) = get(&server, "/ui/?status=failed");
    let ids: Vec<String> = rows(&failed, "data-task-id")
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(ids, [bad.to_string()]);
    let (_, named) = get(&server, "/ui/?name=%3Ci%3E");
    let ids: Vec<String> = rows(&named, "data-task-id")
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(ids, [ok.to_string()], "a name's start");
    assert!(
        text(&named).contains("<i>ok&</i>"),
        "the name is shown as it is"
    );
    assert!(!named.contains("<i>ok"), "and escaped");
    let (_, by_source) = get(&server, "/ui/?source=bulk&status=success");
    assert_eq!(
        rows(&by_source, "data-task-id").len(),
        50,
        "a full first page"
    );

    // The style sheet the pages link is served from here.
    let css = first
        .split("rel=\"stylesheet\" href=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let res = ureq::get(&format!("{}{css}", server.base))
        .call()
        .expect("the css");
    assert_eq!(res.content_type(), "text/css");
    assert!(res
        .into_string()
        .unwrap()
        .contains("prefers-color-scheme: dark"));
}

#[derive(QueryableByName, Debug)]
struct HostCounters {
    #[diesel(sql_type = Text)]
    host: String,
    #[diesel(sql_type = Nullable<Text>)]
    result: Option<String>,
    #[diesel(sql_type = Integer)]
    ok: i32,
    #[diesel(sql_type = Integer)]
    changed: i32,
    #[diesel(sql_type = Integer)]
    failed: i32,
    #[diesel(sql_type = Integer)]
    skipped: i32,
    #[diesel(sql_type = Integer)]
    unreachable: i32,
}

/// A task's page: each host's counters and result are its row's; the output is ansible's own,
/// line for line; one host's output has that host's lines and no other host's.
#[test]
fn a_task_page_shows_each_hosts_counters_and_ansibles_own_output() {
    let server = TestServer::start(Backend::Postgres);
    let play = "- debug:\n    msg: \"item {{ item }}\"\n  loop: [1, 2, 3]\n- command: \"false\"\n  when: inventory_hostname == '127.0.0.3'\n- ping:\n";
    let id = server.run(run_body("page", &HOSTS, play));
    let task = server.wait_end(id, 90);
    assert_eq!(task.status, 3);

    let (code, page) = get(&server, &format!("/ui/tasks/{id}"));
    assert_eq!(code, 200);
    let truth: Vec<HostCounters> = server.view.read(move |c| {
        Ok(diesel::sql_query(format!(
            "SELECT host, result, ok, changed, failed, skipped, unreachable FROM task_hosts WHERE task_id = {id} ORDER BY host"
        ))
        .load(c)?)
    });
    let shown = rows(&page, "data-host");
    assert_eq!(shown.len(), 3);
    for h in &truth {
        let (_, row) = shown
            .iter()
            .find(|(host, _)| *host == h.host)
            .expect("a row per host");
        let counter = |name| cell(row, "data-counter", name).and_then(|v| v.parse::<i32>().ok());
        assert_eq!(
            [
                counter("ok"),
                counter("changed"),
                counter("failed"),
                counter("skipped"),
                counter("unreachable")
            ],
            [
                Some(h.ok),
                Some(h.changed),
                Some(h.failed),
                Some(h.skipped),
                Some(h.unreachable)
            ],
            "{}",
            h.host
        );
        assert_eq!(cell(row, "data-field", "result"), h.result);
    }

    let output = cell(&page, "data-role", "output").expect("the output area");
    let printed = std::fs::read_to_string(server.run_dir(id).join("output.log")).unwrap();
    let lines = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.trim_end().to_owned())
            .collect()
    };
    let (ours, theirs) = (lines(&output), lines(&printed));
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(a, b, "line {i} of ansible's own output");
    }
    assert_eq!(
        ours.len(),
        theirs.len(),
        "ansible's own output: {ours:#?}\n{theirs:#?}"
    );

    let (_, one) = get(&server, &format!("/ui/tasks/{id}?host=127.0.0.3"));
    let output = cell(&one, "data-role", "output").unwrap();
    assert!(output.contains("fatal: [127.0.0.3]"), "{output}");
    assert!(output.contains("TASK [ping]"));
    assert!(
        !output.contains("[127.0.0.2]") && !output.contains("[127.0.0.4]"),
        "{output}"
    );
    assert!(text(&page).contains("local (api)"), "who ran it");
    let (code, missing) = get(&server, "/ui/tasks/999999");
    assert_eq!(code, 404);
    assert!(
        text(&missing).contains("No task has the id 999999"),
        "{missing}"
    );
}

/// An answer of the console: status, the `Location` and `Set-Cookie` headers, the body.
struct Answer {
    status: u16,
    location: String,
    cookie: String,
    body: String,
}

/// A browser's request as far as the console can tell: no redirects followed, the cookie and
/// the `Origin` it is given, a form body when there is one.
fn browse(
    server: &TestServer,
    method: &str,
    path: &str,
    cookie: &str,
    origin: Option<&str>,
    form: Option<&str>,
) -> Answer {
    let agent = ureq::AgentBuilder::new().redirects(0).build();
    let mut req = agent.request(method, &format!("{}{path}", server.base));
    if !cookie.is_empty() {
        req = req.set("Cookie", cookie);
    }
    if let Some(o) = origin {
        req = req.set("Origin", o);
    }
    let res = match form {
        Some(f) => req
            .set("Content-Type", "application/x-www-form-urlencoded")
            .send_string(f),
        None => req.call(),
    };
    let res = match res {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    Answer {
        status: res.status(),
        location: res.header("Location").unwrap_or_default().to_owned(),
        cookie: res.header("Set-Cookie").unwrap_or_default().to_owned(),
        body: res.into_string().unwrap_or_default(),
    }
}

/// The `name=value` of a `Set-Cookie`, to send back.
fn cookie_of(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap_or_default().to_owned()
}

/// The form token a page carries.
fn form_token(page: &str) -> String {
    let at = page
        .find("name=\"form_token\" value=\"")
        .expect("a form token");
    page[at + 25..].split('"').next().unwrap().to_owned()
}

/// With tokens configured: no session, no data; a wrong token, the login again; a read token sees
/// the pages and cannot stop; an operate token stops a running task from its page after a
/// confirmation, recorded as the token's name through the console, and only with the session's
/// form token from this server's own origin; a logout ends the session.
#[test]
fn the_console_logs_in_with_a_token_and_only_an_operate_session_stops() {
    use downlink::api::auth::hash_token;
    let server = TestServer::start_with(Backend::Sqlite, |s| {
        s.auth_tokens = vec![downlink::settings::NamedToken {
            name: "ops".into(),
            sha256: hash_token("ops-s3cret"),
            role: downlink::settings::Role::Operate,
        }];
        s.auth_read_token_hashes = vec![hash_token("look")];
    });
    let auth = [
        ("X-CORRELATION-ID", "1-1"),
        ("X-RESOURCE", "orion"),
        ("Authorization", "Bearer ops-s3cret"),
    ];
    let body = run_body("long", &[HOSTS[0]], "- command: sleep 60\n").to_string();
    let (code, text) = server.post_with("/api/run", &auth, &body);
    assert_eq!(code, 200, "{text}");
    let id: i64 = serde_json::from_str::<serde_json::Value>(&text).unwrap()["content"]["id"]
        .as_i64()
        .unwrap();
    server.wait_status(id, &[2], 60);
    let page = format!("/ui/tasks/{id}");

    // No session: the login, and no data.
    for path in ["/ui/", page.as_str()] {
        let a = browse(&server, "GET", path, "", None, None);
        assert_eq!(
            (a.status, a.location.as_str()),
            (303, "/ui/login"),
            "{path}"
        );
        assert!(!a.body.contains("data-task-id") && !a.body.contains("long"));
    }
    let login = browse(&server, "GET", "/ui/login", "", None, None);
    assert!(login.body.contains("name=\"token\""), "{}", login.body);
    let wrong = browse(&server, "POST", "/ui/login", "", None, Some("token=nope"));
    assert_eq!(wrong.status, 401);
    assert!(wrong.cookie.is_empty() && wrong.body.contains("name=\"token\""));
    assert!(
        browse(
            &server,
            "GET",
            "/ui/",
            "downlink_session=forged",
            None,
            None
        )
        .status
            == 303
    );

    // A read session sees, and cannot stop.
    let read = browse(&server, "POST", "/ui/login", "", None, Some("token=look"));
    assert_eq!((read.status, read.location.as_str()), (303, "/ui/"));
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age="] {
        assert!(read.cookie.contains(attr), "{attr}: {}", read.cookie);
    }
    let reader = cookie_of(&read.cookie);
    let list = browse(&server, "GET", "/ui/", &reader, None, None);
    assert_eq!(list.status, 200);
    assert!(list.body.contains(&format!("data-task-id=\"{id}\"")));
    let shown = browse(&server, "GET", &page, &reader, None, None);
    assert!(
        !shown.body.contains("data-action=\"stop\""),
        "no stop button for a read token"
    );
    let token = form_token(&shown.body);
    let tried = browse(
        &server,
        "POST",
        &format!("{page}/stop"),
        &reader,
        None,
        Some(&format!("form_token={token}")),
    );
    assert_eq!(tried.status, 403);
    assert_eq!(server.view.task(id).status, 2, "still running");

    // An operate session: the button, the confirmation, and a stop only from our own page.
    let op = browse(
        &server,
        "POST",
        "/ui/login",
        "",
        None,
        Some("token=ops-s3cret"),
    );
    let operator = cookie_of(&op.cookie);
    let shown = browse(&server, "GET", &page, &operator, None, None);
    assert!(shown.body.contains("data-action=\"stop\""));
    let confirm = browse(
        &server,
        "GET",
        &format!("{page}/stop"),
        &operator,
        None,
        None,
    );
    assert!(confirm.body.contains("data-action=\"stop\""));
    let token = form_token(&confirm.body);
    let stop = format!("{page}/stop");
    let forged = browse(
        &server,
        "POST",
        &stop,
        &operator,
        None,
        Some("form_token=forged"),
    );
    assert_eq!(forged.status, 403, "another page's form");
    let elsewhere = browse(
        &server,
        "POST",
        &stop,
        &operator,
        Some("http://evil.example"),
        Some(&format!("form_token={token}")),
    );
    assert_eq!(elsewhere.status, 403, "another origin");
    let cookieless = browse(
        &server,
        "POST",
        &stop,
        "",
        Some("http://evil.example"),
        Some(&format!("form_token={token}")),
    );
    assert_eq!(
        cookieless.status, 401,
        "a cross-site post carries no SameSite=Strict cookie"
    );
    assert_eq!(server.view.task(id).status, 2, "none of those stopped it");
    let origin = server.base.clone();
    let done = browse(
        &server,
        "POST",
        &stop,
        &operator,
        Some(&origin),
        Some(&format!("form_token={token}")),
    );
    assert_eq!((done.status, done.location.as_str()), (303, page.as_str()));
    assert_eq!(server.view.task(id).status, 5);
    assert_eq!(
        crate::auth::who_asked(&server, id),
        [
            Some("ops".into()),
            Some("api".into()),
            Some("ops".into()),
            Some("console".into())
        ]
    );
    let after = browse(&server, "GET", &page, &operator, None, None);
    assert!(
        after.body.contains("data-field=\"status\">stopped"),
        "the page says so"
    );

    // Logout ends the session.
    let out = browse(
        &server,
        "POST",
        "/ui/logout",
        &operator,
        Some(&origin),
        Some(&format!("form_token={}", form_token(&after.body))),
    );
    assert_eq!((out.status, out.location.as_str()), (303, "/ui/login"));
    assert_eq!(
        browse(&server, "GET", "/ui/", &operator, None, None).status,
        303
    );
    assert_eq!(
        browse(&server, "GET", "/ui/", &reader, None, None).status,
        200,
        "other sessions go on"
    );
}

#[derive(QueryableByName, Debug)]
struct HostResult {
    #[diesel(sql_type = BigInt)]
    task_id: i64,
    #[diesel(sql_type = Nullable<Text>)]
    result: Option<String>,
    #[diesel(sql_type = Integer)]
    failed: i32,
}

/// A host's page lists every task that ran there, newest first, with the host's result in each,
/// as its rows hold them; a host nothing ran on says so.
#[test]
fn a_hosts_page_lists_every_task_that_ran_there() {
    let server = TestServer::start(Backend::Sqlite);
    let ok = server.run(run_body("here-ok", &[HOSTS[0], HOSTS[1]], "- ping:\n"));
    let bad = server.run(run_body("here-bad", &[HOSTS[0]], "- command: \"false\"\n"));
    let elsewhere = server.run(run_body("elsewhere", &[HOSTS[2]], "- ping:\n"));
    for id in [ok, bad, elsewhere] {
        server.wait_end(id, 60);
    }
    let (code, page) = get(&server, &format!("/ui/hosts/{}", HOSTS[0]));
    assert_eq!(code, 200);
    let sql = format!(
        "SELECT task_id, result, failed FROM task_hosts WHERE host = '{}' ORDER BY task_id DESC",
        HOSTS[0]
    );
    let truth: Vec<HostResult> = server
        .view
        .read(move |c| Ok(diesel::sql_query(sql.clone()).load(c)?));
    let shown = rows(&page, "data-task-id");
    let ids: Vec<i64> = shown.iter().map(|(id, _)| id.parse().unwrap()).collect();
    assert_eq!(ids, truth.iter().map(|t| t.task_id).collect::<Vec<_>>());
    assert_eq!(
        ids,
        [bad, ok],
        "newest first, and not the task of another host"
    );
    for ((_, row), t) in shown.iter().zip(&truth) {
        assert_eq!(cell(row, "data-field", "result"), t.result);
        assert_eq!(
            cell(row, "data-counter", "failed"),
            Some(t.failed.to_string())
        );
    }
    let (_, none) = get(&server, "/ui/hosts/10.9.9.9");
    assert!(rows(&none, "data-task-id").is_empty());
    assert!(text(&none).contains("No task has run on this host."));
}
