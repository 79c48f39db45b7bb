"""MoRModule checkpoints written by `mormm fit`: save -> load gives the same predictions, and
`fit --ckpt_path` resumes the step count, the optimizer state and the token-choice router's
loss-free balancing bias; with model.depthwise, predict, validate and test around what the
pipeline cannot take, logging what the forward logs; evaluation's epoch means, also with a rank
that evaluated no batch."""

import copy
import csv
import json
import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mormm.cli import build_cli
from mormm.data import ensure_demo
from mormm.lit import MoRModule

ROOT = Path(__file__).resolve().parents[1]
ROUTER = "--model.backbone.init_args.router"


pytestmark = pytest.mark.usefixtures("cli_in_repo")


def fit_args(out: Path, *extra: str) -> list[str]:
    """The quickstart with a token-choice router under loss-free balancing (its bias is a
    buffer that only the after-optimizer-step update changes), a few batches, in `out`."""
    return [
        "fit", "--config", "configs/quickstart.yaml",
        f"{ROUTER}.class_path", "mormm.backbone.TokenChoiceRouter",
        f"{ROUTER}.init_args.balancing", "loss_free",
        f"{ROUTER}.init_args.bias_rate", "0.01",
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0", "--trainer.limit_train_batches", "3",
        "--trainer.limit_val_batches", "1", "--data.batch_size", "4", "--data.num_workers", "0",
        "--data.shuffle_buffer", "8", *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ensure_demo("audio")
    out = tmp_path_factory.mktemp("fit")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["mormm"])
        mp.chdir(ROOT)
        # Every step logged: the training statistics are computed on logged steps only.
        cli = build_cli(fit_args(out, "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1"))
    ckpt = out / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and cli.trainer.global_step == 3
    return cli, ckpt


def test_checkpoint_loads_with_the_cli_hyperparameters_and_predicts_the_same(trained):
    cli, ckpt = trained
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    # LightningCLI stores the config (not module objects) and how to instantiate from it.
    assert "_instantiator" in saved["hyper_parameters"]
    assert saved["hyper_parameters"]["backbone"]["class_path"] == "mormm.backbone.MoRBackbone"

    loaded = MoRModule.load_from_checkpoint(ckpt, map_location="cpu")
    assert type(loaded.backbone.router).__name__ == "TokenChoiceRouter"
    assert loaded.num_classes == cli.model.num_classes == 4
    batch = next(iter(cli.datamodule.val_dataloader()))
    cli.model.eval(), loaded.eval()
    with torch.no_grad():
        a, b = cli.model(batch), loaded(batch)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert torch.equal(a.backbone.depth, b.backbone.depth)
    assert loaded.backbone.router.depth_bias.abs().sum() > 0  # the balancing bias came along
    torch.testing.assert_close(loaded.backbone.router.depth_bias, cli.model.backbone.router.depth_bias)


def test_fit_resumes_step_optimizer_and_router_bias(trained, tmp_path: Path, monkeypatch):
    _, ckpt = trained
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    seen = {}

    def on_train_start(self):  # what the resumed run starts from
        opt = self.trainer.optimizers[0]
        seen.update(step=self.trainer.global_step, bias=self.backbone.router.depth_bias.clone(),
                    adam_steps={float(s["step"]) for s in opt.state.values()},
                    lr=opt.param_groups[0]["lr"])

    monkeypatch.setattr(MoRModule, "on_train_start", on_train_start, raising=False)
    cli = build_cli(fit_args(tmp_path, "--trainer.max_epochs", "2", "--ckpt_path", str(ckpt)))
    assert seen["step"] == 3 and seen["adam_steps"] == {3.0}
    torch.testing.assert_close(seen["bias"], saved["state_dict"]["model.backbone.router.depth_bias"])
    assert seen["lr"] == saved["optimizer_states"][0]["param_groups"][0]["lr"]  # schedule resumed
    assert cli.trainer.global_step == 6 and cli.trainer.current_epoch == 2
    opt = cli.trainer.optimizers[0]
    assert {float(s["step"]) for s in opt.state.values()} == {6.0}


