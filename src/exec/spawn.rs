//! Starting a task's process without copying the server: `clone(CLONE_VM | CLONE_VFORK)`, the
//! way glibc's `posix_spawn` and Go's `os/exec` start children.
//!
//! `std::process::Command` forks whenever a `pre_exec` hook or a uid is set, and a task needs both
//! (it joins its cgroup and drops to `run_as_user` before `exec`). A fork marks every page of the
//! server copy-on-write, so at a few hundred starts a second the server's own threads spent most of
//! their time in page faults and TLB shootdowns (measured: half of the actor thread's samples in
//! `do_wp_page` at 200 starts/s). Here the child shares the server's memory and the server's
//! thread waits until the child has called `execve` (or failed), so nothing is copied.
//!
//! The child runs on a stack of its own and calls only async-signal-safe functions that are each
//! one system call (`sigaction`, `open`, `write`, `close`, `dup2`, `chdir`, `pthread_sigmask`,
//! `execve`, and `syscall` itself): no allocation, no lock, and never glibc's `setuid`/`setgroups`,
//! which in a process glibc believes multi-threaded would broadcast the change to the server's
//! threads (the ids are changed with raw `syscall`s). Signals are blocked around the clone; the
//! child resets every handler the server installed before unblocking them, right before `execve`.
//! After its `dup2`s it closes every other descriptor (`close_range(3, ~0)`), so nothing the
//! server holds open (a socket between its `socket()` and its `fcntl(FD_CLOEXEC)`) reaches a
//! playbook running as `run_as_user`.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Mutex;

use nix::libc;

/// Stack of the child between `clone` and `execve`.
const CHILD_STACK: usize = 64 * 1024;

/// What to start: a program with arguments, exactly this environment, a working directory,
/// standard output and error to one file, standard input from `/dev/null`.
#[derive(Debug)]
pub struct Spawn {
    program: OsString,
    args: Vec<OsString>,
    env: BTreeMap<OsString, OsString>,
    cwd: PathBuf,
    output: Option<File>,
    join: Vec<CString>,
    ids: Option<(u32, u32)>,
    nice: libc::c_int,
}

/// A started child; [`Child::wait`] reaps it. One dropped before it was reaped (its waiter went
/// away, e.g. a task actor that panicked) is reaped by a thread of its own, as tokio does for its
/// orphans: no zombie is left behind.
#[derive(Debug)]
pub struct Child {
    pid: i32,
    pidfd: Option<OwnedFd>,
    reaped: bool,
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            let pid = self.pid;
            let reaper = std::thread::Builder::new()
                .name("reaper".into())
                .spawn(move || {
                    // Reaped elsewhere (ECHILD) is what a reaper thread is there to prevent; either
                    // way the child is gone and nothing waits for its status.
                    reap(pid).ok();
                });
            if let Err(e) = reaper {
                // No thread to spare: it stays a zombie until this process exits.
                eprintln!("downlink: cannot start a thread to reap process {pid}: {e}");
            }
        }
    }
}

/// The child's steps, as it reports the one that failed (`execve`'s own error is returned as
/// it is, like `Command::spawn`'s).
const STEP_SESSION: i32 = 1;
const STEP_CGROUP: i32 = 2;
const STEP_IDS: i32 = 3;
const STEP_STDIO: i32 = 4;
const STEP_CWD: i32 = 5;
const STEP_EXEC: i32 = 6;
const STEP_FDS: i32 = 7;
const STEP_NICE: i32 = 8;

fn step_name(step: i32) -> Option<&'static str> {
    match step {
        STEP_SESSION => Some("cannot start a session"),
        STEP_CGROUP => Some("cannot join the task's cgroup"),
        STEP_IDS => Some("cannot change to the run_as user"),
        STEP_STDIO => Some("cannot redirect standard input and output"),
        STEP_CWD => Some("cannot enter the run directory"),
        STEP_FDS => Some("cannot close inherited descriptors"),
        STEP_NICE => Some("cannot lower its priority"),
        _ => None,
    }
}

/// Everything the child reads, prepared before the clone; `err` and `step` are written by it.
#[repr(C)]
struct ChildArgs {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    stdin: libc::c_int,
    output: libc::c_int,
    join: *const *const libc::c_char,
    join_len: usize,
    has_ids: bool,
    uid: libc::uid_t,
    gid: libc::gid_t,
    nice: libc::c_int,
    err: libc::c_int,
    step: libc::c_int,
}

