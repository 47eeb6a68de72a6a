# downlink's callback plugin: appends one JSON object per line to the file named by the environment
# variable DOWNLINK_EVENTS_FILE for every playbook, play and task start, every runner result and
# the final stats. downlink follows that file to fill task_hosts and task_events. The file (not a
# pipe) lets a task outlive the server process that started it.
#
# Shipped inside the downlink binary and written to <run_dir>/.plugins/ at start.
from __future__ import annotations

import datetime
import json
import os

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
    name: downlink_events
    type: notification
    short_description: JSON-lines event stream for downlink
    description: Writes one JSON object per event to the file named by DOWNLINK_EVENTS_FILE.
    requirements:
      - enabled through ANSIBLE_CALLBACKS_ENABLED
"""

# Results are cut to this many characters of JSON before they are written.
MAX_RESULT = 16384


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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

    def _emit(self, event, **fields):
        if self._out is None:
            return
        fields["event"] = event
        fields["time"] = _now()
        # One write per line, flushed at once: a reader never sees half an event for long, and
        # nothing is lost if the server (not this process) dies.
        self._out.write(json.dumps(fields, default=str, sort_keys=True) + "\n")
        self._out.flush()

    def _runner(self, event, result, **extra):
        res = result._result if isinstance(result._result, dict) else {}
        body = json.dumps(res, default=str, sort_keys=True)
        if len(body) > MAX_RESULT:
            body = body[:MAX_RESULT] + "...[truncated by downlink]"
        self._emit(
            event,
            host=result._host.get_name(),
            task=result._task.get_name(),
            changed=bool(res.get("changed", False)),
            msg=_message(res) if event in ("runner_failed", "runner_unreachable") else None,
            result=body,
            **extra,
        )

    def v2_playbook_on_start(self, playbook):
        self._emit("playbook_start", playbook=os.path.basename(playbook._file_name))

    def v2_playbook_on_play_start(self, play):
        self._emit("play_start", play=play.get_name())

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._emit("task_start", task=task.get_name())

    def v2_playbook_on_handler_task_start(self, task):
        self._emit("task_start", task=task.get_name(), handler=True)

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