def test_logged_metrics_include_training_accuracy_and_router_separation(trained):
    cli, _ = trained
    metrics = cli.trainer.callback_metrics
    assert 0.0 <= float(metrics["train/acc"]) <= 1.0
    assert "val/acc" in metrics and not any(k.startswith("val/acc_top") for k in metrics)  # 4 classes
    for stage in ("train", "val"):
        assert f"{stage}/router/load" not in metrics  # vectors are not logged as scalars
        assert f"{stage}/depth/mean" in metrics and f"{stage}/flops_fraction" in metrics


def test_training_statistics_are_computed_only_on_the_steps_lightning_writes(tmp_path: Path,
                                                                             monkeypatch):
    """Depth and router statistics are logged on_step in training, which Lightning writes every
    log_every_n_steps steps: the other steps skip computing them (a step bound by the host pays
    for each op), and every written training row still carries them."""
    ensure_demo("audio")
    monkeypatch.setattr(sys, "argv", ["mormm"])
    monkeypatch.chdir(ROOT)
    computed = []
    log_depth = MoRModule._log_depth

    def spy(self, out, batch_size):
        computed.append(self.trainer.fit_loop.epoch_loop.batch_idx)
        log_depth(self, out, batch_size)

    monkeypatch.setattr(MoRModule, "_log_depth", spy)
    build_cli(fit_args(tmp_path, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "6",
                       "--trainer.log_every_n_steps", "2"))
    assert computed == [1, 3, 5]  # the second batch of every two
    with open(tmp_path / "version_0" / "metrics.csv") as f:
        written = [r for r in csv.DictReader(f) if r["train/loss"]]
    assert len(written) == 3
    assert all(r["train/depth/mean"] and r["train/flops_fraction"] for r in written)


def test_expert_choice_statistics_measure_what_they_say():
    """agreement: share of competing tokens where "logit > 0" matches the selection; separation:
    mean selected logit minus mean logit of the competitors left out."""
    from mormm.backbone import ExpertChoiceRouter, StepTrace

    router = ExpertChoiceRouter(capacities=[1.0, 0.5])
    router.num_steps = 2
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    s0 = StepTrace(torch.tensor([[True, True, True, True]]), logits, None)
    s1 = StepTrace(torch.tensor([[True, False, True, False]]), logits, None)
    stats = router.statistics([s0, s1], None)
    assert float(stats["agreement/step0"]) == 0.5  # 2.0 and 0.5 positive, all 4 selected
    assert float(stats["agreement/step1"]) == 1.0
    assert float(stats["separation/step1"]) == (2.0 + 0.5) / 2 - (-1.0 - 3.0) / 2
    assert "separation/step0" not in stats  # capacity 1: nothing left out


def test_weight_decay_goes_to_linear_and_conv_weights_only(trained):
    cli, _ = trained
    model = cli.model
    opt = model.configure_optimizers()["optimizer"]
    decay, no_decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay and no_decay and not decay & no_decay
    assert len(decay) + len(no_decay) == len(names)
    for i in decay:
        assert names[i].endswith(".weight") and "norm" not in names[i], names[i]
    for n, p in model.named_parameters():
        if n.endswith(".bias") or "norm" in n:
            assert id(p) in no_decay, n
    # Learned position tables are 2-D but no layer weight: chosen by module, not by tensor rank
    # (which FSDP's flattened shards would not keep either).
    from encoders import AudioTokenizer

    tok = AudioTokenizer(96, n_mels=64, layout="frames", frames_per_token=5, learned_pos_grid=(20, 1))
    with_tables = MoRModule(tok, cli.model.backbone, num_classes=4)
    opt = with_tables.configure_optimizers()["optimizer"]
    no_decay = {id(p) for p in opt.param_groups[1]["params"]}
    tables = list(tok.pos_embed.parameters())
    assert tables and all(t.ndim == 2 and id(t) in no_decay for t in tables)


