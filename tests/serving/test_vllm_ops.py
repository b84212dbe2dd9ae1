"""vLLM's C++ RMSNorm and rotary kernels, as serving.vllm_cpu.ops puts them in the eager (LoRA) server, must compute
what vLLM's native code computes, take only the inputs they can, and leave a compiled server alone."""
import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")
from serving.vllm_cpu import ops as cpu_ops  # noqa: E402

HIDDEN, T, EPS = 576, 23, 1e-5  # the default model's hidden size; a decode batch with a prefill chunk


@pytest.fixture(autouse=True)
def _keep_environment():
    """vLLM's CPU config check writes os.environ (LD_PRELOAD, LOCAL_WORLD_SIZE, ...): keep it out of the servers
    and subprocesses later tests start."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def ir():
    assert cpu_ops.install()
    assert cpu_ops.install()  # idempotent: vLLM re-imports the launcher in every process it spawns
    from vllm import ir as vllm_ir

    return vllm_ir


def one_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    """Native rounds to the dtype at a different point than the C++ kernel: allow 2 ulps of the largest value."""
    ulp = 2.0 ** -7 if want.dtype == torch.bfloat16 else 2.0 ** -20
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2 * ulp * want.float().abs().max().item())


def inputs(dtype):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(T, HIDDEN, generator=g)).to(dtype)
    r = (3 * torch.randn(T, HIDDEN, generator=g)).to(dtype)
    w = (torch.rand(HIDDEN, generator=g) + 0.5).to(dtype)
    return x, r, w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_matches_native(ir, dtype):
    x, _, w = inputs(dtype)
    op = ir.ops.rms_norm
    with op.set_priority([cpu_ops.PROVIDER, "native"]):
        assert op.dispatch(x, w, EPS).provider == cpu_ops.PROVIDER
        got = op(x, w, EPS)
    one_rounding(got, op.impls["native"].impl_fn(x, w, EPS))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_add_rms_norm_matches_native_and_works_in_place_only_when_asked(ir, dtype):
    x, r, w = inputs(dtype)
    op = ir.ops.fused_add_rms_norm
    want_out, want_res = op.impls["native"].impl_fn(x, r, w, EPS)
    xc, rc = x.clone(), r.clone()
    with op.set_priority([cpu_ops.PROVIDER, "native"]):
        out, res = op(xc, rc, w, EPS)  # the functional overload must not touch its inputs
        assert torch.equal(xc, x) and torch.equal(rc, r)
        one_rounding(out, want_out)
        one_rounding(res, want_res)
        out2, res2 = op.maybe_inplace(xc, rc, w, EPS)  # what RMSNorm calls: the residual stream, in place
    assert out2.data_ptr() == xc.data_ptr() and res2.data_ptr() == rc.data_ptr()
    one_rounding(xc, want_out)
    one_rounding(rc, want_res)


def test_inputs_the_kernel_cannot_take_fall_through_to_native(ir):
    x, r, w = inputs(torch.bfloat16)
    strided = x[:, : HIDDEN // 2]
    with ir.ops.rms_norm.set_priority([cpu_ops.PROVIDER, "native"]), \
            ir.ops.fused_add_rms_norm.set_priority([cpu_ops.PROVIDER, "native"]):
        assert ir.ops.rms_norm.dispatch(strided, w[: HIDDEN // 2], EPS).provider == "native"
        assert ir.ops.rms_norm.dispatch(x, w, EPS, 100).provider == "native"  # a variance size
        assert ir.ops.rms_norm.dispatch(x, w.float(), EPS).provider == "native"  # weight in another dtype
        assert ir.ops.rms_norm.dispatch(x, None, EPS).provider == "native"  # no weight
        assert ir.ops.fused_add_rms_norm.dispatch(x, r.float(), w, EPS).provider == "native"
        assert ir.ops.fused_add_rms_norm.dispatch(x, r, w, EPS).provider == cpu_ops.PROVIDER


def config(mode, custom_ops=("none",)):
    from vllm.config import CompilationConfig, KernelConfig

    kernel = KernelConfig()
    kernel.ir_op_priority.rms_norm = ["native"]  # as vLLM's platform defaults leave it before the platform check
    kernel.ir_op_priority.fused_add_rms_norm = ["native"]
    return SimpleNamespace(compilation_config=CompilationConfig(mode=mode, custom_ops=list(custom_ops)),
                           kernel_config=kernel)


def test_eager_config_gets_the_kernels_once_and_a_compiled_one_keeps_native():
    from vllm.config import CompilationMode

    eager = config(CompilationMode.NONE)
    assert cpu_ops.prefer_kernels(eager) and cpu_ops.prefer_kernels(eager)
    assert eager.kernel_config.ir_op_priority.rms_norm == [cpu_ops.PROVIDER, "native"]
    assert eager.kernel_config.ir_op_priority.fused_add_rms_norm == [cpu_ops.PROVIDER, "native"]
    assert eager.compilation_config.custom_ops == ["none", "+rotary_embedding"]

    compiled = config(CompilationMode.VLLM_COMPILE)
    assert not cpu_ops.prefer_kernels(compiled)  # inductor fuses the native code; an opaque C++ op would split it
    assert compiled.kernel_config.ir_op_priority.rms_norm == ["native"]
    assert compiled.compilation_config.custom_ops == ["none"]

    refused = config(CompilationMode.NONE, ("none", "-rotary_embedding"))  # an operator's explicit "-" wins
    cpu_ops.prefer_kernels(refused)
    assert "+rotary_embedding" not in refused.compilation_config.custom_ops


def test_cpu_rotary_matches_native_on_views_of_the_fused_qkv():
    """The C++ rotary gets q and k as column slices of the qkv projection (strided rows), as LlamaAttention
    passes them, and rotates them in place."""
    from vllm.config import VllmConfig, set_current_vllm_config

    heads, kv_heads, head = 9, 3, 64  # the default model's attention
    with set_current_vllm_config(VllmConfig()):
        from vllm.model_executor.layers.rotary_embedding import get_rope

        rope = get_rope(head, max_position=2048, is_neox_style=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, dtype=torch.bfloat16)
    qkv = torch.randn(T, (heads + 2 * kv_heads) * head, generator=torch.Generator().manual_seed(0))
    qkv = qkv.to(torch.bfloat16)
    positions = torch.arange(300, 300 + T)

    def rotate(method):
        q, k, v = qkv.clone().split([heads * head, kv_heads * head, kv_heads * head], dim=-1)
        return method(positions, q, k)

    (q_native, k_native), (q_cpp, k_cpp) = rotate(rope.forward_native), rotate(rope.forward_cpu)
    one_rounding(q_cpp, q_native)
    one_rounding(k_cpp, k_native)
    assert not torch.equal(q_cpp, qkv[:, : heads * head])  # it did rotate
