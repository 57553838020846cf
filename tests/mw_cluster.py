"""Runs a two-process `MultiWorkerMirroredStrategy` cluster on 127.0.0.1.

Each worker is a Python script started with `TF_CONFIG` naming its task;
it writes its results to a file. Bounded in time: a worker that does not
finish within `timeout` seconds is killed and reported.
"""

import json
import os
import socket
import subprocess
import sys
import time


def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_workers(script, args, cwd, timeout, workers=2):
    """Runs `script` once per worker with `args(index)`; returns failures.

    Returns:
        A list of messages, one per worker that timed out or exited with an
        error (with the end of its stderr); empty when all succeeded.
    """
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(workers)]}
    procs = []
    for index in range(workers):
        env = dict(os.environ)
        env.update(
            TF_CONFIG=json.dumps({"cluster": cluster,
                                  "task": {"type": "worker", "index": index}}),
            TF_CPP_MIN_LOG_LEVEL="2",
            KERAS_BACKEND="tensorflow",
            CUDA_VISIBLE_DEVICES="-1",
        )
        procs.append(subprocess.Popen(
            [sys.executable, script, *args(index)], env=env, cwd=str(cwd),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    failures = []
    deadline = time.monotonic() + timeout
    try:
        for index, proc in enumerate(procs):
            try:
                _, err = proc.communicate(
                    timeout=max(1.0, deadline - time.monotonic())
                )
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
                failures.append(f"worker {index} timed out after "
                                f"{timeout}s:\n{err[-4000:]}")
                continue
            if proc.returncode != 0:
                failures.append(f"worker {index} exited with {proc.returncode}:\n"
                                f"{err[-4000:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return failures
