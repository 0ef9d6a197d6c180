"""The recipe's dataset: load a local file/folder, the bundled facts or a Hub dataset; detect or check its format;
standardise conversations (``fasttune.chat_templates.standardize_data_formats``); hold out an evaluation split."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, load_dataset

from fasttune.chat_templates import standardize_data_formats
from fasttune.quickstart import facts_path

from .recipe import BUNDLED_DATA, METHOD_FORMATS, DataSection, RecipeError

SUFFIXES: dict[str, str] = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# the columns each named format needs
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "sharegpt": ("conversations",), "openai": ("messages",), "alpaca": ("instruction", "output"),
    "preference": ("prompt", "chosen", "rejected"), "unpaired_preference": ("prompt", "completion", "label"),
    "prompt_completion": ("prompt", "completion"), "prompt_only": ("prompt",),
}
# formats TRL's preference and GRPO trainers read as they are (no conversation standardising)
TRL_FORMATS: tuple[str, ...] = ("preference", "unpaired_preference", "prompt_only")


def _local_files(path: Path, split: str) -> tuple[str, list[str]]:
    """(datasets builder, files) for a file or a folder of files of one type."""
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise RecipeError([f"data.path: {str(path)!r} is not allowed; allowed: a file ending in "
                               f"{', '.join(SUFFIXES)} or a folder of them"])
        return SUFFIXES[path.suffix], [str(path)]
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and not p.name.startswith("."))
    named = [p for p in files if split in p.stem]
    files = named or files
    kinds = {SUFFIXES[p.suffix] for p in files}
    if len(kinds) != 1:
        found = "no data files" if not files else f"files of several types ({sorted(kinds)})"
        raise RecipeError([f"data.path: {str(path)!r} holds {found}; allowed: a folder of {', '.join(SUFFIXES)} "
                           "files of one type"])
    return kinds.pop(), [str(p) for p in files]


def load_rows(spec: DataSection) -> Dataset:
    """The raw rows (first ``max_rows`` when set)."""
    path = Path(str(facts_path())) if spec.path in BUNDLED_DATA else Path(spec.path).expanduser()
    if path.exists():
        builder, files = _local_files(path, spec.split)
        dataset = load_dataset(builder, data_files=files, split="train")
    else:
        dataset = load_dataset(spec.path, split=spec.split)  # a Hub dataset id (needs the network)
    if spec.max_rows:
        dataset = dataset.select(range(min(spec.max_rows, len(dataset))))
    if len(dataset) == 0:
        raise RecipeError([f"data.path: {spec.path!r} has no rows (split {spec.split!r})"])
    return dataset


def detect_format(columns: list[str], spec: DataSection, method: str | None = None) -> str:
    """The named format after checking its columns are there, or the format the columns show (format auto); with
    ``method``, a format that method cannot train on is an error naming the ones it can."""
    fmt = _detect_format(columns, spec, method)
    if method is not None and fmt not in METHOD_FORMATS[method]:
        need = "; ".join(f"{f} ({' + '.join(FORMAT_COLUMNS.get(f, (spec.text_field,)))})"
                         for f in METHOD_FORMATS[method])
        raise RecipeError([f"train.method: {method!r} cannot train on {fmt} rows ({spec.path!r} has columns "
                           f"{columns}); allowed: rows of {need}"])
    return fmt


def _detect_format(columns: list[str], spec: DataSection, method: str | None) -> str:
    if spec.format == "text":
        if spec.text_field not in columns:
            raise RecipeError([f"data.text_field: {spec.text_field!r} is not a column of {spec.path!r}; allowed: "
                               f"one of its columns {columns}"])
        return "text"
    if spec.format != "auto":
        need = FORMAT_COLUMNS[spec.format]
        if not set(need) <= set(columns):
            raise RecipeError([f"data.format: {spec.format!r} needs the column(s) {list(need)}, but {spec.path!r} has "
                               f"{columns}; allowed: auto or a format whose columns are there"])
        return spec.format
    usable = METHOD_FORMATS[method] if method is not None else tuple(FORMAT_COLUMNS) + ("text",)
    for name, need in FORMAT_COLUMNS.items():  # the formats the method trains on first
        if name in usable and set(need) <= set(columns):
            return name
    if "text" in usable and spec.text_field in columns:
        return "text"
    for name, need in FORMAT_COLUMNS.items():  # another format: detect_format says the method cannot train on it
        if set(need) <= set(columns):
            return name
    if spec.text_field in columns:
        return "text"
    raise RecipeError([f"data.format: 'auto' cannot tell the format of {spec.path!r} from its columns {columns}; "
                       "allowed: conversations (sharegpt), messages (openai), instruction+output (alpaca), "
                       "prompt+chosen+rejected (preference), prompt+completion+label (unpaired_preference), "
                       "prompt+completion, prompt (prompt_only), or a text column named by data.text_field (now "
                       f"{spec.text_field!r})"])


def prepare(spec: DataSection, method: str | None = None) -> tuple[Dataset, Dataset | None, str]:
    """(train rows, evaluation rows or None, format). Conversations end up in a ``messages`` column, text in
    ``text``; preference, unpaired-preference and prompt rows stay as TRL's trainers read them."""
    rows = load_rows(spec)
    fmt = detect_format(rows.column_names, spec, method)
    if fmt in TRL_FORMATS or method == "grpo":
        pass
    elif fmt == "text":
        rows = rows.select_columns([spec.text_field])
        if spec.text_field != "text":
            rows = rows.rename_column(spec.text_field, "text")
    else:
        rows = standardize_data_formats(rows, output_column="messages")
    if not spec.eval_fraction:
        return rows, None, fmt
    if len(rows) < 2:
        raise RecipeError([f"data.eval_fraction: {spec.eval_fraction} is not allowed with {len(rows)} row(s); "
                           "allowed: 0 (an evaluation split needs at least 2 rows)"])
    split = rows.train_test_split(test_size=spec.eval_fraction, seed=spec.seed)
    return split["train"], split["test"], fmt
