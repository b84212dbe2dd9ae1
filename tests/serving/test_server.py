"""The supervisor itself: start-up failure reporting, the command line, clean stop with no orphans."""
import os
import sys
import time

import psutil
import pytest

from serving.server import (
    ServerStartError,
    VLLMServer,
    VLLMServerSpec,
    cpu_has_native_bf16,
    usable_cores,
    vllm_block_size,
    vllm_dtype,
    vllm_reserved_cpus,
    vllm_token_budget,
)

AVX2_EPYC = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx f16c fma avx2\n\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n\n"


def test_command_line_carries_the_spec(tmp_path):
    spec = VLLMServerSpec(model_dir=tmp_path, port=1234, max_lora_rank=8, max_loras=3, tensor_parallel=2,
                          data_parallel=2, dtype="bfloat16", extra_args=("--enforce-eager",))
    cmd = VLLMServer(spec).command()
    assert cmd[:3] == [sys.executable, "-m", "serving.vllm_cpu.launch"]
    joined = " ".join(cmd)
    for flag in ("--served-model-name base", "--port 1234", "--enable-lora", "--max-lora-rank 8", "--max-loras 3",
                 "--max-cpu-loras 8", "--tensor-parallel-size 2", "--data-parallel-size 2", "--dtype bfloat16",
                 "--max-model-len 2048"):
        assert flag in joined
    assert cmd[-1] == "--enforce-eager"
    stock = VLLMServer(VLLMServerSpec(model_dir=tmp_path, max_loras=0, fast_cpu_lora=False)).command()
    assert stock[2] == "vllm.entrypoints.openai.api_server" and "--enable-lora" not in stock
    timed = VLLMServer(VLLMServerSpec(model_dir=tmp_path, launcher="benchmarks.serve_step_launch")).command()
    assert timed[2] == "benchmarks.serve_step_launch"  # a wrapper of serving.vllm_cpu.launch (it imports it first)
    many = " ".join(VLLMServer(VLLMServerSpec(model_dir=tmp_path, max_loras=12)).command())
    assert "--max-cpu-loras 12" in many  # vLLM requires max_cpu_loras >= max_loras
    assert VLLMServer(VLLMServerSpec(model_dir=tmp_path)).port > 0  # port 0 = a free port, picked once


def test_auto_dtype_is_bf16_only_where_the_cpu_has_it():
    assert not cpu_has_native_bf16(AVX2_EPYC) and not cpu_has_native_bf16("")
    assert cpu_has_native_bf16(SAPPHIRE_RAPIDS) and cpu_has_native_bf16(GRAVITON3)
    assert vllm_dtype("auto", cpu_build=True, cpuinfo=AVX2_EPYC) == "float32"
    assert vllm_dtype("auto", cpu_build=True, cpuinfo=SAPPHIRE_RAPIDS) == "bfloat16"
    assert vllm_dtype("auto", cpu_build=False, cpuinfo=AVX2_EPYC) == "auto"  # GPU builds: vLLM's own choice
    assert vllm_dtype("bfloat16", cpu_build=True, cpuinfo=AVX2_EPYC) == "bfloat16"  # an explicit choice stands
    here = " ".join(VLLMServer(VLLMServerSpec(model_dir="m")).command())
    assert f"--dtype {'bfloat16' if cpu_has_native_bf16() else 'float32'}" in here  # this machine, vllm-cpu


def test_small_cpus_give_the_model_every_core_and_short_steps():
    # vLLM-cpu keeps one core for its own processes; on 2 cores the model would get half the machine
    assert vllm_reserved_cpus(-1, cpu_build=True, cores=2) == 0
    assert vllm_reserved_cpus(-1, cpu_build=True, cores=1) == 0
    assert vllm_reserved_cpus(-1, cpu_build=True, cores=16) is None     # vLLM's default stands
    assert vllm_reserved_cpus(-1, cpu_build=False, cores=2) is None     # GPU builds
    assert vllm_reserved_cpus(1, cpu_build=True, cores=2) == 1          # an explicit choice stands
    # tokens per step: 64 a core, never under vLLM's max_num_seqs floor (128), never over its default (2048)
    assert vllm_token_budget(0, cpu_build=True, cores=2) == 128
    assert vllm_token_budget(0, cpu_build=True, cores=8) == 512
    assert vllm_token_budget(0, cpu_build=True, cores=64) == 2048
    assert vllm_token_budget(0, cpu_build=False, cores=2) is None       # GPU builds: vLLM's own
    assert vllm_token_budget(300, cpu_build=True, cores=2) == 300
    # KV-cache blocks: the smallest vLLM-cpu's attention takes, so its prefix cache can reuse a chat's turns
    assert vllm_block_size(0, cpu_build=True) == 32
    assert vllm_block_size(0, cpu_build=False) is None                  # GPU builds: vLLM's own
    assert vllm_block_size(128, cpu_build=True) == 128


