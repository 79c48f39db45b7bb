"""Depth-allocation analysis: map geometry, statistics, pictures, baseline routers, and
`mormm analyze` end to end on a quickstart-trained model."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoders import AudioTokenizer, AudioVideoTokenizer, VideoTokenizer
from mormm.analysis import maps, plots, stats
from mormm.analysis.baseline_routers import RandomRouter, UniformRouter, swap_router
from mormm.analysis.collect import collect
from mormm.backbone import BackboneConfig, ExpertChoiceRouter, MoRBackbone, TokenChoiceRouter
from mormm.backbone.units import capacity_counts
from mormm.data.decode import DecodeConfig
from mormm.model import MoRClassifier

ROOT = Path(__file__).resolve().parents[1]
SR = 16_000


# -- maps: a planted depth lands on exactly the cells of its token ---------------------------


@pytest.mark.parametrize("layout, size", [("patches", (8, 16)), ("frames", (5, 64))])
@pytest.mark.parametrize("samples", [SR, 12_345])
def test_audio_map_cells_belong_to_their_token(layout, size, samples):
    tok = AudioTokenizer(dim=16, n_mels=64, layout=layout, patch_size=size, frames_per_token=size[0])
    tokens = tok(torch.zeros(1, samples))
    n, f = tok.grid(samples)
    L = tok.num_frames(samples)
    centres = maps.audio_centres(L, tok.hop / SR, tok.win / SR, tok.n_mels)
    owner = maps.owner_map(tokens.regions[0].numpy(), centres)
    planted = np.arange(n * f) * 7 + 3  # a distinct depth per token
    depth = maps.paint(owner, planted)
    pt, pf = tok.pt, tok.pf
    frame, mel = np.meshgrid(np.arange(L), np.arange(tok.n_mels), indexing="ij")
    expected = planted[(frame // pt) * f + mel // pf]  # token (time step, freq patch) of each cell
    np.testing.assert_array_equal(depth, expected)


def test_video_map_cells_belong_to_their_token():
    tok = VideoTokenizer(dim=16, patch_size=8, tubelet_size=2, frame_rate=8.0)
    T, H, W = 8, 32, 24
    tokens = tok(torch.zeros(1, T, 3, H, W))
    n, h, w = tok.grid((1, T, 3, H, W))
    owner = maps.owner_map(tokens.regions[0].numpy(), maps.video_centres(T, tok.frame_rate, H, W))
    planted = np.arange(n * h * w) % 5
    t, y, x = np.meshgrid(np.arange(T), np.arange(H), np.arange(W), indexing="ij")
    np.testing.assert_array_equal(maps.paint(owner, planted), planted[((t // 2) * h + y // 8) * w + x // 8])


def test_pool_and_uncovered_cells():
    regions = np.array([[[0.0, 2.0]], [[2.0, 3.0]]])  # two tokens on one axis; cell 3 uncovered
    owner = maps.owner_map(regions, [np.arange(4) + 0.5])
    np.testing.assert_array_equal(owner, [0, 0, 1, maps.NO_TOKEN])
    assert np.isnan(maps.paint(owner, np.array([1.0, 2.0]))[3])
    np.testing.assert_allclose(maps.pool(owner, np.array([1.0, 3.0, 10.0, 99.0]), 3), [2.0, 10.0, np.nan])


def test_motion_and_masks():
    frames = np.zeros((3, 1, 4, 4))
    frames[1, 0, 1, 2] = 1.0
    motion = maps.frame_motion(frames)
    assert motion.shape == (3, 4, 4) and motion[1, 1, 2] == 1 and motion[2, 1, 2] == 1 and motion[0, 1, 2] == 1
    assert motion.sum() == 3
    box = maps.box_mask([None, [1, 0, 3, 2]], 4, 4)
    assert not box[0].any() and box[1].sum() == 4 and box[1, 0:2, 1:3].all()
    np.testing.assert_array_equal(maps.interval_mask(np.array([0.1, 0.3, 0.5]), [(0.2, 0.5)]), [0, 1, 0])


# -- collect: a whole batch through a model, audio + video, with annotated events ------------


def small_av_model(unit="segment"):
    torch.manual_seed(0)
    audio = AudioTokenizer(dim=32, n_mels=32, patch_size=(8, 16), freq_mask=0, time_mask=0)
    video = VideoTokenizer(dim=32, patch_size=8, tubelet_size=2, frame_rate=8.0)
    tok = AudioVideoTokenizer(audio, video, segment_seconds=0.25)
    cfg = BackboneConfig(dim=32, num_heads=4, num_layers=3, num_recursions=3, sharing="cycle", rope_axes=3)
    return MoRClassifier(tok, MoRBackbone(cfg, ExpertChoiceRouter(unit=unit)), num_classes=4).eval()


def av_batch(B=2):
    g = torch.Generator().manual_seed(1)
    video = torch.rand(B, 8, 3, 32, 32, generator=g) * 0.2
    boxes = [None] * 16  # original clip: 16 frames at 16 fps, decoded with stride 2
    for i in range(6, 12):
        boxes[i] = [8, 16, 16, 24]
    meta = {"duration": 1.0, "media": {"mp4": {"frames": 16, "width": 32, "height": 32}},
            "event": {"start_s": 0.375, "end_s": 0.75, "frames": list(range(6, 12)), "boxes": boxes}}
    return {"audio": torch.randn(B, SR, generator=g) * 0.01, "audio_lengths": torch.tensor([SR, 12_000][:B]),
            "sample_rate": SR, "video": video, "label": torch.tensor([1, 2][:B]), "key": [f"c{i}" for i in range(B)],
            "meta": [meta] * B}


def test_collect_audio_video():
    model = small_av_model()
    batch = av_batch()
    with torch.no_grad():
        out = model(batch)
    config = DecodeConfig(modalities=("audio", "video"), num_frames=8, frame_stride=2, frame_size=32)
    clips, pics = collect(batch, out, model.tokenizer, config, {0: "audio", 1: "video"}, with_maps=1)
    assert len(clips) == 2 and len(pics) == 1
    valid = out.backbone.valid
    for b, clip in enumerate(clips):
        assert len(clip.depth) == int(valid[b].sum())  # padding left out, nothing else
        np.testing.assert_array_equal(clip.depth, out.backbone.depth[b][valid[b]].numpy())
        assert set(clip.modality) == {"audio", "video"}
        assert not np.isnan(clip.content).any() and not np.isnan(clip.event).any()
    clip, pic = clips[0], pics[0]
    # Audio: event 0.375-0.75 s; tokens are 8 frames (80 ms) wide; inside = at least half of frames.
    audio = clip.modality == "audio"
    starts = clip.regions[audio, 0, 0]
    inside = clip.event[audio] >= stats.EVENT_INSIDE
    assert inside.any() and (starts[inside] >= 0.3).all() and (starts[inside] < 0.75).all()
    # Video: decoded frames 0, 2, ..., 14; the box (rows 16-24, columns 8-16) is in frames 6..11,
    # i.e. model frames 3, 4, 5 -> tubelet slices 1 and 2 at patch (row 2, column 1).
    video = clip.modality == "video"
    pos = np.stack([clip.regions[video, 0, 0] * 8 / 2, clip.regions[video, 1, 0] / 8, clip.regions[video, 2, 0] / 8], 1)
    hit = pos[clip.event[video] > 0]
    np.testing.assert_array_equal(hit, [[1, 2, 1], [2, 2, 1]])
    np.testing.assert_allclose(clip.event[video][clip.event[video] > 0], [0.5, 1.0])  # slice 1 holds frames 2, 3
    # Maps: the painted depth at a cell is the depth of the token there.
    a_depth = clip.depth[audio]
    assert pic.audio_depth.shape == pic.logmel.shape == (98, 32)
    assert pic.audio_depth[0, 0] == a_depth[0] and pic.audio_depth[8, 16] == a_depth[3]  # token (1, 1)
    v_depth = clip.depth[video]
    assert pic.video_depth.shape == (8, 32, 32)
    assert pic.video_depth[2, 17, 9] == v_depth[(1 * 4 + 2) * 4 + 1]
    assert pic.video_boxes[3] == [8, 16, 16, 24] and pic.video_boxes[2] is None


# -- stats -----------------------------------------------------------------------------------


def fake_clip(depth, event, content, label=0, pred=0, modality="audio"):
    n = len(depth)
    regions = np.stack([np.stack([np.arange(n) * 0.1, np.arange(n) * 0.1 + 0.1], 1),
                        np.tile([0.0, 64.0], (n, 1))], 1)
    return stats.ClipDepth("k", 0, [label], pred, 0.9, np.asarray(depth), np.array([modality] * n),
                           np.arange(n), regions, np.asarray(content, float), np.asarray(event, float))


def test_aggregates():
    a = fake_clip([3, 3, 1, 1], [1, 1, 0, 0], [5, 4, 2, 1], label=0, pred=0)
    b = fake_clip([1, 2, 3, 2], [0, 0, 1, 0], [1, 2, 3, 2], label=1, pred=0)
    s = stats.aggregate([a, b], ["x", "y"], max_depth=3, time_bin_s=0.2)
    assert s["depth_histogram"] == {"audio": [0, 3, 2, 3]}
    assert s["accuracy"] == 0.5
    assert s["depth_by_correct"]["correct"]["mean_depth"] == 2.0
    assert s["depth_by_time"]["audio"][0] == {"start": 0.0, "end": 0.2, "mean_depth": 2.25, "tokens": 4}
    ev = s["event_contrast"]["audio"]
    assert ev["all"]["event_depth"] == 3.0 and ev["all"]["background_depth"] == 1.4
    assert ev["all"]["clips_event_deeper"] == 1.0 and ev["y"]["event_tokens"] == 1
    corr = s["content_correlation"]["audio"]
    assert corr["x"]["within_clip_spearman"] == pytest.approx(stats.spearman([3, 3, 1, 1], [5, 4, 2, 1]))
    assert corr["y"]["spearman"] == pytest.approx(1.0)
    assert s["modality_split"]["audio"]["depth_share"] == 1.0
    record = stats.clip_summary(a, ["x", "y"])
    assert record["labels"] == ["x"] and record["segments"][0]["time"] == [0.0, 0.1]
    assert record["segments"][0]["modalities"]["audio"]["freq"] == [0.0, 64.0]
    json.dumps(record)


def test_spearman_matches_definition():
    x = np.array([1, 2, 2, 3, 5.0])
    y = np.array([2, 1, 4, 3, 9.0])
    rx, ry = np.array([1, 2.5, 2.5, 4, 5]), np.array([2, 1, 4, 3, 5])
    assert stats.spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert math.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))


# -- pictures have the promised pixel size -------------------------------------------------


def png_size(path):
    with Image.open(path) as im:
        return im.size


def test_plot_sizes(tmp_path):
    rng = np.random.default_rng(0)
    depth = rng.integers(0, 4, (50, 32)).astype(float)
    depth[-3:] = np.nan
    p = plots.plot_audio(tmp_path / "a.png", rng.normal(size=(50, 32)), depth, np.arange(50) * 0.01 + 0.0125,
                         3, [(0.1, 0.2)], title="t")
    assert png_size(p) == plots.figure_pixels(plots.audio_figsize())
    p = plots.plot_video(tmp_path / "v.png", rng.random((6, 3, 16, 16)), rng.integers(0, 4, (6, 16, 16)).astype(float),
                         3, [None, [0, 0, 8, 8]] + [None] * 4)
    assert png_size(p) == plots.figure_pixels(plots.video_figsize(6))
    summary = stats.aggregate([fake_clip([3, 1, 2], [1, 0, 0], [1, 2, 3])], ["x"], 3, 0.1)
    p = plots.plot_summary(tmp_path / "s.png", summary)
    assert png_size(p) == plots.figure_pixels(plots.summary_figsize()) == (1500, 400)


# -- baseline routers ------------------------------------------------------------------------


def tokens_for(B=3, N=24, lengths=None, seg=4):
    from encoders.tokens import Tokens

    g = torch.Generator().manual_seed(0)
    pad = None if lengths is None else torch.arange(N)[None] >= torch.tensor(lengths)[:, None]
    return Tokens(torch.randn(B, N, 32, generator=g), torch.rand(B, N, 2, generator=g) * 8,
                  (torch.arange(N) // seg).expand(B, N), torch.zeros(B, N, dtype=torch.long), pad,
                  num_segments=math.ceil(N / seg), max_segment_len=seg)


@pytest.mark.parametrize("baseline", [RandomRouter, UniformRouter])
@pytest.mark.parametrize("unit", ["token", "segment"])
@pytest.mark.parametrize("lengths", [None, [24, 17, 9]], ids=["full", "padded"])
@pytest.mark.parametrize("learned_cls", [ExpertChoiceRouter, TokenChoiceRouter])
def test_baselines_select_capacity_counts_hierarchically(baseline, unit, lengths, learned_cls):
    torch.manual_seed(0)
    cfg = BackboneConfig(dim=32, num_heads=4, num_layers=4, num_recursions=4, sharing="cycle", rope_axes=2)
    backbone = MoRBackbone(cfg, learned_cls(unit=unit)).eval()
    learned = backbone.router
    backbone.router = baseline(learned, seed=3)
    tokens = tokens_for(lengths=lengths)
    with torch.no_grad():
        out = backbone(tokens)
    valid = tokens.valid if tokens.valid is not None else torch.ones(3, 24, dtype=torch.bool)
    seg = tokens.segment_ids
    units = valid.float() if unit == "token" else torch.zeros(3, 6).scatter_add(1, seg, valid.float()).gt(0).float()
    count = units.sum(-1).long()
    prev = valid
    for r, step in enumerate(out.steps):
        assert not (step.selected & ~prev).any()  # hierarchical: a dropped token never returns
        chosen = step.selected.sum(-1) if unit == "token" else torch.tensor(
            [torch.unique(seg[b][step.selected[b]]).numel() for b in range(3)])
        assert torch.equal(chosen, capacity_counts(learned.capacities[r], count))
        if unit == "segment":  # whole segments: a segment's valid tokens are all in or all out
            for b in range(3):
                for s in torch.unique(seg[b][step.selected[b]]):
                    assert step.selected[b][(seg[b] == s) & valid[b]].all()
        prev = step.selected
    assert torch.equal(out.depth, torch.stack([s.selected for s in out.steps]).sum(0) * valid)


def test_uniform_router_is_evenly_spaced_and_position_independent():
    torch.manual_seed(0)
    cfg = BackboneConfig(dim=32, num_heads=4, num_layers=4, num_recursions=4, sharing="cycle", rope_axes=2)
    backbone = MoRBackbone(cfg, ExpertChoiceRouter()).eval()
    swap_router(backbone, "uniform", seed=0)
    tokens = tokens_for(B=64, N=24)
    with torch.no_grad():
        out = backbone(tokens)
    step1 = out.steps[1].selected  # 18 of 24 tokens
    gaps = torch.diff(torch.stack([s.nonzero().flatten() for s in step1]), dim=-1)
    assert set(gaps.unique().tolist()) <= {1, 2}  # evenly spaced: 24 / 18 rounded
    last = out.steps[3].selected  # 6 of 24: every 4th token, random phase
    gaps = torch.diff(torch.stack([s.nonzero().flatten() for s in last]), dim=-1)
    assert set(gaps.unique().tolist()) == {4}
    assert len({tuple(s.nonzero().flatten().tolist()) for s in last}) == 4  # all four phases occur
    # The same seed repeats the same choices; the learned router comes back with "learned".
    again = swap_router(backbone, "uniform", seed=0)
    with torch.no_grad():
        assert torch.equal(backbone(tokens).steps[3].selected, last)
    assert swap_router(backbone, "learned") is again and isinstance(backbone.router, ExpertChoiceRouter)


# -- end to end: train the quickstart, analyze it ---------------------------------------------


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    """Train configs/quickstart.yaml briefly, then `mormm analyze` the checkpoint with all routers."""
    from mormm.cli import main

    run = tmp_path_factory.mktemp("quickstart")
    config = str(ROOT / "configs" / "quickstart.yaml")
    code = main(["fit", "--config", config, "--trainer.max_epochs", "5", "--trainer.default_root_dir", str(run),
                 "--trainer.logger.init_args.save_dir", str(run), "--trainer.enable_model_summary", "false"])
    assert code == 0
    ckpt = next(run.rglob("last.ckpt"))
    out = run / "analysis"
    code = main(["analyze", "--config", config, "--ckpt_path", str(ckpt), "--data", "test", "--out", str(out),
                 "--router", "learned", "random", "uniform", "--plots", "2", "--data.num_workers", "0"])
    assert code == 0
    return out


def test_analyze_writes_numbers_and_pictures(analyzed):
    comparison = json.loads((analyzed / "comparison.json").read_text())
    assert set(comparison) == {"learned", "random", "uniform"}
    for kind in comparison:
        folder = analyzed / kind
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["clips"] == 100 and summary["router"] == kind
        assert sum(summary["depth_histogram"]["audio"]) == summary["tokens"]
        clips = sorted((folder / "clips").glob("*.json"))
        assert len(clips) == 100
        record = json.loads(clips[0].read_text())
        assert len(record["tokens"]["depth"]) == len(record["tokens"]["region"])
        assert all(seg["time"][0] < seg["time"][1] for seg in record["segments"])
        rows = (folder / "segments.csv").read_text().splitlines()
        assert rows[0].startswith("key,view,label") and len(rows) > 100
        pngs = sorted((folder / "plots").glob("*_audio.png"))
        assert len(pngs) == 2
        assert png_size(pngs[0]) == plots.figure_pixels(plots.audio_figsize())
        assert png_size(folder / "plots" / "depth_summary.png") == plots.figure_pixels(plots.summary_figsize())
    # Baselines keep the capacities: the same depth histogram as the learned router.
    assert comparison["random"]["audio"]["depth_fractions"] == comparison["learned"]["audio"]["depth_fractions"]


def test_learned_router_gives_the_event_more_depth(analyzed):
    """The demo's class is decided by a short event; the quickstart's router learns to spend its
    second recursion there: more depth on the event than on the background, and more than the
    chance routers give it (they give both the same)."""
    comparison = json.loads((analyzed / "comparison.json").read_text())
    learned, random, uniform = (comparison[k]["audio"] for k in ("learned", "random", "uniform"))
    print({k: {m: (v["event_depth"], v["background_depth"]) for m, v in c.items()} for k, c in comparison.items()})
    assert learned["event_depth"] > learned["background_depth"] + 0.2
    assert learned["event_depth"] > max(random["event_depth"], uniform["event_depth"]) + 0.1
    for chance in (random, uniform):
        assert abs(chance["event_depth"] - chance["background_depth"]) < 0.1
