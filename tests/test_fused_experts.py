"""LoRA on a transformers-5 mixture of experts, configured with the per-expert names (or
'all-linear'): the experts are fused 3-D parameters there, and the config is converted to adapt
them as peft converts it (``tuners/fused_experts.py``). Against peft 0.21 on Qwen3-MoE (one dense
layer beside the sparse one) and Mixtral: the same converted config, checkpoint keys, outputs,
and checkpoints that load both ways."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import minipeft
from tests.against_peft import assert_checkpoints_load_both_ways, seeded_pair

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def qwen3_moe():
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=100, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1],
    )
    return transformers.Qwen3MoeForCausalLM(config).eval()


def mixtral():
    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=100, num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(config).eval()


CASES = [
    (qwen3_moe, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
    (qwen3_moe, "all-linear"),  # the router too
    (qwen3_moe, ["down_proj"]),
    (qwen3_moe, r".*mlp.*proj"),  # a regex: resolved to names first
    (mixtral, ["w1", "w2", "w3", "q_proj"]),
    (mixtral, "all-linear"),
]


@pytest.mark.parametrize("make, targets", CASES, ids=lambda case: str(getattr(case, "__name__", case)))
def test_experts_are_adapted_as_peft_adapts_them(make, targets, tmp_path):
    base = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the regex case: 'gate_up_proj' is left in target_modules, no module)
        theirs, ours = seeded_pair(base, "LoraConfig", dict(r=4, lora_alpha=8, target_modules=targets,
                                                             init_lora_weights=False))
    expected, got = theirs.peft_config["default"], ours.peft_config["default"]
    assert sorted(got.target_modules) == sorted(expected.target_modules)
    assert sorted(got.target_parameters) == sorted(expected.target_parameters)
    assert "gate_up_proj" in got.target_parameters or targets == ["down_proj"]
    assert (got.rank_pattern, got.alpha_pattern) == (expected.rank_pattern, expected.alpha_pattern)
    theirs_state, ours_state = peft.get_peft_model_state_dict(theirs), minipeft.get_peft_model_state_dict(ours)
    assert {k: v.shape for k, v in ours_state.items()} == {k: v.shape for k, v in theirs_state.items()}
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    minipeft.set_peft_model_state_dict(ours, theirs_state)
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_checkpoints_load_both_ways(base, theirs, ours, lambda model: model(ids).logits, tmp_path)


def test_the_experts_gate_and_up_projections_go_together_or_not_at_all():
    with pytest.raises(ValueError, match=r"names 'gate_proj' but not 'up_proj': in Qwen3MoeForCausalLM \(transformers 5\) "
                                         r"both are one parameter, gate_up_proj"):
        minipeft.get_peft_model(qwen3_moe(), minipeft.LoraConfig(target_modules=["q_proj", "gate_proj"]))
    with pytest.raises(ValueError, match=r"target_parameters=\['down_proj'\] does not work with lora_dropout=0.05"):
        minipeft.get_peft_model(qwen3_moe(), minipeft.LoraConfig(target_modules=["down_proj"], lora_dropout=0.05))


def test_a_model_without_fused_experts_is_left_alone():
    model = minipeft.get_peft_model(copy.deepcopy(qwen3_moe().model.layers[1].mlp), minipeft.LoraConfig(
        target_modules=["gate_proj", "up_proj"]))  # a dense MLP: no config, no experts
    assert model.peft_config["default"].target_modules == ["gate_proj", "up_proj"]
    assert not model.peft_config["default"].target_parameters


def test_a_checkpoint_of_per_expert_layers_is_refused_saying_why(tmp_path):
    # transformers 4's layout, as adapters on the Hub hold it: one lora_A / lora_B per expert.
    from safetensors.torch import save_file

    peft.LoraConfig(r=4, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]).save_pretrained(tmp_path)
    tensors = {}
    for layer in range(2):
        prefix = f"base_model.model.model.layers.{layer}"
        tensors[f"{prefix}.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
        tensors[f"{prefix}.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 4)
        for expert in range(4):
            for name, (n_in, n_out) in {"gate_proj": (32, 24), "up_proj": (32, 24), "down_proj": (24, 32)}.items():
                tensors[f"{prefix}.mlp.experts.{expert}.{name}.lora_A.weight"] = torch.zeros(4, n_in)
                tensors[f"{prefix}.mlp.experts.{expert}.{name}.lora_B.weight"] = torch.zeros(n_out, 4)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"it adapts each expert as a layer of its own .* transformers 4 .* "
                                         r"load it with peft and save it again"):
        minipeft.PeftModel.from_pretrained(qwen3_moe(), tmp_path)


def test_qwen2_moe_is_left_as_peft_leaves_it():
    # peft 0.21's list of converted model types lacks qwen2_moe: its names keep selecting the
    # shared expert's nn.Linear layers, and the fused experts stay unadapted, in both libraries.
    torch.manual_seed(0)
    base = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=100, num_experts=4,
        num_experts_per_tok=2)).eval()
    theirs, ours = seeded_pair(base, "LoraConfig", dict(r=4, target_modules=["q_proj", "gate_proj", "up_proj",
                                                                            "down_proj"]))
    assert ours.peft_config["default"].target_modules == ["q_proj", "gate_proj", "up_proj", "down_proj"]
    assert not ours.peft_config["default"].target_parameters
    assert sorted(minipeft.get_peft_model_state_dict(ours)) == sorted(peft.get_peft_model_state_dict(theirs))
