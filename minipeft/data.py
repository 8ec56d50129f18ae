"""Data for the training loop: read records, split them, tokenise them, batch them.

Everything here is plain Python on lists; the only dependency beyond torch is the
`tokenizers` library. A pipeline reads like this:

    records = read_classification("train.tsv")                 # [{"text": ..., "label": 1}, ...]
    train, val, _ = split(records, val_fraction=0.05, seed=0)
    tok = load_tokenizer("tokenizer.json")
    loader = BatchLoader(encode_classification(train, tok, max_length=64), batch_size=32)
    for batch in loader:                                      # dicts of padded LongTensors
        model(**batch)

Two record shapes are supported:
- classification: {"text": str, "label": int}
- prompt/completion for causal LMs: {"prompt": str, "completion": str}; the labels are
  the completion tokens only (prompt and padding are -100, which the loss ignores).
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Iterator, Sequence

import torch
from tokenizers import Tokenizer

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
TEXT_COLUMNS = ("sentence", "text")  # tried in order when no text column is named
LABEL_COLUMN = "label"
PROMPT_COLUMN = "prompt"
COMPLETION_COLUMN = "completion"


class DataError(ValueError):
    """A data file or record that cannot be used; the message says what would be right."""


# ---------------------------------------------------------------------------------------
# Reading files


def read_rows(path: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """Read a .tsv, .csv or .jsonl file into (rows, columns).

    A .json file is read as JSON Lines too (one object per line), not as one JSON document.
    TSV and CSV files must have a header line. Each row is a dict keyed by column name and
    carries its 1-based line number under "_line" so later errors can point at it.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass the .tsv, .csv or .jsonl file in it")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        rows, columns = _read_delimited(path, "\t")
    elif suffix == ".csv":
        rows, columns = _read_delimited(path, ",")
    elif suffix in (".jsonl", ".json"):
        rows, columns = _read_jsonl(path)
    else:
        raise DataError(f"{path}: unknown file type {suffix!r}; use .tsv, .csv or .jsonl (.json is read as JSON Lines)")
    if not rows:
        raise DataError(f"{path}: the file has no data rows (an empty file, or a header only)")
    return rows, columns


