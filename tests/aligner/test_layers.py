"""The first-LoRA-layer setting: an index, or a share of the model's depth (aligner/layers.py)."""

from __future__ import annotations

import pytest

from aligner.layers import first_layer, num_layers, parse_first_layer


@pytest.mark.parametrize("spec, n, k", [
    ("0", 30, 0), (0, 30, 0), ("15", 30, 15), (15, 30, 15), (" 29 ", 30, 29),
    ("50%", 30, 15), ("50%", 2, 1), ("50%", 1, 0), ("0%", 30, 0), ("99%", 30, 29), ("66.7%", 30, 20),
    ("34%", 30, 10)])
def test_a_spec_names_one_layer(spec, n, k):
    assert first_layer(spec, n) == k


@pytest.mark.parametrize("spec", ["-1", "100%", "150%", "-5%", "half", "", "%", "1.5", "nan%", "inf%"])
def test_a_malformed_spec_says_which_forms_are_accepted(spec):
    with pytest.raises(ValueError, match=r"N ≥ 0 or a share of the depth P%"):
        parse_first_layer(spec)


@pytest.mark.parametrize("spec, n", [("2", 2), ("30", 30)])
def test_an_index_beyond_the_model_is_refused_with_its_range(spec, n):
    with pytest.raises(ValueError, match=rf"must be in \[0, {n - 1}\] for this model, got {spec}"):
        first_layer(spec, n)


def test_the_layer_count_comes_from_the_models_config(tiny_model_dir):
    assert num_layers(tiny_model_dir) == 2
