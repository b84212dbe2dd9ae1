"""`python -m serving.vllm_launch ARGS` = `python -m vllm.entrypoints.openai.api_server ARGS` with our CPU LoRA
kernels (serving.cpu_lora) and sort-free top-k / top-p (serving.cpu_sampler) installed.

The install runs at import time on purpose: vLLM starts its engine and worker processes with the `spawn` method,
which re-imports this module as `__mp_main__` in every child, so the kernels are replaced where the model runs.
Set KTO_LOOP_STOCK_LORA=1 or KTO_LOOP_STOCK_SAMPLER=1 to measure the stock ones.
"""

import os
import sys

if os.environ.get("KTO_LOOP_STOCK_LORA", "") not in {"1", "true", "True"}:
    try:
        from serving.cpu_lora import install as _install

        if _install():
            print(f"kto-loop: fast CPU LoRA kernels installed (pid {os.getpid()})", file=sys.stderr, flush=True)
    except ImportError as e:  # a vLLM layout we don't know: serve with the stock kernels rather than not at all
        print(f"kto-loop: stock LoRA kernels kept ({e})", file=sys.stderr, flush=True)

if os.environ.get("KTO_LOOP_STOCK_SAMPLER", "") not in {"1", "true", "True"}:
    try:
        from serving.cpu_sampler import install as _install_sampler

        if _install_sampler():
            print(f"kto-loop: sort-free top-p sampler installed (pid {os.getpid()})", file=sys.stderr, flush=True)
    except (ImportError, AttributeError) as e:  # a vLLM layout we don't know: its own sampler still works
        print(f"kto-loop: stock sampler kept ({e})", file=sys.stderr, flush=True)

if __name__ == "__main__":
    # Call the entry point in-process: `sys.modules["__main__"]` must stay this module, or spawned children
    # would re-import vLLM's module instead of this one and run with the stock kernels.
    try:
        from vllm.entrypoints.launchers.api_server.entry import main
    except ImportError:  # older layouts: same thing through runpy, still without replacing __main__
        import runpy

        runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=False)
    else:
        main()
