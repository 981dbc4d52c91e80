"""The gate on sharded gradients, across real processes: CPU, gloo, 2 and 4 ranks.

Each test launches ``tests/dist_worker.py`` once per rank (see its docstring
for what each case checks) under a hard wall-clock limit: a hung collective
kills the ranks and FAILS the test instead of stalling CI.  Every launch packs
many checks, because starting the ranks (imports, init) is most of the cost.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dgg_kernels as dgg

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_worker.py"

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(case: str, world: int, tmp_path: Path, timeout: float) -> list[str]:
    """Run ``case`` on ``world`` ranks; fail with the ranks' logs on an error or past ``timeout`` seconds."""
    env = dict(
        os.environ,
        WORLD_SIZE=str(world),
        DGG_STORE=str(tmp_path / "store"),  # a FileStore: no port to race for
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),  # for libraries that read it; the worker initializes from the file
        TRITON_INTERPRET="1",  # before the worker imports triton
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]),
    )
    logs = [tmp_path / f"rank{r}.log" for r in range(world)]
    procs = []
    for r in range(world):
        with open(logs[r], "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), case], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                stdout=out, stderr=subprocess.STDOUT, cwd=str(HERE.parent), start_new_session=True,
            ))
    deadline = time.monotonic() + timeout
    hung = False
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        hung = True
    finally:
        for p in procs:  # only the ranks started here (each leads its own session)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    texts = [log.read_text(errors="replace") for log in logs]
    ok = [f"RANK {r} OK {case}" in texts[r] for r in range(world)]
    if hung or not all(ok) or any(p.returncode != 0 for p in procs):
        tails = "\n".join(f"--- rank {r} (exit {procs[r].returncode}):\n{t[-4000:]}" for r, t in enumerate(texts))
        why = f"hung past {timeout:.0f}s and was killed" if hung else "failed"
        pytest.fail(f"distributed case {case!r} on {world} ranks {why}\n{tails}", pytrace=False)
    return texts


def test_two_ranks_fsdp2_tp_plain_shards_errors_compile(tmp_path):
    """DTensor Shard(0) and plain shards with process_group (torch and triton backends), FSDP2, TP colwise,
    state_dict, torch.compile, and every bad-input error: on 2 ranks."""
    _launch("main", 2, tmp_path, timeout=180)


def test_four_ranks_fsdp2_x_tp_and_hsdp(tmp_path):
    """FSDP2 x TP on a 2x2 mesh (two gathers, or one over a group), and HSDP (replicas not double counted)."""
    _launch("mesh2d", 4, tmp_path, timeout=240)


def test_two_ranks_trl_fsdp2(tmp_path):
    """DGGGRPOTrainer on an FSDP2-sharded Qwen2, and its rebuild after accelerate-style sharding."""
    for mod in ("trl", "transformers", "accelerate", "datasets", "tokenizers"):
        pytest.importorskip(mod)
    _launch("trl", 2, tmp_path, timeout=240)


# -- single process: what needs no second rank ----------------------------------------------------------------

def test_process_group_without_init_is_refused():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        dgg.DynamicGradientGate(torch.nn.Parameter(torch.zeros(3)), process_group=object())


def test_plain_gate_is_not_sharded():
    w = torch.nn.Parameter(torch.zeros(4, 3))
    gate = dgg.DynamicGradientGate(w)
    assert not gate.sharded and gate._sharding is None and gate._kernels.sharding is None


# -- CUDA + NCCL, world size 1 (runs where a GPU is lent; CI's gloo launches are the multi-rank proof) -----------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_nccl_sharded_step_is_sync_free_and_graph_capturable(tmp_path, backend):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from sequences import bit_equal

    if not dist.is_nccl_available():
        pytest.skip("NCCL unavailable")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dev = torch.device("cuda", 0)
    try:
        dgg.DynamicGradientGate(torch.nn.Parameter(torch.zeros(4, device=dev)), backend=backend)
    except RuntimeError as e:
        pytest.skip(str(e))
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, device_id=dev)
    try:
        mesh = init_device_mesh("cuda", (1,))
        shape = (4099, 64)
        w = torch.nn.Parameter(distribute_tensor(torch.zeros(shape, device=dev), mesh, [Shard(0)]))
        gate = dgg.DynamicGradientGate(w, backend=backend, window=3, threshold=0.2)
        r = torch.nn.Parameter(torch.zeros(shape, device=dev))
        ref = dgg.DynamicGradientGate(r, backend=backend, window=3, threshold=0.2)  # not sharded: fused step
        assert gate.sharded
        gen = torch.Generator(device=dev).manual_seed(0)
        data = [torch.randn(shape, device=dev, generator=gen) * (1 + 4 * (i % 7 == 6)) for i in range(16)]
        w.grad = distribute_tensor(torch.zeros(shape, device=dev), mesh, [Shard(0)], src_data_rank=None)
        local = w.grad.to_local()

        def feed(i):
            local.copy_(data[i])
            r.grad = data[i].clone()

        for i in range(3):  # warm up: the NCCL communicator, kernel compiles
            feed(i)
            gate.step()
            ref.step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(3, 6):
                feed(i)
                gate.step()
                ref.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert bit_equal(gate.state.stats, ref.state.stats)
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=side):
            gate.step()  # captured: does not run now
        for i in range(6, 16):
            feed(i)
            graph.replay()
            ref.step()
            torch.cuda.synchronize()
            for k in ("ring", "ints", "stats", "decision"):
                assert bit_equal(getattr(gate.state, k), getattr(ref.state, k)), (i, k)
            if bool(gate.state.decision):
                assert torch.equal(local, torch.zeros_like(local))
    finally:
        dist.destroy_process_group()
