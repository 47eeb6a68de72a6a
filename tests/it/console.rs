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
