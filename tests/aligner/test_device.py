"""--device: where the aligner computes. This workplace's CI has no GPU, so the CUDA side is checked through what
can be observed without one (device resolution, the process's GPU under `accelerate launch`, the memory share, and
every tensor of a pass following the model onto another device: the meta device); benchmarks/gpu_check.py runs it
on a GPU."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from aligner import cli
from aligner import model as model_mod
from aligner import train as train_mod
from aligner.config import TrainConfig
from tests.aligner.support import synthetic_rows, write_snapshot

FAST = ["--max-length", "128", "--batch-size", "4", "--epochs", "1", "--max-steps", "2", "--holdout-fraction", "0.2",
        "--checkpoints", "0"]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return write_snapshot(tmp_path_factory.mktemp("snap") / "s.parquet", synthetic_rows(10, 8, seed=4))


def test_auto_is_cuda_only_where_a_gpu_is_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model_mod.resolve_device("auto") == torch.device("cpu")
    assert model_mod.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        model_mod.resolve_device("cuda")
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        model_mod.resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert model_mod.resolve_device("auto") == model_mod.resolve_device("cuda") == torch.device("cuda")
    assert model_mod.resolve_device("cpu") == torch.device("cpu")


def test_auto_dtype_on_a_gpu_is_bf16_where_it_has_bf16(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert model_mod.resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert model_mod.resolve_dtype("auto", cuda) == torch.float32
    assert model_mod.resolve_dtype("bfloat16", cuda) == torch.bfloat16  # asked for: kept
    monkeypatch.setattr(model_mod, "native_bf16", lambda: True)  # the CPU's own rule is untouched
    assert model_mod.resolve_dtype("auto", torch.device("cpu")) == model_mod.resolve_dtype("auto") == torch.bfloat16


def test_autocast_is_the_devices_own():
    assert isinstance(model_mod.autocast_on(torch.device("cpu"), False), contextlib.nullcontext)
    on_cpu = model_mod.autocast_on(torch.device("cpu"), True)
    assert on_cpu.device == "cpu" and on_cpu.fast_dtype == torch.bfloat16
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else contextlib.nullcontext():
        on_gpu = model_mod.autocast_on(torch.device("cuda", 1), True)  # (disabled by torch where there is no GPU)
    assert on_gpu.device == "cuda" and on_gpu.fast_dtype == torch.bfloat16


def test_cuda_without_a_gpu_fails_before_anything_is_loaded(monkeypatch, tmp_path, snapshot, tiny_model_dir, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def loaded(*_a, **_k):
        raise AssertionError("nothing may be loaded when the device is missing")

    for name in ("load_tokenizer", "load_policy", "num_layers", "build_dataset"):
        monkeypatch.setattr(train_mod, name, loaded)
    rc = cli.main(["--snapshot", str(snapshot), "--out", str(tmp_path / "out"), "--model-dir", str(tiny_model_dir),
                   "--device", "cuda", *FAST])
    assert rc == 2
    assert "--device cuda: no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_device_cpu_is_todays_run(tmp_path, snapshot, tiny_model_dir):
    """--device cpu and the default (auto, which is cpu here) give the same run to the bit; the existing pinned
    tests (parity with TRL, the loss) run on the default and pin today's numbers."""
    if torch.cuda.is_available():
        pytest.skip("auto is cuda on this machine")
    runs = {}
    for name, extra in (("default", []), ("cpu", ["--device", "cpu"])):
        out = tmp_path / name
        assert cli.main(["--snapshot", str(snapshot), "--out", str(out), "--model-dir", str(tiny_model_dir),
                         "--lr", "1e-3", *FAST, *extra]) == 0
        runs[name] = (json.loads((out / "manifest.json").read_text()), load_file(out / "adapter_model.safetensors"))
    (m_default, w_default), (m_cpu, w_cpu) = runs["default"], runs["cpu"]
    assert m_cpu["hyperparameters"]["device"] == "cpu" and m_default["hyperparameters"]["device"] == "auto"
    keys = ("loss", "z0_pre_clamp", "reward_desirable", "reward_undesirable", "grad_norm")
    assert [[r[k] for k in keys] for r in m_cpu["log"]] == [[r[k] for k in keys] for r in m_default["log"]]
    assert m_cpu["heldout"]["new"] == m_default["heldout"]["new"]
    assert w_cpu.keys() == w_default.keys()
    assert all(torch.equal(w_cpu[k], w_default[k]) for k in w_cpu)
    assert any(w_cpu[k].abs().max() > 0 for k in w_cpu if "lora_B" in k), "the run must move the adapter"


