"""`Vocabulary`: external item ids <-> the internal ids 1..N that models see.

0 is padding and N+1 the [MASK] token of BERT4Rec, so a catalogue of N items
has N+2 embedding rows. Saved as `vocab.json` in the prepared folder and in
model bundles; numbering items is training/prepare.py's job.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.data_error import DataError
from training.json_files import read_json, write_json

PAD_ID = 0
VOCAB_SCHEMA = "fishrec.vocab/1"


@dataclass(frozen=True)
class Vocabulary:
    """External item id <-> internal id. Internal ids are 1..num_items; 0 pads, num_items+1 masks."""

    items: tuple[str, ...]  # items[i] is the external id of internal id i + 1
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        items = tuple(str(item) for item in self.items)
        index = {external: internal for internal, external in enumerate(items, start=1)}
        if len(index) != len(items):
            repeated = [item for item, count in Counter(items).items() if count > 1]
            raise DataError(f"vocabulary lists items more than once: {repeated[:5]}")
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "_index", index)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def mask_id(self) -> int:
        return self.num_items + 1

    def __len__(self) -> int:
        return self.num_items

    def __contains__(self, external: object) -> bool:
        return external in self._index

    def index(self, external: str) -> int:
        try:
            return self._index[external]
        except KeyError:
            raise KeyError(
                f"unknown item id {external!r} (the vocabulary has {self.num_items} items)"
            ) from None

    def external(self, internal: int) -> str:
        if not 1 <= internal <= self.num_items:
            raise KeyError(
                f"internal id {internal} is not an item: items are 1..{self.num_items}, "
                f"{PAD_ID} is padding and {self.mask_id} is [MASK]"
            )
        return self.items[internal - 1]

    def encode(self, externals: Iterable[str]) -> tuple[list[int], list[str]]:
        """(internal ids of the known items in order, the unknown external ids in order)."""
        known: list[int] = []
        unknown: list[str] = []
        for external in externals:
            internal = self._index.get(external)
            if internal is None:
                unknown.append(external)
            else:
                known.append(internal)
        return known, unknown

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": VOCAB_SCHEMA,
            "pad_id": PAD_ID,
            "mask_id": self.mask_id,
            "num_items": self.num_items,
            "items": list(self.items),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Vocabulary:
        if not isinstance(d, dict) or d.get("schema") != VOCAB_SCHEMA:
            got = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise DataError(f"expected a vocabulary with schema {VOCAB_SCHEMA!r}, got {got!r}")
        items = d.get("items")
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise DataError("vocabulary 'items' must be a list of strings")
        vocab = cls(tuple(items))
        declared = (d.get("pad_id"), d.get("num_items"), d.get("mask_id"))
        if declared != (PAD_ID, vocab.num_items, vocab.mask_id):
            raise DataError(
                f"vocabulary declares pad_id, num_items, mask_id = {declared}; its {vocab.num_items} "
                f"items imply {(PAD_ID, vocab.num_items, vocab.mask_id)}"
            )
        return vocab

    def save(self, path: Path) -> None:
        write_json(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        data = read_json(Path(path))
        try:
            return cls.from_json(data)
        except DataError as error:
            raise DataError(f"{path}: {error}") from None
