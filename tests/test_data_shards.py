"""`mormm shards`: discovery, probing, splitting, writing, the report and the CLI's errors."""

import csv
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mormm.data.demo import write_mp4
from mormm.data.index import DatasetIndex
from mormm.data.shards import ShardsError, main, write_shards


def write_wav(path: Path, seconds: float = 0.25, rate: int = 16_000, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = np.random.default_rng(seed).uniform(-0.5, 0.5, int(seconds * rate)).astype(np.float32)
    sf.write(path, wave, rate, subtype="PCM_16")
    return path


def write_video(path: Path, frames: int = 6, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(path, np.random.default_rng(seed).integers(0, 255, (frames, 16, 16, 3), dtype=np.uint8), fps=8)
    return path


def read_shards(folder: Path) -> dict[str, dict[str, bytes]]:
    """All samples of all shards, by key, read with tarfile (independent of the writer)."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    for c, name in enumerate(["cat", "dog"]):
        for i in range(5):
            write_wav(root / name / f"clip{i}.wav", seconds=0.1 + 0.05 * i, seed=10 * c + i)
    write_wav(root / "dog" / "nested" / "deep.wav", seed=99)
    write_video(root / "cat" / "moving.mp4")
    (root / "cat" / "empty.wav").write_bytes(b"")
    (root / "dog" / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    (root / "dog" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    (root / "dog" / "notes.txt").write_text("not media")
    write_wav(root / "stray.wav")  # not inside a class folder
    return root


def test_folder_round_trip_keeps_bytes_labels_and_reports_bad_files(class_folder: Path, tmp_path: Path):
    out = tmp_path / "shards"
    result = write_shards(class_folder, out, max_samples=3)

    good = [p for p in class_folder.rglob("*") if p.suffix in (".wav", ".mp4") and p.parent != class_folder]
    good = [p for p in good if p.name not in ("empty.wav", "corrupt.wav", "broken.mp4")]
    samples = read_shards(out)
    assert len(samples) == len(good) == 12
    by_source = {json.loads(s["json"])["source"]: s for s in samples.values()}
    index = DatasetIndex.load(out)
    assert index.classes == ["cat", "dog"] and not index.multi_label
    for path in good:
        rel = str(path.relative_to(class_folder))
        sample = by_source[rel]
        ext = path.suffix[1:]
        assert sample[ext] == path.read_bytes()  # stored as-is, no re-encoding
        label = path.relative_to(class_folder).parts[0]
        assert int(sample["cls"]) == index.classes.index(label)
        record = json.loads(sample["json"])
        assert record["label"] == [label]
        media = record["media"][ext]
        assert media["path"] == str(path.relative_to(class_folder))
        if ext == "wav":
            assert media["sample_rate"] == 16_000
            assert media["duration"] == pytest.approx(sf.info(path).duration)
        else:
            assert media["frames"] == 6 and media["fps"] == 8 and (media["width"], media["height"]) == (16, 16)

    reasons = {s.source: s.reason for s in result.skipped}
    assert set(reasons) == {"cat/empty.wav", "dog/corrupt.wav", "dog/broken.mp4", "dog/notes.txt", "stray.wav"}
    assert "empty" in reasons["cat/empty.wav"]
    assert "unreadable" in reasons["dog/corrupt.wav"]
    assert "unsupported extension" in reasons["dog/notes.txt"]
    assert "class sub-folder" in reasons["stray.wav"]
    report = json.loads((out / "report.json").read_text())
    assert {r["source"] for r in report["skipped"]} == set(reasons)

    train = index.splits["train"]
    assert index.skipped == 5 and train.num_samples == 12 and train.class_counts == {"cat": 6, "dog": 6}
    assert [s.samples for s in train.shards] == [3, 3, 3, 3]
    assert all((out / s.path).is_file() for s in train.shards)
    assert index.modalities == []  # the mp4 has no audio track, the wavs no video: nothing shared by all


def test_split_is_stratified_seeded_and_manifest_fields_are_kept(tmp_path: Path):
    rows = []
    for c in ["a", "b"]:
        for i in range(10):
            path = write_wav(tmp_path / "files" / f"{c}{i}.wav", seed=i)
            rows.append({"path": f"files/{path.name}", "label": c, "speaker": f"s{i}"})
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "speaker"])
        writer.writeheader()
        writer.writerows(rows)

    runs = [write_shards(manifest, tmp_path / f"out{n}", split=[0.6, 0.2, 0.2], seed=7) for n in range(2)]
    index = runs[0].index
    assert {k: v.class_counts for k, v in index.splits.items()} == {
        "train": {"a": 6, "b": 6},
        "val": {"a": 2, "b": 2},
        "test": {"a": 2, "b": 2},
    }
    first, second = read_shards(runs[0].output), read_shards(runs[1].output)
    assert first.keys() == second.keys() and all(first[k]["wav"] == second[k]["wav"] for k in first)  # seeded
    records = [json.loads(s["json"]) for s in first.values()]
    assert {r["speaker"] for r in records} == {f"s{i}" for i in range(10)}
    assert all(r["key"].startswith(r["split"]) and "." not in r["key"] for r in records)


def test_jsonl_manifest_pairs_files_and_reads_multi_labels(tmp_path: Path):
    lines = []
    for i in range(3):
        write_wav(tmp_path / f"{i}.wav", seed=i)
        write_video(tmp_path / f"{i}.mp4", seed=i)
        lines.append({"audio": f"{i}.wav", "video": f"{i}.mp4", "label": ["x", "z"] if i else ["y"], "event": {"t": i}})
    lines.append({"audio": "missing.wav", "video": "0.mp4", "label": ["x"]})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))

    result = write_shards(manifest, tmp_path / "out", path_columns=["audio", "video"])
    index = result.index
    assert index.multi_label and index.classes == ["x", "y", "z"]
    assert index.modalities == ["audio", "video"]
    assert [(s.source, s.reason) for s in result.skipped] == [("missing.wav", "missing.wav: file not found")]
    samples = read_shards(result.output)
    assert sorted(s["cls"] for s in samples.values()) == [b"0,2", b"0,2", b"1"]
    for s in samples.values():
        record = json.loads(s["json"])
        assert s["wav"] == (tmp_path / f"{record['event']['t']}.wav").read_bytes()
        assert s["mp4"] == (tmp_path / f"{record['event']['t']}.mp4").read_bytes()


def test_cli_summary_counts_skipped_files(class_folder: Path, tmp_path: Path, capsys):
    out = tmp_path / "shards"
    assert main([str(class_folder), str(out), "--split", "0.5,0.5", "--max-bytes", "1M"]) == 0
    stdout = capsys.readouterr().out
    assert "wrote 12 samples (train 6, val 6; 2 classes" in stdout
    assert "skipped 5 files" in stdout and "dog/corrupt.wav: unreadable" in stdout
    # A second run into the same folder must not silently mix shards.
    assert main([str(class_folder), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([str(class_folder), str(out), "--overwrite"]) == 0


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda d: None, ["missing"], "does not exist"),
        (lambda d: (d / "empty" / "cls").mkdir(parents=True), ["empty"], "no media files found"),
        (lambda d: (d / "m.csv").write_text("path,target\nx.wav,a\n"), ["m.csv"], "no column 'label' (columns: path,"),
        (lambda d: (d / "m.csv").write_text("file,label\nx.wav,a\n"), ["m.csv"], "no column 'path'"),
        (lambda d: (d / "m.txt").write_text("x"), ["m.txt"], "expected a .csv or .jsonl"),
        (lambda d: (d / "m.csv").write_text("path,label\nx.wav,a\n"), ["m.csv", "--split", "0.9,0.3"], "summing to 1"),
    ],
)
def test_cli_user_errors_exit_non_zero_with_a_clear_message(tmp_path: Path, capsys, setup, args, message):
    setup(tmp_path)
    args = [str(tmp_path / args[0]), str(tmp_path / "out"), *args[1:]]
    assert main(args) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")


def test_a_class_whose_files_are_all_broken_is_left_out_and_reported(tmp_path: Path, caplog):
    for i in range(2):
        write_wav(tmp_path / "in" / "cat" / f"{i}.wav", seed=i)
        write_wav(tmp_path / "in" / "dog" / f"{i}.wav", seed=10 + i)
        (tmp_path / "in" / "bird" / f"{i}.wav").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "bird" / f"{i}.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    result = write_shards(tmp_path / "in", tmp_path / "out")
    assert result.index.classes == ["cat", "dog"] and result.lost_classes == ["bird"]
    assert sorted(int(s["cls"]) for s in read_shards(result.output).values()) == [0, 0, 1, 1]
    assert json.loads((result.output / "report.json").read_text())["lost_classes"] == ["bird"]
    assert any("bird" in r.getMessage() and "left out" in r.getMessage() for r in caplog.records)


def test_split_fractions_and_a_manifest_split_column_conflict(tmp_path: Path):
    for i in range(4):
        write_wav(tmp_path / f"{i}.wav", seed=i)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\n0.wav,a,train\n1.wav,a,val\n2.wav,b,train\n3.wav,b,val\n")
    with pytest.raises(ValueError, match=r"'split' column \(train, val\) and --split 0.5,0.5 was given"):
        write_shards(manifest, tmp_path / "out", split=[0.5, 0.5])
    assert main([str(manifest), str(tmp_path / "out"), "--split", "0.5,0.5"]) == 2
    index = write_shards(manifest, tmp_path / "out").index  # without --split the column decides
    assert {k: v.num_samples for k, v in index.splits.items()} == {"train": 2, "val": 2}


def test_overwrite_deletes_only_the_files_a_run_writes(class_folder: Path, tmp_path: Path):
    out = tmp_path / "shards"
    write_shards(class_folder, out, split=[0.5, 0.5], max_samples=2)
    old = {p.name for p in out.iterdir()}
    assert {"index.json", "report.json", "train-000000.tar", "val-000000.tar"} <= old
    keep = [out / "mine.tar", out / "notes.txt", out / "train-extra.tar"]
    for p in keep:
        p.write_text("user file")
    write_shards(class_folder, out, max_samples=100, overwrite=True)  # one train shard now
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.json", "report.json", "train-000000.tar", *(p.name for p in keep)]
    )
    assert all(p.read_text() == "user file" for p in keep)


def test_all_files_unreadable_is_an_error(tmp_path: Path):
    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "in" / "a" / "x.wav").write_bytes(b"nope")
    with pytest.raises(ShardsError, match="none of the 1 samples"):
        write_shards(tmp_path / "in", tmp_path / "out")