impl Spawn {
    pub fn new(program: impl AsRef<OsStr>) -> Spawn {
        Spawn {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: BTreeMap::new(),
            cwd: PathBuf::from("."),
            output: None,
            join: Vec::new(),
            ids: None,
            nice: 0,
        }
    }

    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Spawn {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Sets one variable of the child's environment (which starts empty).
    pub fn env(&mut self, name: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Spawn {
        self.env
            .insert(name.as_ref().to_owned(), value.as_ref().to_owned());
        self
    }

    pub fn envs<K: AsRef<OsStr>, V: AsRef<OsStr>>(
        &mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> &mut Spawn {
        for (k, v) in vars {
            self.env(k, v);
        }
        self
    }

    pub fn current_dir(&mut self, dir: impl AsRef<Path>) -> &mut Spawn {
        self.cwd = dir.as_ref().to_owned();
        self
    }

    /// Standard output and standard error.
    pub fn output(&mut self, file: File) -> &mut Spawn {
        self.output = Some(file);
        self
    }

    /// `cgroup.procs` files the child writes itself into before anything else runs.
    pub fn join(&mut self, files: Vec<CString>) -> &mut Spawn {
        self.join = files;
        self
    }

    /// The user and group the child becomes (after joining its cgroups, while still privileged).
    pub fn run_as(&mut self, uid: u32, gid: u32) -> &mut Spawn {
        self.ids = Some((uid, gid));
        self
    }

    /// The child's nice value (0..=19: it runs at this lower priority, and so does what it starts).
    pub fn nice(&mut self, nice: u8) -> &mut Spawn {
        self.nice = libc::c_int::from(nice.min(19));
        self
    }

    /// The variable as the child will see it.
    pub fn get_env(&self, name: &str) -> Option<&OsStr> {
        self.env.get(OsStr::new(name)).map(OsString::as_os_str)
    }

    /// Starts the child in a session of its own. Returns once it has called `execve`; an error
    /// of any step before (a program that is not found, a cgroup that cannot be joined) is
    /// returned here, as `Command::spawn` would.
    pub fn spawn(&self) -> io::Result<Child> {
        let path = resolve(&self.program, self.get_env("PATH"))?;
        let cstr = |s: &OsStr| {
            CString::new(s.as_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a spawn"))
        };
        let c_path = cstr(path.as_os_str())?;
        let argv: Vec<CString> = std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| cstr(a))
            .collect::<io::Result<_>>()?;
        let envp: Vec<CString> = self
            .env
            .iter()
            .map(|(k, v)| {
                let mut kv = k.clone();
                kv.push("=");
                kv.push(v);
                cstr(&kv)
            })
            .collect::<io::Result<_>>()?;
        let c_cwd = cstr(self.cwd.as_os_str())?;
        let null = |v: &[CString]| -> Vec<*const libc::c_char> {
            v.iter()
                .map(|c| c.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        let (argv_p, envp_p, join_p) = (null(&argv), null(&envp), null(&self.join));
        let stdin = File::open("/dev/null")?;
        let output = self
            .output
            .as_ref()
            .map_or(stdin.as_raw_fd(), |f| f.as_raw_fd());
        let (uid, gid) = self.ids.unwrap_or((0, 0));
        let mut args = ChildArgs {
            path: c_path.as_ptr(),
            argv: argv_p.as_ptr(),
            envp: envp_p.as_ptr(),
            cwd: c_cwd.as_ptr(),
            stdin: stdin.as_raw_fd(),
            output,
            join: join_p.as_ptr(),
            join_len: self.join.len(),
            has_ids: self.ids.is_some(),
            uid,
            gid,
            nice: self.nice,
            err: 0,
            step: 0,
        };
        let mut stack = vec![0u8; CHILD_STACK];
        // Held until the child is known as ours: `procs::reap_orphans` never takes it meanwhile.
        let mut own = OWN.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the child shares this memory and runs `child_main` on `stack`, reading `args`
        // and the CStrings it points to, all alive until `clone` returns: with CLONE_VFORK this
        // thread resumes only once the child has exec'd or exited. Signals are blocked meanwhile
        // so no handler of the server's runs on the child's side.
        let pid = unsafe {
            let top = stack.as_mut_ptr().add(CHILD_STACK);
            let top = top.sub(top as usize % 16);
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            let pid = libc::clone(
                child_main,
                top.cast(),
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                (&mut args as *mut ChildArgs).cast(),
            );
            let clone_err = io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            if pid < 0 {
                return Err(clone_err);
            }
            pid
        };
        own.insert(pid);
        drop(own);
        drop(stack);
        // SAFETY: read after the child is done with `args` (see above).
        let (err, step) = unsafe {
            (
                std::ptr::read_volatile(&args.err),
                std::ptr::read_volatile(&args.step),
            )
        };
        if step != 0 {
            // It exited (127) after reporting; its status says nothing more.
            reap(pid).ok();
            let os = io::Error::from_raw_os_error(err);
            return Err(match step_name(step) {
                Some(what) => io::Error::new(os.kind(), format!("{what}: {os}")),
                None => os,
            });
        }
        // SAFETY: pidfd_open on our own unreaped child; a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, libc::PIDFD_NONBLOCK) };
        let pidfd = (fd >= 0).then(|| {
            // SAFETY: a descriptor we own from here on.
            unsafe { OwnedFd::from_raw_fd(fd as i32) }
        });
        Ok(Child {
            pid,
            pidfd,
            reaped: false,
        })
    }
}

/// The child, between `clone` and `execve`: one-system-call, async-signal-safe functions only.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's ChildArgs, alive and untouched while this runs (CLONE_VFORK).
    unsafe {
        let a = &mut *arg.cast::<ChildArgs>();
        let fail = |a: &mut ChildArgs, step: i32| -> ! {
            std::ptr::write_volatile(&mut a.err, *libc::__errno_location());
            std::ptr::write_volatile(&mut a.step, step);
            libc::_exit(127)
        };
        // Handlers the server installed would run in its memory: back to the defaults (what was
        // ignored stays ignored, except SIGPIPE, which Rust ignores for itself).
        for sig in 1..=libc::SIGRTMAX() {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                && (old.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE)
                && old.sa_sigaction != libc::SIG_DFL
            {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        if libc::syscall(libc::SYS_setsid) < 0 {
            fail(a, STEP_SESSION);
        }
        for i in 0..a.join_len {
            let fd = libc::open(*a.join.add(i), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                fail(a, STEP_CGROUP);
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            if written != 1 {
                fail(a, STEP_CGROUP);
            }
            libc::close(fd);
        }
        // Raising one's own nice value needs no privilege.
        if a.nice > 0 && libc::setpriority(libc::PRIO_PROCESS, 0, a.nice) < 0 {
            fail(a, STEP_NICE);
        }
        if a.has_ids {
            let groups = [a.gid];
            if libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()) < 0
                || libc::syscall(libc::SYS_setresgid, a.gid, a.gid, a.gid) < 0
                || libc::syscall(libc::SYS_setresuid, a.uid, a.uid, a.uid) < 0
            {
                fail(a, STEP_IDS);
            }
        }
        if libc::dup2(a.stdin, 0) < 0 || libc::dup2(a.output, 1) < 0 || libc::dup2(a.output, 2) < 0
        {
            fail(a, STEP_STDIO);
        }
        // Everything else the server had open stays with the server. ENOSYS (a kernel before
        // 5.9): the descriptors the server opens are close-on-exec, which covers all but the race
        // close_range is here for.
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) < 0
            && *libc::__errno_location() != libc::ENOSYS
        {
            fail(a, STEP_FDS);
        }
        if libc::chdir(a.cwd) < 0 {
            fail(a, STEP_CWD);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve(a.path, a.argv, a.envp);
        fail(a, STEP_EXEC)
    }
}

/// The program's path: as given when it names a directory, otherwise the first executable file
/// of that name in the child's `PATH` (as `execvp` would look).
fn resolve(program: &OsStr, path: Option<&OsStr>) -> io::Result<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(program));
    }
    let default = std::env::var_os("PATH");
    let dirs = path
        .or(default.as_deref())
        .unwrap_or(OsStr::new("/usr/bin:/bin"));
    std::env::split_paths(dirs)
        .map(|d| d.join(program))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
}

/// Waits for `pid` (our child) and returns its raw wait status. A child that is no longer ours
/// to wait for (ECHILD: reaped elsewhere) is an error, never a status: its exit is unknown.
/// The children spawned here and not yet reaped: their statuses are their `Child`'s to collect.
static OWN: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// Runs `f` with the set of this process's spawned, not yet reaped children, while no spawn can
/// add one.
pub fn with_own_children<T>(f: impl FnOnce(&BTreeSet<i32>) -> T) -> T {
    f(&OWN.lock().unwrap_or_else(|e| e.into_inner()))
}

fn reap(pid: i32) -> io::Result<i32> {
    wait_pid(pid, 0).map(|status| status.unwrap_or(0))
}

/// `waitpid(pid, flags)`, retried on EINTR: the raw status, or `None` when `WNOHANG` found the
/// child still running.
fn wait_pid(pid: i32, flags: libc::c_int) -> io::Result<Option<i32>> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, flags) };
        if r > 0 {
            OWN.lock().unwrap_or_else(|e| e.into_inner()).remove(&pid);
            return Ok(Some(status));
        }
        if r == 0 {
            return Ok(None);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ECHILD) => {
                return Err(io::Error::other(format!(
                    "process {pid} was reaped elsewhere: its exit status is unknown"
                )))
            }
            _ => return Err(e),
        }
    }
}