def _read_text(path: Path) -> str:
    """The file's text, read as UTF-8. utf-8-sig drops a byte-order mark (Excel writes one),
    which would otherwise become part of the first column's name and hide it."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: the file is not UTF-8 (byte {data[e.start]:#04x}); save it as UTF-8, e.g. "
                        f"iconv -f latin1 -t utf-8 {path.name}") from None


def _is_blank(fields: list[str]) -> bool:
    return all(not f.strip() for f in fields)  # no field, or only spaces and separators


def _read_delimited(path: Path, delimiter: str) -> tuple[list[dict], list[str]]:
    rows: list[dict] = []
    # GLUE-style TSVs are unquoted and sentences contain stray quote characters, so TSV
    # is read without quoting; CSV keeps the usual quoting rules.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter, quoting=quoting)
    header = None
    for fields in reader:
        if _is_blank(fields):
            continue
        if header is None:
            header = [h.strip() for h in fields]
            twice = sorted({h for h in header if header.count(h) > 1})
            if twice:
                raise DataError(f"{path}:{reader.line_num}: the header names column(s) {twice} more than once; "
                                "give each column its own name")
            continue
        if len(fields) != len(header):
            raise DataError(
                f"{path}:{reader.line_num}: expected {len(header)} fields "
                f"({', '.join(header)}) separated by {delimiter!r}, found {len(fields)}"
            )
        row = dict(zip(header, fields))
        row["_line"] = reader.line_num
        rows.append(row)
    return rows, header or []


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    rows: list[dict] = []
    columns: dict[str, None] = {}  # insertion-ordered set
    for line_no, line in enumerate(_read_text(path).split("\n"), start=1):  # (\r stays: JSON takes it as space)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object, found {type(row).__name__}")
        columns.update(dict.fromkeys(row))
        row["_line"] = line_no
        rows.append(row)
    return rows, list(columns)


def _pick_column(path, columns: Sequence[str], wanted: str | None, defaults: Sequence[str], role: str) -> str:
    candidates = [wanted] if wanted else list(defaults)
    for c in candidates:
        if c in columns:
            return c
    asked = repr(wanted) if wanted else f"named {' or '.join(map(repr, defaults))}"
    # A header-less file's first row is taken for the header: its "column names" are data then.
    headless = any(_is_int_text(c) for c in columns)
    raise DataError(
        f"{path}: no {role} column {asked}; the columns are {', '.join(map(repr, columns))}. "
        + ("Its first line looks like data, not a header: add a header line naming the columns." if headless
           else f"Pass {role}_column= with the {role} column's name.")
    )


def _get(path, row: dict, column: str):
    if column not in row:  # JSONL rows may each have different keys
        raise DataError(f"{path}:{row['_line']}: the row has no {column!r} field")
    return row[column]


_INT = re.compile(r"-?\d+")


def _is_int_text(value) -> bool:
    """True for text int() reads as a whole number: an optional "-", then digits (so not "--1")."""
    return isinstance(value, str) and _INT.fullmatch(value.strip()) is not None


def _parse_label(path, row: dict, value, label_names: Sequence[str] | None, num_labels: int | None) -> int:
    where = f"{path}:{row['_line']}"
    if label_names is not None:
        if str(value) in label_names:
            return list(label_names).index(str(value))
        if not ((isinstance(value, int) and not isinstance(value, bool)) or _is_int_text(value)):
            raise DataError(f"{where}: label {value!r} is not one of {list(label_names)}")
        num_labels = len(label_names)
    if isinstance(value, bool) or not (isinstance(value, int) or _is_int_text(value)):
        raise DataError(
            f"{where}: label {value!r} is not an integer; labels must be class indices 0..N-1 "
            "(pass label_names to map string labels to indices)"
        )
    label = int(value)
    if label < 0 or (num_labels is not None and label >= num_labels):
        upper = f"{num_labels - 1}" if num_labels is not None else "N-1"
        raise DataError(f"{where}: label {label} is out of range; expected 0..{upper}")
    return label


def read_classification(
    path: str | os.PathLike,
    text_column: str | None = None,
    label_column: str = LABEL_COLUMN,
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
) -> list[dict]:
    """Read (text, label) records. Returns [{"text": str, "label": int}, ...].

    text_column defaults to "sentence", then "text". Labels must be integers in
    [0, num_labels) (num_labels checked when given), or strings listed in label_names.
    """
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1):
        raise ValueError(f"num_labels must be an integer >= 1, or None not to check, got {num_labels!r}")
    if label_names is not None:
        if isinstance(label_names, str) or not all(isinstance(n, str) for n in label_names) or not label_names:
            raise ValueError(f"label_names must be a list of class names, e.g. ['negative', 'positive'], "
                             f"got {label_names!r}")
        label_names = list(label_names)
    rows, columns = read_rows(path)
    text_col = _pick_column(path, columns, text_column, TEXT_COLUMNS, "text")
    label_col = _pick_column(path, columns, label_column, (), "label")
    records = []
    for row in rows:
        text = _get(path, row, text_col)
        if not isinstance(text, str):
            raise DataError(f"{path}:{row['_line']}: text {text!r} is not a string")
        label = _parse_label(path, row, _get(path, row, label_col), label_names, num_labels)
        records.append({"text": text, "label": label})
    return records


def read_prompt_completion(
    path: str | os.PathLike,
    prompt_column: str = PROMPT_COLUMN,
    completion_column: str = COMPLETION_COLUMN,
) -> list[dict]:
    """Read (prompt, completion) records. Returns [{"prompt": str, "completion": str}, ...]."""
    rows, columns = read_rows(path)
    p_col = _pick_column(path, columns, prompt_column, (), "prompt")
    c_col = _pick_column(path, columns, completion_column, (), "completion")
    records = []
    for row in rows:
        prompt, completion = _get(path, row, p_col), _get(path, row, c_col)
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{path}:{row['_line']}: prompt and completion must be strings")
        records.append({"prompt": prompt, "completion": completion})
    return records


def split(
    records: Sequence, val_fraction: float = 0.1, test_fraction: float = 0.0, seed: int = 0
) -> tuple[list, list, list]:
    """Seeded shuffle, then cut into (train, validation, test).

    The same seed and the same records always give the same three lists, independent of
    the global RNG. A fraction >= 1 is read as a count of records.
    """
    n = len(records)

    def size(name: str, frac: float) -> int:
        if isinstance(frac, bool) or not isinstance(frac, numbers.Real) or not (frac >= 0 and math.isfinite(frac)):
            raise DataError(f"{name} must be a share of the records in [0, 1) or a count >= 1, not {frac!r}")
        if frac >= 1 and frac != int(frac):
            raise DataError(f"{name}={frac!r} is read as a count of records, which must be a whole number; "
                            f"for a share use a number below 1")
        return int(frac) if frac >= 1 else int(round(n * frac))

    n_val, n_test = size("val_fraction", val_fraction), size("test_fraction", test_fraction)
    if n_val + n_test > n:
        raise DataError(f"cannot take {n_val} validation + {n_test} test records from {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    shuffled = [records[i] for i in order]
    return shuffled[n_val + n_test :], shuffled[:n_val], shuffled[n_val : n_val + n_test]


# ---------------------------------------------------------------------------------------
# Tokenising


def load_tokenizer(tokenizer: str | os.PathLike | Tokenizer) -> Tokenizer:
    """A private copy of a `tokenizers.Tokenizer` with padding and truncation turned off; given
    one, a transformers tokenizer built on one (its `backend_tokenizer`), or a tokenizer.json path
    (or its folder). The functions below that take a tokenizer take all three.

    A tokenizer.json may carry its own padding (to a fixed length) and truncation; we pad
    per batch instead and truncate per call, so both are switched off on a copy and the
    caller's object is left untouched.
    """
    tokenizer = _backend(tokenizer)
    if isinstance(tokenizer, Tokenizer):
        tok = Tokenizer.from_str(tokenizer.to_str())
    elif not isinstance(tokenizer, (str, os.PathLike)):
        raise TypeError(f"tokenizer must be a tokenizers.Tokenizer (or a transformers tokenizer built on one), or the "
                        f"path of a tokenizer.json or its folder; got a {type(tokenizer).__name__}")
    else:
        path = Path(tokenizer)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{path}: no tokenizer.json there; pass its path or a tokenizers.Tokenizer")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
            raise DataError(f"{path}: not a tokenizer.json that the tokenizers library can read ({err})") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def _backend(tokenizer):
    """A transformers tokenizer's ``tokenizers.Tokenizer`` (the one it runs); anything else as it is."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else tokenizer


