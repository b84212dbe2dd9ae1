"""The aligner on a CUDA GPU, checked in one short run: meant for a lent GPU machine (no vLLM, no network needed).

    python -m benchmarks.gpu_check [--out DIR] [--tokenizer-dir DIR] [--steps N]

It builds a tiny random Llama (with the default model's tokenizer when one is found, else a character-level
tokenizer built here, offline), writes a synthetic snapshot, and runs the aligner (`python -m aligner`) a few
steps several ways: float32 on the CPU (the reference), float32 and bf16 (autocast) on `--device cuda`, cuda with
`--gpu-memory-fraction`, and under `accelerate launch` (2 processes with nccl where there are 2 GPUs; NCCL refuses
two ranks on one GPU, so with one GPU a single launched process). Each GPU run's per-step loss, z0 and final weights
are compared with the CPU reference within a tolerance (tight for float32, looser for bf16), and a JSON summary
goes to OUT/gpu_check.json (OUT: --out, else $OUT, else benchmarks/results) and to stdout. Exit code 0 = all
checks passed, 1 = a check failed, 2 = no CUDA GPU or a package missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
            head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5)
ARGS = ["--batch-size", "4", "--epochs", "1", "--max-length", "256", "--lr", "1e-3", "--checkpoints", "0",
        "--holdout-fraction", "0.2", "--first-lora-layer", "1"]
# |Δ| allowed per step against the reference run: float32 on the GPU differs in summation order only; bf16 rounds
# the base weights and every product (on the CPU, bf16 against float32 on this model: loss 2e-5, z0 2e-3); two
# processes batch the reference pass differently (tests/aligner/test_distributed.py). Weights are reported, not
# checked: Adam turns last-bit differences of near-zero gradients (lora_A while lora_B is ~0) into steps of ±lr.
TOLERANCE = {"float32": {"loss": 1e-4, "z0_pre_clamp": 1e-3}, "bfloat16": {"loss": 2e-3, "z0_pre_clamp": 2e-2},
             "processes": {"loss": 1e-3, "z0_pre_clamp": 2e-2}}
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _char_tokenizer(out: Path) -> None:
    """A character-level tokenizer with a ChatML template: enough for the aligner's data path, built offline."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<|pad|>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", additional_special_tokens=specials[2:])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)


