//! The disk under the run directory: how much room it has, which disk it is (for messages that
//! name it), whether a directory on it can still be written, and how much a tree holds. Plain
//! functions over the file system, used by the task (a run directory that cannot be written ends
//! its task), the API (`/api/run` refuses work and `/readyz` says why while the disk is low) and
//! the space budget (`run_dir_max_bytes`).

use std::io::Write;
use std::path::Path;

/// Room on a file system, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// What an unprivileged writer may still use.
    pub free: u64,
    pub total: u64,
}

/// The room on the file system holding `path`.
pub fn space(path: &Path) -> std::io::Result<Space> {
    let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    let unit = st.fragment_size().max(1);
    Ok(Space {
        free: st.blocks_available().saturating_mul(unit),
        total: st.blocks().saturating_mul(unit),
    })
}

/// The disk holding `path`, as an operator finds it: `tmpfs (tmpfs) mounted at /var/tmp/x`.
/// From `/proc/self/mountinfo`: the mount whose point is the longest prefix of the path. Falls
/// back to the path itself when that cannot be read.
pub fn describe(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return format!("the disk holding {}", path.display());
    };
    best_mount(&info, &path)
        .map(|(point, fstype, source)| format!("{source} ({fstype}) mounted at {point}"))
        .unwrap_or_else(|| format!("the disk holding {}", path.display()))
}

/// The mount of `path` in a mountinfo text: (mount point, file-system type, source).
fn best_mount<'a>(info: &'a str, path: &Path) -> Option<(String, &'a str, &'a str)> {
    let mut best: Option<(String, &str, &str)> = None;
    for line in info.lines() {
        // id parent major:minor root point options [optional…] - fstype source super-options
        let mut halves = line.splitn(2, " - ");
        let (Some(head), Some(tail)) = (halves.next(), halves.next()) else {
            continue;
        };
        let Some(point) = head.split(' ').nth(4) else {
            continue;
        };
        let point = unescape(point);
        let mut tail = tail.split(' ');
        let (Some(fstype), Some(source)) = (tail.next(), tail.next()) else {
            continue;
        };
        if !path.starts_with(&point) {
            continue;
        }
        // Later lines are mounted over earlier ones at the same point.
        if best.as_ref().is_none_or(|(b, _, _)| point.len() >= b.len()) {
            best = Some((point, fstype, source));
        }
    }
    best
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Bytes a probe writes: one page, so a file system with no whole block left refuses it.
const PROBE_BYTES: usize = 4096;

/// Whether `dir` can still be written: a page written to a file of its own and synced, then
/// removed. The error is the file system's (`ENOSPC`, `EDQUOT`, `EROFS`, `EIO`…).
pub fn probe(dir: &Path) -> std::io::Result<()> {
    let path = dir.join(".downlink-disk-probe");
    let written = std::fs::File::create(&path).and_then(|mut f| {
        f.write_all(&[0u8; PROBE_BYTES])?;
        f.sync_data()
    });
    // A probe that could not be removed is an error too: the next one would find it.
    let removed = match std::fs::remove_file(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    written.and(removed)
}

/// Whether an I/O error says the disk itself cannot take writes (full, over quota, read-only,
/// failing), rather than something about one file.
pub fn is_disk_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::ENOSPC | nix::libc::EDQUOT | nix::libc::EROFS | nix::libc::EIO)
    )
}

/// Bytes the tree at `path` takes on disk (its blocks; symbolic links are not followed).
/// Entries that vanish or cannot be read while it is walked count as nothing.
pub fn usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks().saturating_mul(512);
    if !meta.is_dir() {
        return own;
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return own;
    };
    entries
        .flatten()
        .map(|e| usage(&e.path()))
        .fold(own, u64::saturating_add)
}

/// `n` bytes for people: `5.2 MB`, `812 KB`, `17 B`.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["KB", "MB", "GB", "TB", "PB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if value < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

/// The run directory's disk as last looked at, for `/api/run` (which refuses work while it is
/// low) and `/readyz`: refreshed every second off the request path, read without a system call.
#[derive(Debug)]
pub struct Watch {
    path: std::path::PathBuf,
    min_free: u64,
    /// Free bytes at the last look; `u64::MAX` before the first or when it could not be read.
    free: std::sync::atomic::AtomicU64,
    /// Which disk it is, found when it first ran low.
    name: std::sync::Mutex<Option<String>>,
}

impl Watch {
    /// A watch of the disk holding `path` that calls it low under `min_free` bytes (0: never).
    pub fn new(path: &Path, min_free: u64) -> Watch {
        Watch {
            path: path.to_owned(),
            min_free,
            free: std::sync::atomic::AtomicU64::new(u64::MAX),
            name: std::sync::Mutex::new(None),
        }
    }

    /// Looks again (a `statvfs`; blocking, so on a blocking thread).
    pub fn refresh(&self) -> std::io::Result<Space> {
        let space = space(&self.path);
        let free = space.as_ref().map_or(u64::MAX, |s| s.free);
        self.free.store(free, std::sync::atomic::Ordering::Relaxed);
        if free < self.min_free {
            if let Ok(mut name) = self.name.lock() {
                name.get_or_insert_with(|| describe(&self.path));
            }
        }
        space
    }

    /// Why new tasks are refused now, if they are: the disk, its free space and the setting.
    pub fn low(&self) -> Option<String> {
        let free = self.free.load(std::sync::atomic::Ordering::Relaxed);
        if free >= self.min_free {
            return None;
        }
        let name = self
            .name
            .lock()
            .ok()
            .and_then(|n| n.clone())
            .unwrap_or_else(|| format!("the disk holding {}", self.path.display()));
        Some(format!(
            "the run directory's disk is low on space: {} free on {name}, under run_dir_min_free_bytes ({}); no tasks are accepted until there is room",
            human(free),
            human(self.min_free)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:25 / /var/tmp rw shared:2 - tmpfs tmpfs rw,size=100k
31 30 0:26 / /var/tmp/run\\040dir rw - tmpfs small rw,size=6m
";

    #[test]
    fn the_longest_mount_point_holds_the_path() {
        let m = |p: &str| {
            best_mount(INFO, Path::new(p)).map(|(p, t, s)| (p, t.to_owned(), s.to_owned()))
        };
        assert_eq!(
            m("/etc/x"),
            Some(("/".into(), "ext4".into(), "/dev/sda1".into()))
        );
        assert_eq!(
            m("/var/tmp/a"),
            Some(("/var/tmp".into(), "tmpfs".into(), "tmpfs".into()))
        );
        assert_eq!(
            m("/var/tmp/run dir/agent/7"),
            Some(("/var/tmp/run dir".into(), "tmpfs".into(), "small".into()))
        );
        // A sibling whose name only starts the same is not under it.
        assert_eq!(m("/var/tmpx").map(|m| m.0), Some("/".into()));
    }

    #[test]
    fn sizes_read_for_people() {
        assert_eq!(human(17), "17 B");
        assert_eq!(human(812_000), "812 KB");
        assert_eq!(human(5_240_000), "5.2 MB");
        assert_eq!(human(104_857_600), "105 MB");
    }

    #[test]
    fn a_probe_leaves_nothing_and_usage_counts_blocks() {
        let dir = std::env::temp_dir().join(format!("downlink-disk-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a")).unwrap();
        std::fs::write(dir.join("a/f"), vec![1u8; 10_000]).unwrap();
        probe(&dir).unwrap();
        assert!(!dir.join(".downlink-disk-probe").exists());
        assert!(usage(&dir) >= 10_000, "{}", usage(&dir));
        assert!(space(&dir).unwrap().total > 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
