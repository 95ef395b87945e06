"""torchrun set-up: a single torchrun process joins a process group too (the code path of a multi-GPU job)."""

from __future__ import annotations

import socket

import pytest
import torch.distributed as tdist

from percept_cli import distributed
from percept_cli.errors import BadInputError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_without_torchrun_there_is_no_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    dist = distributed.init("cpu")
    assert (dist.enabled, dist.world, dist.is_main) == (False, 1, True)
    assert distributed.gather(dist, {"a": 1}) == [{"a": 1}]
    assert not tdist.is_initialized()


def test_one_torchrun_process_joins_a_group_and_gathers(monkeypatch):
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    dist = distributed.init("cpu")
    try:
        assert dist.enabled and tdist.is_initialized()
        assert tdist.get_backend() == "gloo" and tdist.get_world_size() == 1
        assert distributed.gather(dist, [1, 2]) == [[1, 2]]  # through all_gather_object
        assert distributed.device_for(dist, "cpu") == "cpu"
    finally:
        distributed.shutdown(dist)
    assert not tdist.is_initialized()


def test_an_explicit_gpu_index_with_several_processes_is_refused(monkeypatch):
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(BadInputError, match="cuda:LOCAL_RANK"):
        distributed.init("CUDA:0")
    assert not tdist.is_initialized()


def test_srun_tasks_are_read_as_ranks():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert distributed.slurm_environment(env) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    # a one-task step, an salloc shell (no SLURM_PROCID), or torchrun's own variables: not a SLURM job
    assert distributed.slurm_environment({**env, "SLURM_NTASKS": "1"}) == {}
    assert distributed.slurm_environment({"SLURM_NTASKS": "8"}) == {}
    assert distributed.slurm_environment({**env, "RANK": "0"}) == {}
    # tasks per node, as torchrun's LOCAL_WORLD_SIZE: 8 tasks on nodes of 3, 3 and 2
    per_node = {**env, "SLURM_STEP_TASKS_PER_NODE": "3(x2),2"}
    assert [distributed.slurm_environment({**per_node, "SLURM_NODEID": n}).get("LOCAL_WORLD_SIZE")
            for n in ("0", "1", "2", "3")] == ["3", "3", "2", None]
    assert "LOCAL_WORLD_SIZE" not in distributed.slurm_environment({**env, "SLURM_TASKS_PER_NODE": "garbled"})


def test_an_srun_task_without_master_addr_is_told_what_to_set(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(BadInputError, match="MASTER_ADDR"):
        distributed.init("cpu")
    assert not tdist.is_initialized()


def test_two_srun_tasks_form_one_group(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "task.py"
    script.write_text("from percept_cli import distributed\n"
                      "d = distributed.init('cpu')\n"
                      "print(d.rank, d.world, distributed.gather(d, d.rank))\n"
                      "distributed.shutdown(d)\n")
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True))
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == ["0 2 [0, 1]", "1 2 [0, 1]"]
