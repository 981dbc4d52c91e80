"""CPU smoke tests of the benchmarks: both scripts run in --quick CPU mode and write well-formed results.

No timing assertions: CPU numbers on a shared CI machine mean nothing.  What is
checked is that every implementation has a row, each row is either measured or
says why not, the goals are stated (and 'not measured' without a GPU), and the
host-read counts separate the peers that read the host from the gate.  The
scripts write into pytest's tmp_path (--out) and nothing into the checkout;
their default folder lies outside it, and --help documents every flag.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common as C  # noqa: E402
from benchmarks import peers as P  # noqa: E402

import dgg_kernels as dgg  # noqa: E402

GOAL_STATUSES = {"met", "missed", "not measured"}


# Folders of the checkout the scripts have no business writing to (or that
# change on their own: git, caches, the venv), skipped when looking for output.
_NOT_OUTPUT = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist", ".whl"}


def _result_files_in_checkout(name: str) -> dict[Path, int]:
    """Files named like a result of benchmark ``name`` anywhere in the checkout, with their mtimes."""
    found = {}
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in _NOT_OUTPUT and not d.endswith(".egg-info")]
        for f in files:
            if f.startswith(f"{name}_"):
                path = Path(root) / f
                found[path] = path.stat().st_mtime_ns
    return found


def _run(script: str, out_dir: Path) -> dict:
    name = script.removesuffix(".py")
    before = _result_files_in_checkout(name)
    # DGG_BENCH_OUT points elsewhere on purpose: --out must win over it.
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO), DGG_BENCH_OUT=str(out_dir / "not-here"))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick", "--device", "cpu",
                           "--out", str(out_dir)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert _result_files_in_checkout(name) == before, "the benchmark wrote (or rewrote) results in the checkout"
    assert not (out_dir / "not-here").exists()
    assert str(out_dir.resolve()) in proc.stderr  # the user is told where the files are
    jsons = sorted(out_dir.glob(f"{name}_cpu_*.json"))
    assert len(jsons) == 1, f"expected one {name}_cpu_<date>.json in {list(out_dir.iterdir())}"
    md = jsons[0].with_suffix(".md")
    assert md.exists()
    return {"json": json.loads(jsons[0].read_text()), "md": md.read_text(), "stdout": proc.stdout,
            "png": jsons[0].with_suffix(".png")}


@pytest.fixture(scope="module")
def overhead(tmp_path_factory):
    return _run("overhead.py", tmp_path_factory.mktemp("overhead"))


@pytest.fixture(scope="module")
def train_step(tmp_path_factory):
    return _run("train_step.py", tmp_path_factory.mktemp("train_step"))


def _check_stamp(stamp: dict):
    for key in ("device", "date", "torch", "triton", "mode", "dgg_kernels"):
        assert key in stamp, key
    assert stamp["device_type"] == "cpu"
    assert stamp["torch"] == torch.__version__


def _check_goals(goals: list):
    assert goals
    for g in goals:
        assert set(g) == {"goal", "target", "status", "detail"}
        assert g["status"] in GOAL_STATUSES
        # Without a GPU no goal can be judged, and each says so.
        assert g["status"] == "not measured" and C.NOT_MEASURED_CPU in g["detail"]


@pytest.mark.triton  # expects the dgg triton rows to be measured
def test_overhead_results_are_well_formed(overhead):
    data = overhead["json"]
    _check_stamp(data["stamp"])
    _check_goals(data["goals"])
    assert data["read_GBps"] > 0
    rows = data["rows"]
    names = {i.name for i in P.IMPLS}
    assert {r["impl"] for r in rows} == names
    cases = {(r["case"], r["dtype"]) for r in rows}
    assert {d for _, d in cases} == {"float32", "bfloat16"}
    assert len(rows) == len(cases) * len(names)  # every implementation has a row for every case
    for r in rows:
        assert r["MB"] > 0 and r["status"]
        if r["status"] == "ok":
            assert r["ms"] > 0 and r["GBps"] > 0 and r["pct_floor"] > 0
            assert isinstance(r["host_syncs"], int)
        else:
            assert r["ms"] is None and r["status"].startswith(("n/a", "skipped", "error")), r
    ok = {r["impl"] for r in rows if r["status"] == "ok"}
    for must in ("vector_norm (bound)", "hand-written dgg", "olmo-style skip", "dgg torch", "dgg triton"):
        assert must in ok, must
    assert not [r for r in rows if r["status"].startswith("error")], [r for r in rows if r["status"].startswith("error")]
    cuda = [r for r in rows if r["impl"] == "dgg cuda"]
    assert all(r["status"].startswith("n/a") for r in cuda)


def test_overhead_host_reads_separate_gate_from_peers(overhead):
    rows = [r for r in overhead["json"]["rows"] if r["status"] == "ok"]
    for r in rows:
        if r["kind"] == "dgg":
            assert r["host_syncs"] == 0, r  # the gate never reads the host in step()
        if r["impl"] in ("hand-written dgg", "zclip"):
            assert r["host_syncs"] >= 1, r  # they read the norm every step


def test_overhead_zclip_row(overhead):
    rows = [r for r in overhead["json"]["rows"] if r["impl"] == "zclip"]
    if importlib.util.find_spec("zclip") is None:
        assert all("zclip" in r["status"] for r in rows)
    else:
        assert all(r["status"] == "ok" for r in rows)


@pytest.mark.triton  # expects the dgg triton rows to be measured
def test_overhead_mask_rows_and_files(overhead):
    masks = overhead["json"]["mask_rows"]
    assert {m["gate"] for m in masks} == {"open", "closed"}
    assert all(m["tensors"] == 339 for m in masks)
    assert any(m["impl"] == "dgg triton" and m["gate"] == "open" and m["status"] == "ok" for m in masks)
    md = overhead["md"]
    assert "CPU MODE" in md and "## Goals" in md and "## Mask cost" in md
    assert "| goal |" in overhead["stdout"]  # the table also goes to stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert overhead["png"].exists() and overhead["png"].stat().st_size > 0


def test_train_step_results_are_well_formed(train_step):
    data = train_step["json"]
    _check_stamp(data["stamp"])
    _check_goals(data["goals"])
    eager = {r["arm"]: r for r in data["rows"] if r["variant"] == "eager"}
    for must in ("no gate", "dgg torch open", "dgg torch open +overlap", "dgg torch closed", "zclip",
                 "clip_grad_norm_ foreach", "hand-written dgg"):
        assert must in eager, must
    for name in ("no gate", "dgg torch open", "dgg torch open +overlap", "dgg torch closed",
                 "clip_grad_norm_ foreach", "hand-written dgg"):
        r = eager[name]
        assert r["status"] == "ok", r
        assert r["step_ms"] > 0 and r["rounds"] >= 1
        if name != "no gate":  # per-round overhead with its 95% bootstrap interval, in ms and %
            for key in ("overhead_ms", "overhead_pct"):
                lo, hi = r[f"{key}_ci"]
                assert lo <= r[key] <= hi, (name, key, r[key], lo, hi)
            assert "[" in r["overhead_ms_str"] and "[" in r["overhead_pct_str"]
    # forced open never closes; forced closed closes every step once its window is full
    assert eager["dgg torch open"]["closed_steps"] == 0 and eager["dgg torch open +overlap"]["closed_steps"] == 0
    assert eager["dgg torch closed"]["closed_steps"] >= data["setup"]["rounds"] * data["setup"]["steps_per_round"]
    # Extra host reads per step over the no-gate baseline: 0 for the gate, >= 1 for the hand-written DGG.
    base = eager["no gate"]["host_syncs"]
    assert eager["dgg torch open"]["host_syncs"] == base
    assert eager["hand-written dgg"]["host_syncs"] >= base + 1
    graph = [r for r in data["rows"] if r["variant"] != "eager"]
    assert {r["variant"] for r in graph} == {"cuda graph", "cuda graph +overlap"}
    assert all(r["status"] == C.NOT_MEASURED_CPU for r in graph)
    assert [i["backend"] for i in data["isolated"]] == ["torch"] and data["isolated"][0]["isolated_ms"] > 0
    assert {m["variant"] for m in data["memory"]} == {"eager", "cuda graph", "cuda graph +overlap"}
    assert "CPU MODE" in train_step["md"] and "95% CI" in train_step["md"]
    assert "built-in" in data["setup"]["model"] or "transformers" in data["setup"]["model"]


def test_bootstrap_interval():
    xs = [1.0, 2.0, 3.0, 4.0, 100.0]
    lo, hi = C.bootstrap_ci(xs)
    assert lo <= 3.0 <= hi and hi <= 100.0
    assert C.bootstrap_ci(xs) == (lo, hi)  # fixed seed: the same interval every run
    assert C.bootstrap_ci([2.5]) == (2.5, 2.5)
    narrow = C.bootstrap_ci([1.0 + 0.001 * i for i in range(40)])
    assert narrow[1] - narrow[0] < 0.02


@pytest.fixture(scope="module")
def host_time(tmp_path_factory):
    return _run("host_time.py", tmp_path_factory.mktemp("host_time"))


@pytest.mark.triton  # expects the dgg triton row to be measured
def test_host_time_results_are_well_formed(host_time):
    data = host_time["json"]
    _check_stamp(data["stamp"])
    _check_goals(data["goals"])
    rows = {r["row"]: r for r in data["rows"]}
    assert data["setup"]["tensors"] == 339
    for name in ("dgg torch step() open", "dgg triton step() open", "clip_grad_norm_ foreach", "AdamW fused step"):
        r = rows[name]
        assert r["status"] == "ok" and r["host_us"] > 0 and r["calls"] >= 5, r
    assert rows["dgg triton step() open"]["host_syncs"] == 0 and rows["dgg torch step() open"]["host_syncs"] == 0
    assert "CPU MODE" in host_time["md"] and "not comparable" in data["label"]


def test_sweep_triton_quick_smoke(tmp_path):
    if not importlib.util.find_spec("triton"):
        pytest.skip("triton not installed")
    data = _run("sweep_triton.py", tmp_path)["json"]
    assert data["energies_agree"] is True
    ok = [r for r in data["rows"] if r.get("status") == "ok"]
    assert {r["dtype"] for r in ok} == {"bfloat16", "float32"} and len(ok) == 4
    assert all(b["status"] == "ok" for b in data["best"])


def test_make_auto_table_from_the_committed_h100_run(tmp_path):
    from benchmarks import make_auto_table as M
    from dgg_kernels.backends import auto

    src = REPO / "benchmarks" / "results" / "overhead_nvidia-h100-80gb-hbm3_2026-11-23.json"
    if not src.exists():
        pytest.skip("the committed H100 overhead json is not in this checkout")
    out = tmp_path / "auto_table.py"
    assert M.main([str(src), "--out", str(out)]) == 0
    table = M.read_table(out)
    packaged = M.read_table(REPO / "dgg_kernels" / "backends" / "auto_table.py")
    assert table == packaged  # the packaged table is exactly what the script makes of that run
    (entry,) = table["devices"]
    assert entry["match"] == "H100" and entry["measured"]["source"] == src.name
    assert set(entry["dtypes"]) == {"float32", "bfloat16"}  # only what was measured
    assert auto.choose("NVIDIA H100 80GB HBM3", torch.float32, 10**6, table)[0] == "cuda"   # 1 MB: cuda 3x faster
    assert auto.choose("NVIDIA H100 80GB HBM3", torch.float32, 2 * 10**9, table)[0] == "triton"
    # a second device is added beside the first, the same device replaced
    assert M.main([str(src), "--out", str(out), "--match", "H200"]) == 0
    assert [d["match"] for d in M.read_table(out)["devices"]] == ["H100", "H200"]
    assert M.main([str(src), "--out", str(out), "--match", "H200", "--tolerance", "0.5"]) == 0
    t = M.read_table(out)
    assert [d["match"] for d in t["devices"]] == ["H100", "H200"] and t["tolerance"] == 0.5


def test_builtin_decoder_matches_qwen2_shapes():
    from benchmarks import train_step as T

    s = T.SHAPES["quick"]
    model, loss_fn, lm_head, desc = T.build_model(s, torch.device("cpu"), torch.float32, want_hf=False)
    assert "built-in" in desc and tuple(lm_head.shape) == (s["vocab"], s["hidden"])
    ids = torch.randint(0, s["vocab"], (1, 8))
    loss = loss_fn(ids)
    loss.backward()
    assert torch.isfinite(loss) and lm_head.grad is not None


def test_host_read_counter_restores_tensor_methods():
    # Setting inherited originals back as attributes would shadow the C slots and slow every later op.
    before = {k: torch.Tensor.__dict__.get(k) for k in C._HOST_READ_METHODS}
    x = torch.ones(3)
    n, how = C.count_host_syncs(lambda: (x.sum().item(), bool(x[0])), torch.device("cpu"))
    assert n == 2 and "proxy" in how
    assert {k: torch.Tensor.__dict__.get(k) for k in C._HOST_READ_METHODS} == before


def test_host_read_proxy_counts_the_torch_backend_in_its_device_form():
    """The torch backend reads host memory on CPU only (the decision, the finalize's numbers): the proxy
    switches those paths off while counting, sees none of them, and restores them."""
    from dgg_kernels.backends import torch_ref as TR

    before = TR.host_state, TR.host_value
    w = torch.nn.Parameter(torch.zeros(6, 5))
    gate = dgg.DynamicGradientGate(w, backend="torch", threshold=0.0, window=2)
    w.grad = torch.randn(6, 5)
    for _ in range(3):
        gate.step()
    n, _ = C.count_host_syncs(gate.step, torch.device("cpu"))
    assert n == 0
    assert (TR.host_state, TR.host_value) == before
    state = gate.state
    assert TR.host_state(state) and TR.host_value(state.decision) is not None


def test_cuda_backend_row_is_unavailable_with_reason():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    p.grad = torch.randn(4, 4)
    cuda = next(i for i in P.IMPLS if i.name == "dgg cuda")
    with pytest.raises(P.Unavailable, match="cuda"):
        P.build(cuda, P.Case(monitor=[p], params=[p]))


# scripts another test already runs as `python benchmarks/<script>.py ...` in a subprocess (_run)
_RUN_AS_SCRIPTS_ELSEWHERE = {"overhead", "train_step", "host_time", "sweep_triton"}


@pytest.mark.parametrize("script", ["overhead", "train_step", "sanitize_cuda", "host_time", "sweep_triton",
                                    "make_auto_table", "torch_backend_cpu"])
def test_help_documents_every_flag(script):
    module = importlib.import_module(f"benchmarks.{script}")
    ap = module.build_parser()
    for action in ap._actions:
        assert action.help and action.help.strip(), f"{script}: {action.option_strings} has no help"
    if script in _RUN_AS_SCRIPTS_ELSEWHERE:
        text = ap.format_help()  # the script's own command line is exercised by its --quick run above
    else:
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{script}.py"), "--help"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        text = proc.stdout
    for action in ap._actions:
        for flag in action.option_strings:
            assert flag in text, flag


@pytest.mark.parametrize("script", ["overhead", "train_step", "host_time", "sweep_triton"])
def test_default_out_is_outside_the_checkout(script, monkeypatch, tmp_path):
    module = importlib.import_module(f"benchmarks.{script}")
    monkeypatch.delenv("DGG_BENCH_OUT", raising=False)
    out = module.build_parser().parse_args([]).out
    assert out == C.TEMP_OUT
    assert not out.resolve().is_relative_to(REPO.resolve()), out
    monkeypatch.setenv("DGG_BENCH_OUT", str(tmp_path))
    assert module.build_parser().parse_args([]).out == tmp_path
    assert module.build_parser().parse_args(["--out", "elsewhere"]).out == Path("elsewhere")


# ----------------------------------------------------------------------------- command lines fail fast
H100_JSON = REPO / "benchmarks" / "results" / "overhead_nvidia-h100-80gb-hbm3_2026-11-23.json"


@pytest.fixture
def no_work(monkeypatch):
    """Every benchmark stamps its run (device, versions) before measuring anything: raising there shows that a
    refused flag stopped the script before any work."""
    def work(*a, **k):
        raise AssertionError("the benchmark started working before refusing the flag")

    monkeypatch.setattr(C, "stamp", work)
    monkeypatch.setattr(C, "read_bandwidth_GBps", work)


def _exits_2(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2, e.value.code  # argparse's usage error
    return capsys.readouterr().err


@pytest.mark.parametrize("script, argv, message", [
    ("overhead", ["--impls", "bogus"], "argument --impls: unknown implementation 'bogus'; known: vector_norm (bound)"),
    ("overhead", ["--impls", "dgg torch,bogus"], "unknown implementation 'bogus'"),
    ("overhead", ["--dtypes", "float64"], "unknown dtype 'float64'; known: float32, bfloat16"),
    ("overhead", ["--dtypes", ""], "give at least one dtype"),
    ("overhead", ["--rep-ms", "0"], "argument --rep-ms: must be a finite number > 0, got '0'"),
    ("overhead", ["--cpu-reps", "0"], "argument --cpu-reps: must be an int >= 1"),
    ("overhead", ["--qu"], "unrecognized arguments: --qu"),  # no abbreviations
    ("overhead", ["--budget-s", "0"], "argument --budget-s: must be a finite number > 0"),
    ("overhead", ["--reserve-s", "-1"], "argument --reserve-s: must be a finite number >= 0"),
    ("overhead", ["--device", "gpu"], "--device 'gpu': use auto, cpu, cuda or cuda:N"),
    ("host_time", ["--backends", "bogus"], "unknown backend 'bogus'; known: auto, torch, triton, cuda"),
    ("host_time", ["--scale", "0"], "argument --scale: must be an int >= 1"),
    ("host_time", ["--calls", "0"], "argument --calls: must be an int >= 1"),
    ("host_time", ["--batches", "-2"], "argument --batches: must be an int >= 1"),
    ("train_step", ["--layers", "0"], "argument --layers: must be an int >= 1, got '0'"),
    ("train_step", ["--rounds", "0"], "argument --rounds: must be an int >= 1, got '0'"),
    ("train_step", ["--backends", "bogus"], "unknown backend 'bogus'; known: auto, torch, triton, cuda"),
    ("train_step", ["--lay", "2"], "unrecognized arguments: --lay"),
    ("sweep_triton", ["--blocks", "100"], "argument --blocks: must be comma-separated ints >= 1, each a power of two"),
    ("sweep_triton", ["--dtypes", "float64"], "unknown dtype 'float64'; known: bfloat16, float16, float32"),
    ("sweep_triton", ["--warps", "0"], "argument --warps"),
    ("sweep_triton", ["--min-gain", "nan"], "argument --min-gain: must be a finite number >= 0"),
])
def test_bad_flag_is_refused_before_any_work(script, argv, message, no_work, capsys):
    module = importlib.import_module(f"benchmarks.{script}")
    err = _exits_2(module.main, ["--device", "cpu", *argv] if "--device" not in argv else argv, capsys)
    assert message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_cuda_device_is_refused_before_any_work(no_work, capsys):
    from benchmarks import overhead

    assert "--device 'cuda': torch sees no CUDA device" in _exits_2(overhead.main, ["--device", "cuda"], capsys)


@pytest.mark.parametrize("script", ["overhead", "train_step", "host_time", "sweep_triton"])
def test_unwritable_out_is_refused_before_any_work(script, tmp_path, no_work, capsys):
    module = importlib.import_module(f"benchmarks.{script}")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = _exits_2(module.main, ["--quick", "--device", "cpu", "--out", str(blocker / "results")], capsys)
    assert f"--out {blocker / 'results'}: cannot write there" in err, err


def test_out_is_created_when_the_flags_are_read(tmp_path):
    from benchmarks import overhead

    out = tmp_path / "new" / "deeper"
    args = C.parse(overhead.build_parser(), ["--device", "cpu", "--out", str(out)])
    assert args.out == out and out.is_dir() and not any(out.iterdir())  # the write test leaves nothing behind


def test_command_line_exit_status_is_2_on_a_bad_flag():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "host_time.py"), "--backends", "bogus"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown backend 'bogus'" in proc.stderr, proc.stderr
    assert "| " not in proc.stdout  # no table: nothing ran


@pytest.mark.parametrize("argv, message", [
    (["missing.json"], "overhead_json missing.json: no such file"),
    ([str(REPO / "README.md")], "not a JSON file"),
    ([str(H100_JSON), "--tolerance", "-1"], "argument --tolerance: must be a finite number >= 0"),
    ([str(H100_JSON), "--tol", "0.1"], "unrecognized arguments: --tol"),
])
def test_make_auto_table_refuses_bad_input_before_writing(argv, message, tmp_path, capsys):
    from benchmarks import make_auto_table as M

    out = tmp_path / "table.py"
    assert message in _exits_2(M.main, [*argv, "--out", str(out)], capsys)
    assert not out.exists()
    assert "is a folder" in _exits_2(M.main, [str(H100_JSON), "--out", str(tmp_path)], capsys)
    assert "does not exist" in _exits_2(M.main, [str(H100_JSON), "--out", str(tmp_path / "no" / "t.py")], capsys)


def test_analysed_keeps_the_raw_json_when_the_analysis_fails(tmp_path):
    path = tmp_path / "r.json"
    payload = {"rows": [1, 2]}
    C.write_json(path, payload)
    with pytest.raises(ZeroDivisionError):
        C.analysed(path, payload, "goals", lambda: 1 / 0)
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    assert C.analysed(path, payload, "goals", lambda: ["ok"]) == ["ok"]
    assert json.loads(path.read_text()) == {"rows": [1, 2], "goals": ["ok"]}


@pytest.mark.parametrize("script, argv", [
    ("overhead", ["--impls", "vector_norm (bound)", "--dtypes", "float32", "--no-plot"]),
    ("host_time", ["--backends", "torch"]),
])
def test_raw_json_is_written_before_the_analysis(script, argv, tmp_path, monkeypatch):
    """When the analysis (the goals) raises, the run's raw rows are on disk already and the script fails."""
    module = importlib.import_module(f"benchmarks.{script}")

    def broken(*a, **k):
        raise RuntimeError("analysis broke")

    monkeypatch.setattr(module, "evaluate_goals", broken)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError, match="analysis broke"):
            module.main(["--quick", "--device", "cpu", "--out", str(tmp_path), *argv])
    finally:
        torch.set_num_threads(threads)
    (path,) = tmp_path.glob(f"{script}_cpu_*.json")
    data = json.loads(path.read_text())
    assert data["rows"] and "goals" not in data and data["stamp"]["device_type"] == "cpu"
    assert not list(tmp_path.glob("*.md"))