class _Placement(TorchDispatchMode):
    """Every floating-point tensor an op produces, by device, and every op fed tensors from two devices: the math of
    a pass must all happen where the model is (integer index tensors are built on the CPU and copied over once,
    model.pad_batch; a CPU index tensor handed to a GPU op would cost a copy per use, or fail)."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: dict[str, set[str]] = {}
        self.mixed: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs or {}))
                  if isinstance(t, torch.Tensor) and t.dim() > 0]
        if len({t.device.type for t in inputs}) > 1:
            self.mixed.add(str(func))
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.devices.setdefault(t.device.type, set()).add(str(func))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_a_pass_runs_where_the_model_is(tiny_model_dir, monkeypatch, dtype):
    """The model on another device than the CPU (meta: shapes only, no GPU needed): the batch, positions, masks,
    shared-head ids, cached prefix states and log-prob sums all follow it, and bf16 autocast is that device's."""
    model = model_mod.load_policy(tiny_model_dir, dtype=dtype, first_lora_layer=1, device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    model_mod.set_shared_head(model, [1, 2])  # this path runs our own layer loop (transformers' masks need values)
    seqs = [([1, 2, 3, 4], [5, 6]), ([1, 2, 3, 7, 8], [9])]
    kinds: list[str] = []
    real = torch.autocast

    def recording(device_type: str, *args, **kwargs):
        kinds.append(device_type)
        return contextlib.nullcontext() if device_type == "meta" else real(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", recording)
    states: list[torch.Tensor] = []
    with _Placement() as where:
        with torch.no_grad():
            ref = model_mod.completion_logps(model, seqs, 0, capture=(1, states))
        lp = model_mod.completion_logps(model, seqs, 0, start=(1, states))
        lp.sum().backward()
        dist = model_mod.completion_log_softmax(model, seqs, 0, start=(1, states))
    assert ref.device.type == lp.device.type == dist.device.type == "meta"
    assert len(states) == 2 and {s.device.type for s in states} == {"meta"}
    assert set(where.devices) == {"meta"}, {k: sorted(v)[:5] for k, v in where.devices.items() if k != "meta"}
    assert not where.mixed, sorted(where.mixed)
    assert ("meta" in kinds) == (dtype == torch.bfloat16)
    ids, rows, cols, targets = model_mod.pad_batch(seqs, 0, "meta")
    assert {t.device.type for t in (ids, rows, cols, targets)} == {"meta"}


class _FakeState:
    """accelerate's PartialState as the launcher leaves it: which backend was asked for, which GPU it picked."""

    calls: list[bool] = []

    def __init__(self, cpu: bool = False) -> None:
        _FakeState.calls.append(cpu)
        self.device = torch.device("cpu") if cpu else torch.device("cuda", 1)


def test_each_launched_process_takes_its_local_rank_gpu(monkeypatch):
    import accelerate

    picked: list[torch.device] = []
    monkeypatch.setattr(accelerate, "PartialState", _FakeState)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: picked.append(torch.device(d)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    _FakeState.calls = []
    d = train_mod.Dist(torch.device("cuda"))
    assert _FakeState.calls == [False]  # nccl: accelerate's GPU set-up, not its CPU-only one
    assert d.device == torch.device("cuda", 1) and picked == [torch.device("cuda", 1)]
    _FakeState.calls, picked[:] = [], []
    d = train_mod.Dist(torch.device("cpu"))
    assert _FakeState.calls == [True] and d.device == torch.device("cpu") and picked == []  # gloo, as before
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    _FakeState.calls = []
    d = train_mod.Dist(torch.device("cuda"))
    assert _FakeState.calls == [] and d.device == torch.device("cuda", 0) and picked == [torch.device("cuda", 0)]


class _Stop(Exception):
    pass


@pytest.mark.parametrize("device, fraction, capped, threads", [
    ("cuda", 0.4, True, False), ("cuda", 0.0, False, False), ("cpu", 0.4, False, True)])
def test_the_gpu_share_is_set_before_the_model_loads(monkeypatch, tmp_path, snapshot, tiny_model_dir, device,
                                                     fraction, capped, threads):
    """On a GPU shared with vLLM the process caps its allocations before loading anything; torch's thread count
    is a CPU setting."""
    calls: list[tuple] = []
    gpu = torch.device("cuda", 0)

    class OneProcess:
        world, rank, main = 1, 0, True

        def __init__(self, dev: torch.device) -> None:
            self.device = gpu if dev.type == "cuda" else dev

    monkeypatch.setattr(train_mod, "resolve_device", lambda name: torch.device(name))
    monkeypatch.setattr(train_mod, "Dist", OneProcess)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append(("cap", f, d)))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("threads", n)))

    def stop(*_a, **_k):
        calls.append(("load",))
        raise _Stop

    monkeypatch.setattr(train_mod, "load_tokenizer", stop)
    cfg = TrainConfig(snapshot=str(snapshot), out=str(tmp_path / "o"), model_dir=str(tiny_model_dir), device=device,
                      gpu_memory_fraction=fraction)
    with pytest.raises(_Stop):
        train_mod.run(cfg)
    assert calls[-1] == ("load",)
    assert (("cap", fraction, gpu) in calls) == capped
    assert any(c[0] == "threads" for c in calls) == threads
    assert len(calls) == 1 + capped + threads
