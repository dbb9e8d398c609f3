"""What the tests need to start one of their worker scripts in a new process.

TensorFlow fixes its devices, and JAX its host devices, when they start, so
the tests of several devices run their half in a fresh Python process.
"""

import json
import os
import socket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_env(**extra: str) -> dict:
    """This process's environment for a worker on the CPUs, plus `extra`.

    The repository root goes on PYTHONPATH (the workers import `tests`), a
    `TF_CONFIG` of the caller is dropped, and GPUs are hidden so that the
    collectives run on the CPUs on every machine.
    """
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [ROOT, env.get("PYTHONPATH")] if p
    )
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    return env


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports of 127.0.0.1 that were free a moment ago."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports: list[int], index: int) -> str:
    """The `TF_CONFIG` of worker `index` of a cluster on 127.0.0.1:`ports`."""
    return json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": index},
        }
    )
