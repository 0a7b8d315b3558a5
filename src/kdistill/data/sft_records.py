"""Where SFT records come from: the chatterbot-corpus English dialogs, and ``.jsonl`` / ``.json`` files.

Both give records in the forms :func:`kdistill.data.sft.render_sft` reads (``messages``, ``prompt``/``completion``
or ``instruction``/``output``):

* :func:`chatterbot_dialogs` reads the English dialog pairs shipped in the PyPI package ``chatterbot-corpus``;
* :func:`load_sft_records` reads records from ``.jsonl`` / ``.json`` files.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kdistill._io import iter_jsonl
from kdistill.data.loading import DataError
from kdistill.data.packaged import MissingPackageError
from kdistill.errors import UnknownNameError

__all__ = ["CHATTERBOT_INSTALL", "chatterbot_dialogs", "load_sft_records"]

CHATTERBOT_INSTALL = "pip install --no-deps chatterbot-corpus"


def _chatterbot_english_dir() -> Path:
    """``chatterbot_corpus/data/english``, located through the import system without running the package."""
    try:
        spec = importlib.util.find_spec("chatterbot_corpus")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise MissingPackageError(
            f"the package 'chatterbot_corpus' is not installed; install it with: {CHATTERBOT_INSTALL}"
        )
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for location in locations:
        folder = Path(location) / "data" / "english"
        if folder.is_dir():
            return folder
    raise MissingPackageError(
        f"the chatterbot_corpus package has no data/english folder (looked in {locations}); "
        f"reinstall it with: {CHATTERBOT_INSTALL}"
    )


def _utterance(value: Any) -> str | None:
    """A dialog entry as text: strings stripped, numbers as written, anything else (None, lists) skipped."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):
        return None
    return value.strip() or None


def chatterbot_dialogs(categories: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The English dialog pairs of the PyPI package ``chatterbot-corpus`` as chat records for :func:`render_sft`.

    Every consecutive ``(utterance, reply)`` pair within a conversation of ``data/english/<category>.yml``
    becomes ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "category": <file stem>}``. Files
    are read in sorted order, so the result is deterministic. The YAML is read with every scalar kept as the text
    written (``yes`` stays ``"yes"``, ``1.10`` stays ``"1.10"``); empty entries and entries that are not text
    (nested lists, malformed conversations) are skipped. chatterbot-corpus 1.3.3 gives 2,306 pairs.

    Args:
        categories: file stems to read (``"ai"``, ``"greetings"``, ...); all of them when None.

    Raises:
        MissingPackageError: the package is not installed (the message gives the pip command).
        UnknownNameError: an unknown category (the message lists the known ones).
    """
    import yaml

    folder = _chatterbot_english_dir()
    files = {path.stem: path for path in sorted(folder.glob("*.yml"))}
    if categories is None:
        wanted = sorted(files)
    else:
        wanted = [categories] if isinstance(categories, str) else list(categories)
        unknown = [name for name in wanted if name not in files]
        if unknown:
            raise UnknownNameError(f"unknown chatterbot category {unknown[0]!r}; known: {', '.join(sorted(files))}")
        wanted = sorted(set(wanted))
    records: list[dict[str, Any]] = []
    for name in wanted:
        with files[name].open(encoding="utf-8") as handle:
            data = yaml.load(handle, Loader=yaml.BaseLoader)  # BaseLoader: every scalar stays a str
        conversations = data.get("conversations") if isinstance(data, dict) else None
        for conversation in conversations or []:
            if not isinstance(conversation, list):
                continue  # e.g. a mis-indented entry that YAML reads as one long string
            turns = [_utterance(value) for value in conversation]
            for utterance, reply in itertools.pairwise(turns):
                if utterance is not None and reply is not None:
                    records.append(
                        {
                            "messages": [
                                {"role": "user", "content": utterance},
                                {"role": "assistant", "content": reply},
                            ],
                            "category": name,
                        }
                    )
    return records


def load_sft_records(path: str | Path) -> list[dict[str, Any]]:
    """Records (see :func:`render_sft`) from a ``.jsonl`` file (one JSON object a line, blank lines skipped) or a
    ``.json`` file (one array of objects).

    Raises:
        DataError: a missing file, another extension, invalid JSON (naming the line), or an entry that is not an
            object (naming its line or index).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"SFT records file not found: {path}")
    suffix = path.suffix.lower()
    records: list[dict[str, Any]] = []
    if suffix == ".jsonl":
        records.extend(record for _, record in iter_jsonl(path, "SFT records file", DataError))
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {error.lineno}: invalid JSON ({error.msg})") from error
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of records, got a {type(data).__name__}")
        for index, record in enumerate(data):
            if not isinstance(record, dict):
                raise DataError(f"{path}: entry {index} is a {type(record).__name__}, not a JSON object")
        records = data
    else:
        raise DataError(f"{path}: unsupported extension {path.suffix!r}; SFT records are read from .jsonl or .json")
    if not records:
        raise DataError(f"{path} holds no records")
    return records
