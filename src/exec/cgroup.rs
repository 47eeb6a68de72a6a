//! A task is a cgroup: every process it starts, however it detaches (new sessions, double forks,
//! SSH ControlPersist masters that rewrite their own environment), stays in the cgroup v2 its
//! `ansible-playbook` joined before `exec`, so it is found and killed without guessing.
//!
//! The hierarchy is found in `/proc/self/mountinfo` (`cgroup2`: `/sys/fs/cgroup` on a unified
//! host, `/sys/fs/cgroup/unified` on a hybrid one). Task cgroups live under
//! `<mount>/<cgroup_parent>/<agent_name>/<task id>`; with `cgroup_parent = ""` the parent is the
//! agent's own cgroup when it runs under systemd with `Delegate=yes` (`…/downlink.service`), else
//! `downlink` at the top. CPU time comes from `cpu.stat`; peak memory from `memory.peak` where the
//! v2 memory controller is on, or, on a hybrid host whose memory controller is still on v1, from a
//! v1 memory cgroup of the same name joined at the same time (`memory.max_usage_in_bytes`).
//!
//! A task is also one entity to the CPU scheduler, weighted `task_cpu_weight` (`cpu.weight`; on a
//! hybrid host `cpu.shares` of a v1 cpu cgroup of the same name). Without it, each of ansible's
//! workers, which lead sessions of their own, is an autogroup as heavy as the whole agent
//! (`kernel.sched_autogroup_enabled`, on by default): on a saturated machine the agent's API then
//! waited 50-120 ms for a CPU, whatever the tasks' nice value (measured in bench W300).
//!
//! Blocking (it reads and writes cgroupfs): call it off the async threads.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};

pub use crate::store::Usage;
use nix::unistd::Pid;

/// Where task cgroups are made, once found writable.
#[derive(Debug, Clone)]
pub struct Cgroups {
    /// `<mount>/<parent>/<agent>`: the task cgroups' parent.
    base: PathBuf,
    /// The same place in a v1 memory hierarchy, for peak memory on a hybrid host.
    memory_v1: Option<PathBuf>,
    /// How a task cgroup gets its CPU weight.
    cpu: CpuWeight,
}

/// Where a task's CPU weight is written.
#[derive(Debug, Clone)]
enum CpuWeight {
    /// `cpu.weight` of the task cgroup itself (the v2 cpu controller is on).
    V2(u16),
    /// `cpu.shares` of a v1 cpu cgroup of the same name under this directory.
    V1(PathBuf, u16),
    /// No cpu controller to use.
    None,
}

/// The cgroup of one task.
#[derive(Debug, Clone)]
pub struct TaskCgroup {
    pub path: PathBuf,
    memory_v1: Option<PathBuf>,
    cpu_v1: Option<PathBuf>,
}

/// The `cgroup2` mount point, from a mountinfo text.
fn v2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// A v1 hierarchy with this controller (`memory`, `cpu`), from a mountinfo text.
fn v1_mount(mountinfo: &str, controller: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut r = right.split_whitespace();
        let fstype = r.next()?;
        let options = r.nth(1)?;
        (fstype == "cgroup" && options.split(',').any(|o| o == controller))
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// This process's cgroup path in the v2 hierarchy (`0::/path`).
fn own_v2_path(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::").map(str::to_owned))
}

/// This process's cgroup path in the v1 hierarchy of this controller.
fn own_v1_path(proc_cgroup: &str, controller: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_owned())
    })
}

/// `cpu.shares` (v1, 1024 by default) for a `cpu.weight` (v2, 100 by default).
fn shares_of(weight: u16) -> u32 {
    (u32::from(weight) * 1024 / 100).max(2)
}

/// Makes `dir` (and its parents) in a v1 hierarchy; `None` when it cannot.
fn v1_dir(mount: &Path, own: Option<String>, delegated: bool, agent: &str) -> Option<PathBuf> {
    let rel = own.filter(|_| !delegated).unwrap_or_default();
    let dir = under(mount, &rel).join("downlink-tasks").join(agent);
    fs::create_dir_all(&dir).ok().map(|_| dir)
}

