"""`mormm shards`: turn a user's media files into webdataset tar shards plus index.json.

Flow: discover (class folders or a CSV/JSONL manifest) -> probe every file (broken ones go to the
report, never into a shard) -> split train/val/test (stratified, seeded) -> write shards with
webdataset's ShardWriter. The encoded bytes are stored as they are (no re-encoding); decoding
and resampling happen at training time, so one set of shards serves any model configuration.

A sample in a shard is:  KEY.<ext> (original bytes, one per file: e.g. .wav, or .wav + .mp4),
KEY.cls (class index, or comma-separated indices for multi-label) and KEY.json (the record:
source, label names, split, duration, per-file media facts, plus any extra manifest fields).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mormm.data.index import DatasetIndex, ShardInfo, SplitInfo
from mormm.data.probe import MEDIA_EXTS, MediaInfo, ProbeError, media_ext, probe_file

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# The files a run writes into OUTPUT, and so the only ones --overwrite deletes.
OUR_SHARD = re.compile(r"(train|val|test)-\d{6,}\.tar")
OUR_FILES = ("index.json", "report.json")
# Record fields the writer owns; a manifest column with one of these names would be overwritten.
RESERVED_FIELDS = frozenset({"key", "source", "label", "split", "duration", "media"})
PROGRESS_MIN_ITEMS = 100  # below this a run takes a blink; a bar would only flicker


class ShardsError(ValueError):
    """A user error (bad input folder, manifest or option); the message says what to do."""


@dataclass
class SourceItem:
    """One sample to write, as discovered: its files (one per modality), labels and extras."""

    files: list[Path]
    labels: list[str]
    source: str  # how the user named it: path relative to the input folder, or as in the manifest
    split: str | None = None  # from a manifest 'split' column
    fields: dict = field(default_factory=dict)  # extra manifest fields, copied into the record


@dataclass
class ProbedItem:
    item: SourceItem
    media: dict[str, MediaInfo]  # ext -> info

    @property
    def duration(self) -> float:
        return max(m.duration for m in self.media.values())


@dataclass
class Skipped:
    source: str
    reason: str


@dataclass
class WriteResult:
    index: DatasetIndex
    skipped: list[Skipped]
    output: Path
    lost_classes: list[str] = field(default_factory=list)  # classes none of whose files could be read


# ---------------------------------------------------------------------------------------------
# discovery


def scan_folder(root: Path) -> tuple[list[SourceItem], list[Skipped]]:
    """ImageFolder layout: root/<class>/**/<file>. Files sharing a stem in the same folder form one
    sample (clip.wav + clip.mp4 -> an audio+video sample)."""
    items, skipped = [], []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for class_dir in class_dirs:
        groups: dict[Path, list[Path]] = defaultdict(list)
        for path in sorted(class_dir.rglob("*")):
            if not path.is_file() or any(part.startswith(".") for part in path.relative_to(root).parts):
                continue
            if media_ext(path) not in MEDIA_EXTS:
                skipped.append(Skipped(str(path.relative_to(root)), f"unsupported extension '{path.suffix}'"))
                continue
            groups[path.with_suffix("")].append(path)
        for stem, files in groups.items():
            source = files[0] if len(files) == 1 else stem  # a pair is named by its shared stem
            items.append(SourceItem(files=files, labels=[class_dir.name], source=str(source.relative_to(root))))
    for path in sorted(root.iterdir()):
        if path.is_file() and media_ext(path) in MEDIA_EXTS:
            skipped.append(Skipped(path.name, "not inside a class sub-folder (expected INPUT/<class>/<file>)"))
    return items, skipped


def read_manifest(
    path: Path, path_columns: list[str], label_column: str, label_sep: str | None
) -> tuple[list[SourceItem], list[Skipped], bool]:
    """CSV (with header) or JSONL: one row per sample; relative paths are relative to the manifest.
    Returns the items, the rows skipped, and whether labels are multi-label (a JSONL list or a CSV
    value split by label_sep)."""
    rows = _read_rows(path)
    if not rows:
        raise ShardsError(f"manifest {path} has no rows")
    columns = set().union(*(r.keys() for r in rows))
    for col in [*path_columns, label_column]:
        if col not in columns:
            raise ShardsError(
                f"manifest {path} has no column '{col}' (columns: {', '.join(sorted(columns))}); "
                f"name the right one with --path-column / --label-column"
            )
    clash = (columns - set(path_columns) - {label_column, "split"}) & RESERVED_FIELDS
    if clash:
        raise ShardsError(f"manifest {path}: column(s) {sorted(clash)} are reserved for the writer; rename them")
    items, skipped = [], []
    for line, row in enumerate(rows, start=2 if path.suffix.lower() == ".csv" else 1):
        source = str(row.get(path_columns[0]) or f"{path.name}:{line}")
        labels = _parse_labels(row.get(label_column), label_sep)
        if not labels:
            skipped.append(Skipped(source, f"empty label in column '{label_column}' ({path.name} line {line})"))
            continue
        split = row.get("split") or None
        if split is not None and split not in SPLITS:
            raise ShardsError(f"manifest {path} line {line}: split '{split}' is not one of {', '.join(SPLITS)}")
        files = [Path(row[c]) for c in path_columns if row.get(c)]
        files = [f if f.is_absolute() else path.parent / f for f in files]
        extras = {k: v for k, v in row.items() if k not in {*path_columns, label_column, "split"}}
        items.append(SourceItem(files=files, labels=labels, source=source, split=split, fields=extras))
    multi_label = label_sep is not None or any(isinstance(r.get(label_column), list) for r in rows)
    return items, skipped, multi_label


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    if suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exn:
                    raise ShardsError(f"manifest {path} line {n} is not valid JSON: {exn}") from exn
        return rows
    raise ShardsError(f"manifest {path}: expected a .csv or .jsonl file, or a folder with one sub-folder per class")


def _parse_labels(value, sep: str | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):  # JSONL multi-label
        return [str(v) for v in value if str(v)]
    value = str(value).strip()
    if sep is not None:
        return [v.strip() for v in value.split(sep) if v.strip()]
    return [value] if value else []


# ---------------------------------------------------------------------------------------------
# probing and splitting


def probe_item(item: SourceItem) -> ProbedItem:
    if not item.files:
        raise ProbeError("no file path given")
    media: dict[str, MediaInfo] = {}
    for path in item.files:
        ext = media_ext(path)
        if ext in media:
            raise ProbeError(f"two files with extension '.{ext}' in one sample")
        try:
            media[ext] = probe_file(path)
        except ProbeError as exn:
            raise ProbeError(f"{path.name}: {exn}" if len(item.files) > 1 else str(exn)) from exn
    return ProbedItem(item, media)


def assign_splits(items: list[ProbedItem], fractions: list[float] | None, seed: int) -> dict[str, list[ProbedItem]]:
    """Fractions (train, val[, test]) split each class separately, so every split sees every class
    in proportion; without fractions a manifest's 'split' column decides (default: train)."""
    rng = random.Random(seed)
    splits: dict[str, list[ProbedItem]] = {s: [] for s in SPLITS}
    if fractions is None:
        for p in items:
            splits[p.item.split or "train"].append(p)
    else:
        by_class: dict[str, list[ProbedItem]] = defaultdict(list)
        for p in items:
            by_class[p.item.labels[0]].append(p)
        for name in sorted(by_class):
            group = by_class[name]
            rng.shuffle(group)
            n_val = int(len(group) * fractions[1] + 0.5)  # half up: 5 x 0.1 still gives one
            n_test = min(int(len(group) * fractions[2] + 0.5), len(group) - n_val)
            n_train = len(group) - n_val - n_test
            splits["train"] += group[:n_train]
            splits["val"] += group[n_train : n_train + n_val]
            splits["test"] += group[n_train + n_val :]
    # Shuffled within a split so each shard mixes classes (streaming shuffle buffers are small).
    for group in splits.values():
        rng.shuffle(group)
    return splits


