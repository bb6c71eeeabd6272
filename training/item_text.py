"""Item text readers: the text of every item of a file, keyed by the item's external id.

What `fishrec data features` reads before encoding (training/item_features.py).
Readers are a registry (`TEXT_FORMATS`); `detect_text_format` picks one by content:

| name        | file                                                                   |
|-------------|------------------------------------------------------------------------|
| `movielens` | `movies.dat`: `MovieID::Title (Year)::Genre|Genre`, ISO-8859-1          |
| `recbole`   | a RecBole atomic `.item` (`item_id:token` + text fields; ML-100K titles) |
| `tsv`       | `item_id<TAB>...<TAB>text`: the last field is the text (Amazon's        |
|             | `item_attributes_text.tsv`, or a plain two-column file); optional header |

MovieLens titles become "Title (Year). Genres: A, B." in both MovieLens readers,
so that the same film gets the same text (and features) in ML-1M and ML-100K.
`read_id_map` reads the table that translates a data set's item ids to a text
file's, for data sets numbered differently from their text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from training.data_error import DataError, line_error, shorten


@dataclass(frozen=True)
class ItemTexts:
    """The text of each item of a file, keyed by the item's external id."""

    texts: dict[str, str]
    source: str
    format: str
    repeated: int = 0  # lines that repeated an earlier line of the same item, ignored
    empty: int = 0  # items whose text was empty (treated as having no text)


def movie_text(title: str, genres: Iterable[str]) -> str:
    """'Toy Story (1995)', ['Animation', 'Comedy'] -> 'Toy Story (1995). Genres: Animation, Comedy.'"""
    names = [g.strip() for g in genres if g.strip()]
    return f"{title.strip()}. Genres: {', '.join(names)}." if names else f"{title.strip()}."


def _decoded_lines(path: Path, encoding: str) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines; an undecodable line is named."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    lines = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            raise line_error(
                path, number, f"{encoding} text (pass --encoding, e.g. latin-1)", repr(raw[:60])
            ) from None
        if text.strip():
            lines.append((number, text.lstrip("\ufeff")))
    return lines


