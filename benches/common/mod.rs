//! What the benchmarks share: cgroups of their own (to measure CPU and to kill whatever a run
//! leaves), a downlink server process started from the built binary, and a pool of client lanes.
// Each bench uses part of this module.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An environment variable the bench scripts set, or a message that says which script does.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run scripts/bench"))
}

/// A cgroup v2 of the bench's own, to measure CPU time and to end what runs in it.
pub struct Cg(pub PathBuf);

impl Cg {
    pub fn new(path: PathBuf) -> Cg {
        std::fs::create_dir_all(&path).unwrap_or_else(|e| {
            panic!(
                "cannot create cgroup {} (the bench needs a writable cgroup v2): {e}",
                path.display()
            )
        });
        Cg(path)
    }

    pub fn cpu_secs(&self) -> f64 {
        let stat = std::fs::read_to_string(self.0.join("cpu.stat")).expect("cpu.stat");
        let usec: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse().ok())
            .expect("usage_usec");
        usec as f64 / 1e6
    }

    /// Makes `cmd`'s process join this cgroup before it runs.
    pub fn join(&self, cmd: &mut Command) {
        let procs = self.0.join("cgroup.procs");
        // SAFETY: a write to cgroupfs between fork and exec; the path was built before the fork.
        unsafe {
            cmd.pre_exec(move || std::fs::write(&procs, "0"));
        }
    }

    /// Kills every process of the cgroup and its descendants, waits until they are gone, and
    /// removes the tree.
    pub fn kill_all(&self) {
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::read_to_string(self.0.join("cgroup.events"))
            .is_ok_and(|e| e.contains("populated 1"))
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        remove_cgroups(&self.0);
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
pub fn v2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .expect("a cgroup2 mount")
}

/// Removes a cgroup tree, children first.
pub fn remove_cgroups(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroups(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Runs `n` jobs `parallel` at a time; the wall time in seconds.
pub fn in_parallel(n: usize, parallel: usize, job: impl Fn(usize) + Sync) -> f64 {
    let t = Instant::now();
    std::thread::scope(|scope| {
        for lane in 0..parallel {
            let job = &job;
            scope.spawn(move || {
                for i in (lane..n).step_by(parallel) {
                    job(i);
                }
            });
        }
    });
    t.elapsed().as_secs_f64()
}

/// A downlink server process in the cgroup `cg` (its own process in `cg/server`, its task cgroups
/// nested under `cg`), working in `work`.
pub struct Downlink {
    pub child: Child,
    pub base: String,
    pub cg: Cg,
}

impl Downlink {
    /// Starts `downlink serve` with these settings (as `DOWNLINK_*` variables) and waits until it
    /// answers `/healthz`.
    pub fn start(work: &Path, cg: Cg, settings: &[(&str, String)]) -> Downlink {
        std::fs::create_dir_all(work).expect("work dir");
        let server_cg = Cg::new(cg.0.join("server"));
        let rel =
            cg.0.strip_prefix(v2_mount())
                .expect("under the mount")
                .to_string_lossy()
                .into_owned();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_downlink"));
        cmd.arg("serve")
            .current_dir(work)
            .env("DOWNLINK_BIND", format!("127.0.0.1:{port}"))
            .env("DOWNLINK_CGROUP_PARENT", rel)
            .env("DOWNLINK_LOG_LEVEL", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (name, value) in settings {
            cmd.env(format!("DOWNLINK_{}", name.to_uppercase()), value);
        }
        server_cg.join(&mut cmd);
        let child = cmd.spawn().expect("downlink starts");
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        while ureq::get(&format!("{base}/healthz")).call().is_err() {
            assert!(Instant::now() < deadline, "downlink did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Downlink { child, base, cg }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// POSTs a JSON body to an endpoint; the answer's text.
    pub fn post(&self, agent: &ureq::Agent, endpoint: &str, body: &serde_json::Value) -> String {
        agent
            .post(&format!("{}{endpoint}", self.base))
            .set("X-CORRELATION-ID", "bench")
            .set("X-RESOURCE", "bench")
            .send_string(&body.to_string())
            .unwrap_or_else(|e| panic!("{endpoint}: {e}"))
            .into_string()
            .expect("body")
    }
}

impl Drop for Downlink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.cg.kill_all();
    }
}
