# downlink's callback plugin: appends one JSON object per line to the file named by the environment
# variable DOWNLINK_EVENTS_FILE for every callback ansible makes (playbook, play and task starts,
# every runner result, loop item, retry, async poll, include, warning, the final stats; the list
# is in docs/events.md). downlink follows that file to fill task_hosts and task_events. The file
# (not a pipe) lets a task outlive the server process that started it.
#
# Each event carries, in `stdout`, the text ansible's stdout callback printed for it: ansible calls
# the stdout callback first, then this one, and every line goes through the one Display of the
# process, so this plugin wraps Display.display and hands what it collected to the next event.
# The terminal output stays exactly as it was, and nothing is formatted twice. (ansible-runner
# does the same, with markers in the output that it parses back.)
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
from ansible.utils.display import Display

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
# A result is an object in the event. One over MAX_RESULT bytes of JSON keeps its keys: values
# longer than this are cut (a value that is not a string becomes the start of its JSON text),
# then the largest are dropped, and `_downlink_truncated` says so.
MAX_VALUE = MAX_RESULT // 8


def _bounded(value, limit=MAX_FIELD):
    if value is None:
        return None
    value = str(value)
    if len(value) > limit:
        return value[:limit] + TRUNCATED
    return value


def _fit_result(res):
    """The result, an object of at most about MAX_RESULT bytes of JSON (see MAX_VALUE)."""
    body = json.dumps(res, default=str, sort_keys=True)
    if len(body) <= MAX_RESULT:
        return res
    cut = {}
    sizes = {}
    for key, value in res.items():
        key = str(key)
        text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
        if len(text) > MAX_VALUE:
            value = text[:MAX_VALUE] + TRUNCATED
        cut[key] = value
        sizes[key] = len(json.dumps(value, default=str))
    dropped = []
    total = sum(sizes.values()) + 4 * len(sizes)
    for key in sorted(sizes, key=lambda k: -sizes[k]):
        if total <= MAX_RESULT - 512:
            break
        total -= sizes[key]
        del cut[key]
        dropped.append(key)
    cut["_downlink_truncated"] = {"bytes": len(body), "dropped": sorted(dropped)}
    return cut


class _Printed:
    """What ansible printed since the last event: Display.display of this process, wrapped."""

    def __init__(self):
        self._lines = []
        self._lock = threading.Lock()
        display = Display()
        original = display.display
        main = os.getpid()

        def display_and_keep(msg, *args, **kwargs):
            # In a worker (a fork) the text goes to the main process, and is kept there.
            log_only = kwargs.get("log_only", args[3] if len(args) > 3 else False)
            if not log_only and os.getpid() == main:
                with self._lock:
                    self._lines.append(str(msg))
            return original(msg, *args, **kwargs)

        display.display = display_and_keep

    def take(self):
        with self._lock:
            lines, self._lines = self._lines, []
        if not lines:
            return None
        return _bounded("\n".join(line.rstrip("\n") for line in lines), MAX_RESULT)


def _parts(result):
    """(result dict, host name, task) of a runner result, ansible 2.19's names or older ones."""
    try:
        res, host, task = result.result, result.host, result.task
    except AttributeError:
        res, host, task = result._result, result._host, result._task
    return (res if isinstance(res, dict) else {}), host.get_name(), task


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
        # Warnings proxied from ansible's workers are shown on a thread of their own.
        self._lock = threading.RLock()
        self._printed = _Printed() if self._out else None
        self._wrap_warnings()

    def _wrap_warnings(self):
        """Every warning and deprecation ansible shows becomes an event (with its text)."""
        if self._out is None:
            return
        display = Display()
        main = os.getpid()
        # ansible-core 2.19 shows them through _warning and _deprecated; older ones through
        # warning and deprecated.
        for kind, names in (("warning", ("_warning", "warning")), ("deprecation", ("_deprecated", "deprecated"))):
            name = next((n for n in names if hasattr(display, n)), None)
            if name is None:
                continue
            original = getattr(display, name)

            def shown(*args, _original=original, _kind=kind, **kwargs):
                if os.getpid() != main:
                    # A worker (a fork): its warnings are shown, and become events, in the main
                    # process, which the worker's display sends them to.
                    return _original(*args, **kwargs)
                with self._lock:
                    before = self._printed.take()
                    result = _original(*args, **kwargs)
                    text = self._printed.take()
                    if text:
                        printed = "\n".join(t for t in (before, text) if t)
                        self._emit(_kind, msg=_bounded(text), printed=printed)
                    elif before:
                        # Not shown (a duplicate, or disabled): what came before stays for the next event.
                        self._printed._lines.insert(0, before)
                return result

            setattr(display, name, shown)

    def _emit(self, event, printed=None, **fields):
        if self._out is None:
            return
        with self._lock:
            self._emit_locked(event, printed, fields)

    def _emit_locked(self, event, printed, fields):
        fields["event"] = event
        fields["time"] = _now()
        text = self._printed.take() if self._printed else None
        if printed or text:
            fields["stdout"] = "\n".join(t for t in (printed, text) if t)
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
        res, host, task = _parts(result)
        failed = event in ("runner_failed", "runner_unreachable", "runner_item_failed", "runner_async_failed")
        self._emit(
            event,
            host=_bounded(host),
            task=_bounded(task.get_name()),
            changed=bool(res.get("changed", False)),
            msg=_bounded(_message(res)) if failed else None,
            result=_fit_result(res),
            **extra,
        )

    def _item(self, event, result):
        res, _, _ = _parts(result)
        label = res.get("_ansible_item_label", res.get("item"))
        self._runner(event, result, item=_bounded(json.dumps(label, default=str, sort_keys=True)))

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

    def v2_runner_on_start(self, host, task):
        self._emit("runner_start", host=_bounded(host.get_name()), task=_bounded(task.get_name()))

    def v2_runner_item_on_ok(self, result):
        self._item("runner_item_ok", result)

    def v2_runner_item_on_failed(self, result):
        self._item("runner_item_failed", result)

    def v2_runner_item_on_skipped(self, result):
        self._item("runner_item_skipped", result)

    def v2_runner_retry(self, result):
        res, _, _ = _parts(result)
        self._runner("runner_retry", result, attempts=res.get("attempts"), retries=res.get("retries"))

    def v2_runner_on_async_poll(self, result):
        self._runner("runner_async_poll", result)

    def v2_runner_on_async_ok(self, result):
        self._runner("runner_async_ok", result)

    def v2_runner_on_async_failed(self, result):
        self._runner("runner_async_failed", result)

    def v2_playbook_on_include(self, included_file):
        for host in included_file._hosts:
            self._emit(
                "include", host=_bounded(host.get_name()), file=_bounded(included_file._filename),
            )

    def v2_playbook_on_no_hosts_matched(self):
        self._emit("no_hosts_matched")

    def v2_playbook_on_no_hosts_remaining(self):
        self._emit("no_hosts_remaining")

    def v2_playbook_on_notify(self, handler, host):
        self._emit("handler_notified", host=_bounded(host.get_name()), handler=_bounded(handler.get_name()))

    def v2_on_file_diff(self, result):
        _, host, task = _parts(result)
        self._emit("diff", host=_bounded(host), task=_bounded(task.get_name()))

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
