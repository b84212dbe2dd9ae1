"""The fast CPU LoRA kernels must compute what vLLM's reference torch ops compute."""
import pytest
import torch

ref = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")
from serving.vllm_cpu import lora as cpu_lora  # noqa: E402

SLOTS, R, IN, OUT, T = 3, 8, 64, 96, 12


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(SLOTS, 1, R, IN, generator=g).to(torch.bfloat16)
    b = torch.randn(SLOTS, 1, OUT, R, generator=g).to(torch.bfloat16)
    a[-1] = 0  # the reference applies slot -1 (the last) to "no adapter" tokens; empty, it equals "no LoRA"
    b[-1] = 0
    x = torch.randn(T, IN, generator=g).to(torch.bfloat16)
    return a, b, x


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16 outputs: the reference rounds the product to bf16 before adding, we round once; allow ~4 ulps of the
    largest value."""
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2 ** -5 * want.float().abs().max().item())


INDICES = [torch.zeros(T, dtype=torch.long), torch.tensor([0, 1, -1] * 4), torch.full((T,), -1),
           torch.tensor([1] * 6 + [0] * 6)]


@pytest.mark.parametrize("idx", INDICES)
def test_shrink_matches_reference(weights, idx):
    a, _, x = weights
    want, got = torch.zeros(T, R), torch.zeros(T, R)
    ref.bgmv_shrink(x, a, want, idx, 0.5)
    cpu_lora.bgmv_shrink(x, a, got, idx, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("idx", INDICES)
@pytest.mark.parametrize("add", [True, False])
def test_expand_slice_matches_reference(weights, idx, add):
    _, b, _ = weights
    h = torch.randn(T, R, generator=torch.Generator().manual_seed(1))
    want = torch.randn(T, 2 * OUT, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    got = want.clone()
    ref.bgmv_expand_slice(h, b, want, idx, OUT, OUT, add)
    cpu_lora.bgmv_expand_slice(h, b, got, idx, OUT, OUT, add)
    close(got, want)
    torch.testing.assert_close(got[:, :OUT], want[:, :OUT])  # the other slice is untouched


def test_prefill_sgmv_groups_sequences(weights):
    a, b, x = weights
    seq_lens, seq_idx = torch.tensor([5, 7]), torch.tensor([1, 0])
    start = torch.tensor([0, 5])
    want, got = torch.zeros(T, R), torch.zeros(T, R)
    ref.sgmv_shrink(x, a, want, start, seq_lens, seq_idx, 2, 7, T, 1.0)
    cpu_lora.sgmv_shrink(x, a, got, start, seq_lens, seq_idx, 2, 7, T, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    y1 = torch.zeros(T, OUT, dtype=torch.bfloat16)
    y2 = y1.clone()
    ref.sgmv_expand(want, b, y1, start, seq_lens, seq_idx, 2, 7, T, True)
    cpu_lora.sgmv_expand(want, b, y2, start, seq_lens, seq_idx, 2, 7, T, True)
    close(y2, y1)


def test_no_adapter_rows_get_no_lora_even_if_last_slot_is_occupied(weights):
    a, _, x = weights
    a = a.clone()
    a[-1] = 1.0  # a real adapter in the last slot
    idx = torch.tensor([-1] * T)
    out = torch.full((T, R), 7.0)
    cpu_lora.bgmv_shrink(x, a, out, idx, 1.0)
    assert torch.count_nonzero(out) == 0


def test_weight_cache_sees_in_place_adapter_loads(weights):
    a, _, x = weights
    a = a.clone()
    idx = torch.zeros(T, dtype=torch.long)
    out1, out2 = torch.zeros(T, R), torch.zeros(T, R)
    cpu_lora.bgmv_shrink(x, a, out1, idx, 1.0)
    a[0, 0].copy_(torch.randn(R, IN).to(torch.bfloat16))  # what vLLM does when a new adapter fills slot 0
    cpu_lora.weights_changed()  # ...from LoRAModelManager.activate_adapter, which install() hooks
    cpu_lora.bgmv_shrink(x, a, out2, idx, 1.0)
    want = torch.zeros(T, R)
    ref.bgmv_shrink(x, a, want, idx, 1.0)
    assert not torch.allclose(out1, out2)
    torch.testing.assert_close(out2, want, rtol=1e-2, atol=1e-2)


def test_install_hooks_the_writers_of_weights_and_indices():
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper import punica_cpu

    assert cpu_lora.install() and cpu_lora.install()  # idempotent: wraps once
    assert not hasattr(LoRAModelManager.activate_adapter.__wrapped__, "__wrapped__")
    assert punica_cpu.bgmv_shrink is cpu_lora.bgmv_shrink and punica_cpu.sgmv_expand is cpu_lora.sgmv_expand

    class Manager:  # what the hook reads from vLLM's LoRAModelManager: the slot table after the write
        lora_index_to_id = [7, None, 9]

    before = cpu_lora._gen["weights"]
    activate = cpu_lora._after_activate(lambda self, lora_id, wrote: wrote)
    assert activate(Manager(), 9, False) is False and cpu_lora._gen["weights"] == before  # already active
    assert activate(Manager(), 9, True) is True and cpu_lora._gen["weights"] == before + 1
    assert cpu_lora._slot_version(2) == before + 1  # slot 2 holds id 9: only it changed
    assert cpu_lora._slot_version(0) < before + 1
    assert activate(Manager(), 5, True) is True and cpu_lora._gen["all"] == before + 2  # slot unknown: all


def test_a_write_into_one_slot_rebuilds_that_slot_only():
    """A hot swap writes the new version into a free slot while the current one keeps serving from its own: the
    current slot's fused stack rows and oneDNN handlers stay as they are, the written slot's are rebuilt, and
    both answer right afterwards."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    g = torch.Generator().manual_seed(9)
    slices = (32, 16, 16)
    a = tuple(torch.randn(SLOTS, 1, R, IN, generator=g) for _ in slices)
    b = tuple(torch.randn(SLOTS, 1, n, R, generator=g) for n in slices)
    x = torch.randn(T, IN, generator=g)
    idx = torch.tensor([1] * 6 + [0] * 6)
    wrapper = PunicaWrapperCPU(64, 8, "cpu")
    wrapper._token_lora_indices[:T].copy_(idx)
    wrapper.indices_len[0] = T
    cpu_lora.indices_changed()
    cpu_lora.weights_changed()

    def run_and_check() -> None:
        got = torch.zeros(T, sum(slices))
        cpu_lora.add_lora_linear(wrapper, got, x, a, b, 1.0, slices)
        want = torch.zeros(T, sum(slices), dtype=torch.float64)
        off = 0
        for s, n in enumerate(slices):
            for t in range(T):
                k = int(idx[t])
                want[t, off:off + n] += x[t].double() @ a[s][k, 0].double().t() @ b[s][k, 0].double().t()
            off += n
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)

    run_and_check()
    stamps = list(a[0]._kto_fused[1])
    for t in a + b:  # a new adapter written into slot 1, as activate_adapter does
        t[1].copy_(torch.randn(t[1].shape, generator=g))
    cpu_lora.weights_changed(1)
    run_and_check()
    after = a[0]._kto_fused[1]
    assert after[0] == stamps[0] and after[1] != stamps[1]  # slot 0 kept, slot 1 restacked