def test_this_machine_gets_the_auto_rules(tmp_path):
    """The command and the environment the supervisor actually hands to vLLM, on this machine (a vllm-cpu build)."""
    server = VLLMServer(VLLMServerSpec(model_dir=tmp_path, env={"X_KTO": "1"}))
    cmd, env = " ".join(server.command()), server.environment()
    assert f"--max-num-batched-tokens {vllm_token_budget(0, cpu_build=True)}" in cmd
    assert "--scheduling-policy priority" in cmd
    assert f"--block-size {vllm_block_size(0, cpu_build=True)}" in cmd
    assert env.get("VLLM_CPU_NUM_OF_RESERVED_CPU") == ("0" if usable_cores() <= 2 else
                                                       os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU"))
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["X_KTO"] == "1"
    fcfs = VLLMServer(VLLMServerSpec(model_dir=tmp_path, scheduling_policy="fcfs", reserved_cpus=1,
                                     max_num_batched_tokens=2048, block_size=64))
    assert "--scheduling-policy" not in fcfs.command() and "--max-num-batched-tokens 2048" in " ".join(fcfs.command())
    assert "--block-size 64" in " ".join(fcfs.command())
    assert fcfs.environment()["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"


@pytest.mark.parametrize("cpu_build", [True, False], ids=["cpu-build", "gpu-build"])
def test_both_builds_commands_parse_with_vllms_own_serve_parser(tmp_path, monkeypatch, cpu_build):
    """The GPU command is never run here (no GPU); vLLM's parser and pre-start checks are the same code in both
    builds of the release, so a flag it does not know, or a bad value, fails here rather than on a GPU machine."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    import serving.server as server_module

    monkeypatch.setattr(server_module, "_is_cpu_build", lambda: cpu_build)
    server = VLLMServer(VLLMServerSpec(model_dir=tmp_path, port=1234, tensor_parallel=1 if cpu_build else 2,
                                       data_parallel=2))
    cmd = server.command()
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(cmd[3:])
    validate_parsed_serve_args(args)
    assert (args.model, args.served_model_name, args.port) == (str(tmp_path), ["base"], 1234)
    assert args.enable_lora and (args.max_lora_rank, args.max_loras, args.max_cpu_loras) == (16, 3, 8)
    assert args.scheduling_policy == "priority" and args.max_model_len == 2048 and args.data_parallel_size == 2
    if cpu_build:
        assert args.block_size == 32 and args.max_num_batched_tokens == vllm_token_budget(0, cpu_build=True)
        assert args.dtype in ("bfloat16", "float32") and args.tensor_parallel_size == 1
    else:  # vLLM's own defaults for the GPU, and nothing CPU-only in its environment
        assert args.block_size is None and args.max_num_batched_tokens is None and args.dtype == "auto"
        assert args.tensor_parallel_size == 2
        reserved = server.environment().get("VLLM_CPU_NUM_OF_RESERVED_CPU")
        assert reserved == os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU")  # the supervisor sets none


def test_request_priorities_follow_the_scheduling_policy(tmp_path):
    """Warm-up ahead of users, the product's own probes behind them; nothing at all on an FCFS server, which
    refuses any non-zero priority."""
    prio = VLLMServerSpec(model_dir=tmp_path)
    assert [prio.priority(k) for k in ("warm_up", "user", "background")] == [-1, 0, 1]
    fcfs = VLLMServerSpec(model_dir=tmp_path, scheduling_policy="fcfs")
    assert [fcfs.priority(k) for k in ("warm_up", "user", "background")] == [None, None, None]
    with pytest.raises(ValueError, match="request kind"):
        prio.priority("urgent")


@pytest.mark.slow
def test_start_failure_raises_with_the_log_tail(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # not a model
    server = VLLMServer(VLLMServerSpec(model_dir=tmp_path, log_path=tmp_path / "vllm.log", start_timeout=240))
    with pytest.raises(ServerStartError) as e:
        server.start()
    msg = str(e.value)
    assert "exited with code" in msg and "last log lines" in msg and str(tmp_path / "vllm.log") in msg
    assert len(msg.splitlines()) > 5  # the log lines themselves, so the operator sees vLLM's reason
    assert server.pid is None and not server.is_healthy()


@pytest.mark.slow
def test_stop_leaves_no_orphans(tiny_model_dir, tmp_path):
    server = VLLMServer(VLLMServerSpec(model_dir=tiny_model_dir, log_path=tmp_path / "vllm.log", max_loras=1,
                                       max_model_len=512, kvcache_gb=1))
    with server:
        assert server.is_healthy()
        family = server.family()
        assert len(family) >= 2  # API server + engine core (+ worker, resource tracker)
    assert not server.is_healthy() and server.pid is None
    time.sleep(0.5)
    alive = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"orphans: {alive}"
    server.stop()  # idempotent
