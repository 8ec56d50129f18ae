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


# Per family: transformers 4's MoE block name and its experts' gate, up and down projections.
V4_NAMES = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"), "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj")}


def save_per_expert_checkpoint(base, folder, projections, r=4, alpha=8, use_rslora=False):
    """A LoRA checkpoint in transformers 4's layout (a pair per expert and projection, and the
    router as an nn.Linear), random, as peft saved it there; and ``base`` with that update merged
    by hand into its fused parameters, expert by expert: the reference its loading must equal."""
    from safetensors.torch import save_file

    block, gate, up, down = V4_NAMES[base.config.model_type]
    old_names = {"gate": gate, "up": up, "down": down, "router": "gate"}
    peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj"] + [old_names[p] for p in projections],
                    use_rslora=use_rslora).save_pretrained(folder)
    merged, tensors, scale = copy.deepcopy(base), {}, alpha / (r ** 0.5 if use_rslora else r)
    generator = torch.Generator().manual_seed(1)

    def pair(key, weight):  # a random pair for the layer ``key``, its update merged into ``weight`` (out, in)
        A, B = torch.randn(r, weight.shape[1], generator=generator), torch.randn(weight.shape[0], r, generator=generator)
        tensors[f"base_model.model.{key}.lora_A.weight"], tensors[f"base_model.model.{key}.lora_B.weight"] = A, B
        with torch.no_grad():
            weight += scale * B @ A

    for i, layer in enumerate(merged.model.layers):
        pair(f"model.layers.{i}.self_attn.q_proj", layer.self_attn.q_proj.weight)
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue  # a dense layer
        inter = experts.gate_up_proj.shape[1] // 2
        for e in range(experts.gate_up_proj.shape[0]):
            rows = {"gate": experts.gate_up_proj[e, :inter], "up": experts.gate_up_proj[e, inter:],
                    "down": experts.down_proj[e]}
            for projection in set(projections) & set(rows):
                pair(f"model.layers.{i}.{block}.experts.{e}.{old_names[projection]}", rows[projection])
        if "router" in projections:
            pair(f"model.layers.{i}.{block}.gate", layer.mlp.gate.weight)
    save_file(tensors, folder / "adapter_model.safetensors")
    return merged


@pytest.mark.parametrize("make", [mixtral, qwen3_moe])
@pytest.mark.parametrize("projections", [("gate", "up", "down", "router"), ("down",), ("gate", "up")])
def test_a_transformers_4_checkpoint_loads_into_the_fused_experts(make, projections, tmp_path):
    # Each per-expert pair's update lands on its expert's rows of the fused parameter, as merging
    # it by hand puts it there.
    base = make()
    merged = save_per_expert_checkpoint(base, tmp_path, projections)
    ours = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(ids).logits, merged(ids).logits)
    if "down" not in projections:
        return  # peft 0.21 keys gate_up_proj's pair as the inner of two wrappers, so it leaves them out here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (peft: its rank pattern for gate_up_proj matched nothing, when down alone)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    theirs_state, ours_state = peft.get_peft_model_state_dict(theirs), minipeft.get_peft_model_state_dict(ours)
    assert sorted(ours_state) == sorted(theirs_state)
    for key in ours_state:
        torch.testing.assert_close(ours_state[key], theirs_state[key], rtol=0, atol=0)


def test_a_transformers_4_rslora_checkpoint_keeps_each_halfs_scaling(tmp_path):
    # alpha / sqrt(r) per half: the fused rank 2 r takes alpha sqrt(2), not 2 alpha (peft's, whose
    # update then comes out sqrt(2) times too large).
    base = qwen3_moe()
    merged = save_per_expert_checkpoint(base, tmp_path, ("gate", "up"), use_rslora=True)
    ours = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert ours.peft_config["default"].alpha_pattern == {r".*\.gate_up_proj": pytest.approx(8 * 2 ** 0.5)}
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(ids).logits, merged(ids).logits)


