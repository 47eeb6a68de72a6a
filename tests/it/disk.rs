//! A full disk: a task whose run directory's disk fills ends failed within 30 s, saying which
//! disk and path, its processes gone here and on its node; while the disk is low, new tasks are
//! refused with a clear message and `/readyz` says why, and both come back by themselves once
//! there is room. With SQLite on that disk, no acknowledged row is lost and recording resumes.
//! The disk is a small tmpfs; the oracle is the machine (statvfs, /proc, the node's processes)
//! and rows read with plain SQL.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::Text;
use serde_json::{json, Value};

use crate::harness::{
    figure, request, run_body, wait_until, Backend, DbView, TaskRow, TestServer, HOSTS,
};

/// A tmpfs of `size` mounted at `path`, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(path: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(path).expect("mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a {size} tmpfs at {} failed (the disk tests need root, as scripts/test runs them): {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(path.to_owned())
    }

    /// Free bytes, by the test's own statvfs.
    fn free(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.0).expect("statvfs");
        st.blocks_available() * st.fragment_size()
    }

    /// Fills what is left with one file; its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        let block = vec![7u8; 65536];
        while f.write_all(&block).is_ok() {}
        f.sync_all().ok();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let done = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
        if !done.is_ok_and(|s| s.success()) {
            eprintln!("cannot unmount the test tmpfs at {}", self.0.display());
        }
    }
}

fn row(view: &DbView, id: i64) -> TaskRow {
    view.rows()
        .into_iter()
        .find(|r| r.id == id)
        .unwrap_or_else(|| panic!("task {id} has no row"))
}

fn readyz(base: &str) -> (u16, Value) {
    let (status, body) = request("GET", &format!("{base}/readyz"), &[], "");
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// A playbook that fills its own run directory's disk from the controller, then waits on the node.
const FILLS_ITS_DISK: &str = r#"- name: fill the run directory's disk
  shell: head -c 100000000 /dev/zero > "{{ playbook_dir }}/fill"; true
  delegate_to: localhost
  vars:
    ansible_connection: local
    ansible_python_interpreter: /usr/bin/python3
- name: wait on the node
  shell: sleep 6741
"#;

#[test]
fn a_full_run_directory_disk_ends_its_task_and_refuses_new_ones() {
    let scratch = crate::harness::TempDir::new();
    let disk = SmallDisk::mount(&scratch.0.join("disk"), "6m");
    let runs = disk.0.join("runs");
    let server = TestServer::start_with(Backend::Postgres, |s| {
        s.run_dir = runs.clone();
        s.run_dir_min_free_bytes = 1_000_000;
    });
    let id = server.run(run_body("fills-its-disk", &[HOSTS[0]], FILLS_ITS_DISK));
    wait_until("the run directory's disk is full", 60, || {
        disk.free() < 65536
    });
    let full_at = Instant::now();
    let ended = server.view.wait_end(id, 40);
    let took = full_at.elapsed();
    let r = row(&server.view, id);
    assert_eq!(r.status, 3, "ended failed: {:?}", r.err);
    let err = r.err.unwrap_or_default();
    let mount = disk.0.canonicalize().unwrap();
    assert!(
        err.contains("No space left on device")
            && err.contains(&format!("mounted at {}", mount.display()))
            && err.contains(&server.run_dir(id).display().to_string()),
        "err names the disk and the path: {err}"
    );
    assert!(
        took <= Duration::from_secs(30),
        "ended {took:?} after the disk filled"
    );
    figure(
        "full disk: from full to the task's end",
        format!("{:.1} s", took.as_secs_f64()),
    );
    assert_eq!(ended.status, 3);
    assert_eq!(
        crate::procwatch::of_task(&server.run_dir(id)),
        Vec::new(),
        "its processes here"
    );
    assert_eq!(
        crate::procwatch::with_token("sleep 6741"),
        Vec::new(),
        "its work on the node"
    );
    let hosts = server.view.hosts(id);
    assert_eq!(hosts.len(), 1);
    assert!(hosts[0].result.is_some(), "its host ended: {:?}", hosts[0]);

    // While the disk is low: refused with the reason, nothing stored, /readyz says why.
    wait_until("/readyz says the disk is low", 5, || {
        readyz(&server.base).0 == 503
    });
    let (_, ready) = readyz(&server.base);
    let why = ready["message"].as_str().unwrap_or_default().to_owned();
    assert!(
        why.contains("low on space") && why.contains("run_dir_min_free_bytes"),
        "{ready}"
    );
    let before = server.view.rows().len();
    let refused = server.call("/api/run", run_body("while-full", &[HOSTS[0]], "- ping:"));
    assert_eq!(refused["code"], -1, "{refused}");
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("low on space") && message.contains(&mount.display().to_string()),
        "{refused}"
    );
    assert_eq!(
        server.view.rows().len(),
        before,
        "a refused task is not stored"
    );

    // Room again: accepted again, without a restart.
    std::fs::remove_file(server.run_dir(id).join("fill")).expect("remove the filler");
    wait_until("/readyz is ready again", 5, || {
        readyz(&server.base).0 == 200
    });
    let later = server.run(run_body("after-room", &[HOSTS[0]], "- ping:"));
    assert_eq!(server.view.wait_end(later, 60).status, 4);
}