def parse_fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ShardsError(f"--split {text!r}: expected fractions like 0.8,0.1,0.1 (train,val,test)") from None
    return check_fractions(values)


def check_fractions(values: list[float]) -> list[float]:
    """(train, val[, test]) fractions -> [train, val, test]."""
    if not 2 <= len(values) <= 3 or any(v < 0 for v in values) or abs(sum(values) - 1) > 1e-6:
        raise ShardsError(f"--split {values}: give 2 or 3 non-negative fractions (train,val[,test]) summing to 1")
    return [*values, 0.0] if len(values) == 2 else list(values)


def parse_bytes(text: str) -> int:
    units = {"K": 1e3, "M": 1e6, "G": 1e9}
    text = text.strip().upper().rstrip("B")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(float(text))
    except ValueError:
        raise ShardsError(f"--max-bytes {text!r}: expected a size like 500M or 1G") from None


# ---------------------------------------------------------------------------------------------
# writing


def _record(key: str, split: str, p: ProbedItem, base: Path) -> dict:
    # Paths relative to the input folder / manifest, as the user named them: shards get moved.
    paths = [path.relative_to(base) if path.is_relative_to(base) else path for path in p.item.files]
    media = {ext: {"path": str(path), **p.media[ext].to_json()} for ext, path in zip(p.media, paths, strict=True)}
    return {
        **p.item.fields,
        "key": key,
        "source": p.item.source,
        "label": p.item.labels,
        "split": split,
        "duration": round(p.duration, 6),
        "media": media,
    }