def test_onednn_handlers_are_rebuilt_for_the_written_slot_only(monkeypatch):
    """A bf16 model's oneDNN handlers (created per slot, ~0.5 ms each, 240 a slot) must survive a write into
    another slot; the written slot's are created anew. Counted with a stand-in for vLLM's handler factory."""
    import vllm._custom_ops as ops

    if cpu_lora._onednn() is None:
        pytest.skip("this vLLM build has no oneDNN matmul")
    made = []
    monkeypatch.setattr(ops, "create_onednn_mm", lambda w, cache: made.append(w.dtype) or object())
    monkeypatch.setattr(cpu_lora, "_refused", set())
    owner = torch.zeros(SLOTS, 1, R, IN, dtype=torch.bfloat16)
    a, b = torch.randn(SLOTS, 2 * R, IN), torch.randn(SLOTS, OUT, 2 * R)
    cpu_lora.weights_changed()
    first = [cpu_lora._handlers(owner, a, b, slot, torch.bfloat16) for slot in (0, 1)]
    assert len(made) == 4 and set(made) == {torch.bfloat16}
    assert cpu_lora._handlers(owner, a, b, 0, torch.bfloat16) is first[0] and len(made) == 4  # cached
    cpu_lora.weights_changed(1)
    assert cpu_lora._handlers(owner, a, b, 0, torch.bfloat16) is first[0]
    assert cpu_lora._handlers(owner, a, b, 1, torch.bfloat16) is not first[1] and len(made) == 6
    cpu_lora.weights_changed()  # slot unknown: everything
    assert cpu_lora._handlers(owner, a, b, 0, torch.bfloat16) is not first[0] and len(made) == 8
    assert cpu_lora._handlers(owner, a, b, 0, torch.float32) is None  # a float32 model keeps torch matmuls