def test_torch_backend_cpu_smoke(tmp_path, capsys):
    """Two small rows per dtype, one repetition: the table's fields, the path each dtype took, the checks."""
    from benchmarks import torch_backend_cpu as T

    rc = T.main(["--dtypes", "float32,bfloat16", "--sizes-mib", "1,2", "--reps", "1", "--warmup", "0",
                 "--out", str(tmp_path)])
    assert rc == 0
    payload = json.loads(next(tmp_path.glob("torch_backend_cpu_*.json")).read_text())
    rows = payload["rows"]
    assert [(r["dtype"], r["MiB"]) for r in rows] == [("float32", 1), ("float32", 2), ("bfloat16", 1), ("bfloat16", 2)]
    for r in rows:
        assert r["checked"] == "ok" and r["vector_norm_ms"] > 0 and r["open_ms"] > 0 and r["closed_ms"] > 0
        assert r["open_ratio"] == pytest.approx(r["open_ms"] / r["vector_norm_ms"])
        assert r["reduction"] == ("in place" if r["dtype"] == "float32" else "chunked")  # 1-2 MiB: below 2**22
    assert payload["stamp"]["flush_MiB"] >= 64 and "cache" in payload["method"]
    goals = {g["goal"]: g for g in payload["goals"]}
    assert goals["open step, float32"]["status"] == "not measured"  # no row from 16 MiB up
    assert goals["every timed step as intended"]["status"] == "met"
    assert (tmp_path / next(tmp_path.glob("torch_backend_cpu_*.json")).with_suffix(".md").name).exists()