def test_a_transformers_4_checkpoint_reloads_into_the_adapter_it_made(tmp_path):
    # load_adapter into that adapter compares the checkpoint's config as adding it converted it.
    base = mixtral()
    merged = save_per_expert_checkpoint(base, tmp_path, ("gate", "up", "down"))
    model = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    model.load_adapter(tmp_path, "default")
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids).logits, merged(ids).logits)


def test_a_transformers_4_checkpoint_missing_an_expert_is_refused_saying_which(tmp_path):
    from safetensors.torch import load_file, save_file

    save_per_expert_checkpoint(mixtral(), tmp_path, ("gate", "up", "down"))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.block_sparse_moe.experts.3.w3.lora_B.weight"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"per-expert \(transformers 4\) checkpoint lacks the w3 pair of expert\(s\) "
                                         r"\[3\] at .*model\.layers\.1\.mlp\.experts \(as transformers 5 names it\): "
                                         r"every one of the 4 experts' w3 is needed"):
        minipeft.PeftModel.from_pretrained(mixtral(), tmp_path)


def test_a_transformers_4_checkpoint_of_dense_layers_named_as_the_experts_says_why_they_find_no_adapter(tmp_path):
    # Qwen3-MoE's dense layer (mlp_only_layers) has its own gate_proj: converted, the config adapts
    # the fused experts in its place (peft's rule), and peft drops the dense layer's pair silently.
    from safetensors.torch import load_file, save_file

    base = qwen3_moe()
    save_per_expert_checkpoint(base, tmp_path, ("gate", "up", "down"))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight"] = torch.zeros(4, 32)
    tensors["base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight"] = torch.zeros(64, 4)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"2 unexpected key\(s\).* These are pairs of layers named as the experts' "
                                         r"projections but outside the experts .*: dense MLP layers or shared experts"):
        minipeft.PeftModel.from_pretrained(base, tmp_path)


def test_a_mixtral_checkpoint_adapting_the_router_alone_loads_under_the_new_block_name(tmp_path):
    base = mixtral()
    merged = save_per_expert_checkpoint(base, tmp_path, ("router",))
    ours = minipeft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(ids).logits, merged(ids).logits)


def qwen2_moe():
    torch.manual_seed(0)
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=100, num_experts=4,
        num_experts_per_tok=2)).eval()


def test_qwen2_moe_is_left_as_peft_leaves_it():
    # peft 0.21's list of converted model types lacks qwen2_moe: its names keep selecting the
    # shared expert's nn.Linear layers, and the fused experts stay unadapted, in both libraries.
    base = qwen2_moe()
    theirs, ours = seeded_pair(base, "LoraConfig", dict(r=4, target_modules=["q_proj", "gate_proj", "up_proj",
                                                                            "down_proj"]))
    assert ours.peft_config["default"].target_modules == ["q_proj", "gate_proj", "up_proj", "down_proj"]
    assert not ours.peft_config["default"].target_parameters
    assert sorted(minipeft.get_peft_model_state_dict(ours)) == sorted(peft.get_peft_model_state_dict(theirs))


def test_a_transformers_4_checkpoint_of_an_unconverted_family_is_refused_saying_why(tmp_path):
    from safetensors.torch import save_file

    base = qwen2_moe()
    peft.LoraConfig(r=4, target_modules=["down_proj"]).save_pretrained(tmp_path)
    tensors = {f"base_model.model.model.layers.0.mlp.experts.{e}.down_proj.lora_{f}.weight": torch.zeros(4, 4)
               for e in range(4) for f in "AB"}
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"it adapts each expert as a layer of its own .* transformers 4 .* converts "
                                         r"such checkpoints for the Mixtral and Qwen-MoE families, not for model type "
                                         r"'qwen2_moe'"):
        minipeft.PeftModel.from_pretrained(base, tmp_path)