class _TextTable:
    """Collects (id, text) pairs; a repeated id must repeat its text."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt = path, fmt
        self.texts: dict[str, str] = {}
        self.lines: dict[str, int] = {}
        self.repeated = self.empty = 0

    def add(self, number: int, item: str, text: str) -> None:
        item, text = item.strip(), " ".join(text.split())
        if not item:
            raise line_error(self.path, number, "an item id in the first field")
        if item in self.texts:
            if self.texts[item] != text:
                raise DataError(
                    f"{self.path}: line {number}: item {item!r} already has another text "
                    f"(line {self.lines[item]}): {shorten(self.texts[item])!r}"
                )
            self.repeated += 1
            return
        self.texts[item], self.lines[item] = text, number

    def result(self) -> ItemTexts:
        kept = {item: text for item, text in self.texts.items() if text}
        empty = len(self.texts) - len(kept)
        return ItemTexts(kept, self.path.name, self.fmt, self.repeated, empty)


def read_movielens(path: Path, encoding: str | None = None) -> ItemTexts:
    """MovieLens `movies.dat` (`MovieID::Title (Year)::Genres`), ISO-8859-1 by default."""
    table = _TextTable(path, "movielens")
    for number, line in _decoded_lines(path, encoding or "iso-8859-1"):
        fields = line.rstrip("\r\n").split("::")
        if len(fields) != 3:
            raise line_error(path, number, "MovieID::Title::Genres", line)
        table.add(number, fields[0], movie_text(fields[1], fields[2].split("|")))
    return table.result()


_RECBOLE_HEADER = re.compile(r"^([^:\s]+):(token|token_seq|float|float_seq)$")


def read_recbole_items(path: Path, encoding: str | None = None) -> ItemTexts:
    """A RecBole atomic `.item` file: the `item_id` column and its text fields.

    MovieLens-style fields (movie_title, release_year, class) make the same text as
    `read_movielens`; any other fields are joined with "; ".
    """
    lines = _decoded_lines(path, encoding or "utf-8")
    if not lines:
        raise DataError(f"{path}: the file is empty")
    header = [
        _RECBOLE_HEADER.match(name.strip()) for name in lines[0][1].rstrip("\r\n").split("\t")
    ]
    if not all(header):
        raise line_error(path, lines[0][0], "a RecBole header of name:type fields", lines[0][1])
    names = [match.group(1) for match in header if match]
    if "item_id" not in names:
        raise DataError(f"{path}: no item_id column in the header {names}")
    table = _TextTable(path, "recbole")
    for number, line in lines[1:]:
        values = line.rstrip("\r\n").split("\t")
        if len(values) != len(names):
            raise line_error(path, number, f"{len(names)} tab-separated fields", line)
        row = dict(zip(names, values, strict=True))
        table.add(number, row.pop("item_id"), _recbole_text(row))
    return table.result()


def _recbole_text(row: dict[str, str]) -> str:
    if "movie_title" in row:
        year = row.get("release_year", "").strip()
        title = f"{row['movie_title'].strip()} ({year})" if year else row["movie_title"]
        return movie_text(title, row.get("class", "").split())
    return "; ".join(value.strip() for value in row.values() if value.strip())


_HEADER_IDS = ("item_id", "item", "id", "item_id:token")


def read_tsv(path: Path, encoding: str | None = None) -> ItemTexts:
    """`item_id<TAB>...<TAB>text`: the first field is the id, the last the text."""
    table = _TextTable(path, "tsv")
    for index, (number, line) in enumerate(_decoded_lines(path, encoding or "utf-8")):
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) < 2:
            raise line_error(path, number, "item_id<TAB>text", line)
        if index == 0 and fields[0].strip().lower() in _HEADER_IDS:
            continue  # a header line
        table.add(number, fields[0], fields[-1])
    return table.result()


TextReader = Callable[[Path, str | None], ItemTexts]
TEXT_FORMATS: dict[str, TextReader] = {
    "movielens": read_movielens,
    "recbole": read_recbole_items,
    "tsv": read_tsv,
}


def detect_text_format(path: Path) -> str:
    """movielens when the first line has '::', recbole for a name:type header, else tsv."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as handle:
        first = handle.readline().decode("utf-8", errors="replace")
    if "::" in first:
        return "movielens"
    fields = first.rstrip("\r\n").split("\t")
    if len(fields) > 1 and all(_RECBOLE_HEADER.match(name.strip()) for name in fields):
        return "recbole"
    return "tsv"


def read_item_texts(path: Path, fmt: str = "auto", encoding: str | None = None) -> ItemTexts:
    """The item texts of a file in any of `TEXT_FORMATS` (`auto` recognises them)."""
    path = Path(path)
    fmt = detect_text_format(path) if fmt == "auto" else fmt
    if fmt not in TEXT_FORMATS:
        raise DataError(f"unknown item text format {fmt!r}; known: auto, {', '.join(TEXT_FORMATS)}")
    try:
        return TEXT_FORMATS[fmt](path, encoding)
    except LookupError as err:  # an unknown encoding name
        raise DataError(f"{path}: {err}") from None


def read_id_map(path: Path) -> dict[str, str]:
    """A two-column TSV `data item id<TAB>text file item id` (header optional).

    For data sets whose item ids are not those of the text file, e.g. the ICLRec
    ML-1M file with `ml-1m_5core_item_map.tsv` (item_id -> MovieID).
    """
    table = _TextTable(Path(path), "id map")
    for index, (number, line) in enumerate(_decoded_lines(Path(path), "utf-8")):
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) != 2:
            raise line_error(path, number, "data_id<TAB>text_id", line)
        if index == 0 and fields[0].strip().lower() in _HEADER_IDS:
            continue  # a header line
        table.add(number, fields[0], fields[1])
    return table.texts