@pytest.mark.parametrize("idx", INDICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # the served dtype with / without native bf16
def test_fused_add_lora_linear_matches_per_slice_math(idx, dtype):
    """qkv-like layer: 3 slices of different widths; y[:, slice_i] += scale * x A_i^T B_i^T per token's slot."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    g = torch.Generator().manual_seed(3)
    slices = (32, 16, 16)
    a = tuple(torch.randn(SLOTS, 1, R, IN, generator=g).to(dtype) for _ in slices)
    b = tuple(torch.randn(SLOTS, 1, n, R, generator=g).to(dtype) for n in slices)
    x = torch.randn(T, IN, generator=g).to(dtype)
    y = torch.randn(T, sum(slices), generator=g).to(dtype)
    wrapper = PunicaWrapperCPU(64, 8, "cpu")
    wrapper._token_lora_indices[:T].copy_(idx)
    wrapper.indices_len[0] = T
    cpu_lora.indices_changed()
    cpu_lora.weights_changed()
    got = y.clone()
    cpu_lora.add_lora_linear(wrapper, got, x, a, b, 0.5, slices)
    want = y.double()
    off = 0
    for s, n in enumerate(slices):
        for t in range(T):
            k = int(idx[t])
            if k >= 0:
                want[t, off:off + n] += 0.5 * x[t].double() @ a[s][k, 0].double().t() @ b[s][k, 0].double().t()
        off += n
    close(got, want.to(dtype))


def test_a_dtype_onednn_refuses_falls_back_to_fp32_once(monkeypatch, capfd):
    """An AVX2-only CPU has no oneDNN bf16 matmul ("could not create a primitive descriptor"): the LoRA term must
    still be right, through the fp32 path, and the refusal is remembered, not retried every layer."""
    import vllm._custom_ops as ops
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    if cpu_lora._onednn() is None:
        pytest.skip("this vLLM build has no oneDNN matmul")
    calls = []

    def refuse(weight, cache_size):
        calls.append(weight.dtype)
        raise RuntimeError("could not create a primitive descriptor for the matmul primitive.")

    monkeypatch.setattr(ops, "create_onednn_mm", refuse)
    monkeypatch.setattr(cpu_lora, "_refused", set())
    g = torch.Generator().manual_seed(5)
    bf = torch.bfloat16
    a = (torch.randn(SLOTS, 1, R, IN, generator=g).to(bf),)
    b = (torch.randn(SLOTS, 1, 24, R, generator=g).to(bf),)
    x, y = torch.randn(T, IN, generator=g).to(bf), torch.randn(T, 24, generator=g).to(bf)
    wrapper = PunicaWrapperCPU(64, 8, "cpu")
    wrapper._token_lora_indices[:T].copy_(INDICES[0])
    wrapper.indices_len[0] = T
    cpu_lora.indices_changed()
    cpu_lora.weights_changed()
    for _ in range(2):
        got = y.clone()
        cpu_lora.add_lora_linear(wrapper, got, x, a, b, 0.5, (24,))
        want = y.double().clone()
        for t in range(T):
            k = int(INDICES[0][t])
            if k >= 0:
                want[t] += 0.5 * x[t].double() @ a[0][k, 0].double().t() @ b[0][k, 0].double().t()
        close(got, want.to(bf))
    assert calls == [bf] and bf in cpu_lora._refused
    assert "LoRA terms fall back to fp32" in capfd.readouterr().err
