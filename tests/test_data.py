"""Reading, splitting, tokenising and batching: behaviour and error messages."""

import json
import re

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from minipeft.data import (
    IGNORE_INDEX,
    BatchLoader,
    DataError,
    collate,
    encode_classification,
    encode_prompt_completion,
    load_tokenizer,
    pad_token_id,
    read_classification,
    read_prompt_completion,
    split,
)

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "good", "bad", "film", "is", "very", "the", "answer", "yes", "no", "?"]


@pytest.fixture
def tokenizer() -> Tokenizer:
    """A word-level tokenizer with BERT-like [CLS] x [SEP] framing, built in memory."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# -- reading --------------------------------------------------------------------------------


def test_reads_tsv_csv_and_jsonl_alike(tmp_path):
    tsv = write(tmp_path / "a.tsv", 'sentence\tlabel\na "good" film\t1\nbad\t0\n')
    csv_ = write(tmp_path / "a.csv", 'text,label\n"a ""good"" film",1\nbad,0\n')
    jsonl = write(tmp_path / "a.jsonl", '{"text": "a \\"good\\" film", "label": 1}\n\n{"text": "bad", "label": 0}\n')
    expected = [{"text": 'a "good" film', "label": 1}, {"text": "bad", "label": 0}]
    for path in (tsv, csv_, jsonl):
        assert read_classification(path) == expected


def test_whitespace_lines_are_blank_anywhere_and_a_column_named_twice_is_refused(tmp_path):
    tsv = write(tmp_path / "a.tsv", "\nsentence\tlabel\n \t\ngood\t1\n\t\nbad\t0\n")
    csv_ = write(tmp_path / "a.csv", "  \ntext,label\ngood,1\n   \n , \nbad,0\n")
    for path in (tsv, csv_):
        assert read_classification(path) == [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    twice = write(tmp_path / "b.csv", "text,label,text\ngood,1,reviewer\n")
    with pytest.raises(DataError, match=r"b.csv:1: the header names column\(s\) \['text'\] more than once"):
        read_classification(twice)


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl"])
def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path, suffix):
    text = "sentence\tlabel\ngood\t1\ncaf\u00e9\t0\n" if suffix == ".tsv" else \
        '{"text": "good", "label": 1}\n{"text": "caf\u00e9", "label": 0}\n'
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(text.encode("latin-1"))
    line = 3 if suffix == ".tsv" else 2
    with pytest.raises(DataError, match=rf"latin1{suffix}:{line}: the file is not UTF-8 \(byte 0xe9\); save it as UTF-8"):
        read_classification(path)


def test_custom_column_names_and_label_names(tmp_path):
    path = write(tmp_path / "a.csv", "review,sentiment\ngood,pos\nbad,neg\n")
    records = read_classification(path, text_column="review", label_column="sentiment", label_names=["neg", "pos"])
    assert records == [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]


def test_prompt_completion_records(tmp_path):
    path = write(tmp_path / "a.jsonl", json.dumps({"prompt": "is it good ?", "completion": "yes", "id": 3}) + "\n")
    assert read_prompt_completion(path) == [{"prompt": "is it good ?", "completion": "yes"}]


def test_missing_column_lists_the_columns_that_exist(tmp_path):
    path = write(tmp_path / "a.tsv", "review\tlabel\ngood\t1\n")
    with pytest.raises(DataError, match=r"no text column named 'sentence' or 'text'.*'review', 'label'. "
                                        r"Pass text_column= with"):
        read_classification(path)
    with pytest.raises(DataError, match=r"no label column 'target'.*'review', 'label'. Pass label_column="):
        read_classification(path, text_column="review", label_column="target")
    # no header line: its first row was read as one, and the error says what is missing
    headless = write(tmp_path / "b.tsv", "hide new secretions\t0\ngood\t1\n")
    with pytest.raises(DataError, match=r"'hide new secretions', '0'. Its first line looks like data, not a header"):
        read_classification(headless)


def test_empty_files_are_errors(tmp_path):
    for name, text in (("e.tsv", ""), ("h.tsv", "sentence\tlabel\n"), ("e.jsonl", "\n\n")):
        with pytest.raises(DataError, match="no data rows"):
            read_classification(write(tmp_path / name, text))


def test_bad_labels_name_the_line(tmp_path):
    path = write(tmp_path / "a.tsv", "sentence\tlabel\ngood\t1\nbad\tnegative\n")
    with pytest.raises(DataError, match=r"a.tsv:3: label 'negative' is not an integer"):
        read_classification(path)
    path = write(tmp_path / "b.tsv", "sentence\tlabel\ngood\t1\nbad\t2\n")
    with pytest.raises(DataError, match=r"b.tsv:3: label 2 is out of range; expected 0..1"):
        read_classification(path, num_labels=2)
    path = write(tmp_path / "c.jsonl", '{"text": "x", "label": 0.5}\n')
    with pytest.raises(DataError, match=r"c.jsonl:1: label 0.5 is not an integer"):
        read_classification(path)
    with pytest.raises(DataError, match=r"d.jsonl:1: label -1 is out of range"):
        read_classification(write(tmp_path / "d.jsonl", '{"text": "x", "label": -1}\n'))

    for bad in ("--1", "1-", "1.0", "+-1"):  # not whole numbers, however int() or isdigit() might read them
        path = write(tmp_path / "e.tsv", f"sentence\tlabel\ngood\t1\nbad\t{bad}\n")
        with pytest.raises(DataError, match=rf"e.tsv:3: label '{re.escape(bad)}' is not an integer"):
            read_classification(path)
    path = write(tmp_path / "f.tsv", "sentence\tlabel\ngood\t1\nbad\t--1\n")
    with pytest.raises(DataError, match=r"f.tsv:3: label '--1' is not one of"):
        read_classification(path, label_names=["neg", "pos"])


def test_byte_order_mark_does_not_hide_the_first_column(tmp_path):
    # Excel's "CSV UTF-8" starts with a BOM; read as plain utf-8 the first column would be
    # named "\ufeffsentence" and not be found
    for name, text in (("a.csv", "sentence,label\ngood,1\n"), ("a.tsv", "sentence\tlabel\ngood\t1\n"),
                       ("a.jsonl", '{"sentence": "good", "label": 1}\n')):
        path = tmp_path / name
        path.write_bytes("\ufeff".encode() + text.encode())
        assert read_classification(path) == [{"text": "good", "label": 1}]


def test_unparseable_rows_name_file_and_line(tmp_path):
    path = write(tmp_path / "a.tsv", "sentence\tlabel\ngood\t1\nno tab here\n")
    with pytest.raises(DataError, match=r"a.tsv:3: expected 2 fields \(sentence, label\).*found 1"):
        read_classification(path)
    path = write(tmp_path / "a.jsonl", '{"text": "x", "label": 0}\n{"text": "y", "label": \n')
    with pytest.raises(DataError, match=r"a.jsonl:2: not valid JSON"):
        read_classification(path)
    path = write(tmp_path / "b.jsonl", '{"text": "x", "label": 0}\n{"label": 1}\n')
    with pytest.raises(DataError, match=r"b.jsonl:2: the row has no 'text' field"):
        read_classification(path)
    with pytest.raises(DataError, match=r"unknown file type '.txt'"):
        read_classification(write(tmp_path / "a.txt", "x"))
    with pytest.raises(DataError, match="no such file"):
        read_classification(tmp_path / "missing.tsv")


# -- splitting ------------------------------------------------------------------------------


def test_split_is_seeded_disjoint_and_complete():
    records = list(range(100))
    train, val, test = split(records, val_fraction=0.1, test_fraction=0.2, seed=3)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert sorted(train + val + test) == records
    assert split(records, 0.1, 0.2, seed=3) == (train, val, test)
    assert split(records, 0.1, 0.2, seed=4) != (train, val, test)
    assert len(split(records, val_fraction=25)[1]) == 25  # >= 1 reads as a count
    assert len(split(records, val_fraction=np.int64(25))[1]) == 25  # numpy numbers too
    with pytest.raises(DataError, match="cannot take"):
        split(records, val_fraction=80, test_fraction=30)


@pytest.mark.parametrize("fraction, message", [
    (-0.1, r"val_fraction must be a share of the records in \[0, 1\) or a count >= 1, not -0.1"),
    (float("nan"), r"val_fraction must be a share .*, not nan"),
    (1.5, r"val_fraction=1.5 is read as a count of records, which must be a whole number"),
])
def test_split_refuses_fractions_that_are_neither_a_share_nor_a_count(fraction, message):
    with pytest.raises(DataError, match=message):
        split(list(range(100)), val_fraction=fraction)


# -- tokenising and batching ----------------------------------------------------------------


def test_classification_encoding_truncates_and_keeps_special_tokens(tokenizer):
    records = [{"text": "a good film", "label": 1}, {"text": "the film is very very very bad", "label": 0}]
    enc = encode_classification(records, tokenizer, max_length=5)
    assert enc[0] == {"input_ids": [2, 4, 5, 7, 3], "label": 1}
    assert enc[1]["input_ids"] == [2, 10, 7, 8, 3]  # cut to 5 with [SEP] kept
    # the caller's tokenizer is not changed by our truncation
    assert len(tokenizer.encode("the film is very very very bad").ids) == 9


def test_tokenizer_from_file_with_baked_in_padding(tmp_path, tokenizer):
    tokenizer.enable_padding(length=32)  # as some tokenizer.json files ship
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)  # a folder works as well as the file
    assert len(tok.encode("a good film").ids) == 5  # no fixed-length padding: we pad per batch
    assert pad_token_id(tok) == 0
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "nope")


def test_a_transformers_tokenizer_is_read_through_the_tokenizers_one_it_runs(tokenizer):
    transformers = pytest.importorskip("transformers")
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    records = [{"text": "a good film", "label": 1}]
    assert encode_classification(records, wrapped, 8) == encode_classification(records, tokenizer, 8)
    assert pad_token_id(wrapped) == pad_token_id(tokenizer) == 0
    with pytest.raises(TypeError, match="tokenizer must be a tokenizers.Tokenizer .* or the path of a tokenizer.json "
                                        "or its folder; got a dict"):
        load_tokenizer({"model": "word"})


def test_collate_pads_dynamically():
    batch = collate([{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [5], "label": 0}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]


def test_collate_takes_whole_number_labels_and_refuses_fractions():
    examples = [{"input_ids": [5], "label": label} for label in (np.int64(2), 1.0, torch.tensor(0), True)]
    assert collate(examples)["labels"].tolist() == [2, 1, 0, 1]
    for label in (0.7, float("nan"), "1"):
        with pytest.raises(DataError, match=r"example 1's label .* is not a class index: .* whole number"):
            collate([{"input_ids": [5], "label": 1}, {"input_ids": [5], "label": label}])
    # labels per token too (a token classifier's; -100 where there is none)
    assert collate([{"input_ids": [5, 6], "labels": [-100, 2.0]}])["labels"].tolist() == [[-100, 2]]
    for labels, message in [([-100, 0.7], r"example 0's label 0.7 is not a class index"),
                            ([-100, 1e20], r"example 0's label 1e\+20 is not a class index"),
                            (3, r"example 0's labels 3 are not a list of class indices, one per token"),
                            ([1], r"example 0 has 2 token ids and 1 labels")]:
        with pytest.raises(DataError, match=message):
            collate([{"input_ids": [5, 6], "labels": labels}])


def test_text_without_labels_encodes_and_collates_for_prediction(tokenizer):
    labelled = encode_classification([{"text": "a good film", "label": 1}], tokenizer)
    new = encode_classification([{"text": "a good film"}, {"text": "bad"}], tokenizer)
    assert new[0] == {"input_ids": labelled[0]["input_ids"]}
    batch = collate(new, pad_id=0)
    assert sorted(batch) == ["attention_mask", "input_ids"] and batch["input_ids"].shape[0] == 2
    with pytest.raises(DataError, match="example 1 has no label while others have"):
        collate([labelled[0], new[1]])


def test_prompt_tokens_and_padding_are_masked_for_causal_lm(tokenizer):
    records = [{"prompt": "is the film good ?", "completion": "yes"}, {"prompt": "good ?", "completion": "no no"}]
    enc = encode_prompt_completion(records, tokenizer, max_length=16, eos_token_id=3)
    # prompt: [CLS] is the film good ? [SEP] -> 7 tokens, then "yes" and the eos
    assert enc[0]["input_ids"] == [2, 8, 10, 7, 5, 14, 3, 12, 3]
    assert enc[0]["labels"] == [IGNORE_INDEX] * 7 + [12, 3]
    batch = collate(enc, pad_id=0)
    assert batch["labels"].shape == batch["input_ids"].shape == (2, 9)
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 4 + [13, 13, 3] + [IGNORE_INDEX] * 2
    assert batch["attention_mask"][1].tolist() == [1] * 7 + [0] * 2


def test_prompt_longer_than_max_length_is_dropped_with_a_warning(tokenizer):
    short = {"prompt": "a good film", "completion": "yes"}  # [CLS] a good film [SEP] = 5 tokens
    exactly = {"prompt": "the film is bad", "completion": "no"}  # 6 tokens: nothing left of the completion
    longer = {"prompt": "the film is very very bad", "completion": "no"}  # 8 tokens
    with pytest.warns(UserWarning, match=r"dropped 2 of 3 rows have nothing to predict: "
                                         r"2 with a prompt of at least max_length=6 tokens \(raise max_length\)"):
        enc = encode_prompt_completion([short, exactly, longer], tokenizer, max_length=6)
    assert enc == [{"input_ids": [2, 4, 5, 7, 3, 12], "labels": [IGNORE_INDEX] * 5 + [12]}]
    with pytest.raises(DataError, match=r"no row is left to train on; 2 of 2 rows .* max_length=6 .*raise max_length"):
        encode_prompt_completion([exactly, longer], tokenizer, max_length=6)


def test_empty_completion_is_dropped_unless_an_eos_is_learned(tokenizer):
    records = [{"prompt": "a good film", "completion": "yes"}, {"prompt": "is it good ?", "completion": ""}]
    with pytest.warns(UserWarning, match=r"dropped 1 of 2 rows .*: 1 with an empty completion \(pass eos_token_id"):
        assert len(encode_prompt_completion(records, tokenizer, max_length=16)) == 1
    enc = encode_prompt_completion(records, tokenizer, max_length=16, eos_token_id=3)  # nothing dropped: no warning
    assert len(enc) == 2 and enc[1]["labels"][-1] == 3


def test_a_one_token_target_after_an_empty_prompt_is_dropped(tokenizer):
    # Without a BOS token an empty prompt leaves the target's first token at position 0, which
    # no position predicts: a one-token target would leave the row nothing to learn (and a
    # batch of such rows a mean loss over no token).
    bare = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    bare.pre_tokenizer = pre_tokenizers.Whitespace()
    records = [{"prompt": "", "completion": "yes"}, {"prompt": "", "completion": "yes no"}]
    with pytest.warns(UserWarning, match=r"dropped 1 of 2 rows .*: 1 with an empty prompt and a one-token target"):
        enc = encode_prompt_completion(records, bare, max_length=16)
    assert enc == [{"input_ids": [12, 13], "labels": [12, 13]}]


def test_nothing_dropped_gives_no_warning(tokenizer, recwarn):
    encode_prompt_completion([{"prompt": "a good film", "completion": "yes"}], tokenizer, max_length=16)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def make_examples(n):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": list(range(1, int(torch.randint(1, 40, (1,), generator=g)) + 1)), "label": i % 2}
            for i in range(n)]


def test_loader_is_deterministic_per_epoch_and_covers_everything():
    examples = make_examples(100)
    loader = BatchLoader(examples, batch_size=8, shuffle=True, seed=1)
    assert len(loader) == 13
    first = loader.batch_indices()
    assert sorted(i for b in first for i in b) == list(range(100))
    assert loader.batch_indices() == first  # same epoch, same order
    loader.set_epoch(1)
    assert loader.batch_indices() != first
    assert len(BatchLoader(examples, batch_size=8, drop_last=True)) == 12 == len(list(BatchLoader(examples, 8, drop_last=True)))


def test_drop_last_with_group_by_length_drops_random_examples():
    # The examples a dropped partial batch leaves out change from epoch to epoch; they are
    # not the longest ones every time (as when the cut came after sorting by length).
    examples = make_examples(10)
    loader = BatchLoader(examples, batch_size=4, shuffle=True, group_by_length=True, drop_last=True)
    left_out = []
    for epoch in range(20):
        loader.set_epoch(epoch)
        batches = loader.batch_indices()
        assert [len(b) for b in batches] == [4, 4]
        left_out.append(frozenset(range(10)) - {i for b in batches for i in b})
    assert len(set(left_out)) > 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), r"batch_size must be an integer >= 1, not 0"),
    (dict(bucket_size=0), r"bucket_size must be an integer >= 1, not 0"),
    (dict(shuffle="no"), r"shuffle must be True or False, not 'no'"),  # "no" would shuffle
    (dict(drop_last=1), r"drop_last must be True or False, not 1"),
    (dict(seed=None), r"seed must be an integer >= 0, not None"),  # (else a TypeError at the first batch)
])
def test_loader_refuses_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchLoader(make_examples(4), **kwargs)
    with pytest.raises(ValueError, match="BatchLoader got no examples"):
        BatchLoader([])


def test_a_folder_given_as_data_file_is_named_so(tmp_path):
    with pytest.raises(DataError, match=r"is a folder; pass the .tsv, .csv or .jsonl file in it"):
        read_classification(tmp_path)


def test_group_by_length_cuts_padding_but_stays_shuffled():
    examples = make_examples(400)
    plain = BatchLoader(examples, batch_size=16, shuffle=True)
    grouped = BatchLoader(examples, batch_size=16, shuffle=True, group_by_length=True, bucket_size=5)

    def padded_tokens(loader):
        return sum(b["input_ids"].numel() for b in loader)

    assert padded_tokens(grouped) < 0.75 * padded_tokens(plain)
    idx = grouped.batch_indices()
    assert sorted(i for b in idx for i in b) == list(range(400))
    lengths = [max(len(examples[i]["input_ids"]) for i in b) for b in idx]
    assert lengths != sorted(lengths)  # batches are not served short-to-long


def test_a_max_length_with_no_room_for_text_is_refused():
    # tokenizers leaves a sequence untruncated when max_length cannot hold its special tokens.
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "good": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    records = [{"text": "good good good", "label": 1}]
    for n in (0, 1, 2):
        with pytest.raises(DataError, match=rf"max_length={n} leaves no room for text: the tokenizer adds 2"):
            encode_classification(records, tok, max_length=n)
    assert encode_classification(records, tok, max_length=3)[0]["input_ids"] == [1, 3, 2]


def test_records_batched_before_tokenising_get_a_clear_error():
    with pytest.raises(DataError, match=r"needs its token ids under 'input_ids'; this one has \['label', 'text'\]"):
        next(iter(BatchLoader([{"text": "good", "label": 1}], batch_size=1)))


def test_collate_refuses_what_it_would_misread():
    with pytest.raises(DataError, match="collate got no examples"):
        collate([])
    assert collate([{"input_ids": []}, {"input_ids": [4]}])["attention_mask"].tolist() == [[0], [1]]  # (empty: no text)
    with pytest.raises(DataError, match=r"example 0's input_ids \[1.7, 2.9\] are not a list of token ids"):
        collate([{"input_ids": [1.7, 2.9]}])  # (would be truncated to 1, 2)
    with pytest.raises(DataError, match="example 1's input_ids hold -1; token ids are >= 0"):
        collate([{"input_ids": [1]}, {"input_ids": [2, -1]}])
    with pytest.raises(DataError, match="example 0 has label and example 1 has labels: a batch holds one"):
        collate([{"input_ids": [1], "label": 0}, {"input_ids": [2], "labels": [0]}])


@pytest.mark.parametrize("kwargs, message", [
    (dict(eos_token_id=-1), r"eos_token_id=-1 is not a token id of this tokenizer \(0 to 14\)"),
    (dict(eos_token_id=15), r"eos_token_id=15 is not a token id"),
    (dict(max_length="512"), r"max_length must be an integer >= 2 .* got '512'"),
    (dict(max_length=3.5), r"max_length must be an integer >= 2"),
])
def test_prompt_completion_encoding_refuses_bad_options(tokenizer, kwargs, message):
    with pytest.raises(DataError, match=message):
        encode_prompt_completion([{"prompt": "is it good ?", "completion": "yes"}], tokenizer, **kwargs)


def test_label_options_of_the_wrong_kind_are_refused(tmp_path):
    path = write(tmp_path / "d.tsv", "sentence\tlabel\ngood film\tpositive\n")
    with pytest.raises(ValueError, match=r"label_names must be a list of class names, .* got 'negative,positive'"):
        read_classification(path, label_names="negative,positive")  # (read as a string, 'positive' in it)
    with pytest.raises(ValueError, match=r"num_labels must be an integer >= 1, or None not to check, got '2'"):
        read_classification(path, num_labels="2")
    assert read_classification(path, label_names=("negative", "positive"))[0]["label"] == 1


def test_a_tokenizer_file_that_does_not_parse_is_named(tmp_path):
    path = write(tmp_path / "tokenizer.json", "{1: 2}")
    with pytest.raises(DataError, match=r"tokenizer.json: not a tokenizer.json that the tokenizers library can read"):
        load_tokenizer(path)


def test_records_of_the_other_kind_or_a_path_are_refused_saying_which_function_fits(tokenizer):
    with pytest.raises(DataError, match=r"encode_classification: record 0 needs 'text' as text; .*keys \['completion', "
                                        r"'prompt'\]\); for prompt/completion records, encode_prompt_completion"):
        encode_classification([{"prompt": "a", "completion": "good"}], tokenizer, 8)
    with pytest.raises(DataError, match=r"encode_prompt_completion: record 0 needs 'prompt' and 'completion' as text; "
                                        r".*for text/label records, encode_classification"):
        encode_prompt_completion([{"text": "a good film", "label": 1}], tokenizer, 8)
    with pytest.raises(DataError, match=r"encode_classification takes records \(dicts\), as read_classification\(path\) "
                                        r"returns them; got str"):
        encode_classification("train.tsv", tokenizer, 8)
