"""Sharded caches of encoded samples: safetensors shards plus a JSON index, for every kind of cache.

Layout of a cache folder::

    index.json                 kind, version, settings, completed shards, one entry per sample, records that failed
    null_text.safetensors      umT5 of "" (1, text_len, text_dim), the text-dropout replacement
    shard-00000.safetensors    tensors "<key>/<name>" of up to `shard_size` samples
    ...

The index records the cache's ``kind`` (what its samples are: "motion" pairs, "preference" pairs) and the
``version`` of the rules they were encoded with. A cache class names both in its `CacheFormat`; an index of
another kind or version is refused with what to do instead, never read or extended.

Writing (`build_sharded_cache`): records are decoded in loader workers, encoded in the main process and
appended to the current shard; a shard is written to a temporary name and renamed when complete, and the index
lists only renamed shards, so an interrupted run leaves nothing half-used. Running the same build again skips
the records already cached (or already failed) and continues; a folder built with other settings is refused.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader, Dataset

from scail2.data.sample import SampleError
from scail2.utils.dtypes import DTYPES

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
NULL_TEXT_NAME = "null_text.safetensors"


@dataclass(frozen=True)
class CacheFormat:
    """What a cache class reads and writes.

    kind: what the samples are (recorded in the index). name: its name in messages, naming the kind
    ("motion latent cache").
    version: the encoding rules' version; changes: what this version changed (said when an older one is refused).
    build: the command that builds such a cache. uses: for other kinds, how to use a cache of that kind instead.
    """

    kind: str
    name: str
    version: int
    changes: str
    build: str
    uses: Mapping[str, str] = field(default_factory=dict)


def _recorded_kind(data: Mapping[str, Any]) -> str | None:
    # Indexes written before the kind was recorded were all motion latent caches (version 1).
    return data.get("kind", "motion" if "version" in data and "settings" in data else None)


@dataclass
class ShardIndex:
    """The parsed ``index.json`` of a cache folder; subclasses set ``format`` and turn entries into samples."""

    format: ClassVar[CacheFormat]

    root: Path
    settings: dict[str, Any]
    shards: list[str] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, root: str | Path):
        """Read the index of ``root``; refuse a missing one, another kind or another version."""
        root = Path(root)
        path = root / INDEX_NAME
        fmt = cls.format
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; build the cache with `{fmt.build.replace('DIR', str(root), 1)}`")
        data = json.loads(path.read_text())
        kind = _recorded_kind(data)
        if kind != fmt.kind:
            instead = fmt.uses.get(kind or "")
            fix = f"{instead}; or build a {fmt.name} with `{fmt.build}`" if instead else f"build a {fmt.name} with `{fmt.build}`"
            raise ValueError(f"{path} is a {kind or 'unknown'} cache, not a {fmt.name}; {fix}")
        if data.get("version") != fmt.version:
            raise ValueError(
                f"{path} has cache version {data.get('version')}; this code reads version {fmt.version} "
                f"({fmt.changes}): rebuild it with `{fmt.build}` into a new folder (or delete {root}); caches of "
                "different versions are never mixed"
            )
        return cls(root, data["settings"], data["shards"], data["samples"], data["failed"])

    def save(self) -> None:
        data = {
            "kind": self.format.kind,
            "version": self.format.version,
            "settings": self.settings,
            "shards": self.shards,
            "samples": self.samples,
            "failed": self.failed,
        }
        tmp = self.root / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.root / INDEX_NAME)  # atomic: readers see the old or the new index, never half

    def null_text(self) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.root / NULL_TEXT_NAME))["null_text"].float()

    def read_tensors(self, entry: Mapping[str, Any], names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` of one sample, as float32; an unreadable shard raises `SampleError`."""
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        key = entry["key"]
        try:
            with safe_open(str(self.root / entry["shard"]), framework="pt") as fh:
                return {name: fh.get_tensor(f"{key}/{name}").float() for name in names}
        except (OSError, SafetensorError, KeyError) as exc:
            raise SampleError("unreadable", "cache", f"{entry['shard']} {key}: {exc}") from None


@dataclass
class CacheReport:
    cached: int  # samples in the cache after this run
    added: int  # samples encoded by this run
    failed: int  # records that failed (all runs)
    skipped_done: int  # records already in the cache when this run started
    seconds: float


Failure = tuple[str, str, str]  # (reason, field, detail) of a record that produced no sample


