"""Two vLLM servers started the same way but for one environment switch, measured in interleaved passes: the
shared harness of the kernel A/B benchmarks (sampler_bench, cpu_ops_bench).

Both servers stay up for the whole run, so a pass on one is measured while the other idles; each pass records
the idle one's share of a core, which must stay negligible for the comparison to be fair. Rounds of four passes
run stock/ours/ours/stock, then the mirror order, so a drift in the machine's speed hits both alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from serving_bench import make_adapter

from serving.client import ChatClient
from serving.registry import AdapterRegistry
from serving.server import VLLMServer, VLLMServerSpec

NAMES = ("stock", "ours")


def cpu_seconds(server: VLLMServer) -> float:
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
               warm: Callable[[ChatClient], object], launcher: str = "serving.vllm_cpu.launch",
               env_of: Callable[[str], dict[str, str]] = lambda name: {},
               spec_of: Callable[[str], dict] = lambda name: {},
               ) -> Iterator[dict[str, tuple[VLLMServer, ChatClient, str]]]:
    """{"stock": (server, client, adapter name), "ours": ...}: the stock server gets `stock_env`, each server
    `env_of(its name)` too, and `spec_of(its name)` as VLLMServerSpec fields; both serve the same rank-16 adapter.
    Checks from the logs that only ours printed `installed_line` (the kernels or setting under test)."""
    specs = {name: VLLMServerSpec(model_dir=model_dir, log_path=tmp / f"{name}.log", auto_restart=False,
                                  launcher=launcher, env={**env_of(name), **(stock_env if name == "stock" else {})},
                                  **spec_of(name))
             for name in NAMES}
    adapter_dir = make_adapter(model_dir, tmp / "adapter-1", seed=1)
    with ExitStack() as stack:
        out = {}
        for name in NAMES:
            server = stack.enter_context(VLLMServer(specs[name]))
            client = stack.enter_context(ChatClient(server.base_url, read_timeout=600))
            installed = installed_line in Path(specs[name].log_path).read_text(errors="replace")
            assert installed == (name == "ours"), f"{name} server: '{installed_line}' in its log: {installed}"
            adapter = AdapterRegistry(server, tmp / f"registry-{name}.json", base_model_dir=model_dir).promote(
                adapter_dir)
            warm(client)
            out[name] = (server, client, adapter)
        yield out


def interleaved(servers: dict[str, tuple[VLLMServer, ChatClient, str]], rounds: int,
                measure: Callable[[str, int, ChatClient, str], dict]) -> dict[str, list[dict]]:
    """Per server, one record per pass: `measure(name, round, client, adapter)` plus the idle server's CPU share."""
    runs: dict[str, list[dict]] = {name: [] for name in NAMES}
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
