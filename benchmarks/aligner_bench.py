"""Our KTO trainer vs TRL's KTOTrainer + PEFT: same model, same data, same hyper-parameters, interleaved repeats.

Each trainer runs in its own subprocess so peak RSS (ru_maxrss from wait4) is its own. Ours runs with the
product's defaults for everything not in HP (notably `grad_tokens`, which bounds the activations kept for
backward). Throughput is the same token count for both (prompt + completion tokens of every example, times epochs)
divided by the wall time of the whole job after imports: tokenisation, model load, reference log-probs, training
and saving the adapter. Enough examples that training, not start-up, dominates; the runs alternate ABBA (ours, TRL,
TRL, ours, ...) so a drift in machine load hits both sides alike; each run records the load average before and after
and its CPU seconds (user + sys), a figure less sensitive than wall time to other processes on the machine. The
result file is rewritten after every completed pair, so a bench cut short still leaves its medians.

    .venv/bin/python -m benchmarks.aligner_bench [--model-dir DIR] [--examples 64] [--epochs 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.harness import machine

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "aligner_bench.json"
HP = dict(batch_size=8, lr=1e-3, lora_rank=16, lora_alpha=32, max_length=512, beta=0.1, threads=2)


def make_snapshot(path: Path, n: int, seed: int = 0) -> Path:
    """Chat-like rated answers with a realistic spread of lengths (short refusals to long explanations)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    words = ("the of and to in is that it for as with was on be by this are from at or an which have not "
             "light water energy system people history simple example because small large first").split()
    rows = []
    for k in range(n):
        good = k % 5 < 3
        msgs = [{"role": "system", "content": "You are a helpful assistant."}]
        for _ in range(rng.choice([0, 0, 1, 2])):
            msgs += [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(5, 40)))},
                     {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(10, 80)))}]
        msgs.append({"role": "user", "content": "Explain " + " ".join(rng.choices(words, k=rng.randint(3, 30)))})
        length = rng.randint(60, 300) if good else rng.randint(5, 120)
        rows.append({"example_id": f"e{k}", "answer_id": f"a{k}", "messages": json.dumps(msgs),
                     "completion": " ".join(rng.choices(words, k=length)), "label": good, "user_id": "u",
                     "adapter": "base", "rated_at": datetime(2025, 1, 1, tzinfo=UTC)})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def count_tokens(snapshot: Path, model_dir: str) -> int:
    from aligner.data import read_snapshot, tokenize_pair
    from aligner.model import load_tokenizer

    tok = load_tokenizer(model_dir)
    return sum(len(p) + len(c) for p, c in (tokenize_pair(tok, r["messages"], r["completion"])
                                            for r in read_snapshot(snapshot)))


def worker_ours(snapshot: str, model_dir: str, epochs: int, out: str) -> float:
    from aligner.train import TrainConfig, run

    t = time.time()
    run(TrainConfig(snapshot=snapshot, out=out, model_dir=model_dir, epochs=epochs, heldout_fraction=0.0,
                    batch_size=HP["batch_size"], lr=HP["lr"], lora_rank=HP["lora_rank"], lora_alpha=HP["lora_alpha"],
                    max_length=HP["max_length"], beta=HP["beta"], threads=HP["threads"]))
    return time.time() - t


def worker_trl(snapshot: str, model_dir: str, epochs: int, out: str) -> float:
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import KTOConfig, KTOTrainer

    from aligner.model import native_bf16

    torch.set_num_threads(HP["threads"])
    t = time.time()
    rows = pq.read_table(snapshot).to_pylist()
    data = Dataset.from_list([{"prompt": json.loads(r["messages"]),
                               "completion": [{"role": "assistant", "content": r["completion"]}],
                               "label": r["label"]} for r in rows])
    args = KTOConfig(output_dir=out, per_device_train_batch_size=HP["batch_size"], learning_rate=HP["lr"],
                     num_train_epochs=epochs, max_length=HP["max_length"], beta=HP["beta"], bf16=native_bf16(),
                     use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, warmup_steps=0.1,
                     lr_scheduler_type="linear", dataloader_num_workers=0)
    peft = LoraConfig(r=HP["lora_rank"], lora_alpha=HP["lora_alpha"], lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    trainer = KTOTrainer(model=model_dir, args=args, train_dataset=data, peft_config=peft)
    trainer.train()
    trainer.save_model(out)
    return time.time() - t


def run_worker(name: str, snapshot: Path, model_dir: str, epochs: int) -> dict:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "res.json"
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.aligner_bench", "--worker", name,
                                 "--snapshot", str(snapshot), "--model-dir", model_dir, "--epochs", str(epochs),
                                 "--out", str(Path(tmp) / "out"), "--result", str(res)], cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{name} worker failed")
        seconds = json.loads(res.read_text())["seconds"]
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime,
            "load_avg_before": load_before, "load_avg_after": os.getloadavg()}


