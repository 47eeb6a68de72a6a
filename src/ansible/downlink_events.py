# downlink's callback plugin: appends one JSON object per line to the file named by the environment
# variable DOWNLINK_EVENTS_FILE for every playbook, play and task start, every runner result and
# the final stats. downlink follows that file to fill task_hosts and task_events. The file (not a
# pipe) lets a task outlive the server process that started it.
#
# With DOWNLINK_LEASE_FILE set (shared_queue), it also runs the task's watchdog: a thread of this
# ansible-playbook process that ends the whole run once the agent's lease file (touched at every
# heartbeat the agent renews) is older than DOWNLINK_LEASE_SECS. A frozen agent (SIGSTOP, a paused
# VM) cannot stop its tasks itself, and other agents will soon declare them lost: the run ends here
# first, so nothing of it goes on after another agent has recorded it as interrupted.
#
# Shipped inside the downlink binary and written to <run_dir>/.plugins/ at start.
from __future__ import annotations

import datetime
import json
import os
import signal
import threading
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
    name: downlink_events
    type: notification
    short_description: JSON-lines event stream for downlink
    description: Writes one JSON object per event to the file named by DOWNLINK_EVENTS_FILE.
    requirements:
      - enabled through ANSIBLE_CALLBACKS_ENABLED
"""

# Results are cut to this many characters of JSON before they are written; names and messages
# to MAX_FIELD, so no line of the file grows with what a node prints.
MAX_RESULT = 16384
MAX_FIELD = 4096
TRUNCATED = "...[truncated by downlink]"


def _bounded(value, limit=MAX_FIELD):
    if value is None:
        return None
    value = str(value)
    if len(value) > limit:
        return value[:limit] + TRUNCATED
    return value


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _kill_the_run():
    """Kills every process of this run. ansible's workers each lead a session of their own
    (WorkerProcess._detach), so neither this process group nor this process's children are the
    whole run: its cgroup is (DOWNLINK_TASK_CGROUP, when downlink made one and this user may kill
    it), else every process whose environment carries this run's DOWNLINK_TASK_MARK."""
    cgroup = os.environ.get("DOWNLINK_TASK_CGROUP")
    if cgroup:
        try:
            with open(os.path.join(cgroup, "cgroup.kill"), "w", encoding="ascii") as k:
                k.write("1")
            return
        except OSError:
            pass
    mark = os.environ.get("DOWNLINK_TASK_MARK")
    if mark:
        needle = ("DOWNLINK_TASK_MARK=%s\0" % mark).encode()
        me = os.getpid()
        # Twice: a process forked while the first pass ran is caught by the second.
        for _ in range(2):
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) == me:
                    continue
                try:
                    with open("/proc/%s/environ" % pid, "rb") as f:
                        if needle in f.read() + b"\0":
                            os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    continue
    os.kill(os.getpid(), signal.SIGKILL)


def _watchdog(lease_file, lease_secs, fenced_file):
    """Ends the run once the agent's lease is older than lease_secs (see the top of the file)."""
    while True:
        time.sleep(0.5)
        try:
            age = time.time() - os.stat(lease_file).st_mtime
        except OSError:
            # No lease to judge by (the agent has not written one): nothing to do.
            continue
        if age <= lease_secs:
            continue
        reason = (
            "the agent renewed no heartbeat for %.0f s (frozen, or cut off from its database), so "
            "the task's watchdog ended it before another agent could declare it lost" % age
        )
        try:
            with open(fenced_file, "w", encoding="utf-8") as f:
                f.write(reason + "\n")
        except OSError:
            pass
        _kill_the_run()
        return


def _start_watchdog(events_path):
    lease_file = os.environ.get("DOWNLINK_LEASE_FILE")
    if not lease_file or not events_path:
        return
    try:
        lease_secs = float(os.environ.get("DOWNLINK_LEASE_SECS", ""))
    except ValueError:
        return
    fenced_file = os.path.join(os.path.dirname(events_path), "fenced")
    threading.Thread(
        target=_watchdog, args=(lease_file, lease_secs, fenced_file), name="downlink-watchdog",
        daemon=True,
    ).start()