def write_split(
    items: list[ProbedItem],
    split: str,
    output: Path,
    class_to_idx: dict[str, int],
    max_samples: int,
    max_bytes: int,
    base: Path,
    progress: Progress | None = None,
) -> SplitInfo:
    info = SplitInfo()
    if not items:
        return info
    counts: Counter[str] = Counter()  # shard file name -> samples
    counts_by_class: Counter[str] = Counter()
    task = progress.add_task(f"writing {split}", total=len(items)) if progress else None
    with wds.ShardWriter(str(output / f"{split}-%06d.tar"), maxcount=max_samples, maxsize=max_bytes, verbose=0) as w:
        for n, p in enumerate(items):
            key = f"{split}_{n:07d}"  # no dots: webdataset splits key and extension at the first dot
            sample = {"__key__": key}
            for path in p.item.files:
                sample[media_ext(path)] = path.read_bytes()
            sample["cls"] = ",".join(str(class_to_idx[name]) for name in p.item.labels).encode()
            sample["json"] = json.dumps(_record(key, split, p, base)).encode()
            w.write(sample)
            counts[Path(w.fname).name] += 1
            counts_by_class.update(p.item.labels)
            info.duration_s += p.duration
            if progress:
                progress.advance(task)
    info.shards = [ShardInfo(path=name, samples=n) for name, n in counts.items()]
    info.class_counts = {name: counts_by_class[name] for name in class_to_idx if counts_by_class[name]}
    info.num_samples = len(items)
    info.duration_s = round(info.duration_s, 3)
    return info


def _modalities(items: list[ProbedItem]) -> list[str]:
    """Modalities every sample can provide; a DataModule may ask for any subset of these."""
    has_audio = all(any(m.has_audio for m in p.media.values()) for p in items)
    has_video = all(any(m.has_video for m in p.media.values()) for p in items)
    return [m for m, ok in (("audio", has_audio), ("video", has_video)) if ok]


def _prepare_output(output: Path, overwrite: bool) -> None:
    """Refuse to mix with an earlier run's shards, or (overwrite) delete exactly the files a run
    writes; anything else in the folder is left alone."""
    ours = []
    if output.is_dir():
        ours = [p for p in output.iterdir() if OUR_SHARD.fullmatch(p.name) or p.name in OUR_FILES]
    if ours and not overwrite:
        raise ShardsError(f"output folder {output} already holds shards; pass --overwrite or choose another folder")
    for p in ours:
        p.unlink()
    output.mkdir(parents=True, exist_ok=True)


