#!/usr/bin/env python3
# A scripted stand-in for ansible-playbook, for tests that need exact bytes in events.jsonl and
# output.log (the behaviour behind them is proven with the real ansible-playbook elsewhere).
# It reads what to do from the task's params (extra_vars.json in its working directory):
#   standin_lines_b64   list of base64 chunks appended, in order, to $DOWNLINK_EVENTS_FILE
#   standin_output_b64  base64 bytes written to standard output (output.log)
#   standin_generate    {"count": N, "host": H}: then N runner_ok events of host H (task names t1..tN)
#   standin_sleep       seconds to sleep before exiting
#   standin_exit        exit code
import base64
import json
import os
import sys
import time

with open("extra_vars.json", encoding="utf-8") as f:
    spec = json.load(f)
with open(os.environ["DOWNLINK_EVENTS_FILE"], "ab") as out:
    for chunk in spec.get("standin_lines_b64", []):
        out.write(base64.b64decode(chunk))
        out.flush()
    generate = spec.get("standin_generate")
    if generate:
        host = json.dumps(generate["host"])
        for i in range(1, int(generate["count"]) + 1):
            out.write(f'{{"event":"runner_ok","host":{host},"task":"t{i}"}}\n'.encode())
        out.flush()
sys.stdout.buffer.write(base64.b64decode(spec.get("standin_output_b64", "")))
sys.stdout.flush()
time.sleep(float(spec.get("standin_sleep", 0)))
sys.exit(int(spec.get("standin_exit", 0)))
