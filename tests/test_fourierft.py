"""FourierFT against hand-derived math (the inverse DFT of a sparse spectrum written out as a sum
of cosines) and against peft (one seed: the same locations and coefficients, logits, gradients,
checkpoints both ways, per-module sizes), on LLaMA's linear layers and GPT-2's Conv1D."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from minipeft import FourierFTConfig, get_peft_model
from tests import against_peft
from tests.models import input_ids, tiny_transformers_model

peft = pytest.importorskip("peft")

CASES = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def test_the_update_is_a_sum_of_cosines_over_the_chosen_frequencies():
    """Re(IDFT2(F))[p, q] = 1/(out in) sum_k c_k cos(2 pi (p u_k / out + q v_k / in)) for a spectrum F
    holding c_k at (u_k, v_k): the update written out by hand, entry by entry."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(6, 4)), FourierFTConfig(n_frequency=5, scaling=3.0,
                                                                           target_modules=["0"]))
    layer = model.get_base_model()[0]
    c, (u, v) = layer.fourierft_spectrum["default"].detach().double(), layer.indices["default"]
    p, q = torch.arange(4, dtype=torch.float64)[:, None, None], torch.arange(6, dtype=torch.float64)[None, :, None]
    want = 3.0 * (c * torch.cos(2 * math.pi * (p * u / 4 + q * v / 6))).sum(-1) / 24
    torch.testing.assert_close(layer.delta_out_in("default").double(), want, atol=1e-6, rtol=0)
    assert len({(int(a), int(b)) for a, b in zip(u, v)}) == 5  # five distinct locations
    x = torch.randn(2, 6)
    torch.testing.assert_close(model(x), layer.base_layer(x) + x @ want.float().T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("options", [{}, dict(init_weights=True), dict(scaling=10.0, random_loc_seed=5),
                                     dict(n_frequency_pattern={"v_proj": 20, "c_fc": 20})])
def test_locations_coefficients_logits_and_gradients_match_peft(kind, options):
    config = dict(n_frequency=100, target_modules=CASES[kind]) | options
    p, m = against_peft.seeded_pair(tiny_transformers_model(kind), "FourierFTConfig", config)
    against_peft.assert_same_outputs_and_gradients(p, m, input_ids())
    for name, t in p.named_parameters():
        torch.testing.assert_close(m.get_parameter(name), t, atol=0, rtol=0)


@pytest.mark.parametrize("kind", list(CASES))
def test_checkpoints_load_in_peft_and_back(tmp_path, kind):
    base = tiny_transformers_model(kind)
    p, m = against_peft.seeded_pair(base, "FourierFTConfig", dict(n_frequency=100, target_modules=CASES[kind]))
    ids = input_ids()
    against_peft.assert_checkpoints_load_both_ways(base, p, m, lambda model: model(input_ids=ids).logits, tmp_path)


@pytest.mark.parametrize("kind", list(CASES))
def test_merge_equals_the_forward_and_unmerge_restores_the_weights(kind):
    base = tiny_transformers_model(kind)
    model = get_peft_model(copy.deepcopy(base), FourierFTConfig(n_frequency=100, scaling=20.0,
                                                                target_modules=CASES[kind]))
    ids = input_ids()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        assert not torch.allclose(adapted, base(input_ids=ids).logits, atol=1e-3)
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        restored = copy.deepcopy(model).unload().state_dict()
    for name, t in base.state_dict().items():
        torch.testing.assert_close(restored[name], t, atol=1e-6, rtol=0)


def test_bad_configs_and_targets_say_what_would_be_right():
    with pytest.raises(ValueError, match="positive integer, got n_frequency=0"):
        FourierFTConfig(n_frequency=0)
    with pytest.raises(ValueError, match="'none', 'all' or 'fourier_only'"):
        FourierFTConfig(bias="lora_only")
    with pytest.raises(ValueError, match="use at most 12"):
        get_peft_model(nn.Sequential(nn.Linear(4, 3)), FourierFTConfig(n_frequency=13, target_modules=["0"]))
    with pytest.warns(UserWarning, match="fan_in_fan_out=True but '0' is an nn.Linear"):
        model = get_peft_model(nn.Sequential(nn.Linear(4, 3)), FourierFTConfig(n_frequency=4, fan_in_fan_out=True,
                                                                               target_modules=["0"]))
    assert model.peft_config["default"].fan_in_fan_out is False  # what the layer uses, as peft saves it
    with pytest.raises(ValueError, match="FourierFT supports nn.Linear"):
        get_peft_model(nn.Sequential(nn.Conv2d(2, 2, 3)), FourierFTConfig(target_modules=["0"]))