def build_model(out: Path, tokenizer_dir: Path | None) -> str:
    """The tiny random model (bf16 weights, like the served base) in `out`; returns where its tokenizer came from."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
        source = str(tokenizer_dir)
    else:
        _char_tokenizer(out)
        source = "character-level (built here)"
    tok = AutoTokenizer.from_pretrained(out)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **TINY)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    return source


def _default_tokenizer() -> Path | None:
    home = Path(os.environ.get("KTO_LOOP_HOME", "~/.cache/kto-loop")).expanduser()
    d = home / "models" / "SmolLM2-135M-Instruct"
    return d if (d / "tokenizer_config.json").is_file() else None


def run_aligner(name: str, work: Path, common: list[str], extra: list[str], launcher: list[str] | None = None,
                timeout: float = 240) -> dict[str, Any]:
    """One aligner run; its manifest's per-step log and its adapter's weights (as a path), or its error."""
    out = work / name
    cmd = [*(launcher or [sys.executable]), "-m", "aligner", "--out", str(out), *common, *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    res: dict[str, Any] = {"name": name, "args": extra, "rc": proc.returncode, "seconds": round(time.time() - t0, 1)}
    if launcher:
        res["launcher"] = launcher[1:]
    if proc.returncode != 0:
        res["stderr_tail"] = proc.stderr[-2500:]
        return res
    m = json.loads((out / "manifest.json").read_text())
    hp = m["hyperparameters"]
    res.update(dtype=hp["dtype"], device=hp["device"], world_size=hp["world_size"], final_loss=m["final_loss"],
               log=[{k: r.get(k) for k in ("step", "loss", "z0_pre_clamp", "grad_norm")} for r in m["log"]],
               heldout_new=m["heldout"]["new"], adapter=str(out / "adapter_model.safetensors"),
               tokens_per_second=round(m["tokens_per_second"], 1), phase_seconds=m["phase_seconds"])
    return res


def compare(run: dict[str, Any], ref: dict[str, Any], tol: dict[str, float]) -> dict[str, Any]:
    """Largest per-step |Δ| of loss and z0, and of the final adapter weights, against the reference run."""
    from safetensors.torch import load_file

    if run.get("rc") != 0 or ref.get("rc") != 0:
        return {"ok": False, "why": "a run failed"}
    if len(run["log"]) != len(ref["log"]):
        return {"ok": False, "why": f"{len(run['log'])} steps against {len(ref['log'])}"}
    out: dict[str, Any] = {}
    for k in ("loss", "z0_pre_clamp"):
        out[k] = max(abs(a[k] - b[k]) for a, b in zip(run["log"], ref["log"], strict=True))
    wa, wb = load_file(run["adapter"]), load_file(ref["adapter"])
    out["weights"] = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wb) if wa.keys() == wb.keys() \
        else float("inf")
    out["weights_moved"] = max(wb[k].float().abs().max().item() for k in wb if "lora_B" in k)
    out["tolerance"] = tol
    out["ok"] = all(out[k] <= tol[k] for k in tol) and out["weights_moved"] > 0
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    p.add_argument("--tokenizer-dir", type=Path, default=None, help="default: the default model's, if present")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dry-run-on-cpu", action="store_true",
                   help="check this script itself where there is no GPU: every 'cuda' run runs on the CPU "
                        "(bf16 asked for explicitly), so no GPU result comes out of it")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"check": "aligner on a CUDA GPU", "python": sys.version.split()[0]}

    def finish(code: int) -> int:
        summary["ok"] = code == 0
        text = json.dumps(summary, indent=2, sort_keys=True, default=str)
        (args.out / "gpu_check.json").write_text(text + "\n")
        print(text)
        return code

    missing = []
    for mod in ("torch", "transformers", "peft", "accelerate", "pyarrow", "safetensors", "tokenizers"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        summary["missing_packages"] = missing
        return finish(2)
    import torch

    summary["torch"] = torch.__version__
    summary["cuda"] = torch.version.cuda
    dry = args.dry_run_on_cpu
    if not torch.cuda.is_available() and not dry:
        summary["error"] = "no CUDA GPU visible"
        return finish(2)
    n_gpu = 1 if dry else torch.cuda.device_count()
    summary["gpus"] = ["none: a dry run on the CPU"] if dry else [torch.cuda.get_device_name(i) for i in range(n_gpu)]
    summary["bf16_supported"] = True if dry else torch.cuda.is_bf16_supported()
    gpu = "cpu" if dry else "cuda"

    sys.path.insert(0, str(ROOT))
    from tests.aligner.support import synthetic_rows, write_snapshot

    work = Path(tempfile.mkdtemp(prefix="kto-gpu-check-"))
    try:
        model_dir = work / "tiny"
        summary["tokenizer"] = build_model(model_dir, args.tokenizer_dir or _default_tokenizer())
        snap = write_snapshot(work / "s.parquet", synthetic_rows(24, 16, seed=7))
        common = ["--snapshot", str(snap), "--model-dir", str(model_dir), "--max-steps", str(args.steps), *ARGS]
        runs: dict[str, dict[str, Any]] = {}
        runs["cpu_float32"] = run_aligner("cpu_float32", work, common, ["--device", "cpu", "--dtype", "float32"])
        runs["cuda_float32"] = run_aligner("cuda_float32", work, common, ["--device", gpu, "--dtype", "float32"])
        runs["cuda_auto"] = run_aligner("cuda_auto", work, common,  # bf16 where the GPU has it
                                        ["--device", gpu, *(["--dtype", "bfloat16"] if dry else [])])
        runs["cuda_shared_0.2"] = run_aligner("cuda_shared_0.2", work, common,
                                              ["--device", gpu, "--gpu-memory-fraction", "0.2",
                                               *(["--dtype", "bfloat16"] if dry else [])])
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
        procs = 2 if n_gpu >= 2 else 1
        launch = [accelerate or "accelerate", "launch", "--num_processes", str(procs), "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
        if procs > 1:
            launch.insert(2, "--multi_gpu")
        if dry:
            launch.insert(2, "--cpu")
        # A process's micro-batches: the same global batch as the single-process runs (grad_accum × processes).
        runs["accelerate"] = run_aligner(f"accelerate_{procs}", work, common,
                                         ["--device", gpu, "--dtype", "float32",
                                          "--grad-accum", "1" if procs == 2 else "2"], launcher=launch)
        if procs == 1:  # its single-process twin, same global batch
            runs["cuda_float32_accum2"] = run_aligner("cuda_float32_accum2", work, common,
                                                      ["--device", gpu, "--dtype", "float32", "--grad-accum", "2"])
        ref = runs["cpu_float32"]
        auto_dtype = runs["cuda_auto"].get("dtype", "bfloat16")
        checks = {
            "cuda_float32_vs_cpu": compare(runs["cuda_float32"], ref, TOLERANCE["float32"]),
            f"cuda_{auto_dtype}_vs_cpu_float32": compare(runs["cuda_auto"], ref, TOLERANCE[auto_dtype]),
            "cuda_shared_vs_cuda_auto": compare(runs["cuda_shared_0.2"], runs["cuda_auto"], TOLERANCE["float32"]),
        }
        if procs == 2:
            accum_ref = run_aligner("cpu_float32_accum2", work, common,
                                    ["--device", "cpu", "--dtype", "float32", "--grad-accum", "2"])
            runs["cpu_float32_accum2"] = accum_ref
            checks["accelerate_2_gpus_vs_cpu_float32"] = compare(runs["accelerate"], accum_ref, TOLERANCE["processes"])
        else:
            checks["accelerate_1_process_vs_cuda_float32"] = compare(runs["accelerate"], runs["cuda_float32_accum2"],
                                                                     TOLERANCE["float32"])
        checks["devices_recorded"] = {"ok": runs["cuda_auto"].get("device") == gpu
                                      and runs["cuda_auto"].get("dtype") == ("bfloat16" if summary["bf16_supported"]
                                                                             else "float32")}
        summary["runs"] = {k: {x: v for x, v in r.items() if x != "adapter"} for k, r in runs.items()}
        summary["checks"] = checks
        return finish(0 if all(c.get("ok") for c in checks.values()) else 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