def pad_token_id(tokenizer: Tokenizer, default: int = 0) -> int:
    """The id of the tokenizer's pad token ([PAD], <pad>, ...), or `default` when it has none."""
    tokenizer = _backend(tokenizer)
    for name in ("[PAD]", "<pad>", "<|pad|>", "<PAD>"):
        i = tokenizer.token_to_id(name)
        if i is not None:
            return i
    return default


def encode_classification(records: Sequence[dict], tokenizer: Tokenizer, max_length: int = 128) -> list[dict]:
    """Tokenise {"text", "label"} records into {"input_ids": list[int], "label": int}; records
    without labels (new text to predict) into {"input_ids": list[int]}.

    Special tokens ([CLS] ... [SEP]) come from the tokenizer's post-processor; sequences
    longer than max_length are truncated (keeping the final special token).
    """
    tok = load_tokenizer(tokenizer)
    specials = tok.num_special_tokens_to_add(False)
    if not isinstance(max_length, int) or max_length <= specials:
        # (tokenizers would then silently not truncate at all)
        raise DataError(f"max_length={max_length!r} leaves no room for text: the tokenizer adds {specials} special "
                        f"token(s) to each sequence; give max_length > {specials}")
    tok.enable_truncation(max_length)
    _check_records(records, ("text",), "encode_classification", "read_classification",
                   "for prompt/completion records, encode_prompt_completion")
    encodings = tok.encode_batch([r["text"] for r in records])
    return [{"input_ids": e.ids, **({"label": r["label"]} if "label" in r else {})} for e, r in zip(encodings, records)]