def _message(result):
    """The first thing that says why a result failed."""
    for key in ("msg", "stderr", "reason", "exception"):
        value = result.get(key)
        if value:
            return str(value)
    if result.get("rc") not in (None, 0):
        return "non-zero return code %s" % result.get("rc")
    return None


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "downlink_events"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        path = os.environ.get("DOWNLINK_EVENTS_FILE")
        self._out = open(path, "a", encoding="utf-8") if path else None
        # Past this size only the final stats are written; the rest is counted (one marker).
        try:
            self._max_bytes = int(os.environ.get("DOWNLINK_EVENTS_MAX_BYTES", "0"))
        except ValueError:
            self._max_bytes = 0
        self._written = self._out.tell() if self._out else 0
        _start_watchdog(path)
        self._dropped = 0
        self._dropped_bytes = 0

    def _emit(self, event, **fields):
        if self._out is None:
            return
        fields["event"] = event
        fields["time"] = _now()
        # ensure_ascii: the file stays ASCII whatever a node printed (an undecodable byte becomes a
        # \udcXX escape, which downlink repairs; it never fails to encode here).
        line = json.dumps(fields, default=str, sort_keys=True) + "\n"
        if self._max_bytes and self._written + len(line) > self._max_bytes and event != "stats":
            self._dropped += 1
            self._dropped_bytes += len(line)
            return
        if event == "stats" and self._dropped:
            marker = json.dumps({
                "event": "events_file_limit", "time": fields["time"], "dropped": self._dropped,
                "dropped_bytes": self._dropped_bytes, "max_bytes": self._max_bytes,
            }, sort_keys=True) + "\n"
            line = marker + line
        # One write per line, flushed at once: a reader never sees half an event for long, and
        # nothing is lost if the server (not this process) dies.
        self._out.write(line)
        self._out.flush()
        self._written += len(line)

    def _runner(self, event, result, **extra):
        res = result._result if isinstance(result._result, dict) else {}
        body = json.dumps(res, default=str, sort_keys=True)
        if len(body) > MAX_RESULT:
            body = body[:MAX_RESULT] + "...[truncated by downlink]"
        self._emit(
            event,
            host=_bounded(result._host.get_name()),
            task=_bounded(result._task.get_name()),
            changed=bool(res.get("changed", False)),
            msg=_bounded(_message(res)) if event in ("runner_failed", "runner_unreachable") else None,
            result=body,
            **extra,
        )

    def v2_playbook_on_start(self, playbook):
        self._emit("playbook_start", playbook=os.path.basename(playbook._file_name))

    def v2_playbook_on_play_start(self, play):
        self._mark_remote(play)
        self._emit("play_start", play=_bounded(play.get_name()))

    @staticmethod
    def _mark_remote(play):
        """Adds DOWNLINK_TASK=<mark> to the play's environment, so every process the task starts on
        a node carries it (through become too) and a stop can find it there. The blocks of a play
        keep the play they were loaded with, not the copy this callback gets: mark both. The mark
        is appended to whatever environment the play had; nothing else of the play changes."""
        mark = os.environ.get("DOWNLINK_REMOTE_MARK")
        if not mark:
            return
        plays = {id(play): play}
        for block in list(play.pre_tasks) + list(play.tasks) + list(play.post_tasks) + list(play.handlers):
            parent = getattr(block, "_play", None)
            if parent is not None:
                plays[id(parent)] = parent
        for p in plays.values():
            env = p.environment
            if not env:
                env = []
            elif not isinstance(env, list):
                env = [env]
            p.environment = env + [{"DOWNLINK_TASK": mark}]

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._emit("task_start", task=_bounded(task.get_name()))

    def v2_playbook_on_handler_task_start(self, task):
        self._emit("task_start", task=_bounded(task.get_name()), handler=True)

    def v2_runner_on_ok(self, result):
        self._runner("runner_ok", result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._runner("runner_failed", result, ignore_errors=bool(ignore_errors))

    def v2_runner_on_unreachable(self, result):
        self._runner("runner_unreachable", result)

    def v2_runner_on_skipped(self, result):
        self._runner("runner_skipped", result)

    def v2_playbook_on_stats(self, stats):
        hosts = {}
        for host in sorted(stats.processed.keys()):
            s = stats.summarize(host)
            hosts[host] = {
                "ok": s.get("ok", 0),
                "changed": s.get("changed", 0),
                "failed": s.get("failures", 0),
                "unreachable": s.get("unreachable", 0),
                "skipped": s.get("skipped", 0),
                "rescued": s.get("rescued", 0),
                "ignored": s.get("ignored", 0),
            }
        self._emit("stats", hosts=hosts)