def test_compile_keeps_the_eager_parameter_names(trained):
    cli, _ = trained
    m = MoRModule(cli.model.model.tokenizer, cli.model.backbone, num_classes=4, compile=True)
    before = list(m.state_dict())
    m.configure_model()  # compiles lazily (nothing is traced until the first call)
    assert list(m.state_dict()) == before  # so checkpoints load into eager models, analysis, uptrain


def test_compile_mode_reaches_torch_compile_and_bad_modes_are_named(trained, monkeypatch):
    from mormm.backbone import BackboneConfig, MoRBackbone

    tok = trained[0].model.model.tokenizer
    with pytest.raises(ValueError, match=r"model.compile='fast'.*reduce-overhead"):
        MoRModule(tok, MoRBackbone(BackboneConfig(dim=96)), num_classes=4, compile="fast")
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    # The mode's inductor options; pointwise kernels keep inductor's default block size unless
    # the mode autotunes everything (mormm/backbone/inductor.py says why).
    for mode, expected in (
        (True, {"triton.autotune_pointwise": False}),
        ("reduce-overhead", {"triton.cudagraphs": True, "triton.autotune_pointwise": False}),
        ("max-autotune", {"max_autotune": True, "triton.cudagraphs": True,
                          "coordinate_descent_tuning": True}),
    ):
        MoRModule(tok, MoRBackbone(BackboneConfig(dim=96)), num_classes=4, compile=mode).configure_model()
        assert seen.pop() == {"options": expected}
        with torch._inductor.config.patch(expected):  # raises on a key inductor does not have
            pass
    # Under CUDA graphs gradients stay allocated (see tests/test_cuda_graphs.py for why).
    for mode in ("reduce-overhead", "max-autotune"):
        m = MoRModule(tok, MoRBackbone(BackboneConfig(dim=96)), num_classes=4, compile=mode)
        m.on_train_start()
        m.optimizer_zero_grad(0, 0, torch.optim.SGD(m.parameters(), lr=1.0))
        assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
    m = MoRModule(tok, MoRBackbone(BackboneConfig(dim=96)), num_classes=4, compile=True)
    m.on_train_start()
    assert all(p.grad is None for p in m.backbone.parameters())  # no CUDA graphs: nothing kept


def test_compiled_inference_on_cuda_takes_the_cpp_wrapper_and_training_does_not(trained, monkeypatch):
    """What inductor is configured with while the backbone runs (the first call of each grad
    mode compiles): the C++ wrapper for no-grad calls of a compiled model on CUDA only; training,
    the CPU, CUDA graph modes and eager models keep the defaults."""
    cli, _ = trained
    tok = cli.model.model.tokenizer
    batch = next(iter(cli.datamodule.val_dataloader()))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the configuration is under test
    for compile, device, grad, expected in (
        (True, "cuda:0", False, True),
        (True, "cuda:0", True, False),
        ("max-autotune-no-cudagraphs", "cuda:0", False, True),
        ("reduce-overhead", "cuda:0", False, False),
        (True, "cpu", False, False),
        (False, "cuda:0", False, False),
    ):
        # a copy: compiling sets the backbone's compiled call, which must not reach other tests
        m = MoRModule(tok, copy.deepcopy(cli.model.backbone), num_classes=4, compile=compile)
        m.configure_model()
        m._device = torch.device(device)  # what Lightning sets when it moves the module
        seen = []
        hook = m.backbone.register_forward_pre_hook(
            lambda *_: seen.append(torch._inductor.config.cpp_wrapper))
        with torch.set_grad_enabled(grad):
            m(batch)
        hook.remove()
        assert seen == [expected], (compile, device, grad)
        assert torch._inductor.config.cpp_wrapper is False  # restored after the call


