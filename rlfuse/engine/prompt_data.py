"""Prompt data sets for ``rlfuse train --data``, in TRL's prompt-only formats.

A row holds a ``prompt``: TRL's "standard" form (a string) or its "conversational" form (a list of
``{"role", "content"}`` messages), plus any other columns (a reward function may read them). GSM8K-format rows
(``question``, ``answer`` ending in ``#### N``) become a one-message conversational prompt built by
:func:`rlfuse.engine.data.prompt_text`. See TRL's "Dataset formats and types" guide and
``trl.data_utils.maybe_apply_chat_template``, which :func:`prompt_token_ids` follows.

Sources: ``gsm8k`` / ``svamp`` by name, a JSONL / JSON / Parquet file, a folder written by ``datasets``'
``save_to_disk``, or a hub id loaded by ``datasets.load_dataset`` (imported only then).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from rlfuse.engine import data as gsm8k_data

Prompt = Union[str, List[Dict[str, str]]]
ROLES = ("system", "user", "assistant", "tool")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
ACCEPTED = ("a JSONL/JSON/Parquet file, a save_to_disk folder, gsm8k, svamp, or a hub id "
            "(datasets.load_dataset)")
EXPECTED_PROMPT = "a non-empty string, or a non-empty list of {'role', 'content'} messages with string values"
EXPECTED_COLUMNS = ("a 'prompt' column (a string or a list of {'role', 'content'} messages), "
                    "or GSM8K's 'question' and 'answer' ('... #### N')")
# Names that can only be file paths (a hub id is "name" or "owner/name").
_PATH_PREFIXES = ("./", "../", "/", "~")
_OTHER_DATA_SUFFIXES = (".csv", ".tsv", ".txt", ".arrow", ".gz")


@dataclass(frozen=True)
class PromptRow:
    """One prompt of a data set.

    Attributes:
        prompt: a string (TRL "standard") or a list of ``{"role", "content"}`` messages (TRL "conversational").
        columns: every other column of the row, by name, values unchanged; for a GSM8K-format row, the whole
            record (``question``, ``answer`` and any other field).
        source: where the row came from, for error messages: ``"x.jsonl, line 7"`` or ``"folder, row 3"``
            (lines count from 1, rows from 0 as ``dataset[3]``).
    """

    prompt: Prompt
    columns: Dict[str, Any]
    source: str


def is_conversational(prompt: Any) -> bool:
    """Whether ``prompt`` is a list of messages (TRL's ``is_conversational`` on ``{"prompt": prompt}``)."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def prompt_token_ids(tokenizer, prompt: Prompt) -> List[int]:
    """Token ids of ``prompt`` as TRL builds them (``trl.data_utils.maybe_apply_chat_template``).

    A string is tokenized as TRL's ``GRPOTrainer`` does, ``tokenizer(text)`` (with the tokenizer's own special
    tokens, a BOS for tokenizers that add one). Messages go through ``tokenizer.apply_chat_template`` with the
    generation prompt appended after a last ``user`` / ``tool`` message, or with ``continue_final_message=True``
    (no generation prompt) after a last ``assistant`` message, whose text the completion then continues, and are
    tokenized with ``add_special_tokens=False``: the template already holds the special tokens. For a GSM8K row
    this equals :func:`rlfuse.engine.data.build_prompt`.

    Args:
        tokenizer: a transformers tokenizer; messages need its chat template.
        prompt: a string or a list of ``{"role", "content"}`` messages.

    Returns:
        The prompt's token ids (ints), without padding.

    Raises:
        ValueError: a message list ending in a ``system`` message (TRL raises too), or an empty prompt.
        TypeError: ``prompt`` neither a string nor a list of messages.
    """
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    if is_conversational(prompt):
        last_role = prompt[-1]["role"]
        if last_role not in ("user", "tool", "assistant"):
            raise ValueError(f"the last message of a prompt is from {last_role!r}; expected user, tool or assistant")
        continue_final = last_role == "assistant"
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=not continue_final,
                                             continue_final_message=continue_final)
    elif isinstance(prompt, list) and not prompt:
        raise ValueError(f"empty prompt; expected {EXPECTED_PROMPT}")
    else:
        raise TypeError(f"prompt of type {type(prompt).__name__}; expected {EXPECTED_PROMPT}")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_prompt_rows(data: str, split: str = "train", prompt_style: str = "one_shot") -> List[PromptRow]:
    """The prompts of ``--data``, in order, checked row by row.

    ``data`` is tried as, in order:

    1. ``gsm8k`` / ``svamp``: the workspace copy of ``split`` (:func:`rlfuse.engine.data.shared_data_path`);
       without one, ``gsm8k`` loads ``openai/gsm8k`` (config ``main``) through ``datasets``.
    2. an existing file (``split`` is ignored: a file is one split): ``.jsonl`` (one JSON object a line, blank
       lines skipped), ``.json`` (an array of objects, a columnar object ``{column: [values]}``, or JSON lines),
       ``.parquet`` (read with pyarrow).
    3. an existing folder written by ``datasets``' ``save_to_disk``: a ``Dataset``, or a ``DatasetDict`` whose
       ``split`` is taken.
    4. a hub id, through ``datasets.load_dataset(data, split=split)``, unless ``data`` can only be a path.

    Rows with a ``prompt`` column keep it; GSM8K-format rows (``question``, ``answer``) get the user message
    :func:`rlfuse.engine.data.prompt_text` of the stripped question in ``prompt_style``.

    Args:
        data: the ``--data`` value.
        split: the split of a named data set, a ``DatasetDict`` folder or a hub id.
        prompt_style: ``--prompt-style`` for GSM8K-format rows (:data:`rlfuse.engine.data.PROMPT_STYLES`).

    Returns:
        One :class:`PromptRow` per row.

    Raises:
        FileNotFoundError: a path that does not exist (one with a data-file suffix, or starting with ``./``,
            ``../``, ``/`` or ``~``, or with more than one ``/``), or ``svamp`` without a workspace copy.
        ValueError: a file of another suffix; a folder that ``save_to_disk`` did not write; a ``split`` the
            folder lacks (the message lists those it has); a hub id that failed to load (offline, unknown);
            a data set with neither ``prompt`` nor ``question`` / ``answer`` columns (the message lists its
            columns); a malformed row (the message names the file and line or row); no rows; an unknown
            ``prompt_style``.
        ImportError: a Parquet file or a folder without ``pyarrow`` / ``datasets`` installed.
    """
    if prompt_style not in gsm8k_data.PROMPT_STYLES:
        raise ValueError(f"prompt style {prompt_style!r} is not one of {gsm8k_data.PROMPT_STYLES}")
    name, records = _read_records(data, split)
    rows = _to_prompt_rows(name, records, prompt_style)
    if not rows:
        raise ValueError(f"--data {data}: {name} holds no rows; expected at least one prompt")
    return rows


