"""The dataset index (index.json next to the shards) and random access into tar shards.

index.json is the single source of truth for class names, split sizes and shard lists, so configs
never repeat them. Random access (TarMember offsets) is what makes evaluation exact-once: every
rank can pick its own samples by position instead of streaming whole shards.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

INDEX_NAME = "index.json"
INDEX_FORMAT = "mormm-shards/1"


@dataclass
class ShardInfo:
    path: str  # relative to the index's folder
    samples: int


@dataclass
class SplitInfo:
    shards: list[ShardInfo] = field(default_factory=list)
    num_samples: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0


@dataclass
class DatasetIndex:
    classes: list[str]
    multi_label: bool
    # Modalities that every sample has (a video with an audio track counts for both).
    modalities: list[str]
    splits: dict[str, SplitInfo]
    skipped: int = 0
    format: str = INDEX_FORMAT
    root: Path | None = field(default=None, compare=False)  # folder of index.json, set by load()

    @property
    def total_duration_s(self) -> float:
        return sum(s.duration_s for s in self.splits.values())

    @property
    def path(self) -> Path | None:
        """The index.json this index was loaded from (or saved to)."""
        return None if self.root is None else self.root / INDEX_NAME

    def missing_shards(self) -> list[str]:
        """Shard files listed in the index (every split) that are not on disk."""
        return [str(self.root / s.path) for split in self.splits.values() for s in split.shards
                if not (self.root / s.path).is_file()]

    def shard_paths(self, split: str) -> list[str]:
        if split not in self.splits or self.splits[split].num_samples == 0:
            have = ", ".join(f"{k} ({v.num_samples})" for k, v in self.splits.items())
            raise ValueError(
                f"dataset {self.root} has no '{split}' samples (splits: {have or 'none'}); "
                f"write the shards with e.g. `mormm shards IN OUT --split 0.8,0.1,0.1`"
            )
        return [str(self.root / s.path) for s in self.splits[split].shards]

    def save(self, folder: Path) -> Path:
        data = {k: v for k, v in asdict(self).items() if k != "root"}
        data["total_duration_s"] = round(self.total_duration_s, 3)
        path = folder / INDEX_NAME
        path.write_text(json.dumps(data, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> DatasetIndex:
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / INDEX_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no dataset index at {path}; write shards with `mormm shards INPUT OUTPUT` first")
        data = json.loads(path.read_text())
        if data.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path}: format {data.get('format')!r} is not {INDEX_FORMAT!r}; rewrite the shards")
        splits = {
            name: SplitInfo(
                shards=[ShardInfo(**s) for s in split["shards"]],
                num_samples=split["num_samples"],
                class_counts=split["class_counts"],
                duration_s=split["duration_s"],
            )
            for name, split in data["splits"].items()
        }
        return cls(
            classes=data["classes"],
            multi_label=data["multi_label"],
            modalities=data["modalities"],
            splits=splits,
            skipped=data.get("skipped", 0),
            root=path.parent,
        )


@dataclass(frozen=True)
class TarMember:
    offset: int  # byte offset of the member's data in the tar file
    size: int


@dataclass(frozen=True)
class TarSample:
    """Where one sample's files lie in a shard: extension -> member."""

    shard: str
    key: str
    members: dict[str, TarMember]

    def read(self) -> dict[str, bytes | str]:
        """The sample in webdataset's form: {"__key__": key, "__url__": shard, ext: bytes}."""
        sample: dict[str, bytes | str] = {"__key__": self.key, "__url__": self.shard}
        with open(self.shard, "rb") as f:
            for ext, m in self.members.items():
                f.seek(m.offset)
                sample[ext] = f.read(m.size)
        return sample


def index_tar(shard: str) -> list[TarSample]:
    """List the samples of one shard in file order, reading only the tar headers. Raises
    ValueError if the file is not a readable tar (corrupt or truncated header)."""
    samples: dict[str, dict[str, TarMember]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                # Same grouping rule as webdataset: the key is the name up to the first dot.
                key, _, ext = info.name.partition(".")
                samples.setdefault(key, {})[ext.lower()] = TarMember(info.offset_data, info.size)
    except tarfile.TarError as exn:  # ReadError (bad header), HeaderError, truncated file, ...
        raise ValueError(
            f"shard {shard} is corrupt or not a tar file ({type(exn).__name__}: {exn}); rewrite it with `mormm shards`"
        ) from exn
    return [TarSample(shard, key, members) for key, members in samples.items()]