def _ours_grad_tokens() -> int:
    from aligner.train import TrainConfig

    return TrainConfig.__dataclass_fields__["grad_tokens"].default




def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", default=str(Path("~/.cache/kto-loop/models/SmolLM2-135M-Instruct").expanduser()))
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--worker"), p.add_argument("--snapshot"), p.add_argument("--out"), p.add_argument("--result")
    a = p.parse_args()
    if a.worker:
        fn = worker_ours if a.worker == "ours" else worker_trl
        Path(a.result).write_text(json.dumps({"seconds": fn(a.snapshot, a.model_dir, a.epochs, a.out)}))
        return
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        snap = make_snapshot(Path(tmp) / "bench.parquet", a.examples)
        tokens = count_tokens(snap, a.model_dir) * a.epochs
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        names = list(a.only or ("ours", "trl"))
        for k in range(a.repeats):
            for name in names if k % 2 == 0 else names[::-1]:  # ABBA
                r = run_worker(name, snap, a.model_dir, a.epochs)
                r["tokens_per_s"] = tokens / r["seconds"]
                runs[name].append(r)
                print(f"{name:5s} {r['seconds']:7.1f} s  {r['tokens_per_s']:7.1f} tok/s  "
                      f"peak RSS {r['peak_rss_mib']:7.0f} MiB  cpu {r['cpu_s']:7.1f} s  "
                      f"load {r['load_avg_before'][0]:.1f}->{r['load_avg_after'][0]:.1f}", flush=True)
            if len(names) == 2:
                write_result(a, info, tokens, runs, complete=k + 1 == a.repeats)


def write_result(a: argparse.Namespace, info: dict, tokens: int, runs: dict[str, list[dict]], complete: bool) -> None:
    keys = ("seconds", "tokens_per_s", "peak_rss_mib", "cpu_s")
    med = {n: {k: statistics.median(r[k] for r in rs) for k in keys} for n, rs in runs.items()}
    ratio_speed = med["ours"]["tokens_per_s"] / med["trl"]["tokens_per_s"]
    ratio_mem = med["ours"]["peak_rss_mib"] / med["trl"]["peak_rss_mib"]
    ratio_cpu = med["trl"]["cpu_s"] / med["ours"]["cpu_s"]
    print(f"ours/TRL tokens/s: {ratio_speed:.2f}x (goal >= 2.0)   peak RSS: {ratio_mem:.2f}x (goal <= 0.8)   "
          f"CPU seconds TRL/ours: {ratio_cpu:.2f}x", flush=True)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({
        "benchmark": "aligner_bench", "machine": info, "model": a.model_dir, "examples": a.examples,
        "epochs": a.epochs, "tokens": tokens, "hyperparameters": HP, "repeats_requested": a.repeats,
        "repeats_done": min(len(rs) for rs in runs.values()), "complete": complete,
        "ours_defaults": {"grad_tokens": _ours_grad_tokens(), "grad_accum": 1}, "runs": runs, "median": med,
        "ratio_tokens_per_s": ratio_speed, "ratio_peak_rss": ratio_mem, "ratio_cpu_seconds_trl_over_ours": ratio_cpu,
        "goal": {"tokens_per_s": ">= 2.0x TRL", "peak_rss": "<= 0.8x TRL"},
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds")}, indent=2) + "\n")

if __name__ == "__main__":
    main()
