"""The sort-free top-k / top-p must keep exactly the tokens vLLM's sorting implementation keeps."""
import pytest
import torch

stock_mod = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")
from serving.vllm_cpu import sampler as cpu_sampler  # noqa: E402

V = 49152  # SmolLM2's vocabulary: larger than both candidate sets


def stock(logits, k, p):
    return stock_mod.apply_top_k_top_p_pytorch(logits, k, p, allow_cpu_sync=True)


class Recorder:
    """The fallback, counting the rows it was handed."""

    def __init__(self) -> None:
        self.rows = 0

    def __call__(self, logits, k, p):
        self.rows += logits.shape[0]
        return stock(logits, k, p)


def logits_of(scales: list[float], seed: int = 0) -> torch.Tensor:
    """Gaussian rows (a wide nucleus: hundreds to tens of thousands of tokens at p = 0.95)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(1, V, generator=g) * s for s in scales])


def lm_like(decays: list[float], seed: int = 0) -> torch.Tensor:
    """Rows shaped like a language model's: logit = -a·log(1 + rank) + noise, shuffled. At p = 0.95 the nucleus
    is ~3 tokens for a = 3, ~16 for 2, ~180 for 1.5 and ~9,000 for 1.2."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.log1p(torch.arange(V, dtype=torch.float32))
    return torch.stack([(-a * rank + 0.5 * torch.randn(V, generator=g))[torch.randperm(V, generator=g)]
                        for a in decays])


def check_same(logits, k, p) -> Recorder:
    want = stock(logits.clone(), None if k is None else k.clone(), None if p is None else p.clone())
    rec = Recorder()
    x = logits.clone()
    got = cpu_sampler.top_k_top_p(x, k, p, fallback=rec)
    assert got is x  # in place, like vLLM's
    assert torch.equal(torch.isinf(got), torch.isinf(want)), "a different set of tokens was kept"
    assert torch.equal(got[~torch.isinf(got)], want[~torch.isinf(want)])  # kept tokens keep their own logits
    return rec


def test_peaked_rows_are_decided_without_the_sort():
    # temperature-scaled logits of a small LM: a nucleus of a handful to a few hundred tokens
    logits = lm_like([3, 2, 1.5, 2.5, 2, 3, 1.7, 2])
    p = torch.tensor([0.95, 0.9, 0.5, 0.95, 0.99, 0.1, 0.95, 0.8])
    rec = check_same(logits, None, p)
    assert rec.rows == 0


def test_flat_rows_go_to_the_sort_and_match():
    # a nucleus of tens of thousands of tokens: beyond every candidate set
    logits = torch.cat([logits_of([0.05, 0.5, 2]), lm_like([2, 1.2])])
    p = torch.full((5,), 0.95)
    rec = check_same(logits, None, p)
    assert rec.rows == 4  # all but the peaked one: their nuclei hold thousands of tokens


def test_top_k_with_top_p_per_row():
    logits = torch.cat([lm_like([1.5, 1.5, 1.2, 1.2, 2]), logits_of([0.05, 4])])
    k = torch.tensor([1, 7, 300, 5000, V, 20, V], dtype=torch.int32)  # 300 > the first set, 5000 > both
    p = torch.tensor([0.95, 0.5, 0.95, 0.95, 0.95, 0.95, 1.0])
    check_same(logits, k, p)


def test_top_k_alone_per_row_with_p_one():
    logits = logits_of([5, 2, 0.5])
    k = torch.tensor([3, 100, 40000], dtype=torch.int32)
    check_same(logits, k, torch.ones(3))


def test_ties_at_the_kth_value_keep_them_all():
    logits = torch.zeros(2, V)
    logits[:, :10] = torch.arange(10, 0, -1, dtype=torch.float32)  # 10..1, then 49142 zeros tied
    k = torch.tensor([12, 5], dtype=torch.int32)  # the 12th largest is 0: every zero ties with it
    p = torch.tensor([0.999, 0.999])
    rec = check_same(logits, k, p)
    assert rec.rows == 1  # the tie reaches past every candidate set: only the sort can decide it


def test_rows_without_filters_are_untouched():
    logits = logits_of([3, 3])
    x = logits.clone()
    rec = Recorder()
    cpu_sampler.top_k_top_p(x, torch.tensor([V, V]), torch.ones(2), fallback=rec)
    assert torch.equal(x, logits) and rec.rows == 0


def test_mixed_batch_of_served_settings():
    logits = torch.cat([lm_like([2, 1.5, 3], seed=3), logits_of([3, 0.02, 5], seed=3)])
    p = torch.tensor([0.95, 0.95, 1.0, 0.7, 0.95, 0.95])
    check_same(logits, None, p)


def test_top_k_only_is_vllms_own_path():
    logits = logits_of([3, 3])
    rec = Recorder()
    cpu_sampler.top_k_top_p(logits.clone(), torch.tensor([5, 9]), None, fallback=rec)
    assert rec.rows == 2


def test_install_routes_vllms_cpu_sampler_through_ours():
    before = stock_mod.apply_top_k_top_p
    try:
        assert cpu_sampler.install()
        assert cpu_sampler.install()  # twice: still one layer over vLLM's own function
        assert stock_mod.apply_top_k_top_p.__wrapped__ is getattr(before, "__wrapped__", before)
        logits = logits_of([4, 4])
        p = torch.full((2,), 0.9)
        want = stock(logits.clone(), None, p)
        got = stock_mod.apply_top_k_top_p(logits.clone(), None, p)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
    finally:
        stock_mod.apply_top_k_top_p = before
