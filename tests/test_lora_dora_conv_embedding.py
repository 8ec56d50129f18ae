"""DoRA on convolutions and embeddings, and LoRA on nn.Conv3d, against peft and by hand.

DoRA's rows are a convolution's output channels (each with its whole kernel) and an
embedding's features (columns of the table, over the whole vocabulary), as in peft: the
magnitude vector keeps peft's shapes, (1, out, 1, ...) and (dim,), so checkpoints load both ways.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minipeft
from tests.against_peft import assert_checkpoints_load_both_ways
from tests.models import TinyNet, input_ids, randomize_adapters
from tests.test_lora_peft_parity import assert_same_behaviour, build_pair

peft = pytest.importorskip("peft")


class Volumes(nn.Module):
    """A Conv3d over a small volume, then a linear head: LoRA and DoRA on a 3-D kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(2, 5, kernel_size=(3, 2, 3), padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # The ids only seed a volume, so that the shared helpers (which pass input_ids) apply.
        g = torch.Generator().manual_seed(int(input_ids.sum()))
        volume = torch.randn(input_ids.shape[0], 2, 4, 5, 6, generator=g)
        return self.head(self.conv3d(volume).mean((2, 3, 4)))


@pytest.mark.parametrize("targets", [["embed"], ["conv1d"], ["conv2d"], ["embed", "conv1d", "conv2d", "fc1"]])
def test_dora_on_embeddings_and_convolutions_matches_peft(targets):
    peft_model, mini_model = build_pair(TinyNet().eval(), r=2, lora_alpha=6, target_modules=targets, use_dora=True)
    assert_same_behaviour(peft_model, mini_model, input_ids())


@pytest.mark.parametrize("use_dora", [False, True])
def test_conv3d_matches_peft(use_dora):
    peft_model, mini_model = build_pair(Volumes(), r=3, lora_alpha=6, target_modules=["conv3d"], use_dora=use_dora)
    assert_same_behaviour(peft_model, mini_model, input_ids())


def test_dora_with_dropout_in_training_draws_what_peft_draws():
    # With dropout the convolution's base term is recomputed on the dropped input (bias left
    # out); the embedding has no dropout.
    peft_model, mini_model = build_pair(TinyNet(), r=2, lora_alpha=6, lora_dropout=0.3, use_dora=True,
                                        target_modules=["embed", "conv1d", "conv2d"])
    outputs = []
    for model in (peft_model, mini_model):
        model.train()
        torch.manual_seed(3)
        outputs.append(model(input_ids=input_ids()))
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-6, rtol=0)


def dora_weight(weight, rows, magnitude, delta):
    """By the definition: each row of (W + delta) scaled to the magnitude, in W's layout.
    ``rows(t)`` views t as DoRA's matrix of rows."""
    adapted = weight + delta
    norm = rows(adapted).norm(dim=1)
    return (rows(adapted) * (magnitude / norm)[:, None]).reshape(rows(adapted).shape)


def test_dora_conv_and_embedding_outputs_follow_the_definition():
    model = minipeft.get_peft_model(TinyNet().eval(), minipeft.LoraConfig(r=2, lora_alpha=6, use_dora=True,
                                                                          target_modules=["conv2d", "embed"]))
    randomize_adapters(model)
    net = model.get_base_model()
    ids = input_ids()
    s = 6 / 2
    with torch.no_grad():
        # Conv2d (4, 1, 3, 3): rows are the 4 output channels, each 9 weights.
        conv = net.conv2d
        A, B = conv.lora_A["default"].weight, conv.lora_B["default"].weight  # (2, 1, 3, 3), (4, 2, 1, 1)
        W = conv.base_layer.weight
        delta = s * (B.flatten(1) @ A.flatten(1)).reshape(W.shape)
        m = conv.lora_magnitude_vector["default"].weight.reshape(-1)
        W_dora = dora_weight(W, lambda t: t.flatten(1), m, delta).reshape(W.shape)
        image = torch.randn(2, 1, 5, 6)
        torch.testing.assert_close(conv(image), F.conv2d(image, W_dora, conv.base_layer.bias, padding=1),
                                   atol=1e-6, rtol=1e-5)
        # Embedding (V, 16): rows are the 16 features, each a column over the vocabulary.
        emb = net.embed
        A, B = emb.lora_embedding_A["default"], emb.lora_embedding_B["default"]  # (2, V), (16, 2)
        W = emb.base_layer.weight
        m = emb.lora_magnitude_vector["default"].weight
        W_dora = dora_weight(W.T, lambda t: t, m, s * (B @ A)).T  # (V, 16)
        torch.testing.assert_close(emb(ids), F.embedding(ids, W_dora), atol=1e-6, rtol=1e-5)