impl Child {
    pub fn id(&self) -> i32 {
        self.pid
    }

    /// Sends SIGKILL (the pid is still this child's: it is not reaped before `wait`).
    pub fn kill(&self) -> io::Result<()> {
        if self.reaped {
            return Err(io::Error::other("the child was reaped already"));
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(io::Error::from)
    }

    /// Waits until the child exits (without a thread: its pidfd becomes readable) and reaps it.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let pid = self.pid;
        let status = match self.pidfd.take() {
            Some(fd) => {
                use tokio::io::{unix::AsyncFd, Interest};
                // SAFETY: an OwnedFd, moved into the AsyncFd and closed only when it drops.
                let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                    .map_err(|e| e.into_parts().1)?;
                let _ready = fd.readable().await?;
                self.reaped = true;
                reap(pid)?
            }
            // A kernel without pidfds (before 5.3): a blocking thread waits.
            None => {
                let status = tokio::task::spawn_blocking(move || reap(pid))
                    .await
                    .map_err(io::Error::other)?;
                self.reaped = true;
                status?
            }
        };
        Ok(ExitStatus::from_raw(status))
    }

    /// Waits on this thread until the child exits, and reaps it.
    pub fn wait_blocking(&mut self) -> io::Result<ExitStatus> {
        if self.reaped {
            return Err(io::Error::other("the child was reaped already"));
        }
        self.reaped = true;
        reap(self.pid).map(ExitStatus::from_raw)
    }