#[test]
fn with_sqlite_on_a_full_disk_no_acknowledged_row_is_lost_and_recording_resumes() {
    let scratch = crate::harness::TempDir::new();
    let disk = SmallDisk::mount(&scratch.0.join("disk"), "8m");
    let db_url = format!("sqlite://{}", disk.0.join("downlink.sqlite3").display());
    let runs = disk.0.join("runs");
    let server = TestServer::start_with(Backend::Sqlite, |s| {
        s.database_url = db_url.clone();
        s.run_dir = runs.clone();
        // Refusing at the door would keep every insert away from the full disk; here they try.
        s.run_dir_min_free_bytes = 0;
        s.reconcile_secs = 2;
    });
    let view = DbView::open(&db_url);
    let waiting = server.run(run_body(
        "waits-on-the-node",
        &[HOSTS[1]],
        "- shell: sleep 6752",
    ));
    wait_until("the task runs on its node", 60, || {
        !crate::procwatch::with_token("sleep 6752").is_empty()
    });
    let filler = disk.fill();
    assert!(disk.free() < 65536, "the disk is full");
    // Tasks asked for while the disk is full: each is answered an id (stored) or an error.
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for i in 0..5 {
        let (status, body) = server.post(
            "/api/run",
            &run_body(&format!("asked-while-full-{i}"), &[HOSTS[2]], "- ping:").to_string(),
        );
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).expect("JSON");
        match answer["content"]["id"].as_i64() {
            Some(id) => acknowledged.push(id),
            None => {
                assert_eq!(answer["code"], json!(-1), "{answer}");
                refused += 1;
            }
        }
    }
    // The waiting task meets the full disk too: its processes go, and its end waits for room.
    let dir = server.run_dir(waiting);
    wait_until("the waiting task's processes are gone", 40, || {
        crate::procwatch::of_task(&dir).is_empty()
            && crate::procwatch::with_token("sleep 6752").is_empty()
    });
    std::fs::remove_file(&filler).expect("remove the filler");
    let t = Instant::now();
    let ended = view.wait_end(waiting, 60);
    figure(
        "full disk, SQLite: from room again to the end recorded",
        format!("{:.1} s", t.elapsed().as_secs_f64()),
    );
    assert!(
        [3, 4].contains(&ended.status),
        "the waiting task ends true: {} {:?}",
        ended.status,
        ended.err
    );
    eprintln!(
        "acknowledged {acknowledged:?}, refused {refused}, rows {:?}",
        view.rows()
    );
    for id in &acknowledged {
        let r = view.wait_end(*id, 60);
        assert!(r.status >= 3, "acknowledged task {id} ends");
    }
    let stored: Vec<i64> = view.rows().into_iter().map(|r| r.id).collect();
    for id in acknowledged.iter().chain([&waiting]) {
        assert!(stored.contains(id), "acknowledged task {id} kept its row");
    }
    #[derive(QueryableByName)]
    struct Check {
        #[diesel(sql_type = Text)]
        integrity_check: String,
    }
    let check: Vec<Check> =
        view.read(|c| Ok(diesel::sql_query("PRAGMA integrity_check").load::<Check>(c)?));
    assert_eq!(
        check.first().map(|c| c.integrity_check.as_str()),
        Some("ok")
    );
    figure(
        "full disk, SQLite: tasks asked while full",
        format!("{} stored, {refused} refused", acknowledged.len()),
    );
    // Recording goes on: a task asked now is stored and ends.
    let later = server.run(run_body("after-room", &[HOSTS[2]], "- ping:"));
    assert_eq!(view.wait_end(later, 60).status, 4);
}

/// Bytes under `path` as the test sees them (file sizes; no downlink code).
fn tree_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|d| d.flatten().map(|e| tree_bytes(&e.path())).sum())
        .unwrap_or(0)
}

/// Writes `bytes` into the task's own run directory, then waits on the node for `sleep`.
fn writes_into_its_dir(bytes: u32, sleep: &str) -> String {
    format!(
        r#"- name: write into the run directory
  shell: head -c {bytes} /dev/urandom > "{{{{ playbook_dir }}}}/blob"
  delegate_to: localhost
  vars:
    ansible_connection: local
    ansible_python_interpreter: /usr/bin/python3
- shell: "{sleep}"
"#
    )
}

#[test]
fn run_dir_max_bytes_removes_the_oldest_ended_run_directories_and_never_a_live_one() {
    let server = TestServer::start_with(Backend::Sqlite, |s| {
        s.run_dir_max_bytes = 1_500_000;
        s.run_dir_check_secs = 1;
    });
    let mut ended = Vec::new();
    for i in 0..4 {
        let id = server.run(run_body(
            &format!("blob-{i}"),
            &[HOSTS[0]],
            &writes_into_its_dir(600_000, "true"),
        ));
        let task = server.view.wait_end(id, 60);
        assert_eq!(task.status, 4, "{:?}", task.err);
        ended.push(id);
    }
    let root = server.run_dir(ended[0]).parent().unwrap().to_owned();
    // Four ended directories of 600 KB pass 1.5 MB: the two oldest go, the two newest stay.
    wait_until("the run directories fit in run_dir_max_bytes", 15, || {
        tree_bytes(&root) <= 1_500_000
    });
    let kept: Vec<bool> = ended
        .iter()
        .map(|id| server.run_dir(*id).exists())
        .collect();
    assert_eq!(kept, [false, false, true, true], "oldest first");
    // A running task's directory stays even when it alone passes the budget.
    let live = server.run(run_body(
        "big-and-live",
        &[HOSTS[0]],
        &writes_into_its_dir(2_000_000, "sleep 6763"),
    ));
    wait_until("the live task waits on its node", 60, || {
        !crate::procwatch::with_token("sleep 6763").is_empty()
    });
    wait_until(
        "the ended directories are removed for the live one",
        15,
        || !server.run_dir(ended[2]).exists() && !server.run_dir(ended[3]).exists(),
    );
    assert!(
        server.run_dir(live).join("blob").exists(),
        "the live task's directory stays"
    );
    assert_eq!(server.view.task(live).status, 2);
    server.call("/api/stop", json!({"id": live, "name": "big-and-live"}));
    assert_eq!(server.view.wait_end(live, 30).status, 5);
}
