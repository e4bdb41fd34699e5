import json

import pytest
from tiny_models import tiny_tokenizer

from offsite.data.read import read_data
from offsite.data.tokens import IGNORE, encode_pair, lm_sequences, train_choice_sequence
from offsite.data.types import ChoiceData, ChoiceExample, TextData
from offsite.errors import OffsiteError


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_txt_and_both_jsonl_kinds(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert read_data(tmp_path / "a.txt") == TextData(["hello world"], str(tmp_path / "a.txt"))
    lm = write_lines(tmp_path / "lm.jsonl", [json.dumps({"text": "one"}), "", json.dumps({"text": "two"})])
    assert read_data(lm).texts == ["one", "two"]
    choice = write_lines(tmp_path / "c.jsonl", [json.dumps({"context": "Q:", "choices": [" a", " b"], "label": 1})])
    data = read_data(choice)
    assert isinstance(data, ChoiceData) and data.examples[0].choices == (" a", " b") and data.examples[0].label == 1
    (tmp_path / "NOTES.TXT").write_text("upper case")
    assert read_data(tmp_path / "NOTES.TXT").texts == ["upper case"]
    upper = write_lines(tmp_path / "LM.JSONL", [json.dumps({"text": "u"})])
    assert read_data(upper).texts == ["u"]


def test_a_line_with_a_unicode_line_separator_stays_one_line(tmp_path):
    path = write_lines(tmp_path / "sep.jsonl", [json.dumps({"text": "a\u2028b"}, ensure_ascii=False)])
    assert read_data(path).texts == ["a\u2028b"]


@pytest.mark.parametrize("line, message", [
    ("{not json", "bad.jsonl:2: invalid JSON"),
    ("[1, 2]", "bad.jsonl:2: expected a JSON object"),
    ('{"context": "Q", "choices": [" a", " b"]}', "bad.jsonl:2: missing field(s) ['label']"),
    ('{"context": "Q", "choices": [" a", " b"], "label": 2}', "bad.jsonl:2: field 'label' must be an integer from 0 to 1"),
    ('{"context": "Q", "choices": [" a"], "label": 0}', "bad.jsonl:2: field 'choices' must be a list of at least 2"),
    ('{"text": 5}', "bad.jsonl:2: field 'text' must be a string"),
    ('{"text": "x"}', "bad.jsonl:2: mixes text lines with choice lines"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"context": "Q", "choices": [" a", " b"], "label": 0}), line])
    with pytest.raises(OffsiteError) as error:
        read_data(path)
    assert message in str(error.value)


def test_missing_empty_and_unknown_files(tmp_path):
    with pytest.raises(OffsiteError, match="--data .*nope.txt: no such file"):
        read_data(tmp_path / "nope.txt")
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(OffsiteError, match="is empty"):
        read_data(tmp_path / "e.txt")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(OffsiteError, match="unknown file type '.csv'"):
        read_data(tmp_path / "x.csv")


def test_choice_training_scores_only_the_correct_continuation():
    tok = tiny_tokenizer()
    example = ChoiceExample("The river was", (" loud", " quiet"), 1)
    sequence = train_choice_sequence(tok, example, seq_len=64)
    context_ids, continuation_ids = encode_pair(tok, "The river was", " quiet")
    assert sequence.input_ids == (context_ids + continuation_ids)[:-1]
    scored = [label for label in sequence.labels if label != IGNORE]
    assert scored == continuation_ids
    assert sequence.labels[-len(continuation_ids):] == continuation_ids


def test_long_context_is_cut_from_the_left_keeping_the_continuation():
    tok = tiny_tokenizer()
    sequence = train_choice_sequence(tok, ChoiceExample("word " * 100, (" tea", " soup"), 0), seq_len=16)
    assert len(sequence.input_ids) == 16
    assert [label for label in sequence.labels if label != IGNORE] == encode_pair(tok, "word " * 100, " tea")[1]


def test_trailing_space_moves_to_the_continuation():
    tok = tiny_tokenizer()
    assert encode_pair(tok, "The river ", "was") == encode_pair(tok, "The river", " was")


def test_lm_blocks_cover_the_stream_once():
    tok = tiny_tokenizer()
    blocks = lm_sequences(tok, ["one two three four five six seven", "eight nine"], seq_len=4)
    stream = tok("one two three four five six seven")["input_ids"] + [tok.eos_token_id] + \
        tok("eight nine")["input_ids"] + [tok.eos_token_id]
    assert [t for b in blocks for t in b.labels] == stream[1:]
    assert all(b.input_ids[1:] == b.labels[:-1] for b in blocks)