# A record is (source, row): row is the parsed object (any JSON value: checked by _to_prompt_rows).
Records = Iterable[Tuple[str, Any]]


def _read_records(spec: str, split: str) -> Tuple[str, List[Tuple[str, Any]]]:
    """``(name for messages, [(source, row), ...])`` of ``--data spec``; see :func:`load_prompt_rows`."""
    if spec in gsm8k_data.DATASETS:
        return _named_records(spec, split)
    path = Path(spec).expanduser()
    if path.is_file():
        return str(path), list(_file_records(spec, path))
    if path.is_dir():
        return str(path), _dataset_records(str(path), _load_from_disk(spec, path, split))
    if _looks_like_path(spec):
        raise FileNotFoundError(f"--data {spec}: no such file or folder; pass {ACCEPTED}")
    return f"{spec} ({split})", _dataset_records(f"{spec} ({split})", _load_hub(spec, split))


def _named_records(name: str, split: str) -> Tuple[str, List[Tuple[str, Any]]]:
    local = gsm8k_data.shared_data_path(name, split)
    if local is not None:
        return str(local), list(_jsonl_records(local))
    if name == "svamp":
        raise FileNotFoundError(f"no SVAMP {split} split found: put svamp/{split}.jsonl (GSM8K layout) under "
                                "$RLFUSE_DATA_DIR, or pass the JSONL path")
    hub = f"openai/gsm8k ({split})"
    try:
        from datasets import load_dataset  # only when no local copy exists

        dataset = load_dataset("openai/gsm8k", "main", split=split)
    except Exception as error:  # offline, unknown split, no datasets: all end here
        raise ValueError(f"--data gsm8k: no workspace copy of the {split} split ($RLFUSE_DATA_DIR/gsm8k or "
                         f"../shared/data/gsm8k), and loading openai/gsm8k from the hub failed "
                         f"({_short(error)})") from None
    return hub, _dataset_records(hub, dataset)


def _looks_like_path(spec: str) -> bool:
    suffix = Path(spec).suffix.lower()
    return (spec.startswith(_PATH_PREFIXES) or suffix in FILE_SUFFIXES + _OTHER_DATA_SUFFIXES
            or spec.count("/") > 1)


def _file_records(spec: str, path: Path) -> Records:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_records(path)
    if suffix == ".json":
        return _json_records(path)
    if suffix == ".parquet":
        return _parquet_records(path)
    raise ValueError(f"--data {spec}: a {suffix or 'suffix-less'} file is not read; pass {ACCEPTED}")


def _jsonl_records(path: Path, lines: Optional[Iterable[str]] = None) -> Records:
    if lines is None:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: JSON strings may hold U+2028
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: invalid JSON ({error}); expected one JSON object a line") \
                from None
        yield f"{path}, line {number}", row


def _json_records(path: Path) -> Records:
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # a first value parsed, then more: JSON lines
            return list(_jsonl_records(path, text.split("\n")))
        raise ValueError(f"{path}, line {error.lineno}: invalid JSON ({error.msg}); expected a JSON array of "
                         "objects, a columnar object {column: [values]}, or JSON lines") from None
    if isinstance(value, list):
        return [(f"{path}, row {index}", row) for index, row in enumerate(value)]
    if isinstance(value, dict) and value and all(isinstance(column, list) for column in value.values()):
        return _columnar_records(path, value)
    return [(f"{path}, line 1", value)]  # one object: JSON lines of one line