def write_shards(
    input: str | Path,
    output: str | Path,
    *,
    path_columns: list[str] | tuple[str, ...] = ("path",),
    label_column: str = "label",
    label_sep: str | None = None,
    split: list[float] | None = None,
    seed: int = 0,
    max_samples: int = 1000,
    max_bytes: int = 1_000_000_000,
    overwrite: bool = False,
    console: Console | None = None,
) -> WriteResult:
    """Probe, split and write; returns the index and the skipped files. Raises ShardsError on user
    errors (missing input, empty input, unknown column)."""
    input, output = Path(input).expanduser(), Path(output).expanduser()
    if not input.exists():
        raise ShardsError(f"input {input} does not exist; give a folder with one sub-folder per class or a manifest")
    if input.is_dir():
        items, skipped = scan_folder(input)
        multi_label = False
    else:
        items, skipped, multi_label = read_manifest(input, list(path_columns), label_column, label_sep)
    if not items:
        raise ShardsError(
            f"no media files found in {input} (supported: {', '.join(sorted(MEDIA_EXTS))}; "
            f"a folder needs one sub-folder per class)"
        )
    given = {it.split for it in items if it.split}
    if split is not None and given:
        raise ShardsError(
            f"manifest {input} has a 'split' column ({', '.join(sorted(given))}) and "
            f"--split {','.join(map(str, split))} was given too; drop --split to keep the manifest's splits, or rename the column to re-split at random"
        )
    _prepare_output(output, overwrite)

    console = console or Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=len(items) < PROGRESS_MIN_ITEMS,
    ) as progress:
        probed = []
        for item in progress.track(items, description="probing"):
            try:
                probed.append(probe_item(item))
            except ProbeError as exn:
                skipped.append(Skipped(item.source, str(exn)))
        if not probed:
            raise ShardsError(f"none of the {len(items)} samples in {input} could be read ({skipped[0].reason}, ...)")
        # Classes come from the samples kept: a class whose every file is broken would otherwise
        # be a class the model must predict but never sees.
        classes = sorted({name for p in probed for name in p.item.labels})
        lost = sorted({name for it in items for name in it.labels} - set(classes))
        if lost:
            log.warning("classes left out, none of their files could be read (see report.json): %s", ", ".join(lost))
        class_to_idx = {name: i for i, name in enumerate(classes)}
        base = input if input.is_dir() else input.parent
        by_split = assign_splits(probed, None if split is None else check_fractions(split), seed)
        splits = {
            name: write_split(group, name, output, class_to_idx, max_samples, max_bytes, base, progress)
            for name, group in by_split.items()
            if group
        }
    index = DatasetIndex(
        classes=classes,
        multi_label=multi_label,
        modalities=_modalities(probed),
        splits=splits,
        skipped=len(skipped),
        root=output,
    )
    index.save(output)
    report = {"skipped": [{"source": s.source, "reason": s.reason} for s in skipped], "lost_classes": lost}
    (output / "report.json").write_text(json.dumps(report, indent=2))
    return WriteResult(index=index, skipped=skipped, output=output, lost_classes=lost)


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mormm shards",
        description="Write webdataset shards (+ index.json, report.json) from audio/video files.",
    )
    parser.add_argument("input", type=Path, help="folder with one sub-folder per class, or a .csv/.jsonl manifest")
    parser.add_argument("output", type=Path, help="folder for the shards")
    parser.add_argument(
        "--path-column",
        default="path",
        help="manifest column(s) holding file paths, comma-separated for paired files (e.g. audio,video)",
    )
    parser.add_argument("--label-column", default="label", help="manifest column holding the label")
    parser.add_argument("--label-sep", default=None, help="separator for multi-label values in a CSV (e.g. ';')")
    parser.add_argument(
        "--split",
        default=None,
        help="train,val[,test] fractions, e.g. 0.8,0.1,0.1 (default: manifest 'split' or all train)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the split and the shuffle")
    parser.add_argument("--max-samples", type=int, default=1000, help="samples per shard at most")
    parser.add_argument("--max-bytes", default="1G", help="bytes per shard at most (e.g. 500M, 1G)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUTPUT")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        result = write_shards(
            args.input,
            args.output,
            path_columns=[c.strip() for c in args.path_column.split(",") if c.strip()],
            label_column=args.label_column,
            label_sep=args.label_sep,
            split=parse_fractions(args.split) if args.split else None,
            seed=args.seed,
            max_samples=args.max_samples,
            max_bytes=parse_bytes(args.max_bytes),
            overwrite=args.overwrite,
            console=console,
        )
    except ShardsError as exn:
        console.print(f"[red]error:[/red] {exn}", highlight=False, soft_wrap=True)  # paths stay unbroken
        return 2
    index = result.index
    per_split = ", ".join(f"{name} {s.num_samples}" for name, s in index.splits.items())
    n_shards = sum(len(s.shards) for s in index.splits.values())
    written = sum(s.num_samples for s in index.splits.values())
    print(
        f"wrote {written} samples ({per_split}; {len(index.classes)} classes; {index.total_duration_s:.1f} s; "
        f"modalities: {', '.join(index.modalities) or 'none shared by all samples'}) "
        f"in {n_shards} shards to {result.output}"
    )
    print(
        f"skipped {len(result.skipped)} files"
        + (f" (reasons in {result.output / 'report.json'}):" if result.skipped else "")
    )
    for s in result.skipped[:20]:
        print(f"  {s.source}: {s.reason}")
    if len(result.skipped) > 20:
        print(f"  ... and {len(result.skipped) - 20} more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
