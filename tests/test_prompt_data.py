"""Prompt data sets for ``rlfuse train --data``: every accepted form, every malformed input, TRL tokenization."""

import json
from pathlib import Path

import pytest

from rlfuse.engine import data as gsm8k_data
from rlfuse.engine.data import build_prompt, prompt_text, read_jsonl, shared_data_path
from rlfuse.engine.prompt_data import PromptRow, is_conversational, load_prompt_rows, prompt_token_ids

SAMPLES = Path(__file__).parent / "data"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
ACCEPTED = "a JSONL/JSON/Parquet file, a save_to_disk folder, gsm8k, svamp"


def write_jsonl(path, records):
    path.write_text("\n".join(record if isinstance(record, str) else json.dumps(record) for record in records) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF that ``smollm2_dir`` is made from (seconds, not 20)."""
    from transformers import AutoTokenizer

    from rlfuse.engine.model import resolve_model

    try:
        source = resolve_model("smollm2-135m")
    except ValueError as error:
        pytest.skip(str(error))
    return AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)


# ---- accepted forms ----------------------------------------------------------------------------------------------


def test_jsonl_string_prompts_keep_extra_columns_and_lines(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "The sky is", "answer": "blue", "meta": {"k": [1, 2]}},
                                              "", {"prompt": "2 + 2 =", "answer": "4", "meta": None}])
    rows = load_prompt_rows(path)
    assert rows == [PromptRow("The sky is", {"answer": "blue", "meta": {"k": [1, 2]}}, f"{path}, line 1"),
                    PromptRow("2 + 2 =", {"answer": "4", "meta": None}, f"{path}, line 3")]


def test_jsonl_conversational_and_mixed_prompts(tmp_path):
    continued = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2,"}]
    tool = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "call"},
            {"role": "tool", "content": "5"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": CHAT, "solution": "5"},
                                              {"prompt": continued, "solution": "3"},
                                              {"prompt": tool, "solution": "5"}, {"prompt": "plain", "solution": "0"}])
    rows = load_prompt_rows(path, split="ignored for a file")
    assert [row.prompt for row in rows] == [CHAT, continued, tool, "plain"]
    assert [row.columns for row in rows] == [{"solution": "5"}, {"solution": "3"}, {"solution": "5"}, {"solution": "0"}]
    assert [is_conversational(row.prompt) for row in rows] == [True, True, True, False]


def test_json_array_columnar_and_json_lines(tmp_path):
    records = [{"prompt": CHAT, "label": 5}, {"prompt": "hi", "label": 0}]
    array = tmp_path / "a.json"
    array.write_text(json.dumps(records, indent=2))
    columnar = tmp_path / "c.json"
    columnar.write_text(json.dumps({"prompt": [CHAT, "hi"], "label": [5, 0]}))
    lines = tmp_path / "l.json"
    write_jsonl(lines, records)
    for path, unit in ((array, "row"), (columnar, "row")):
        rows = load_prompt_rows(str(path))
        assert [(r.prompt, r.columns, r.source) for r in rows] == [
            (CHAT, {"label": 5}, f"{path}, {unit} 0"), ("hi", {"label": 0}, f"{path}, {unit} 1")]
    rows = load_prompt_rows(str(lines))
    assert [(r.prompt, r.columns, r.source) for r in rows] == [
        (CHAT, {"label": 5}, f"{lines}, line 1"), ("hi", {"label": 0}, f"{lines}, line 2")]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": CHAT, "solution": "5", "score": 1.5},
                                         {"prompt": CHAT[1:], "solution": "7", "score": None}]), path)
    rows = load_prompt_rows(str(path))
    assert [(r.prompt, r.columns, r.source) for r in rows] == [
        (CHAT, {"solution": "5", "score": 1.5}, f"{path}, row 0"),
        (CHAT[1:], {"solution": "7", "score": None}, f"{path}, row 1")]


def test_save_to_disk_dataset_and_dataset_dict_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_list([{"prompt": "a", "id": 0}, {"prompt": "b", "id": 1}])
    test = datasets.Dataset.from_list([{"prompt": CHAT, "id": 9}])
    train.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dict"))

    one = load_prompt_rows(str(tmp_path / "one"), split="test")  # a single Dataset: the split is ignored
    assert [(r.prompt, r.columns, r.source) for r in one] == [("a", {"id": 0}, f"{tmp_path / 'one'}, row 0"),
                                                              ("b", {"id": 1}, f"{tmp_path / 'one'}, row 1")]
    assert [r.prompt for r in load_prompt_rows(str(tmp_path / "dict"))] == ["a", "b"]
    picked = load_prompt_rows(str(tmp_path / "dict"), split="test")
    assert [(r.prompt, r.columns) for r in picked] == [(CHAT, {"id": 9})]
    with pytest.raises(ValueError, match=r"no split 'validation'; its splits are \['test', 'train'\]"):
        load_prompt_rows(str(tmp_path / "dict"), split="validation")


def test_gsm8k_format_jsonl_becomes_user_message_with_whole_record():
    path = SAMPLES / "svamp_train_sample.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    rows = load_prompt_rows(str(path), prompt_style="zero_shot")
    assert len(rows) == len(records) == 32
    assert [row.columns for row in rows] == records  # question, answer, id, type: unchanged
    assert rows[0].prompt == [{"role": "user", "content": prompt_text(records[0]["question"].strip(), "zero_shot")}]
    assert rows[4].source == f"{path}, line 5"
    one_shot = load_prompt_rows(str(SAMPLES / "gsm8k_train_sample.jsonl"))
    question = read_jsonl(SAMPLES / "gsm8k_train_sample.jsonl")[0].question
    assert one_shot[0].prompt[0]["content"] == prompt_text(question, "one_shot")


@pytest.mark.parametrize("name", ["gsm8k", "svamp"])
def test_named_datasets_read_workspace_copies(name):
    local = shared_data_path(name, "test")
    if local is None:
        pytest.skip(f"no workspace copy of {name}")
    rows = load_prompt_rows(name, split="test", prompt_style="zero_shot")
    examples = read_jsonl(local)
    assert len(rows) == len(examples) > 100
    assert rows[-1].prompt[0]["content"] == prompt_text(examples[-1].question, "zero_shot")
    assert rows[-1].source == f"{local}, line {len(examples)}"


def test_named_datasets_without_workspace_copy(monkeypatch):
    monkeypatch.setattr(gsm8k_data, "shared_data_path", lambda name, split: None)
    with pytest.raises(FileNotFoundError, match="no SVAMP train split"):
        load_prompt_rows("svamp")
    with pytest.raises(ValueError, match=r"--data gsm8k: no workspace copy .* loading openai/gsm8k from the hub"):
        load_prompt_rows("gsm8k")  # HF_HUB_OFFLINE=1 (conftest)


# ---- malformed input -------------------------------------------------------------------------------------------

GOOD = {"prompt": "fine", "x": 1}
BAD_ROWS = [
    ("{not json", r"line 2: invalid JSON .*expected one JSON object a line"),
    (json.dumps([1, 2]), r"line 2: of type list, not an object; expected an object with a 'prompt' column"),
    (json.dumps({"x": 1}), r"line 2: no 'prompt' column \(it has \['x'\]\).*expected a 'prompt' column"),
    (json.dumps({"prompt": 7}), r"line 2: 'prompt' is of type int; expected 'prompt' to be a non-empty string"),
    (json.dumps({"prompt": "  "}), r"line 2: 'prompt' is an empty string; expected"),
    (json.dumps({"prompt": []}), r"line 2: 'prompt' is an empty list; expected"),
    (json.dumps({"prompt": [{"role": "user"}]}), r"line 2: message 0 of 'prompt' has no string 'content'.*expected"),
    (json.dumps({"prompt": ["hi"]}), r"line 2: message 0 of 'prompt' is of type str, not a \{'role', 'content'\}"),
    (json.dumps({"prompt": [{"role": "bot", "content": "x"}]}), r"line 2: message 0 of 'prompt' has role 'bot'"),
    (json.dumps({"prompt": [{"role": "system", "content": "x"}]}), r"line 2: the last message of 'prompt' is a system"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS)
def test_malformed_prompt_row_names_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(ValueError, match=message) as caught:
        load_prompt_rows(path)
    assert str(caught.value).startswith(f"{path}, line 2: ")


@pytest.mark.parametrize("bad,message", [
    ({"question": "Q", "answer": "no hashes"}, r"line 2: the answer has no '#### N' final line; expected GSM8K's"),
    ({"question": 3, "answer": "#### 3"}, r"line 2: needs string 'question' and 'answer'"),
    ({"answer": "#### 3"}, r"line 2: needs string 'question' and 'answer' \(it has \['answer'\]\)"),
])
def test_malformed_gsm8k_row_names_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "Q", "answer": "#### 1"}, bad])
    with pytest.raises(ValueError, match=message):
        load_prompt_rows(path)


def test_dataset_without_usable_columns_lists_its_columns(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1}])
    with pytest.raises(ValueError, match=r"t.jsonl: its rows have columns \['label', 'text'\] \(.*line 1\); "
                                         r"expected a 'prompt' column .* or GSM8K's 'question' and 'answer'"):
        load_prompt_rows(path)


def test_malformed_rows_in_json_array_and_parquet_name_the_row(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([GOOD, GOOD, {"prompt": 3.5}]))
    with pytest.raises(ValueError, match=r"a.json, row 2: 'prompt' is of type float"):
        load_prompt_rows(str(path))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "ok"}, {"prompt": ""}]), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p.parquet, row 1: 'prompt' is an empty string"):
        load_prompt_rows(str(tmp_path / "p.parquet"))


def test_malformed_json_files(tmp_path):
    broken = tmp_path / "b.json"
    broken.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]')
    with pytest.raises(ValueError, match=r"b.json, line 3: invalid JSON"):
        load_prompt_rows(str(broken))
    lines = tmp_path / "l.json"
    write_jsonl(lines, [GOOD, GOOD, "{oops"])
    with pytest.raises(ValueError, match=r"l.json, line 3: invalid JSON"):
        load_prompt_rows(str(lines))
    ragged = tmp_path / "r.json"
    ragged.write_text(json.dumps({"prompt": ["a", "b"], "x": [1]}))
    with pytest.raises(ValueError, match=r"r.json: columns of different lengths \{'prompt': 2, 'x': 1\}"):
        load_prompt_rows(str(ragged))


def test_empty_file(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="e.jsonl holds no rows"):
        load_prompt_rows(str(path))


def test_unknown_extension_and_missing_paths(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("prompt\nhi\n")
    with pytest.raises(ValueError, match=rf"--data {csv}: a .csv file is not read; pass {ACCEPTED}"):
        load_prompt_rows(str(csv))
    for missing in (str(tmp_path / "nope.jsonl"), "nope.parquet", "./nope", "~/no/such/data", "a/b/c"):
        with pytest.raises(FileNotFoundError, match=rf"--data {missing}: no such file or folder; pass {ACCEPTED}"):
            load_prompt_rows(missing)


def test_folder_not_written_by_save_to_disk(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"the folder is not a datasets save_to_disk folder \(.*\); pass"):
        load_prompt_rows(str(tmp_path))


def test_hub_id_offline_gives_clear_error():
    with pytest.raises(ValueError) as caught:
        load_prompt_rows("nobody-here/no-such-prompts")  # HF_HUB_OFFLINE=1 (conftest)
    message = str(caught.value)
    assert message.startswith("--data nobody-here/no-such-prompts: not a file or folder here, and loading it from "
                              "the hub failed (")
    assert message.endswith("); pass a JSONL/JSON/Parquet file, a save_to_disk folder, gsm8k, svamp, or a hub id "
                            "while online")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no chained datasets traceback


def test_unknown_prompt_style():
    with pytest.raises(ValueError, match="prompt style 'few_shot'"):
        load_prompt_rows(str(SAMPLES / "gsm8k_train_sample.jsonl"), prompt_style="few_shot")


# ---- tokenization ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["zero_shot", "one_shot"])
def test_gsm8k_rows_tokenize_as_build_prompt(tokenizer, style):
    path = SAMPLES / "gsm8k_train_sample.jsonl"
    rows = load_prompt_rows(str(path), prompt_style=style)[:4]
    for row, example in zip(rows, read_jsonl(path)):
        assert prompt_token_ids(tokenizer, row.prompt) == build_prompt(tokenizer, example.question, style)


def test_prompt_token_ids_follow_trl(tokenizer):
    trl_data_utils = pytest.importorskip("trl.data_utils")
    continued = CHAT + [{"role": "assistant", "content": "The answer is"}]
    tool = CHAT + [{"role": "assistant", "content": "call"}, {"role": "tool", "content": "5"}]
    for prompt in (CHAT, continued, tool, "The sky is"):
        text = trl_data_utils.maybe_apply_chat_template({"prompt": prompt}, tokenizer)["prompt"]
        assert prompt_token_ids(tokenizer, prompt) == tokenizer(text, add_special_tokens=False)["input_ids"]
    # continue_final_message: the assistant turn is left open, to be continued, with no new generation prompt.
    ids = prompt_token_ids(tokenizer, continued)
    closed = tokenizer.apply_chat_template(continued, tokenize=False)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\nThe answer is")
    assert closed.startswith(tokenizer.decode(ids)) and closed != tokenizer.decode(ids)
    # as TRL's GRPOTrainer tokenizes a plain prompt: processing_class(text=prompts), special tokens included
    assert prompt_token_ids(tokenizer, "The sky is") == tokenizer("The sky is")["input_ids"]


def test_prompt_token_ids_rejects_bad_prompts(tokenizer):
    with pytest.raises(ValueError, match="last message of a prompt is from 'system'"):
        prompt_token_ids(tokenizer, [{"role": "system", "content": "x"}])
    with pytest.raises(ValueError, match="empty prompt"):
        prompt_token_ids(tokenizer, [])
    with pytest.raises(TypeError, match="prompt of type int"):
        prompt_token_ids(tokenizer, 3)


def test_is_conversational():
    assert is_conversational(CHAT) and not is_conversational("text")
    assert not is_conversational([]) and not is_conversational(["a"]) and not is_conversational(None)