/// Makes a directory that may already be there (an adopted task's).
fn ensure_dir(path: &Path) -> io::Result<()> {
    match fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

fn under(mount: &Path, cgroup_path: &str) -> PathBuf {
    mount.join(cgroup_path.trim_start_matches('/'))
}

impl Cgroups {
    /// Finds a writable cgroup v2 hierarchy and makes the agent's parent in it; why not, if none.
    /// Each task is weighted `cpu_weight` (1-10000, as `cpu.weight`) against the agent's 100.
    pub fn detect(parent: &str, agent: &str, cpu_weight: u16) -> Result<Cgroups, String> {
        // Test builds only: an agent named `fallback-…` behaves as on a host without cgroup v2.
        fail::fail_point!("cgroup-detect", agent.starts_with("fallback-"), |_| Err(
            "disabled by the test fail point cgroup-detect".to_owned()
        ));
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let mount = v2_mount(&mountinfo).ok_or("no cgroup2 file system is mounted")?;
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let own_v2 = own_v2_path(&own);
        // Under systemd with Delegate=yes the unit's own cgroup is ours to divide.
        let delegated = own_v2
            .as_deref()
            .filter(|p| p.ends_with(".service") && parent.is_empty());
        let rel = match delegated {
            Some(own) => format!("{own}/tasks"),
            None if parent.is_empty() => "downlink".to_owned(),
            None => parent.trim_matches('/').to_owned(),
        };
        let base = under(&mount, &rel).join(agent);
        fs::create_dir_all(&base)
            .map_err(|e| format!("cannot create cgroup {}: {e}", base.display()))?;
        // Probe: a task cgroup must be creatable and joinable.
        let probe = base.join(format!(".probe-{}", std::process::id()));
        fs::create_dir(&probe)
            .and_then(|_| fs::remove_dir(&probe))
            .map_err(|e| format!("cannot create a task cgroup under {}: {e}", base.display()))?;
        // Memory and CPU controllers for the task cgroups, where the hierarchy offers them.
        for dir in [base.parent().unwrap_or(&base), &base] {
            // Best effort: what the hierarchy really offers is read right below.
            fs::write(dir.join("cgroup.subtree_control"), "+memory +cpu").ok();
        }
        let offered = fs::read_to_string(base.join("cgroup.subtree_control")).unwrap_or_default();
        let v2_has = |controller: &str| offered.split_whitespace().any(|c| c == controller);
        let v1 = |controller: &str| {
            let mount = v1_mount(&mountinfo, controller)?;
            let own = own_v1_path(&own, controller);
            v1_dir(&mount, own, delegated.is_some(), agent)
        };
        let memory_v1 = if v2_has("memory") { None } else { v1("memory") };
        let cpu = if v2_has("cpu") {
            CpuWeight::V2(cpu_weight)
        } else {
            match v1("cpu") {
                Some(dir) => CpuWeight::V1(dir, cpu_weight),
                None => CpuWeight::None,
            }
        };
        Ok(Cgroups {
            base,
            memory_v1,
            cpu,
        })
    }

    /// A description for the start-up log and `/readyz`.
    pub fn describe(&self) -> String {
        let memory = match &self.memory_v1 {
            None => String::new(),
            Some(m) => format!("; peak memory from the v1 memory cgroup {}", m.display()),
        };
        let cpu = match &self.cpu {
            CpuWeight::V2(w) => format!("; each task at cpu.weight {w}"),
            CpuWeight::V1(dir, w) => format!(
                "; each task at cpu.shares {} in the v1 cpu cgroup {}",
                shares_of(*w),
                dir.display()
            ),
            CpuWeight::None => {
                "; no cpu controller, so task_cpu_weight is not applied (each of ansible's \
                 sessions competes with the agent for the CPU as an equal)"
                    .to_owned()
            }
        };
        format!("cgroup v2 under {}{memory}{cpu}", self.base.display())
    }

    /// The cgroup of task `id`, created if it does not exist (it does for an adopted task).
    pub fn task(&self, id: i64) -> io::Result<TaskCgroup> {
        let path = self.base.join(id.to_string());
        ensure_dir(&path)?;
        let memory_v1 = self.memory_v1.as_ref().and_then(|m| {
            let dir = m.join(id.to_string());
            ensure_dir(&dir).ok().map(|_| dir)
        });
        // A weight that cannot be written leaves the task at the default weight: it still runs,
        // and is still tracked and killed by its v2 cgroup.
        let cpu_v1 = match &self.cpu {
            CpuWeight::V2(w) => {
                fs::write(path.join("cpu.weight"), w.to_string()).ok();
                None
            }
            CpuWeight::V1(m, w) => {
                let dir = m.join(id.to_string());
                ensure_dir(&dir)
                    .and_then(|_| fs::write(dir.join("cpu.shares"), shares_of(*w).to_string()))
                    .ok()
                    .map(|_| dir)
            }
            CpuWeight::None => None,
        };
        Ok(TaskCgroup {
            path,
            memory_v1,
            cpu_v1,
        })
    }
}

impl TaskCgroup {
    /// The `cgroup.procs` files a child writes `0` into before `exec`, to join the task.
    pub fn join_files(&self) -> Vec<CString> {
        std::iter::once(self.path.join("cgroup.procs"))
            .chain(self.memory_v1.iter().map(|m| m.join("cgroup.procs")))
            .chain(self.cpu_v1.iter().map(|m| m.join("cgroup.procs")))
            .filter_map(|p| CString::new(p.as_os_str().as_bytes()).ok())
            .collect()
    }

    /// Pids of the processes in the cgroup now.
    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Sends `signal` to every process of the task.
    pub fn signal(&self, signal: Signal) {
        for pid in self.pids() {
            // ESRCH: it ended meanwhile, which is what the caller wants.
            kill(Pid::from_raw(pid), signal).ok();
        }
    }

    /// Kills every process of the task at once (`cgroup.kill`, or SIGKILL to each where the
    /// kernel has no `cgroup.kill`).
    pub fn kill(&self) {
        if fs::write(self.path.join("cgroup.kill"), "1").is_err() {
            self.signal(Signal::SIGKILL);
        }
    }

    /// Whether any process is still in the cgroup (`cgroup.events`: `populated`).
    pub fn populated(&self) -> bool {
        match fs::read_to_string(self.path.join("cgroup.events")) {
            Ok(events) => events.lines().any(|l| l == "populated 1"),
            Err(_) => !self.pids().is_empty(),
        }
    }

    /// Kills what is left and waits until the cgroup is empty (at most `limit`): whether it is,
    /// and every pid seen in it meanwhile (for the caller to reap those that became its children).
    pub fn empty(&self, limit: Duration) -> (bool, Vec<i32>) {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            if !self.populated() {
                return (true, seen);
            }
            seen.extend(self.pids());
            self.kill();
            if Instant::now() >= deadline {
                return (false, seen);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What the cgroup measured.
    pub fn usage(&self) -> Usage {
        let cpu_usec = fs::read_to_string(self.path.join("cpu.stat"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse().ok())
            });
        let memory_peak_bytes = fs::read_to_string(self.path.join("memory.peak"))
            .ok()
            .or_else(|| {
                self.memory_v1
                    .as_ref()
                    .and_then(|m| fs::read_to_string(m.join("memory.max_usage_in_bytes")).ok())
            })
            .and_then(|v| v.trim().parse().ok());
        Usage {
            cpu_usec,
            memory_peak_bytes,
        }
    }

    /// Removes the (empty) cgroup. The page cache its processes left charged to it (the run
    /// directory's files) is reclaimed first: otherwise the kernel keeps every removed memory
    /// cgroup as a "dying" one until those pages go (measured: 6,000 tasks left about 490 dying
    /// memory cgroups without this, about 14 with it).
    /// An error says which cgroup is left behind.
    pub fn remove(&self) -> std::io::Result<()> {
        let reclaim = self.path.join("memory.reclaim");
        if let Ok(current) = fs::read_to_string(self.path.join("memory.current")) {
            // Best effort (kernels before 5.19 have no memory.reclaim): only a cost if it fails.
            fs::write(reclaim, current.trim()).ok();
        }
        let removed = fs::remove_dir(&self.path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", self.path.display())));
        if let Some(m) = &self.memory_v1 {
            fs::write(m.join("memory.force_empty"), "0").ok();
            fs::remove_dir(m)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", m.display())))?;
        }
        if let Some(c) = &self.cpu_v1 {
            fs::remove_dir(c)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", c.display())))?;
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
44 31 0:41 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
45 31 0:42 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
";

    #[test]
    fn finds_the_hierarchies_and_own_paths() {
        assert_eq!(
            v2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            v1_mount(HYBRID, "memory"),
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
        assert_eq!(
            v1_mount(HYBRID, "cpu"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(v1_mount(HYBRID, "cpuset"), None);
        let own = "4:memory:/process_api/x\n2:cpu,cpuacct:/y\n0::/system.slice/downlink.service\n";
        assert_eq!(
            own_v2_path(own).as_deref(),
            Some("/system.slice/downlink.service")
        );
        assert_eq!(
            own_v1_path(own, "memory").as_deref(),
            Some("/process_api/x")
        );
        assert_eq!(own_v1_path(own, "cpu").as_deref(), Some("/y"));
        assert_eq!(own_v1_path(own, "blkio"), None);
    }

    #[test]
    fn a_weight_becomes_shares_in_proportion() {
        assert_eq!(shares_of(100), 1024);
        assert_eq!(shares_of(10), 102);
        assert_eq!(shares_of(1), 10);
        assert_eq!(shares_of(10000), 102400);
    }
}
