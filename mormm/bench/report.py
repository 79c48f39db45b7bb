"""What the harness writes: ratios against the vanilla row of the same shape and mode, the
environment, the markdown table, and the merge of several calls' result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch

SCHEMA = "mormm.bench/1"
# The checkout this package runs from, when it runs from one (not from an installed copy).
ROOT = Path(__file__).resolve().parents[2]


def add_ratios(rows: list[dict]) -> None:
    def key(r):
        return r["shape"], r["mode"], r.get("precision", "autocast")

    base = {key(r): r for r in rows if r["variant"] == "vanilla"}
    for r in rows:
        v = base.get(key(r))
        if v is None:
            continue
        r["speedup"] = v["infer_s"] / r["infer_s"]
        r["flop_bound"] = v["flops"] / r["flops"]
        r["bound_fraction"] = r["speedup"] / r["flop_bound"]
        if "train_s" in r and "train_s" in v:
            r["train_time_ratio"] = r["train_s"] / v["train_s"]
            if r.get("train_peak_gib") and v.get("train_peak_gib"):
                r["train_mem_ratio"] = r["train_peak_gib"] / v["train_peak_gib"]


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _config_note(model: dict) -> str:
    """What `mormm bench --config` timed: the config and its router (built-in runs: nothing)."""
    if "config" not in model:
        return ""
    router = "no router" if model["router"] is None else f"{model['router']} per {model['unit']}"
    return f" of {', '.join(model['config'])}'s backbone ({router}, kv {model['kv_mode']})"


def markdown(result: dict) -> str:
    env = result["env"]
    threads = ""
    if env["device"] == "cpu" and "cpu_threads" in env:  # older result files lack it
        threads = f", {env['cpu_threads']} CPU threads"
    lines = [
        f"# mormm bench: {env['device_name']}",
        "",
        f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, Python {env['python']}"
        f"{threads}; code {env.get('code') or 'unrecorded'}; "
        f"dim {result['model']['dim']}, {result['model']['heads']} heads, effective depth "
        f"{result['model']['layers']}, N_r = {result['model']['recursions']} "
        f"({result['model'].get('sharing', 'cycle')}), capacities "
        f"{result['model']['capacities']}{_config_note(result['model'])}"
        f"{'' if result['model'].get('fused_merge', True) else ', unfused step merges'}"
        "; precision: "
        f"{'bf16 autocast (fp32 weights)' if env['device'] == 'cuda' else 'fp32'}, unless the "
        "mode says bf16 (bf16 weights and activations, inference only).",
        "",
    ]
    if "timing" in result:  # older result files lack it
        t = result["timing"]
        lines += [
            f"Timing: median over {t['reps']} turns of {t['inner']} back-to-back forwards per "
            f"variant, after {t['warmup']} warm-up calls each.",
            "",
        ]
    lines += [
        "speedup = vanilla time / variant time (inference, same mode); bound = vanilla FLOPs / "
        "variant FLOPs (forward, torch.utils.flop_counter); frac = speedup / bound; host ms = the "
        "host's time to issue one eager forward (timed at batch 1; near infer ms, the row is "
        "host-bound and follows the host's speed); kernels = aten ops that launch work in one "
        "eager forward (counted on the unfused ops; on CUDA the fused kernels of fused.py and "
        "fused_routing.py stand in for several of them per routed step); train and mem = "
        "training step time and peak memory over vanilla's.",
        "",
    ]
    if any(r["mode"] == "depthwise" for r in result["rows"]):
        lines += [
            "depthwise = a stream of batches through DepthwiseBatcher, N_r of them in flight "
            "(each batch's output comes N_r - 1 calls after it went in): infer ms per call in "
            "the steady state, host ms per call with one clip per batch; vanilla, with no shared "
            "layers to batch, runs its eager forward there.",
            "",
        ]
    for shape in result["shapes"]:
        rows = [r for r in result["rows"] if r["shape"] == shape["name"]]
        if not rows:
            continue
        lines += [
            f"## {shape['name']}: batch {shape['batch']} x {shape['tokens']} tokens ({shape['note']})",
            "",
            "| variant | mode | infer ms | host ms | clips/s | speedup | bound | frac | GFLOP | kernels | train ms | train | peak GiB | mem |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['variant']} | {r['mode']}{' bf16' if r.get('precision') == 'bf16' else ''} "
                f"| {r['infer_s'] * 1e3:.2f} "
                f"| {_fmt(r.get('host_s') and r['host_s'] * 1e3, '.2f')} | {r['clips_per_s']:.0f} "
                f"| {_fmt(r.get('speedup'), '.2f')} | {_fmt(r.get('flop_bound'), '.2f')} "
                f"| {_fmt(r.get('bound_fraction'), '.2f')} | {r['flops'] / 1e9:.1f} "
                f"| {_fmt(r.get('kernels'), 'd')} "
                f"| {_fmt(r.get('train_s') and r['train_s'] * 1e3, '.2f')} "
                f"| {_fmt(r.get('train_time_ratio'), '.2f')} "
                f"| {_fmt(r.get('train_peak_gib'), '.2f')} | {_fmt(r.get('train_mem_ratio'), '.2f')} |"
            )
        lines.append("")
    if result.get("errors"):
        lines += ["## errors", ""] + [f"- {e}" for e in result["errors"]] + [""]
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "code": code_version(),
    }


def code_version(root: Path = ROOT) -> str | None:
    """The commit a result was measured on, for the result files: MORMM_COMMIT if set (for code
    copied without its .git, as onto a lent GPU machine), else the git commit of the checkout at
    `root`, with "+changes" when tracked files differ from it; None when neither says."""
    if os.environ.get("MORMM_COMMIT"):
        return os.environ["MORMM_COMMIT"]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                 timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    # Only root's own repository: an installed copy may sit inside some other one (a venv in a
    # project folder).
    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root.resolve():
        return None
    commit = git("rev-parse", "--short=12", "HEAD")
    if commit is None:  # a repository without commits
        return None
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def _cpu_name() -> str:
    # platform.processor() is empty on most Linux machines; /proc/cpuinfo names the model.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower() or "device"


def save(stem: str | Path, result: dict) -> None:
    """The result as <stem>.json and its table as <stem>.md."""
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1))
    Path(f"{stem}.md").write_text(markdown(result))


def _result_file(path: str) -> dict:
    try:
        result = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(result, dict) or result.get("schema") != SCHEMA:
        found = result.get("schema") if isinstance(result, dict) else type(result).__name__
        raise ValueError(f"{path}: not a result file of this harness (schema {found!r}, "
                         f"expected {SCHEMA!r}); give the .json files `mormm bench --out` wrote")
    return result


def _timing(result: dict) -> str:
    t = result.get("timing")
    if t is None:  # files written before the harness recorded it
        return "with unrecorded timing"
    return f"with --warmup {t['warmup']} --reps {t['reps']} --inner {t['inner']}"


def merge(paths: list[str]) -> dict:
    """Combine result files of one device (e.g. an eager call and a compiled call) into one."""
    results = [_result_file(p) for p in paths]
    timings = {_timing(r): p for r, p in zip(results, paths)}
    if len(timings) > 1:  # a burst length changes the clocks a GPU runs at: keep tables apart
        raise ValueError(" vs ".join(f"{p} timed {t}" for t, p in timings.items())
                         + "; merge only result files timed with the same --warmup, --reps and "
                         "--inner")
    out = dict(results[0])
    codes = list(dict.fromkeys(r["env"].get("code") for r in results))
    if len(codes) > 1:  # files measured on different code: the merged header names each commit
        out["env"] = dict(out["env"], code=", ".join(c or "unrecorded" for c in codes))
    out["rows"] = [r for res in results for r in res["rows"]]
    out["errors"] = [e for res in results for e in res["errors"]]
    names = {s["name"]: s for res in results for s in res["shapes"]}
    out["shapes"] = list(names.values())
    add_ratios(out["rows"])
    return out
