"""Smoke test of the benchmark harness on tiny CPU shapes: it runs and writes its schema."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from mormm.bench.report import SCHEMA, code_version, markdown, merge
from mormm.cli import main


def test_harness_writes_json_and_markdown(tmp_path):
    assert 0 == main(["bench", "--small", "--device", "cpu", "--shapes", "image,audio1s",
          "--variants", "vanilla,mor_ec,mor_tc_segment", "--modes", "eager",
          "--reps", "1", "--inner", "1", "--warmup", "0", "--batch", "3", "--out", str(tmp_path),
          "--name", "cpu"])
    result = json.loads((tmp_path / "cpu.json").read_text())
    md = (tmp_path / "cpu.md").read_text()
    assert result["schema"] == SCHEMA
    assert result["timing"] == {"warmup": 0, "reps": 1, "inner": 1}
    assert "median over 1 turns of 1 back-to-back forwards per variant, after 0 warm-up" in md
    assert {"device", "device_name", "torch", "cuda", "python", "cpu_threads", "code"} <= set(
        result["env"])
    assert result["env"]["code"] == code_version()  # this checkout's commit (None outside one)
    assert f"code {result['env']['code'] or 'unrecorded'};" in md
    assert f"{result['env']['cpu_threads']} CPU threads" in md
    assert not result["errors"]
    assert len(result["rows"]) == 2 * 3
    assert {r["batch"] for r in result["rows"]} == {3} and "## image: batch 3 x 16 tokens" in md
    for row in result["rows"]:
        for key in ("shape", "variant", "mode", "batch", "tokens", "flops", "infer_s", "host_s",
                    "clips_per_s", "train_s", "speedup", "flop_bound", "bound_fraction", "kernels",
                    "train_time_ratio"):
            assert key in row, key
        assert row["flops"] > 0 and row["infer_s"] > 0 and row["host_s"] > 0
        assert f"| {row['host_s'] * 1e3:.2f} |" in md
    vanilla = [r for r in result["rows"] if r["variant"] == "vanilla"]
    assert all(r["speedup"] == 1.0 and r["flop_bound"] == 1.0 for r in vanilla)
    mor = [r for r in result["rows"] if r["variant"] == "mor_ec"]
    assert all(r["flop_bound"] > 1.2 for r in mor)  # capacities 1, 3/4, 1/2, 1/4 skip compute
    assert "| vanilla | eager |" in md and result["env"]["device_name"] in md


def test_compiled_modes_time_inference_as_mormm_module_compiles_it(monkeypatch):
    """Each compiled mode compiles with its torch.compile mode's options and runs inference under
    that mode's inference_config (the C++ wrapper on CUDA), as MoRModule does; eager modes under
    neither. torch.compile is stubbed: what is under test is what reaches it."""
    from contextlib import contextmanager

    import torch

    from mormm.bench import harness
    from mormm.bench.models import VARIANTS, make_inputs, shape_table

    compiled, configs = [], []

    @contextmanager
    def entered(mode, device):  # records when the forward enters it
        configs.append((mode, device.type))
        yield

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)
    monkeypatch.setattr(harness, "inference_config", entered)
    args = harness.parse_args(["--small", "--device", "cpu", "--no-train"])
    device = torch.device("cpu")
    shape = shape_table(small=True)["image"]
    inputs = make_inputs(shape, args.dim, device)
    for mode, options, config in (
        ("compiled", harness.compile_options(), (None, "cpu")),
        ("cudagraphs", harness.compile_options("reduce-overhead"), ("reduce-overhead", "cpu")),
        ("eager", None, None),
    ):
        compiled.clear(), configs.clear()
        case = harness.prepare(shape, VARIANTS["mor_ec"], mode, args, device, inputs,
                               harness.make_suite(args, device).build)
        case.infer()
        assert compiled == ([] if options is None else [{"options": options}])
        # every inference call enters it: prepare's two (compile, peak memory) and this one
        assert configs == ([] if config is None else [config] * 3)


def test_depthwise_rows_time_a_stream_through_the_batcher_against_vanilla_eager(tmp_path):
    """--modes depthwise: the variants DepthwiseBatcher runs, each call one call of a full
    pipeline (N_r batches in flight), and vanilla's eager forward as the baseline; the variants
    it cannot run (shared keys and values) have no row there."""
    from mormm.bench import harness
    from mormm.bench.models import VARIANTS, make_inputs, shape_table

    assert 0 == main(["bench", "--small", "--device", "cpu", "--shapes", "audio1s", "--variants",
                      "vanilla,recursive,mor_ec,mor_ec_kvshare,mor_tc", "--modes", "depthwise",
                      "--reps", "1", "--inner", "1", "--warmup", "0", "--out", str(tmp_path),
                      "--name", "cpu"])
    result = json.loads((tmp_path / "cpu.json").read_text())
    assert not result["errors"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"vanilla", "recursive", "mor_ec", "mor_tc"}
    assert all(r["mode"] == "depthwise" and r["infer_s"] > 0 and r["host_s"] > 0
               and "train_s" not in r for r in rows.values())
    assert rows["vanilla"]["speedup"] == 1.0 and rows["mor_ec"]["flop_bound"] > 1.2

    args = harness.parse_args(["--small", "--device", "cpu", "--no-train"])
    shape = shape_table(small=True)["audio1s"]
    inputs = make_inputs(shape, args.dim, torch.device("cpu"))
    case = harness.prepare(shape, VARIANTS["mor_ec"], "depthwise", args, torch.device("cpu"),
                           inputs, harness.make_suite(args, torch.device("cpu")).build)
    out = case.infer()  # prepare filled the pipeline: every call now returns a finished batch
    assert out.hidden.shape == (shape.batch, shape.tokens, args.dim)
    with torch.no_grad():
        assert torch.allclose(out.hidden, case.model.backbone(case.model.tokens(*inputs)).hidden,
                              atol=1e-5)


def test_a_configs_backbone_is_timed_on_a_batch_of_its_data_against_its_baselines(
        tmp_path, cli_in_repo, capsys):
    """mormm bench --config: the config's backbone, vanilla (as many distinct layers as its
    effective depth) and plain recursion (its sharing, no router), on a batch its data module
    reads and its tokenizer makes, with LightningCLI overrides; options that pick the built-in
    models are refused by name, and so is a missing config."""
    config = "configs/quickstart.yaml"
    assert 0 == main(["bench", "--config", config, "--device", "cpu", "--modes",
                      "eager,depthwise", "--reps", "1", "--inner", "1", "--warmup", "0",
                      "--data.batch_size", "3", "--out", str(tmp_path), "--name", "cfg"])
    result = json.loads((tmp_path / "cfg.json").read_text())
    assert not result["errors"]
    rows = {(r["variant"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(v, m) for v in ("vanilla", "recursive", "quickstart")
                         for m in ("eager", "depthwise")}
    (shape,) = result["shapes"]
    assert shape["batch"] == 3 and all(r["batch"] == 3 for r in rows.values())
    assert shape["tokens"] == 20  # 1 s demo clips, 5 frames of 10 ms per token: 100 / 5
    vanilla, recursive, own = (rows[v, "eager"] for v in ("vanilla", "recursive", "quickstart"))
    # Same effective depth (4): vanilla's 4 distinct layers, recursion's first, shared, last
    # (middle_cycle, N_r = 2), and the config's router on top; capacities 1, 1/2 skip FLOPs.
    from mormm.backbone.layers import Block

    layer = sum(p.numel() for p in Block(96, 4).parameters())
    assert vanilla["params"] - recursive["params"] == layer
    assert own["params"] > recursive["params"] and vanilla["flops"] == recursive["flops"]
    assert own["flop_bound"] == pytest.approx(4 / 3.5, rel=0.05)  # layers run: 1 + 1 + 1/2 + 1
    assert result["model"]["config"] == [config]
    assert (result["model"]["router"], result["model"]["capacities"]) == ("ExpertChoiceRouter",
                                                                         [1.0, 0.5])
    assert f"{config}'s backbone (ExpertChoiceRouter per token" in (tmp_path / "cfg.md").read_text()

    with pytest.raises(SystemExit):
        main(["bench", "--config", config, "--device", "cpu", "--shapes", "image"])
    assert "--shapes: the config decides its model and data" in capsys.readouterr().err
    assert 2 == main(["bench", "--config", "configs/nope.yaml", "--device", "cpu"])
    assert "--config configs/nope.yaml: no such file" in capsys.readouterr().err
    assert 2 == main(["bench", "--config", config, "--device", "cpu", "--split", "nowhere"])
    assert "--split nowhere: neither a split of the dataset" in capsys.readouterr().err


def test_result_files_name_the_commit_they_ran_on(tmp_path, monkeypatch):
    monkeypatch.delenv("MORMM_COMMIT", raising=False)
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                               *args], check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    assert code_version(repo) is None  # no commit yet
    (repo / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "first")
    head = git("rev-parse", "--short=12", "HEAD")
    assert code_version(repo) == head
    (repo / "new.py").write_text("")  # untracked files do not count (scratch would mark every run)
    assert code_version(repo) == head
    (repo / "a.py").write_text("x = 2\n")
    assert code_version(repo) == head + "+changes"
    # A copy installed inside some other repository does not take that repository's commit.
    assert code_version(repo / "pkg") is None
    assert code_version(tmp_path) is None  # not a repository
    monkeypatch.setenv("MORMM_COMMIT", "abc1234")  # code copied without its .git
    assert code_version(tmp_path) == "abc1234"


def test_bf16_rows_compare_with_the_bf16_vanilla_and_merge_beside_autocast(tmp_path, capsys):
    common = ["bench", "--small", "--device", "cpu", "--shapes", "image", "--variants",
              "vanilla,mor_ec", "--modes", "eager", "--reps", "1", "--inner", "1", "--warmup", "0",
              "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        main([*common, "--precision", "bf16"])  # training bf16 weights is not what we time
    assert "--precision bf16 times inference only" in capsys.readouterr().err
    assert 0 == main([*common, "--precision", "bf16", "--no-train", "--name", "bf16"])
    assert 0 == main([*common, "--no-train", "--name", "fp32"])
    merged = merge([str(tmp_path / "bf16.json"), str(tmp_path / "fp32.json")])
    rows = {(r["variant"], r["precision"]): r for r in merged["rows"]}
    assert len(rows) == 4
    for precision in ("bf16", "autocast"):  # each against the vanilla of its own precision
        vanilla, mor = rows["vanilla", precision], rows["mor_ec", precision]
        assert vanilla["speedup"] == 1.0
        assert mor["speedup"] == vanilla["infer_s"] / mor["infer_s"]
    assert "| mor_ec | eager bf16 |" in markdown(merged)
    assert merged["env"]["code"] == code_version()
    # Files measured on different code: the merged header keeps both commits.
    other = json.loads((tmp_path / "fp32.json").read_text())
    other["env"]["code"] = "0123abcd"
    (tmp_path / "other.json").write_text(json.dumps(other))
    merged = merge([str(tmp_path / "bf16.json"), str(tmp_path / "other.json")])
    assert merged["env"]["code"] == f"{code_version() or 'unrecorded'}, 0123abcd"
    assert 0 == main([*common, "--no-train", "--inner", "2", "--name", "inner2"])
    capsys.readouterr()
    assert 2 == main(["bench", "merge", str(tmp_path / "both"), str(tmp_path / "fp32.json"),
                      str(tmp_path / "inner2.json")])
    assert "inner2.json timed with --warmup 0 --reps 1 --inner 2" in capsys.readouterr().err
    assert not (tmp_path / "both.json").exists()  # tables timed apart are not merged


def test_a_run_stopped_part_way_keeps_the_groups_it_timed(tmp_path, monkeypatch):
    from mormm.bench import harness

    timed = []

    def stop_at_the_second_group(shape, cases, args, device):
        if timed:
            raise KeyboardInterrupt  # a device call's time limit, or ^C
        measure_group(shape, cases, args, device)
        timed.append(shape.name)

    measure_group = harness.measure_group
    monkeypatch.setattr(harness, "measure_group", stop_at_the_second_group)
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "--small", "--device", "cpu", "--shapes", "image,audio1s", "--variants",
              "vanilla,mor_ec", "--modes", "eager", "--no-train", "--out", str(tmp_path),
              "--name", "cut"])
    result = json.loads((tmp_path / "cut.json").read_text())
    assert timed == ["image"] and {r["shape"] for r in result["rows"]} == {"image"}
    assert [r["speedup"] for r in result["rows"]][0] == 1.0
    assert "## image:" in (tmp_path / "cut.md").read_text()


def test_bench_names_a_bad_out_folder_or_merge_input(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        main(["bench", "--small", "--device", "cpu", "--out", str(blocker / "results")])
    assert f"--out {blocker / 'results'}: cannot create the folder" in capsys.readouterr().err
    assert 2 == main(["bench", "merge", str(tmp_path / "out")])
    assert "usage: mormm bench merge OUT_STEM a.json" in capsys.readouterr().err
    (tmp_path / "other.json").write_text('{"rows": []}')
    (tmp_path / "broken.json").write_text('{"rows": [')
    for name, says in (("other.json", "not a result file of this harness (schema None"),
                       ("broken.json", "not JSON"), ("missing.json", "No such file")):
        assert 2 == main(["bench", "merge", str(tmp_path / "out"), str(tmp_path / name)])
        err = capsys.readouterr().err
        assert says in err and name in err, err
    assert not (tmp_path / "out.json").exists()


def test_harness_names_a_timing_it_cannot_use(capsys):
    for flag, value, least in (("--reps", "0", 1), ("--inner", "0", 1), ("--warmup", "-1", 0),
                               ("--warm-jobs", "-2", 0)):
        with pytest.raises(SystemExit):
            main(["bench", "--small", "--device", "cpu", flag, value])
        assert f"{flag} {value}: give at least {least}" in capsys.readouterr().err


def test_harness_names_an_unknown_shape_variant_or_mode(capsys):
    for flag, value, choices in (("--shapes", "image,vido", "video,audio10s,audio1s,image"),
                                 ("--variants", "mor_ec,mor", "vanilla,recursive,"),
                                 ("--modes", "eager,compile", "eager,graphed,compiled,cudagraphs")):
        with pytest.raises(SystemExit):
            main(["bench", "--small", "--device", "cpu", flag, value])
        err = capsys.readouterr().err
        assert f"{flag}: unknown '{value.split(',')[1]}'; choose from {choices}" in err


def test_harness_names_a_device_it_cannot_use(capsys):
    with pytest.raises(SystemExit):  # no GPU here, or not 100 of them
        main(["bench", "--small", "--device", "cuda:99"])
    err = capsys.readouterr().err
    assert "--device cuda:99: not usable here (" in err and "--device cpu --small" in err


def _checkout(root, dest):
    """A tree holding this checkout's `mormm` and `encoders` packages, as code_ab.py takes."""
    import shutil

    for package in ("mormm", "encoders"):
        shutil.copytree(root / package, dest / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_code_ab_times_two_checkouts_side_by_side_in_one_process(tmp_path):
    """benchmarks/code_ab.py: each code's models run that code's modules (loaded side by side
    into one process), both are timed on the CPU's tiny shapes, and a tree that holds no mormm
    is named (not timed as the installed mormm)."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = root / "benchmarks" / "code_ab.py"
    a, b = _checkout(root, tmp_path / "a"), _checkout(root, tmp_path / "b")
    probe = (f"import sys; sys.path.insert(0, {str(script.parent)!r}); import code_ab\n"
             "files = []\n"
             f"for tree in ({str(a)!r}, {str(b)!r}):\n"
             "    models, _ = code_ab.load(tree)\n"
             "    m = models.build_model(models.VARIANTS['mor_ec'], 32, 2, 12, 4)\n"
             "    files.append(type(m.backbone).forward.__code__.co_filename)\n"
             "print(json.dumps(files))\n")
    out = subprocess.run([sys.executable, "-c", "import json\n" + probe], capture_output=True,
                         text=True, check=True, cwd=tmp_path)
    files = json.loads(out.stdout.strip().splitlines()[-1])
    assert files[0].startswith(str(a)) and files[1].startswith(str(b))

    result = tmp_path / "ab.json"
    out = subprocess.run([sys.executable, str(script), str(a), str(b), "--device", "cpu",
                          "--small", "--shapes", "image", "--variants", "vanilla,mor_ec",
                          "--reps", "2", "--json", str(result)],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    timed = json.loads(result.read_text())
    assert timed["grad"] == "inference_mode"  # as Lightning evaluates and predicts
    rows = timed["rows"]["image"]
    assert set(rows) == {"A/vanilla", "A/mor_ec", "B/vanilla", "B/mor_ec"}
    assert all(r["wall_ms"] > 0 and r["host_ms"] > 0 for r in rows.values())
    assert "| image | mor_ec |" in out.stdout and "speedup over vanilla, A / B" in out.stdout

    empty = tmp_path / "empty"
    empty.mkdir()
    failed = subprocess.run([sys.executable, str(script), str(empty), str(b), "--device", "cpu",
                             "--small"], capture_output=True, text=True, cwd=tmp_path)
    assert failed.returncode != 0 and f"{empty} holds no mormm package" in failed.stderr


def test_train_stats_times_steps_with_and_without_the_statistics(tmp_path):
    """benchmarks/train_stats.py on the CPU's tiny shapes: each variant's step timed both ways."""
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_stats.py"
    result = tmp_path / "stats.json"
    out = subprocess.run([sys.executable, str(script), "--device", "cpu", "--small", "--shapes",
                          "image", "--variants", "vanilla,mor_ec", "--reps", "1", "--json",
                          str(result)], capture_output=True, text=True, check=True, cwd=tmp_path)
    rows = json.loads(result.read_text())["rows"]
    assert set(rows) == {"image/vanilla", "image/mor_ec"}
    assert all(r["with"] > 0 and r["without"] > 0 for r in rows.values())
    assert "| image/mor_ec |" in out.stdout


def test_train_host_times_each_phase_of_a_training_step(tmp_path):
    """benchmarks/train_host.py on the CPU's tiny shapes: each phase of each variant's step
    timed, the phases adding up to the step, and the table written beside the JSON."""
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_host.py"
    result, table = tmp_path / "host.json", tmp_path / "host.md"
    subprocess.run([sys.executable, str(script), "--device", "cpu", "--small", "--shapes",
                    "image", "--variants", "vanilla,mor_ec", "--reps", "2", "--json",
                    str(result), "--md", str(table)], capture_output=True, text=True, check=True,
                   cwd=tmp_path)
    rows = json.loads(result.read_text())["rows"]
    assert [(r["shape"], r["variant"]) for r in rows] == [("image", "vanilla"), ("image", "mor_ec")]
    for r in rows:
        assert min(r["forward"], r["backward"], r["optimizer"]) > 0
        # medians of each phase need not add up exactly to the median step, but nearly
        parts = r["forward"] + r["backward"] + r["optimizer"] + r["tail"]
        assert parts == pytest.approx(r["step"], rel=0.5)
    assert "| image | mor_ec |" in table.read_text()


def test_host_bound_times_each_variant_alone_in_turns_and_issued(tmp_path):
    """benchmarks/host_bound.py on the CPU's tiny shapes: every column but the CUDA graph's
    timed for each variant, the ratios taken over vanilla, and a baseline other than vanilla
    refused."""
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "host_bound.py"
    result, table = tmp_path / "hb.json", tmp_path / "hb.md"
    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, str(script), "--device", "cpu", "--small", "--shapes", "image",
         "--reps", "2", *extra], capture_output=True, text=True, cwd=tmp_path)
    assert run("--variants", "vanilla,mor_ec", "--json", str(result), "--md", str(table)).returncode == 0
    rows = json.loads(result.read_text())["shapes"]["image"]
    assert [r["variant"] for r in rows] == ["vanilla", "mor_ec"]
    for r in rows:
        assert r["graphed"] is None  # no CUDA graphs on the CPU
        assert min(r[c] for c in ("alone", "turns", "host", "host_b1")) > 0
    ratio = rows[0]["alone"] / rows[1]["alone"]
    assert f"| mor_ec | {rows[1]['alone']:.2f} |" in table.read_text()
    assert f"| {ratio:.2f} | - |" in table.read_text()
    refused = run("--variants", "mor_ec,vanilla")
    assert refused.returncode == 2 and "must start with vanilla" in refused.stderr


def _time_loop(script: str, tmp_path) -> tuple[list[dict], str]:
    """Run a benchmarks/ script that times mormm test's loop (eval_loop.parser's options) on the
    CPU's tiny width, 3 batches of two 1 s clips, vanilla and expert-choice: its JSON rows and
    its printed table."""
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    out = subprocess.run([sys.executable, str(path), "--device", "cpu", "--small", "--clips",
                          "1:2", "--variants", "vanilla,mor_ec", "--batches", "3", "--reps", "1",
                          "--out", str(tmp_path), "--name", "loop"],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    return json.loads((tmp_path / "loop.json").read_text())["rows"], out.stdout


def test_eval_loop_times_mormm_tests_loop_and_checks_the_depthwise_metrics(tmp_path):
    """benchmarks/eval_loop.py on the CPU's tiny width: Lightning's test loop timed per variant
    and mode, and the depth-wise run's logged metrics checked against the batch-by-batch run's."""
    rows, stdout = _time_loop("eval_loop.py", tmp_path)
    assert [(r["variant"], r["mode"]) for r in rows] == [
        ("vanilla", "eager"), ("mor_ec", "eager"), ("mor_ec", "depthwise")]
    assert all(r["clips_per_s"] > 0 and len(r["times_s"]) == 1 for r in rows)
    assert rows[0]["over_vanilla"] == 1.0
    assert rows[2]["max_logged_diff"] is not None and rows[2]["max_logged_diff"] < 1e-5
    assert "| 1 s | 2 | mor_ec | depthwise |" in stdout


def test_metric_chunks_times_the_loop_with_both_update_sizes(tmp_path):
    """benchmarks/metric_chunks.py on the CPU's tiny width: each variant and mode timed with its
    metrics updated per batch and METRIC_CHUNK batches at a time."""
    from mormm.lit import METRIC_CHUNK

    rows, stdout = _time_loop("metric_chunks.py", tmp_path)
    assert [(r["variant"], r["mode"], r["chunk"]) for r in rows] == [
        (v, m, c) for v, m in (("vanilla", "eager"), ("mor_ec", "eager"), ("mor_ec", "depthwise"))
        for c in (1, METRIC_CHUNK)]
    assert all(r["ms_per_batch"] > 0 and len(r["times_s"]) == 1 for r in rows)
    assert "| 1 s | 2 | mor_ec | depthwise |" in stdout


def test_eval_loop_clock_covers_the_modules_epoch_end(monkeypatch):
    """The module's on_test_epoch_end finishes the depth-wise batches still in flight; Lightning
    calls it after callbacks' epoch-end hooks, so a clock stopped there would leave it out."""
    import importlib.util
    from pathlib import Path

    import lightning as L

    from mormm.lit import MoRModule

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_loop.py"
    spec = importlib.util.spec_from_file_location("eval_loop", script)
    eval_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_loop)
    finished = []
    epoch_end = MoRModule.on_test_epoch_end

    def timed_epoch_end(self):
        epoch_end(self)
        finished.append(eval_loop.time.perf_counter())

    monkeypatch.setattr(MoRModule, "on_test_epoch_end", timed_epoch_end)
    clock = eval_loop._EpochClock()
    module = eval_loop._module("mor_ec", *eval_loop.width(True), depthwise=True)
    cpu = torch.device("cpu")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[clock])
    trainer.test(module, torch.utils.data.DataLoader(eval_loop._batches(0.5, 2, 3, cpu),
                                                     batch_size=None), verbose=False)
    assert len(finished) == 1 and clock.start < finished[0] < clock.stop