def _columnar_records(path: Path, columns: Dict[str, list]) -> Records:
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{path}: columns of different lengths {lengths}; expected a columnar object "
                         "{column: [values]} with one value per row in every column")
    count = next(iter(lengths.values()))
    return [(f"{path}, row {index}", {name: values[index] for name, values in columns.items()})
            for index in range(count)]


def _parquet_records(path: Path) -> Records:
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError(f"reading {path} needs pyarrow: pip install datasets ({error})") from None
    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow.ArrowInvalid and kin
        raise ValueError(f"{path}: not a readable Parquet file ({_short(error)})") from None
    return [(f"{path}, row {index}", row) for index, row in enumerate(table.to_pylist())]


def _load_from_disk(spec: str, path: Path, split: str):
    try:
        import datasets
    except ImportError as error:
        raise ImportError(f"reading the folder {path} needs datasets: pip install datasets ({error})") \
            from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # FileNotFoundError for a folder save_to_disk did not write
        raise ValueError(f"--data {spec}: the folder is not a datasets save_to_disk folder ({_short(error)}); "
                         f"pass {ACCEPTED}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"--data {spec}: the DatasetDict has no split {split!r}; its splits are "
                             f"{sorted(loaded)}; choose one of them as the split")
        return loaded[split]
    return loaded


def _load_hub(spec: str, split: str):
    try:
        from datasets import load_dataset

        return load_dataset(spec, split=split)
    except Exception as error:  # offline, unknown id or split, no datasets
        raise ValueError(f"--data {spec}: not a file or folder here, and loading it from the hub failed "
                         f"({_short(error)}); pass a JSONL/JSON/Parquet file, a save_to_disk folder, gsm8k, svamp, "
                         "or a hub id while online") from None


def _dataset_records(name: str, dataset) -> List[Tuple[str, Any]]:
    return [(f"{name}, row {index}", row) for index, row in enumerate(dataset.to_list())]


def _short(error: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _to_prompt_rows(name: str, records: Iterable[Tuple[str, Any]], prompt_style: str) -> List[PromptRow]:
    """Check each record and build its :class:`PromptRow`; the first object record fixes the data set's kind."""
    rows, kind = [], None
    for source, record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{source}: of type {type(record).__name__}, not an object; expected an object with "
                             f"{EXPECTED_COLUMNS}")
        if kind is None:
            kind = _kind(name, source, record)
        rows.append(_prompt_row(source, record, prompt_style) if kind == "prompt" else
                    _gsm8k_row(source, record, prompt_style))
    return rows


def _kind(name: str, source: str, record: Dict[str, Any]) -> str:
    if "prompt" in record:
        return "prompt"
    if "question" in record and "answer" in record:
        return "gsm8k"
    raise ValueError(f"{name}: its rows have columns {sorted(record)} ({source}); expected {EXPECTED_COLUMNS}")


def _prompt_row(source: str, record: Dict[str, Any], prompt_style: str) -> PromptRow:
    if "prompt" not in record:
        raise ValueError(f"{source}: no 'prompt' column (it has {sorted(record)}), unlike the rows before; "
                         f"expected {EXPECTED_COLUMNS} in every row")
    prompt = record["prompt"]
    problem = _prompt_problem(prompt)
    if problem:
        raise ValueError(f"{source}: {problem}; expected 'prompt' to be {EXPECTED_PROMPT}")
    return PromptRow(prompt, {key: value for key, value in record.items() if key != "prompt"}, source)


def _prompt_problem(prompt: Any) -> str:
    """What is wrong with ``prompt``, or ``""``."""
    if isinstance(prompt, str):
        return "'prompt' is an empty string" if not prompt.strip() else ""
    if not isinstance(prompt, list):
        return f"'prompt' is of type {type(prompt).__name__}"
    if not prompt:
        return "'prompt' is an empty list"
    for index, message in enumerate(prompt):
        if not isinstance(message, dict):
            kind = type(message).__name__
            return f"message {index} of 'prompt' is of type {kind}, not a {{'role', 'content'}} object"
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in ROLES:
            return f"message {index} of 'prompt' has role {role!r}, not one of {'/'.join(ROLES)}"
        if not isinstance(content, str):
            return f"message {index} of 'prompt' has no string 'content' (it is {content!r})"
    if prompt[-1]["role"] == "system":
        return "the last message of 'prompt' is a system message (TRL needs user, tool or assistant last)"
    return ""


def _gsm8k_row(source: str, record: Dict[str, Any], prompt_style: str) -> PromptRow:
    question, answer = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str):
        raise ValueError(f"{source}: needs string 'question' and 'answer' (it has {sorted(record)}); "
                         f"expected {EXPECTED_COLUMNS} in every row")
    try:
        gsm8k_data.gold_answer(answer)
    except ValueError as error:
        raise ValueError(f"{source}: {error}; expected GSM8K's 'answer' ('... #### N')") from None
    prompt = [{"role": "user", "content": gsm8k_data.prompt_text(question.strip(), prompt_style)}]
    return PromptRow(prompt, dict(record), source)