def encode_prompt_completion(
    records: Sequence[dict],
    tokenizer: Tokenizer,
    max_length: int = 512,
    eos_token_id: int | None = None,
) -> list[dict]:
    """Tokenise {"prompt", "completion"} records for a causal LM.

    Returns {"input_ids": prompt+completion(+eos), "labels": [-100]*len(prompt)+completion(+eos)}.
    The prompt gets the tokenizer's special tokens (e.g. BOS), the completion none. Rows
    are cut at max_length from the right. A row with nothing left to predict would teach
    nothing (and its loss would be a mean over no token), so it is dropped, with a warning
    that counts them: its prompt fills all of max_length, its completion is empty (and there
    is no eos), or its prompt is empty and its target one token long: the first token has no
    position before it to be predicted from (position t predicts token t + 1). When that
    leaves no row at all, it is an error.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an integer >= 2 (a prompt token and one to predict), got {max_length!r}")
    tok = load_tokenizer(tokenizer)
    if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)
                                     or not 0 <= eos_token_id < tok.get_vocab_size()):
        raise DataError(f"eos_token_id={eos_token_id!r} is not a token id of this tokenizer (0 to "
                        f"{tok.get_vocab_size() - 1}); e.g. tokenizer.token_to_id('</s>')")
    _check_records(records, ("prompt", "completion"), "encode_prompt_completion", "read_prompt_completion",
                   "for text/label records, encode_classification")
    prompts = tok.encode_batch([r["prompt"] for r in records])
    completions = tok.encode_batch([r["completion"] for r in records], add_special_tokens=False)
    out = []
    dropped = {"too_long": 0, "empty": 0, "unpredictable": 0}
    for p, c in zip(prompts, completions):
        target = c.ids + ([eos_token_id] if eos_token_id is not None else [])
        if not target:
            dropped["empty"] += 1
        elif len(p.ids) >= max_length:  # truncation would cut the whole target away
            dropped["too_long"] += 1
        elif not p.ids and len(target) == 1:
            dropped["unpredictable"] += 1
        else:
            ids = (p.ids + target)[:max_length]
            labels = ([IGNORE_INDEX] * len(p.ids) + target)[:max_length]
            out.append({"input_ids": ids, "labels": labels})
    if any(dropped.values()):
        why = {"too_long": f"a prompt of at least max_length={max_length} tokens (raise max_length)",
               "empty": "an empty completion (pass eos_token_id to teach the model to stop there)",
               "unpredictable": "an empty prompt and a one-token target, which no position precedes (give a "
                                "prompt, or a tokenizer that adds a BOS token)"}
        reasons = [f"{count} with {why[kind]}" for kind, count in dropped.items() if count]
        message = f"{sum(dropped.values())} of {len(records)} rows have nothing to predict: {'; '.join(reasons)}"
        if not out:
            raise DataError(f"no row is left to train on; {message}")
        warnings.warn(f"dropped {message}", stacklevel=2)
    return out


def _check_records(records, fields: tuple[str, ...], function: str, reader: str, other: str) -> None:
    """A DataError unless ``records`` is a list of dicts whose ``fields`` hold strings."""
    if isinstance(records, (str, os.PathLike)) or not all(isinstance(r, Mapping) for r in records):
        raise DataError(f"{function} takes records (dicts), as {reader}(path) returns them; got "
                        f"{type(records).__name__ if isinstance(records, (str, os.PathLike)) else 'other items'}")
    for i, record in enumerate(records):
        bad = [f for f in fields if not isinstance(record.get(f), str)]
        if bad:
            raise DataError(f"{function}: record {i} needs {' and '.join(map(repr, fields))} as text; it has "
                            f"{ {f: record.get(f) for f in bad} } (keys {sorted(map(str, record))}); {other}")


# ---------------------------------------------------------------------------------------
# Batching


def collate(examples: Sequence[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad a list of encoded examples to the longest one in the list (dynamic padding).

    Returns input_ids and attention_mask [B, T] and labels: [B] for classification
    ("label" in the examples) or [B, T] padded with -100 for causal LMs ("labels"); no labels
    for examples that have none (text to predict).
    """
    if len(examples) == 0:
        raise DataError("collate got no examples; a batch holds at least one")
    raw = next((e for e in examples if "input_ids" not in e), None)
    if raw is not None:
        raise DataError(f"an example needs its token ids under 'input_ids'; this one has {sorted(raw)}: tokenise "
                        "the records first (encode_classification, encode_prompt_completion)")
    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labelled = ["label" in e or "labels" in e for e in examples]
    if any(labelled) and not all(labelled):
        raise DataError(f"example {labelled.index(False)} has no label while others have: a batch is labelled "
                        "throughout (training, evaluation) or not at all (prediction)")
    token_labels = "labels" in examples[0]
    other = next((i for i, e in enumerate(examples) if labelled[i] and ("labels" in e) != token_labels), None)
    if other is not None:
        raise DataError(f"example 0 has {'labels' if token_labels else 'label'} and example {other} has "
                        f"{'label' if token_labels else 'labels'}: a batch holds one label per example ('label') "
                        "or labels per token ('labels'), not both")
    labels = None
    if all(labelled):
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long) if token_labels else torch.empty(B, dtype=torch.long)
    for i, e in enumerate(examples):
        ids = _token_ids(e["input_ids"], i)
        n = len(ids)
        input_ids[i, :n] = ids
        attention_mask[i, :n] = 1
        if labels is not None and token_labels:
            per_token = _class_indices(e["labels"], i)
            if len(per_token) != n:
                raise DataError(f"example {i} has {n} token ids and {len(per_token)} labels; labels per token go "
                                "one to a token (-100 where there is nothing to predict)")
            labels[i, :n] = per_token
        elif labels is not None:
            labels[i] = _class_index(e["label"], i)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    return batch if labels is None else {**batch, "labels": labels}