def test_dora_conv_and_embedding_merge_unmerge_and_match_peft_merged(tmp_path):
    peft_model, mini_model = build_pair(TinyNet().eval(), r=2, lora_alpha=6, use_dora=True,
                                        target_modules=["embed", "conv1d", "conv2d"])
    ids = input_ids()
    with torch.no_grad():
        before = mini_model(input_ids=ids)
        mini_model.merge_adapter()
        torch.testing.assert_close(mini_model(input_ids=ids), before, atol=1e-5, rtol=1e-5)
        mini_model.unmerge_adapter()
        torch.testing.assert_close(mini_model(input_ids=ids), before, atol=1e-5, rtol=1e-5)
        ours = copy.deepcopy(mini_model).merge_and_unload().state_dict()
        theirs = peft_model.merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-5, msg=name)
    restored = mini_model.unload().state_dict()
    for name, t in TinyNet().state_dict().items():
        assert restored[name].shape == t.shape


@pytest.mark.parametrize("base, targets", [(TinyNet, ["embed", "conv1d", "conv2d"]), (Volumes, ["conv3d"])])
def test_dora_checkpoints_load_both_ways(base, targets, tmp_path):
    model = base().eval()
    peft_model, mini_model = build_pair(model, r=2, lora_alpha=6, use_dora=True, target_modules=targets)
    peft_model.eval(), mini_model.eval()

    def run(m):
        with torch.no_grad():
            return m(input_ids=input_ids())
    assert_checkpoints_load_both_ways(model, peft_model, mini_model, run, tmp_path)


@pytest.mark.parametrize("target", ["embed", "conv1d"])
def test_a_dora_adapter_beside_a_plain_one_on_a_wrapped_layer(target):
    # The second adapter reaches the layer through update_layer, not wrap_module: it must get a
    # magnitude vector its forward uses, as in peft.
    config = dict(r=2, lora_alpha=4, target_modules=[target])
    peft_model, mini_model = build_pair(TinyNet().eval(), **config)
    peft_model.add_adapter("dora", peft.LoraConfig(**config, use_dora=True))
    mini_model.add_adapter("dora", minipeft.LoraConfig(**config, use_dora=True))
    randomize_adapters(peft_model, seed=4)
    mini_model.load_state_dict(peft_model.state_dict(), strict=True)
    peft_model.set_adapter("dora"), mini_model.set_adapter("dora")
    assert_same_behaviour(peft_model, mini_model, input_ids())


def test_conv_dora_on_an_unbatched_input_and_under_autocast():
    # nn.Conv1d takes (C, L) without a batch: the per-channel scale lines up with the channels
    # either way (here L = C_out, where a batch-first view would scale the positions instead).
    conv = nn.Sequential(nn.Conv1d(3, 5, kernel_size=3, padding=1))
    model = minipeft.get_peft_model(conv, minipeft.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    randomize_adapters(model)
    x = torch.randn(3, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.unsqueeze(0))[0])
        # Under autocast the result keeps the base output's dtype, as the linear DoRA (and peft) do.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x.unsqueeze(0)).dtype == model.get_base_model()[0].base_layer(x.unsqueeze(0)).dtype
