"""`python -m serving.vllm_cpu.launch ARGS` = `python -m vllm.entrypoints.openai.api_server ARGS` with our CPU LoRA
kernels (serving.vllm_cpu.lora), sort-free top-k / top-p (serving.vllm_cpu.sampler) and vLLM's C++ RMSNorm and rotary in
eager mode (serving.vllm_cpu.ops) installed.

The install runs at import time on purpose: vLLM starts its engine and worker processes with the `spawn` method,
which re-imports this module as `__mp_main__` in every child, so the kernels are replaced where the model runs.
Set KTO_LOOP_STOCK_LORA=1, KTO_LOOP_STOCK_SAMPLER=1 or KTO_LOOP_STOCK_OPS=1 to measure the stock ones.
"""

import importlib
import os
import sys


def _install(module: str, stock_env: str, installed: str, kept: str) -> None:
    """Install one replacement unless `stock_env` asks for vLLM's own. A vLLM layout we don't know keeps vLLM's
    (serving with the stock code beats not serving at all)."""
    if os.environ.get(stock_env, "") in {"1", "true", "True"}:
        return
    try:
        if importlib.import_module(module).install():
            print(f"kto-loop: {installed} installed (pid {os.getpid()})", file=sys.stderr, flush=True)
    except (ImportError, AttributeError) as e:
        print(f"kto-loop: {kept} kept ({e})", file=sys.stderr, flush=True)


_install("serving.vllm_cpu.lora", "KTO_LOOP_STOCK_LORA", "fast CPU LoRA kernels", "stock LoRA kernels")
_install("serving.vllm_cpu.sampler", "KTO_LOOP_STOCK_SAMPLER", "sort-free top-p sampler", "stock sampler")
_install("serving.vllm_cpu.ops", "KTO_LOOP_STOCK_OPS", "C++ RMSNorm and rotary kernels for eager mode",
         "native RMSNorm and rotary")


def main() -> None:
    """Run vLLM's OpenAI server in this process (a wrapper launcher imports this module, then calls this)."""
    try:
        from vllm.entrypoints.launchers.api_server.entry import main as vllm_main
    except ImportError:  # older layouts: same thing through runpy, still without replacing __main__
        import runpy

        runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=False)
    else:
        vllm_main()


if __name__ == "__main__":
    # Call the entry point in-process: `sys.modules["__main__"]` must stay this module (or a wrapper that imports
    # it), or spawned children would re-import vLLM's module instead and run with the stock kernels.
    main()