def _token_ids(ids, i: int) -> torch.Tensor:
    """Example ``i``'s token ids as a long tensor: integers >= 0 (a float would be truncated silently)."""
    try:
        values = torch.as_tensor(ids) if len(ids) else torch.zeros(0, dtype=torch.long)  # ([] reads as float)
    except (TypeError, ValueError, RuntimeError):
        values = None
    if (values is None or values.dim() != 1 or values.dtype == torch.bool or values.is_floating_point()
            or values.is_complex()):
        raise DataError(f"example {i}'s input_ids {ids!r} are not a list of token ids (integers)")
    if (values < 0).any():
        raise DataError(f"example {i}'s input_ids hold {values[values < 0][0].item()}; token ids are >= 0")
    return values.long()


def _class_indices(labels, i: int) -> torch.Tensor:
    """Example ``i``'s labels per token as class or token indices (long), checked as
    ``_class_index`` checks one label, all at once; -100 (IGNORE_INDEX) passes as any whole number."""
    try:
        values = torch.as_tensor(labels)
        if values.is_floating_point():
            values = torch.as_tensor(labels, dtype=torch.float64)  # (0.7 as given, not as float32)
    except (TypeError, ValueError, RuntimeError):
        values = None
    if values is None or values.dim() != 1 or values.dtype == torch.bool or values.is_complex():
        raise DataError(f"example {i}'s labels {labels!r} are not a list of class indices, one per token: whole "
                        "numbers 0, 1, ... (one label per example goes under 'label')")
    if values.is_floating_point():
        bad = ~(torch.isfinite(values) & (values == values.round()) & (values.abs() < 2**62))
        if bad.any():
            _class_index(values[bad][0].item(), i)  # (raises, naming the first)
    return values.long()


def _class_index(label, i: int) -> int:
    """A classification label as the class index it must be (a float would be truncated silently)."""
    if isinstance(label, torch.Tensor) and label.numel() == 1:
        label = label.item()
    whole = isinstance(label, numbers.Real) and math.isfinite(label) and label == int(label)
    if not whole or abs(label) >= 2**62:
        raise DataError(f"example {i}'s label {label!r} is not a class index: a classification label is a whole "
                        "number 0, 1, ...")
    return int(label)


@dataclass
class BatchLoader:
    """Re-iterable batches of padded tensors, deterministic given (seed, epoch).

    shuffle: a new order every epoch, drawn from a private RNG seeded with
        `seed * 1_000_003 + epoch` (not the global RNG), so a resumed run sees exactly the
        batches the interrupted one would have. The prime factor keeps (seed, epoch) pairs
        apart: with `seed + epoch`, seed 1 epoch 0 would repeat seed 0 epoch 1.
    group_by_length: bucketed batches. Cut the examples (shuffled first, with shuffle) into
        chunks of `bucket_size` batches, sort each chunk by length, batch it, and (with shuffle)
        shuffle the batches. Batches hold similar lengths (little padding) while the order stays
        random; without shuffle, the chunks follow the file's order.
    Call set_epoch(e) before iterating epoch e (the training loop does).
    """

    examples: Sequence[dict]
    batch_size: int = 32
    shuffle: bool = False
    group_by_length: bool = False
    bucket_size: int = 50  # in batches
    drop_last: bool = False
    pad_id: int = 0
    seed: int = 0
    epoch: int = 0

    def __post_init__(self):
        for name in ("batch_size", "bucket_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, not {value!r}")
        for name in ("shuffle", "group_by_length", "drop_last"):
            if not isinstance(getattr(self, name), bool):  # "no" would read as true
                raise ValueError(f"{name} must be True or False, not {getattr(self, name)!r}")
        for name in ("pad_id", "seed", "epoch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, not {value!r}")
        if len(self.examples) == 0:
            raise ValueError("BatchLoader got no examples: check the data file and the split that produced them")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.examples)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batch_indices(self) -> list[list[int]]:
        order = list(range(len(self.examples)))
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        if self.drop_last:
            # drop the partial batch's worth before grouping by length, so the examples left out
            # are random ones (the shuffle's last), not always the longest
            order = order[: len(order) - len(order) % self.batch_size]
        if self.group_by_length:
            chunk = self.batch_size * self.bucket_size
            order = [
                i
                for start in range(0, len(order), chunk)
                for i in sorted(order[start : start + chunk], key=lambda j: len(self.examples[j]["input_ids"]))
            ]
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.group_by_length and self.shuffle:
            rng.shuffle(batches)  # else every chunk would run short-to-long
        return batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for idx in self.batch_indices():
            yield collate([self.examples[i] for i in idx], self.pad_id)