def test_without_a_cxx_compiler_compiled_inference_keeps_the_python_wrapper_and_says_so():
    from mormm.backbone import inductor, inference_config

    cuda = torch.device("cuda", 0)
    inductor._cxx_compiler_found.cache_clear()
    try:
        with torch._inductor.config.patch({"cpp.cxx": (None, "no-such-g++")}):
            with pytest.warns(UserWarning, match=r"no C\+\+ compiler.*no-such-g\+\+.*Install g\+\+"):
                config = inference_config(None, cuda)
            with config:
                assert torch._inductor.config.cpp_wrapper is False
    finally:
        inductor._cxx_compiler_found.cache_clear()  # the next call finds the real one again
    with inference_config(None, cuda):  # this machine's g++
        assert torch._inductor.config.cpp_wrapper is True


def test_multi_label_fit_trains_with_bce_and_reports_map(tmp_path: Path):
    """A JSONL manifest with label lists gives a multi-label dataset: the model trains with BCE
    and validation reports mAP (macro) and per-label accuracy."""
    import json

    import numpy as np
    import soundfile as sf

    from mormm.data import write_shards

    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        sf.write(tmp_path / f"{i}.wav", rng.uniform(-0.3, 0.3, 16_000).astype(np.float32), 16_000)
        rows.append({"audio": f"{i}.wav", "label": [["a"], ["b"], ["a", "c"]][i % 3]})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shards = write_shards(tmp_path / "m.jsonl", tmp_path / "shards", path_columns=["audio"],
                          split=[0.5, 0.5], max_samples=6).output
    cli = build_cli(["fit", "--config", "configs/quickstart.yaml", "--data.dataset", str(shards),
                     "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
                     "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                     "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                     "--data.batch_size", "4", "--data.num_workers", "0", "--data.shuffle_buffer", "8"])
    assert cli.model.multi_label and cli.model.num_classes == 3
    metrics = cli.trainer.callback_metrics
    assert 0.0 <= float(metrics["val/mAP"]) <= 1.0 and 0.0 <= float(metrics["val/acc"]) <= 1.0
    assert torch.isfinite(metrics["train/loss"])


def _depthwise_module() -> MoRModule:
    """A small audio model (N_r = 2, expert-choice) with model.depthwise on."""
    from helpers import randomize_router

    from encoders import AudioTokenizer
    from mormm.backbone import BackboneConfig, ExpertChoiceRouter, MoRBackbone

    torch.manual_seed(0)
    config = BackboneConfig(dim=32, num_heads=2, num_layers=4, num_recursions=2,
                            sharing="middle_cycle", rope_axes=2)
    backbone = MoRBackbone(config, ExpertChoiceRouter())
    randomize_router(backbone)
    tokenizer = AudioTokenizer(dim=32, n_mels=32, layout="frames", frames_per_token=5)
    return MoRModule(tokenizer, backbone, num_classes=4, depthwise=True).eval()


def _audio_batches(lengths: list) -> list[dict]:
    """Batches of two 1 s clips, padded where `lengths` gives the clips' lengths."""
    S = 16000
    g = torch.Generator().manual_seed(1)
    batches = []
    for i, n in enumerate(lengths):
        batch = {"audio": torch.randn(2, S, generator=g), "key": [f"{i}.{j}" for j in range(2)]}
        if n is not None:
            batch["audio_lengths"] = torch.tensor(n)
        batches.append(batch)
    return batches


