"""transformers' Trainer with a minipeft model. Trainer reads the forward's signature to keep the
dataset columns and to find the labels (without them evaluate() reports no eval_loss and calls
no compute_metrics); a PeftModel's forward carries the wrapped model's signature for that. Trainer
saves only the models it knows by class, so the README's two-method subclass saves and resumes
the adapter instead of the whole model (which a tied embedding makes unsavable there)."""

from __future__ import annotations

import inspect
import os

import pytest
import torch

from minipeft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer's own requirement
import safetensors.torch  # noqa: E402

from tests.models import tiny_transformers_model  # noqa: E402


class AdapterTrainer(transformers.Trainer):
    """The README's recipe: checkpoints hold the adapter, resume from it and reload the best."""

    def _save(self, output_dir=None, state_dict=None):
        self.model.save_pretrained(output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        tensors = safetensors.torch.load_file(os.path.join(resume_from_checkpoint, "adapter_model.safetensors"))
        set_peft_model_state_dict(model or self.model, tensors)

    def _load_best_model(self):
        self._load_from_checkpoint(self.state.best_model_checkpoint)


def arguments(tmp_path, **kwargs):
    return transformers.TrainingArguments(str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True,
                                          per_device_train_batch_size=4, per_device_eval_batch_size=4,
                                          learning_rate=1e-2, seed=0, **kwargs)


def bert_classifier():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=2)
    return transformers.BertForSequenceClassification(config).eval()


def test_the_forward_names_the_wrapped_models_arguments_and_labels():
    model = get_peft_model(bert_classifier(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    names = list(inspect.signature(model.forward).parameters)
    assert names[:6] == ["input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "labels"]
    assert "adapter_names" in names and isinstance(model, PeftModel)
    assert transformers.utils.generic.find_labels(type(model)) == ["labels"]
    qa = get_peft_model(transformers.BertForQuestionAnswering(bert_classifier().config),
                        LoraConfig(task_type="QUESTION_ANS", r=4, target_modules=["query"]))
    assert transformers.utils.generic.find_labels(type(qa)) == ["start_positions", "end_positions"]


def test_evaluate_reports_the_loss_and_the_metrics(tmp_path):
    model = get_peft_model(bert_classifier(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(2, 64, (6,), generator=g), "labels": i % 2} for i in range(8)]
    trainer = transformers.Trainer(model=model, args=arguments(tmp_path), eval_dataset=data,
                                   compute_metrics=lambda prediction: {"seen": len(prediction.label_ids)})
    metrics = trainer.evaluate()
    with torch.no_grad():  # by hand: the mean of the two batches' losses
        batches = [data[:4], data[4:]]
        want = sum(model(input_ids=torch.stack([d["input_ids"] for d in b]),
                         labels=torch.tensor([d["labels"] for d in b])).loss for b in batches) / 2
    assert metrics["eval_seen"] == 8
    assert metrics["eval_loss"] == pytest.approx(want.item(), rel=1e-5)


def test_checkpoints_hold_the_adapter_and_resume_to_the_same_weights(tmp_path):
    # GPT-2 ties its head to the input embedding, which Trainer's whole-model save refuses.
    def run(folder, resume=None):
        model = get_peft_model(tiny_transformers_model("gpt2"), LoraConfig(task_type="CAUSAL_LM", r=4,
                                                                          target_modules=["c_attn"]))
        data = [{"input_ids": torch.arange(2, 10) + i, "labels": torch.arange(2, 10) + i} for i in range(16)]
        AdapterTrainer(model=model, args=arguments(folder, max_steps=4, save_steps=2),
                       train_dataset=data).train(resume_from_checkpoint=resume)
        return model.eval()

    whole = run(tmp_path / "whole")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "whole" / "checkpoint-4"))
    reloaded = PeftModel.from_pretrained(tiny_transformers_model("gpt2"), tmp_path / "whole" / "checkpoint-4")
    # Resumed from step 2's checkpoint: the same adapter as the run without a stop.
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-2"))
    ids = torch.arange(3, 9)[None]
    with torch.no_grad():
        want = whole(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want)
        torch.testing.assert_close(resumed(input_ids=ids).logits, want)
    assert not torch.equal(want, tiny_transformers_model("gpt2").eval()(input_ids=ids).logits)  # it trained


def test_the_best_checkpoint_is_reloaded_at_the_end(tmp_path):
    model = get_peft_model(bert_classifier(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(2, 64, (6,), generator=g), "labels": i % 2} for i in range(8)]
    # the highest loss counted best: the first checkpoint, not the weights the run ends with
    args = arguments(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, save_steps=2,
                     load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-2")
    reloaded = PeftModel.from_pretrained(bert_classifier(), best)
    ids = data[0]["input_ids"][None]
    with torch.no_grad():  # the model the run ends with is the best checkpoint's
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, reloaded(input_ids=ids).logits)
