"""Ranks whose rendezvous port was taken between picking it and binding it (another process's
ranks, beside these under xdist) start again on a new port."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = """
import pickle, socket, sys

from pytest_vram import ranks, user_step
from pytest_vram.meters.host import HostMeter

import rank_body

taken = socket.socket()
taken.bind(("127.0.0.1", 0))
taken.listen()
picked = []
free = ranks._free_port


def pick():
    # The first pick is a port someone else holds by the time rank 0 binds it.
    port = taken.getsockname()[1] if not picked else free()
    picked.append(port)
    return port


ranks._free_port = pick
result = user_step.measure_ranks(
    pickle.dumps((rank_body.group_barrier, (), {})), "ports", HostMeter(), 2, ()
)
print(len(result.ranks), len(picked), picked[0] == taken.getsockname()[1])
"""

BODY = """
def group_barrier():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.barrier()
"""


def test_ranks_start_again_when_their_port_was_taken(tmp_path: Path) -> None:
    (tmp_path / "rank_body.py").write_text(textwrap.dedent(BODY))
    # A fresh process, as the worker's case child: ranks fork from one that has not computed.
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-3:] == ["2", "2", "True"]
