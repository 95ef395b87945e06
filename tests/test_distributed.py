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