def test_depthwise_predict_runs_the_batches_it_cannot_take_alone_and_counts_them(caplog):
    """model.depthwise over batches of whole clips with padded ones (clips of different lengths)
    among them: the padded batches run through the forward alone, the rest through the pipeline;
    every clip gets the forward's prediction, and the run's end reports how many ran alone."""
    module = _depthwise_module()
    S = 16000
    batches = _audio_batches([None, (S, S // 2), None, None, (S // 3, S), None])
    module.on_predict_start()
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="mormm.lit"):
        expected = [module._prediction(b, module(b)) for b in batches]
        got = [module.predict_step(b, i) for i, b in enumerate(batches)]
        # the padded batches come back at once, the others one step late (N_r = 2)
        assert [p and p["key"] for p in got] == [None, ["1.0", "1.1"], ["0.0", "0.1"],
                                                 ["2.0", "2.1"], ["4.0", "4.1"], ["3.0", "3.1"]]
        got = [p for p in got if p is not None] + module.flush_predictions()
        module.on_predict_epoch_end()  # as Lightning calls them: the writer's flush first
    by_key = {p["key"][0]: p for p in got}
    assert sorted(by_key) == sorted(p["key"][0] for p in expected)
    for e in expected:
        p = by_key[e["key"][0]]
        assert p["key"] == e["key"]
        torch.testing.assert_close(p["probs"], e["probs"], atol=1e-5, rtol=1e-5)
        assert torch.equal(p["depth"], e["depth"]) and torch.equal(p["content"], e["content"])
    assert sum(bool(p["content"].logical_not().any()) for p in expected) == 2  # padding there
    (message,) = [r.getMessage() for r in caplog.records if r.name == "mormm.lit"]
    assert message.startswith("model.depthwise: 2 of 6 batches ran through the forward alone, "
                              "not the pipeline: its clips are padded (Tokens.padding_mask)")


def test_depthwise_predict_without_the_prediction_writer_says_where_the_last_batches_are(
        caplog, tmp_path: Path):
    """trainer.predict with model.depthwise and no PredictionWriter: the batches still in flight
    when the data ran out are reported, and flush_predictions() returns them."""
    import lightning as L

    module = _depthwise_module()
    batches = _audio_batches([None] * 3)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    with caplog.at_level(logging.WARNING, logger="mormm.lit"), warnings.catch_warnings(
            record=True) as caught:
        warnings.simplefilter("always")
        returned = trainer.predict(module, loader)
    assert not [w for w in caught if "returned None" in str(w.message)]  # on purpose here
    assert [p and p["key"] for p in returned] == [None, ["0.0", "0.1"], ["1.0", "1.1"]]
    (message,) = [r.getMessage() for r in caplog.records if r.name == "mormm.lit"]
    assert message.startswith("model.depthwise: the data ran out with 1 batch(es) still in "
                              "flight")
    assert [p["key"] for p in module.flush_predictions()] == [["2.0", "2.1"]]


def test_depthwise_predict_flushes_the_last_batches_under_the_runs_precision(tmp_path: Path,
                                                                            monkeypatch):
    """precision bf16-mixed: the batches the PredictionWriter flushes after the data ran out
    (outside predict_step, where Lightning enters autocast) take their last steps under the
    run's autocast too, as the others did."""
    import lightning as L

    from mormm.backbone import DepthwiseBatcher
    from mormm.predict import PredictionWriter

    module = _depthwise_module()
    autocast = []
    real = DepthwiseBatcher._advance  # every step of the pipeline
    monkeypatch.setattr(DepthwiseBatcher, "_advance", lambda self, batch=None: autocast.append(
        torch.is_autocast_enabled("cpu")) or real(self, batch))
    out = tmp_path / "predictions.jsonl"
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[PredictionWriter(str(out))])
    trainer.predict(module, torch.utils.data.DataLoader(_audio_batches([None] * 3),
                                                        batch_size=None))
    assert autocast == [True] * 4  # three batches admitted, one call to finish the last
    keys = [json.loads(line)["key"] for line in out.read_text().splitlines()]
    assert keys == ["0.0", "0.1", "1.0", "1.1", "2.0", "2.1"]


@pytest.mark.parametrize("limit", [None, 5])
def test_depthwise_validate_and_test_log_what_the_forward_logs(tmp_path: Path, caplog, limit):
    """trainer.validate / trainer.test with model.depthwise: every batch of the stream is
    evaluated, also those still in the pipeline when the data (or limit_*_batches) runs out,
    which finish under the run's precision; the epoch's loss, metrics and depth statistics are
    the forward's; padded batches run alone and are counted. More than one dataloader is refused
    by name."""
    import lightning as L

    from mormm.backbone import DepthwiseBatcher

    S = 16000
    batches = _audio_batches([None, None, (S, S // 2), None, None, None, (S // 3, S)])
    for i, b in enumerate(batches):
        b["label"] = torch.tensor([i % 4, (i + 1) % 4])
    module = _depthwise_module()
    plain = copy.deepcopy(module)
    plain.hparams.depthwise = False
    calls = []  # (admits a batch, under autocast)
    real = DepthwiseBatcher._advance  # every step of the pipeline

    def spy(self, batch=None):
        calls.append((batch is not None, torch.is_autocast_enabled("cpu")))
        return real(self, batch)

    def run(stage, prefix, model, precision="32-true"):
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path,
                            precision=precision, **{f"limit_{prefix}_batches": limit})
        loader = torch.utils.data.DataLoader(batches, batch_size=None)
        with caplog.at_level(logging.WARNING, logger="mormm.lit"):
            (metrics,) = getattr(trainer, stage)(model, loader)
        return metrics

    n = limit or len(batches)
    admitted = sum(1 for b in batches[:n] if "audio_lengths" not in b)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DepthwiseBatcher, "_advance", spy)
        for stage, prefix in (("validate", "val"), ("test", "test")):
            caplog.clear()
            calls.clear()
            got, expected = run(stage, prefix, module), run(stage, prefix, plain)
            assert calls == [(True, False)] * admitted + [(False, False)]  # N_r = 2: one more
            assert f"{prefix}/acc" in got and f"{prefix}/depth/mean" in got
            assert got.keys() == expected.keys()
            for k, v in expected.items():
                assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
            (message,) = [r.getMessage() for r in caplog.records if r.name == "mormm.lit"]
            assert message.startswith(f"model.depthwise: {n - admitted} of {n} batches ran "
                                      f"through the forward alone")
        calls.clear()
        run("validate", "val", module, precision="bf16-mixed")
        assert calls == [(True, True)] * admitted + [(False, True)]
    with pytest.raises(ValueError, match=r"one dataloader per run.*dataloader_idx=1"):
        two = [torch.utils.data.DataLoader(batches[:2], batch_size=None)] * 2
        L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path).validate(module, two)


def test_evaluation_statistics_are_the_batches_means_weighted_by_size(tmp_path: Path):
    """trainer.validate logs each depth and router statistic as the mean of its per-batch values
    weighted by batch size (what Lightning's on_epoch logging gave), summed on the device."""
    import lightning as L

    from mormm.lit import depth_stats

    module = _depthwise_module()
    module.hparams.depthwise = False
    S = 16000
    batches = _audio_batches([None, (S, S // 2), None])
    batches[2] = {k: v[:1] for k, v in batches[2].items()}  # B = 1
    for i, b in enumerate(batches):
        b["label"] = torch.arange(len(b["key"])) + i
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    (logged,) = trainer.validate(module, torch.utils.data.DataLoader(batches, batch_size=None))
    sums, sizes = {}, 0
    with torch.inference_mode():
        for b in batches:
            out = module(b).backbone
            stats = depth_stats(out, module.backbone.config.num_layers, module.backbone.plan)
            stats.update({f"router/{k}": v for k, v in
                          module.backbone.router.statistics(out.steps, out.valid).items()})
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(b["key"])
            sizes += len(b["key"])
    assert {k for k in logged if k.startswith(("val/depth", "val/router", "val/flops"))} == {
        f"val/{k}" for k in sums}
    for k, v in sums.items():
        assert logged[f"val/{k}"] == pytest.approx(v / sizes, rel=1e-6), k


@pytest.mark.parametrize("chunk", [2, 32])
def test_evaluation_metrics_are_the_batches_updates_in_chunks(tmp_path: Path, monkeypatch, chunk):
    """The metrics take the epoch's logits METRIC_CHUNK batches at a time (one wait for the
    device per chunk): validate and test log what updating them batch by batch gives, with
    chunks that end mid-epoch (2 of 7 batches) or only at its end (32), epoch after epoch."""
    import lightning as L

    import mormm.lit

    monkeypatch.setattr(mormm.lit, "METRIC_CHUNK", chunk)
    module = _depthwise_module()
    module.hparams.depthwise = False
    batches = _audio_batches([None] * 7)
    for i, b in enumerate(batches):
        b["label"] = torch.tensor([i % 4, (i * 3 + 1) % 4])
    reference = module.val_metrics.clone(prefix="val/")
    with torch.inference_mode():
        for b in batches:
            reference.update(module(b).logits, b["label"])
    expected = {k: float(v) for k, v in reference.compute().items()}
    assert 0.0 < expected["val/acc"] < 1.0  # neither all right nor all wrong: a real check
    rows = []  # rows per update of the validation metrics
    update = module.val_metrics.update
    monkeypatch.setattr(module.val_metrics, "update",
                        lambda preds, target: rows.append(len(target)) or update(preds, target))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    for _ in range(2):  # nothing held over from the last epoch
        rows.clear()
        (logged,) = trainer.validate(module, loader)
        assert rows == ([4, 4, 4, 2] if chunk == 2 else [14])  # every clip, chunk by chunk
        assert logged["val/acc"] == pytest.approx(expected["val/acc"], abs=1e-6)
        (tested,) = trainer.test(module, loader)
        assert tested["test/acc"] == pytest.approx(expected["val/acc"], abs=1e-6)
    assert module._pending == []


@pytest.mark.parametrize("router", ["ec", "tc", None])
def test_depth_and_router_statistics_follow_their_per_step_definitions(router):
    """depth_stats and the expert-choice statistics, computed for every step at once, equal
    their definitions step by step, on padded clips (padding counts nowhere)."""
    from helpers import random_tokens, randomize_router

    from mormm.backbone import (BackboneConfig, ExpertChoiceRouter, MoRBackbone,
                                TokenChoiceRouter)
    from mormm.lit import depth_stats

    torch.manual_seed(0)
    make = {"ec": ExpertChoiceRouter, "tc": TokenChoiceRouter, None: lambda: None}[router]
    config = BackboneConfig(dim=32, num_heads=2, num_layers=10, num_recursions=4,
                            sharing="middle_cycle")
    backbone = MoRBackbone(config, make()).eval()
    randomize_router(backbone)
    with torch.no_grad():
        out = backbone(random_tokens(3, 12, 32, lengths=[12, 7, 9]))
    valid, depth, plan = out.valid, out.depth, backbone.plan
    n = valid.sum()
    expected, processed = {}, 2.0  # prelude and coda
    for r, step in enumerate(out.steps):
        expected[f"depth/selected_step{r}"] = step.selected.sum() / n
        processed += len(plan.steps[r]) * step.selected.sum() / n
    for d in range(len(out.steps) + 1):
        expected[f"depth/fraction_depth{d}"] = ((depth == d) & valid).sum() / n
    expected["depth/mean"] = depth.sum() / n
    expected["flops_fraction"] = processed / 10
    got = depth_stats(out, 10, plan)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert float(got[k]) == pytest.approx(float(v), abs=1e-6), k
    assert float(got["depth/fraction_depth0"]) == 0.0  # padding has depth 0 and is not counted
    if router != "ec":
        return
    stats, competed = {}, valid
    for r, step in enumerate(out.steps):
        agree = ((step.logits > 0) == step.selected) & competed
        stats[f"agreement/step{r}"] = agree.sum() / competed.sum()
        if r:  # capacities below 1
            rest = competed & ~step.selected
            stats[f"separation/step{r}"] = (step.logits[step.selected].mean()
                                            - step.logits[rest].mean())
        competed = step.selected
    got = backbone.router.statistics(out.steps, out.valid)
    assert got.keys() == stats.keys()
    for k, v in stats.items():
        assert float(got[k]) == pytest.approx(float(v), abs=1e-6), k


def test_epoch_means_weigh_every_ranks_batches_by_size():
    """EpochMeans: the size-weighted mean of each scalar over this rank's batches and, through
    the strategy's sum, every other rank's; a batch with other scalars is an error."""
    from mormm.lit import EpochMeans

    class TwoRanks:  # the other rank added one batch of 3 clips with a = 1, b = 4
        def reduce(self, total, reduce_op):
            assert reduce_op == "sum"
            return total + torch.tensor([3 * 1.0, 3 * 4.0, 3.0])

    means = EpochMeans()
    means.add({"a": torch.tensor(2.0), "b": torch.tensor(0)}, 1)
    means.add({"a": torch.tensor(4.0), "b": torch.tensor(8)}, 2)
    got = means.means(TwoRanks())
    assert list(got) == ["a", "b"]
    assert float(got["a"]) == pytest.approx((2 * 1 + 4 * 2 + 1 * 3) / 6)
    assert float(got["b"]) == pytest.approx((0 + 8 * 2 + 4 * 3) / 6)
    with pytest.raises(RuntimeError, match="a batch gave"):
        means.add({"a": torch.tensor(1.0)}, 1)
    assert EpochMeans().means(TwoRanks()) == {}  # no batch


RANK_WITHOUT_BATCHES = '''
import json, sys
sys.path.insert(0, sys.argv[1])
import lightning as L
import torch
from test_lit import _depthwise_module, labelled_batches


class RankZeroOnly(torch.utils.data.IterableDataset):
    """Rank 0's batches; rank 1 yields none, as when every sample of its share is skipped."""

    def __iter__(self):
        return iter(labelled_batches() if torch.distributed.get_rank() == 0 else [])


trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False,
                    enable_progress_bar=False, enable_model_summary=False)
(logged,) = trainer.validate(_depthwise_module(),
                             torch.utils.data.DataLoader(RankZeroOnly(), batch_size=None))
with open(f"{sys.argv[2]}/rank{trainer.global_rank}.json", "w") as f:
    json.dump({k: float(v) for k, v in logged.items()}, f)
'''


def labelled_batches() -> list[dict]:
    batches = _audio_batches([None, None, None])
    for i, b in enumerate(batches):
        b["label"] = torch.tensor([i, 3 - i])
    return batches


def test_a_rank_that_evaluates_no_batch_joins_the_epochs_reductions(tmp_path: Path):
    """Two CPU ranks (gloo), rank 1 without a batch: validate ends (it hung in the epoch-end
    reduction) and both ranks log rank 0's loss, metrics and statistics under the same keys."""
    import subprocess

    import lightning as L

    script = tmp_path / "rank_without_batches.py"
    script.write_text(RANK_WITHOUT_BATCHES)
    tests = Path(__file__).resolve().parent
    proc = subprocess.run([sys.executable, str(script), str(tests), str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 1 evaluated no batch" in proc.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    (alone,) = trainer.validate(_depthwise_module(),
                                torch.utils.data.DataLoader(labelled_batches(), batch_size=None))
    assert "val/loss" in alone and "val/router/agreement/step0" in alone
    for logged in ranks:
        assert set(logged) == set(alone)
        for k, v in alone.items():
            assert logged[k] == pytest.approx(float(v), rel=1e-5, abs=1e-6), k


def test_evaluation_views_average_into_their_clips_logits():
    """Several evaluation views per clip (decode.py's clip_index, one row each): a clip's logits
    are its views' mean, and a clip index without views gives zeros, not NaN. On CUDA without a
    host sync (bincount read the index range back every evaluation step)."""
    logits = torch.arange(12.0).view(6, 2)
    batch = {"label": torch.zeros(4, dtype=torch.long),
             "clip_index": torch.tensor([0, 0, 0, 1, 3, 3])}
    expect = torch.stack([logits[:3].mean(0), logits[3], torch.zeros(2), logits[4:].mean(0)])
    assert torch.equal(MoRModule._clip_logits(logits, batch), expect)
    assert MoRModule._clip_logits(logits, {"label": batch["label"]}) is logits  # one view each
    if torch.cuda.is_available():
        from helpers import NoHostSyncs

        on_gpu, gpu_logits = {k: v.cuda() for k, v in batch.items()}, logits.cuda()
        with NoHostSyncs():
            averaged = MoRModule._clip_logits(gpu_logits, on_gpu)
        assert torch.equal(averaged.cpu(), expect)
