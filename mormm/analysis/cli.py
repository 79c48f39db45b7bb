"""`mormm analyze`: where does a trained model spend its recursions?

    mormm analyze --config FILE --ckpt_path CKPT [--data SPLIT|PATH] [--out DIR]
                  [--router learned random uniform] [--seed N] [--plots N] [--max_clips N]
                  [--time_bin SECONDS] [any LightningCLI override, e.g. --data.dataset demo:audio]

Builds the model and data from the same YAML as training (extra `--section.key value` overrides
go to LightningCLI), loads the checkpoint's weights, runs the model in eval mode over a split
("train", "val", "test") or a media file / folder, and writes, per router, to DIR/<router>/:

    clips/<key>.json     per clip: prediction, depth and region of every token, segments
    segments.csv         one row per segment and modality: depth, time span, extent, content
    summary.json         aggregates (histograms, by time / class / correctness, modality split,
                         depth-content correlations, event vs background depth)
    plots/*.png          spectrogram / frames with the depth overlay, and the summary figure
and DIR/comparison.json with the headline numbers of every router, also printed as a table.

The random and uniform routers (analysis.baseline_routers) keep the learned router's capacities,
unit and gate and only replace which units recurse: the chance level to compare against.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

import torch

from mormm.analysis import plots
from mormm.analysis.baseline_routers import swap_router
from mormm.analysis.collect import collect, tokenizers
from mormm.analysis.stats import AXES, CONTENT, ClipDepth, aggregate, clip_summary

ROUTERS = ("learned", "random", "uniform")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mormm analyze",
        description="Depth-allocation analysis of a trained model: numbers and pictures. Arguments "
        "not listed here (e.g. --data.dataset demo:audio, --data.batch_size 8) are LightningCLI "
        "overrides of the config.",
        allow_abbrev=False,
    )
    p.add_argument("--config", action="append", required=True, help="training YAML (repeatable)")
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by `mormm fit`")
    p.add_argument("--data", default="test", help="split name or media file/folder (default: test)")
    p.add_argument("--out", default="analysis", help="output folder (default: ./analysis)")
    p.add_argument("--router", nargs="+", choices=ROUTERS, default=["learned"],
                   help="learned, and/or the random and uniform chance baselines")
    p.add_argument("--seed", type=int, default=0, help="seed of the random / uniform routers")
    p.add_argument("--plots", type=int, default=8, help="clips drawn per router (default 8)")
    p.add_argument("--max_clips", type=int, default=None, help="stop after this many clip views")
    p.add_argument("--time_bin", type=float, default=None,
                   help="seconds per bin of depth-by-time (default: the tokenizer's time step)")
    return p


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        module, datamodule = load(args.config, args.ckpt_path, overrides, args.data)
        results = analyze(module, datamodule, args)
    except (ValueError, FileNotFoundError) as e:
        from mormm.cli import user_error

        return user_error(e)
    print_summary(results)
    return 0


def load(configs: list[str], ckpt_path: str, overrides: list[str], data: str):
    """The MoRModule (weights from the checkpoint, eval mode) and ShardDataModule of a config."""
    from mormm.cli import model_and_data  # the training CLI's parser: same YAML, same overrides

    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such file")
    module, datamodule = model_and_data(configs, [*overrides, "--data.predict_from", data])
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    try:
        module.load_state_dict(state["state_dict"] if "state_dict" in state else state)
    except RuntimeError as e:  # shapes or names differ: the config is not the one trained
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:4]) or first[0]
        raise ValueError(
            f"--ckpt_path {ckpt_path}: its weights do not fit the model that {configs} builds "
            f"({detail}); analyze with the config it was trained with (the config.yaml that "
            f"`mormm fit` saved next to its checkpoints folder)"
        ) from None
    module.eval()
    return module, datamodule


def modality_names(tokenizer) -> dict[int, str]:
    audio, video = tokenizers(tokenizer)
    names = {}
    if audio is not None:
        names[audio.modality_id] = "audio"
    if video is not None:
        names[video.modality_id] = "video"
    return names


@torch.no_grad()
def analyze(module, datamodule, args) -> dict[str, dict]:
    """Run every requested router over the data; write the outputs; return their summaries."""
    model = module.model
    backbone = getattr(model.backbone, "_orig_mod", model.backbone)  # never the compiled wrapper
    if backbone.router is None and set(args.router) - {"learned"}:
        raise ValueError("the model has no router (plain recursion): only --router learned applies")
    audio_tok, video_tok = tokenizers(model.tokenizer)
    steps = [s for s in (getattr(audio_tok, "step_seconds", None), getattr(video_tok, "slice_seconds", None)) if s]
    time_bin = args.time_bin or (min(steps) if steps else 0.1)
    names = modality_names(model.tokenizer)
    class_names = datamodule.class_names
    max_depth = backbone.config.num_recursions
    out_dir = Path(args.out)
    learned = backbone.router
    routers = {}
    for kind in args.router:
        swap_router(backbone, kind, args.seed)
        routers[kind] = backbone.router
    backbone.router = learned

    clips: dict[str, list[ClipDepth]] = {k: [] for k in routers}
    drawn = {k: 0 for k in routers}
    seen = 0
    for batch in datamodule.predict_dataloader():
        for kind, router in routers.items():
            backbone.router = router
            out = model(batch)
            budget = max(0, args.plots - drawn[kind])
            got, pictures = collect(batch, out, model.tokenizer, datamodule.decode_config, names,
                                    datamodule.multi_label, with_maps=budget)
            for clip, pics in zip(got, pictures):
                draw(out_dir / kind / "plots", clip, pics, max_depth, class_names)
                drawn[kind] += 1
            clips[kind].extend(got)
        backbone.router = learned
        seen += len(got)
        if args.max_clips is not None and seen >= args.max_clips:
            break
    skipped = datamodule.skipped.get("predict", 0)
    if not seen:
        raise ValueError(f"--data {args.data}: no clip could be read ({skipped} skipped; their "
                         f"reasons are in the log above)")

    summaries = {}
    for kind, rows in clips.items():
        rows = rows[: args.max_clips] if args.max_clips else rows
        summary = aggregate(rows, class_names, max_depth, time_bin)
        summary.update(router=kind, data=args.data, ckpt_path=str(args.ckpt_path), time_bin_s=time_bin,
                       skipped_clips=skipped)
        write(out_dir / kind, rows, summary, class_names)
        summaries[kind] = summary
    comparison = {k: headline(s) for k, s in summaries.items()}
    (out_dir / "comparison.json").write_text(json.dumps(comparison, indent=2))
    return summaries


# -- outputs -----------------------------------------------------------------------------------


def _file_key(clip: ClipDepth) -> str:
    key = re.sub(r"[^\w.-]", "_", clip.key)
    return key if clip.view == 0 else f"{key}_view{clip.view}"


def draw(folder: Path, clip: ClipDepth, pics, max_depth: int, class_names: list[str]) -> None:
    name = lambda i: class_names[i] if 0 <= i < len(class_names) else str(i)  # noqa: E731
    truth = ",".join(name(i) for i in clip.labels) or "?"
    title = f"{clip.key}  label {truth}  pred {name(clip.pred)} ({clip.prob:.2f})  mean depth {clip.depth.mean():.2f}"
    if pics.logmel is not None:
        plots.plot_audio(folder / f"{_file_key(clip)}_audio.png", pics.logmel, pics.audio_depth,
                         pics.audio_times, max_depth, pics.audio_events, title)
    if pics.frames is not None:
        plots.plot_video(folder / f"{_file_key(clip)}_video.png", pics.frames, pics.video_depth,
                         max_depth, pics.video_boxes, pics.video_times, title)


SEGMENT_COLUMNS = ("key", "view", "label", "pred", "correct", "segment", "modality", "depth", "tokens",
                   "time_start", "time_end", "freq_start", "freq_end", "height_start", "height_end",
                   "width_start", "width_end", "energy", "motion", "event_fraction")


def write(folder: Path, clips: list[ClipDepth], summary: dict, class_names: list[str]) -> None:
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    with (folder / "segments.csv").open("w", newline="") as f:
        rows = csv.DictWriter(f, SEGMENT_COLUMNS, restval="")
        rows.writeheader()
        for clip in clips:
            record = clip_summary(clip, class_names)
            (folder / "clips" / f"{_file_key(clip)}.json").write_text(json.dumps(record))
            for seg in record["segments"]:
                for m, info in seg["modalities"].items():
                    row = {"key": clip.key, "view": clip.view, "label": ",".join(map(str, record["labels"])),
                           "pred": record["pred"], "correct": record["correct"], "segment": seg["segment"],
                           "modality": m, "depth": info["depth"], "tokens": info["tokens"],
                           "time_start": seg["time"][0], "time_end": seg["time"][1],
                           "event_fraction": info["event"]}
                    for axis in AXES.get(m, ())[1:]:
                        row[f"{axis}_start"], row[f"{axis}_end"] = info[axis]
                    if CONTENT.get(m) in info:
                        row[CONTENT[m]] = info[CONTENT[m]]
                    rows.writerow(row)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    plots.plot_summary(folder / "plots" / "depth_summary.png", summary)


def headline(summary: dict) -> dict:
    """The numbers that fit on one line per modality."""
    rows = {}
    for m, counts in summary["depth_histogram"].items():
        total = max(sum(counts), 1)
        ev = summary["event_contrast"].get(m, {}).get("all", {})
        corr = summary["content_correlation"].get(m, {})
        rows[m] = {
            "accuracy": summary["accuracy"],
            "mean_depth": summary["modality_split"][m]["mean_depth"],
            "depth_fractions": [c / total for c in counts],
            "depth_share": summary["modality_split"][m]["depth_share"],
            "event_depth": ev.get("event_depth"),
            "background_depth": ev.get("background_depth"),
            "clips_event_deeper": ev.get("clips_event_deeper"),
            "content_measure": corr.get("measure"),
            "content_spearman": corr.get("all", {}).get("within_clip_spearman"),
        }
    return rows


def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def print_summary(summaries: dict[str, dict]) -> None:
    """Headline numbers per router and modality, then per class (event / background depth and the
    within-clip Spearman correlation of segment depth with the content measure)."""
    from rich.console import Console
    from rich.table import Table

    multimodal = any(len(s["depth_histogram"]) > 1 for s in summaries.values())
    table = Table(title="Depth allocation (recursions per token)", caption="rho: Spearman of segment depth "
                  "with audio energy / video motion, mean within clips; ev>bg: share of clips")
    cols = ["router", "mod", "clips", "acc", "depth", "d=0/1/..", *(["share"] if multimodal else []),
            "event", "bg", "ev>bg", "rho"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("router", "mod") else "right")
    for kind, s in summaries.items():
        for m, h in headline(s).items():
            table.add_row(kind, m, str(s["clips"]), _fmt(h["accuracy"], 2), _fmt(h["mean_depth"], 2),
                          "/".join(f"{f:.2f}" for f in h["depth_fractions"]),
                          *([_fmt(h["depth_share"], 2)] if multimodal else []),
                          _fmt(h["event_depth"], 2), _fmt(h["background_depth"], 2),
                          _fmt(h["clips_event_deeper"], 2), _fmt(h["content_spearman"], 2))
    per_class = Table(title="Per class")
    for col in ("router", "mod", "class", "clips", "acc", "depth", "event", "bg", "rho"):
        per_class.add_column(col, justify="left" if col in ("router", "mod", "class") else "right")
    for kind, s in summaries.items():
        for m in s["depth_histogram"]:
            for cls, rec in sorted(s["depth_by_class"].items()):
                ev = s["event_contrast"].get(m, {}).get(cls, {})
                corr = s["content_correlation"].get(m, {}).get(cls, {})
                per_class.add_row(kind, m, cls, str(rec["clips"]), _fmt(rec["accuracy"], 2),
                                  _fmt(rec["mean_depth"], 2), _fmt(ev.get("event_depth"), 2),
                                  _fmt(ev.get("background_depth"), 2), _fmt(corr.get("within_clip_spearman"), 2))
    console = Console()
    if not console.is_terminal:  # a log file: no terminal width to fit, keep the columns whole
        console = Console(width=120)
    console.print(table)
    if per_class.row_count:
        console.print(per_class)
    skipped = next(iter(summaries.values())).get("skipped_clips", 0)
    if skipped:
        console.print(f"[bold]{skipped} clips could not be read and are not in these numbers[/] "
                      f"(each reason is in the log)")
