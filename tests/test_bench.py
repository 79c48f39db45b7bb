"""Smoke test of the benchmark harness on tiny CPU shapes: it runs and writes its schema."""

from __future__ import annotations

import json

from mormm.bench.harness import SCHEMA
from mormm.cli import main


def test_harness_writes_json_and_markdown(tmp_path):
    assert 0 == main(["bench", "--small", "--device", "cpu", "--shapes", "image,audio1s",
          "--variants", "vanilla,mor_ec,mor_tc_segment", "--modes", "eager",
          "--reps", "1", "--inner", "1", "--warmup", "0", "--out", str(tmp_path), "--name", "cpu"])
    result = json.loads((tmp_path / "cpu.json").read_text())
    md = (tmp_path / "cpu.md").read_text()
    assert result["schema"] == SCHEMA
    assert {"device", "device_name", "torch", "cuda", "python"} <= set(result["env"])
    assert not result["errors"]
    assert len(result["rows"]) == 2 * 3
    for row in result["rows"]:
        for key in ("shape", "variant", "mode", "batch", "tokens", "flops", "infer_s",
                    "clips_per_s", "train_s", "speedup", "flop_bound", "bound_fraction", "kernels",
                    "train_time_ratio"):
            assert key in row, key
        assert row["flops"] > 0 and row["infer_s"] > 0
    vanilla = [r for r in result["rows"] if r["variant"] == "vanilla"]
    assert all(r["speedup"] == 1.0 and r["flop_bound"] == 1.0 for r in vanilla)
    mor = [r for r in result["rows"] if r["variant"] == "mor_ec"]
    assert all(r["flop_bound"] > 1.2 for r in mor)  # capacities 1, 3/4, 1/2, 1/4 skip compute
    assert "| vanilla | eager |" in md and result["env"]["device_name"] in md