    /// The exit status if the child has exited (and reaps it), without waiting.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.reaped {
            return Err(io::Error::other("the child was reaped already"));
        }
        let status = wait_pid(self.pid, libc::WNOHANG).inspect_err(|_| self.reaped = true)?;
        if status.is_some() {
            self.reaped = true;
        }
        Ok(status.map(ExitStatus::from_raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_a_program_with_exactly_its_environment_and_output() {
        let dir = std::env::temp_dir().join(format!("dl-spawn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let mut s = Spawn::new("sh");
        s.arg("-c")
            .arg("echo \"$A $(pwd) $$\"; echo err >&2; exit 3")
            .env("A", "x y")
            .env("PATH", "/usr/bin:/bin")
            .current_dir(&dir)
            .output(File::create(&out).unwrap());
        let mut child = s.spawn().unwrap();
        let pid = child.id();
        let status = child.wait().await.unwrap();
        assert_eq!(status.code(), Some(3));
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text, format!("x y {} {pid}\nerr\n", dir.display()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn reports_a_missing_program_and_a_signal() {
        let err = Spawn::new("/nonexistent/prog").spawn().unwrap_err();
        assert_eq!(err.to_string(), "No such file or directory (os error 2)");
        let err = Spawn::new("no-such-program-here").spawn().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        let mut s = Spawn::new("/bin/sh");
        s.arg("-c").arg("kill -TERM $$");
        let status = s.spawn().unwrap().wait().await.unwrap();
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }

    #[tokio::test]
    async fn a_child_reaped_elsewhere_is_an_error_not_a_success() {
        let mut child = Spawn::new("/bin/true").spawn().unwrap();
        let pid = child.id();
        // Someone else (a stray waitpid(-1)) takes its status first.
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        let err = child.wait().await.unwrap_err();
        assert!(err.to_string().contains("reaped elsewhere"), "{err}");
    }

    #[tokio::test]
    async fn no_descriptor_of_the_server_reaches_the_child() {
        let dir = std::env::temp_dir().join(format!("dl-spawn-fds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A descriptor without close-on-exec, as one is between socket() and fcntl(). Numbered
        // 100 or above: a low one could be the number ls gets for its own directory (the test
        // read fd 3 for 3 once, when the test process had few descriptors open).
        let null = File::open("/dev/null").unwrap();
        // SAFETY: F_DUPFD on our own descriptor gives a new one that we own (no close-on-exec).
        let raw = unsafe { libc::fcntl(null.as_raw_fd(), libc::F_DUPFD, 100) };
        assert!(raw >= 100);
        // SAFETY: `raw` is a fresh descriptor of ours, owned from here on.
        let leaky = unsafe { File::from_raw_fd(raw) };
        let out = dir.join("fds");
        let mut s = Spawn::new("/bin/ls");
        s.arg("/proc/self/fd").output(File::create(&out).unwrap());
        s.spawn().unwrap().wait().await.unwrap();
        let fds: Vec<String> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        // 0, 1, 2 and the one ls opened to read the directory.
        assert!(!fds.contains(&raw.to_string()), "{fds:?}");
        assert!(fds.len() <= 4, "{fds:?}");
        drop(leaky);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cgroup_that_cannot_be_joined_is_an_error_of_its_own() {
        let mut s = Spawn::new("/bin/true");
        s.join(vec![CString::new("/nonexistent/cgroup.procs").unwrap()]);
        let err = s.spawn().unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot join the task's cgroup: No such file"),
            "{err}"
        );
    }
}