class _DecodeJobs(Dataset):
    """Decoding in loader workers: item -> (record index, decoded sample or `Failure`)."""

    def __init__(self, records: Sequence[Any], pending: Sequence[int], decode: Callable[[Any], Any]):
        self.records, self.pending, self.decode = records, pending, decode

    def __len__(self) -> int:
        return len(self.pending)

    def __getitem__(self, i: int):
        index = self.pending[i]
        try:
            return index, self.decode(self.records[index])
        except SampleError as exc:
            return index, (exc.reason, exc.field, exc.detail)
        except Exception as exc:  # noqa: BLE001 - one record's failure must not end the whole cache run
            return index, ("invalid", "<record>", f"{type(exc).__name__}: {exc}")


def _first(batch):
    return batch[0]


def build_sharded_cache(
    index_class: type[ShardIndex],
    records: Sequence[Any],
    out_dir: str | Path,
    settings: dict[str, Any],
    null_text: Callable[[], torch.Tensor],
    decode: Callable[[Any], Any],
    encode: Callable[[Any, Any], tuple[dict[str, Any], Mapping[str, torch.Tensor]]],
    dtype: str = "bfloat16",
    shard_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
) -> CacheReport:
    """Encode ``records`` (each with ``id`` and ``source``) into ``out_dir``, created or resumed.

    decode(record) -> decoded sample, or a `Failure` tuple, or raises `SampleError`: runs in loader workers
    (``num_workers``), so it must pickle. encode(record, decoded) -> (index entry, named tensors): runs in this
    process; tensors are stored as ``dtype``. null_text() -> the umT5 embedding of "" (written once).
    ``settings`` are recorded in the index; a folder built with other settings is refused rather than mixed.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if dtype not in DTYPES:
        raise ValueError(f"cache dtype {dtype!r}; use one of {sorted(DTYPES)}")
    if shard_size < 1:
        raise ValueError(f"shard_size {shard_size} must be >= 1")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("the manifest has duplicate record ids; run `scail2-data validate` first")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if (root / INDEX_NAME).exists():
        index = index_class.load(root)
        if index.settings != settings:
            changed = sorted(k for k in settings if index.settings.get(k) != settings[k])
            raise ValueError(
                f"{root} holds a cache built with other settings ({', '.join(changed)} differ); "
                "use a new folder or delete this one"
            )
    else:
        index = index_class(root, settings)
    for stale in root.glob("*.tmp"):  # leftovers of an interrupted run: never referenced by the index
        stale.unlink()
    null_path = root / NULL_TEXT_NAME
    if not null_path.exists():
        tmp = root / (NULL_TEXT_NAME + ".tmp")
        save_file({"null_text": null_text().float().cpu().contiguous()}, str(tmp))
        tmp.replace(null_path)

    done = {s["id"] for s in index.samples} | {f["id"] for f in index.failed}
    pending = [i for i, r in enumerate(records) if r.id not in done]
    store = DTYPES[dtype]
    loader = DataLoader(_DecodeJobs(records, pending, decode), batch_size=1, num_workers=num_workers, collate_fn=_first)

    tensors: dict[str, torch.Tensor] = {}
    entries: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    added = 0

    def commit() -> None:
        nonlocal tensors, entries, failures
        if entries:
            name = f"shard-{len(index.shards):05d}.safetensors"
            tmp = root / (name + ".tmp")
            save_file(tensors, str(tmp))
            os.replace(tmp, root / name)
            index.shards.append(name)
            index.samples.extend({**e, "shard": name} for e in entries)
        index.failed.extend(failures)
        if entries or failures:
            index.save()
        tensors, entries, failures = {}, [], []

    bar = tqdm(total=len(pending), desc="caching", unit="rec", disable=not progress)
    for position, result in loader:
        record = records[position]
        if isinstance(result, tuple):
            reason, field_name, detail = result
            log.warning("cache: skipping %s: %s: %s: %s", record.id, field_name, reason, detail)
            failures.append({"id": record.id, "source": record.source, "reason": reason, "field": field_name, "detail": detail})
        else:
            entry, named = encode(record, result)
            key = f"s{len(entries)}"
            for name, value in named.items():
                tensors[f"{key}/{name}"] = value.to(store).contiguous()
            entries.append({**entry, "key": key})
            added += 1
        bar.update(1)
        if len(entries) >= shard_size:
            commit()
    commit()
    bar.close()
    return CacheReport(len(index.samples), added, len(index.failed), len(records) - len(pending), time.perf_counter() - start)
