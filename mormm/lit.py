"""LightningModule: owns the losses, metrics, optimizer and schedule around a MoRClassifier.

Model code stays free of Lightning; everything about training (auxiliary-loss weighting, router
bias updates after optimizer steps, depth statistics for logging, compile) lives here.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter, deque
from contextlib import nullcontext

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MultilabelAccuracy,
    MultilabelAveragePrecision,
)

from encoders.tokens import Tokens
from mormm.backbone import (BackboneOutput, DepthwiseBatcher, MoRBackbone, compile_options,
                            inference_config)
from mormm.heads import Pooling
from mormm.model import ClassifierOutput, MoRClassifier
from mormm.uptrain import UptrainInit, uptrain

log = logging.getLogger(__name__)

# Evaluation batches whose logits wait on the device for one metrics update (_evaluate): one
# wait for the device per 32 batches, and at most 32 batches' logits held (at 256 clips and 527
# classes in bf16, 8.6 MB).
METRIC_CHUNK = 32


def depth_stats(out: BackboneOutput, num_layers: int, plan) -> dict[str, Tensor]:
    """Mean depth per step, fraction of tokens per depth, and the linear-FLOPs fraction of a
    dense model with the same effective depth (tokens x layers actually processed). Computed
    for all steps and depths at once: evaluation pays these launches on every batch."""
    valid = out.valid
    n_valid = out.depth.numel() if valid is None else valid.sum().clamp(min=1)
    R = len(out.steps)
    selected = torch.stack([step.selected for step in out.steps]).flatten(1).sum(1) / n_valid
    hit = out.depth[..., None] == torch.arange(R + 1, device=out.depth.device)  # (B, N, R + 1)
    if valid is not None:
        hit &= valid[..., None]
    fractions = hit.flatten(0, -2).sum(0) / n_valid
    processed = len(plan.steps[0]) * selected.sum()  # every step runs as many layers
    stats = {f"depth/selected_step{r}": f for r, f in enumerate(selected.unbind())}
    stats.update({f"depth/fraction_depth{d}": f for d, f in enumerate(fractions.unbind())})
    stats["depth/mean"] = out.depth.sum() / n_valid
    stats["flops_fraction"] = (processed + len(plan.prelude) + len(plan.coda)) / num_layers
    return stats


class EpochMeans:
    """Scalars averaged over an evaluation epoch, each batch weighted by its size, across ranks:
    what Lightning's on_epoch logging computes, summed on the device in two launches per batch
    (a stack and an add) where `self.log` costs about four small ops and its Python per scalar
    (18 scalars for expert-choice at N_r = 4: a step bound by the host pays for each)."""

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self.sums: Tensor | None = None
        self.weight = 0

    def add(self, values: dict[str, Tensor], weight: int) -> None:
        if self.names is None:
            self.names = list(values)
        elif list(values) != self.names:
            raise RuntimeError(f"EpochMeans: a batch gave {sorted(values)}, the epoch's first "
                               f"gave {sorted(self.names)}")
        stacked = torch.stack(list(values.values())).float()
        if self.sums is None:
            self.sums = stacked * weight
        else:
            self.sums.add_(stacked, alpha=weight)
        self.weight += weight

    def means(self, strategy) -> dict[str, Tensor]:
        """The epoch's means over every rank's batches (`strategy`: the trainer's); {} when no
        rank added a batch. Every rank calls it: a rank that added none (all of its share
        skipped) takes the scalars' names from the others and adds zeros, so all ranks run the
        same collectives and log the same keys."""
        names, sums = self.names, self.sums
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, names)
            names = next((n for n in every if n is not None), None)
            if any(n is not None and n != names for n in every):
                raise RuntimeError(f"EpochMeans: the ranks' batches gave different scalars: {every}")
            if sums is None and names is not None:
                sums = torch.zeros(len(names), device=strategy.root_device)
        if sums is None:
            return {}
        total = strategy.reduce(torch.cat([sums, sums.new_tensor([self.weight])]), reduce_op="sum")
        return dict(zip(names, total[:-1] / total[-1]))


class MoRModule(L.LightningModule):
    """Audio / video / audio+video classification with a Mixture-of-Recursions backbone.

    tokenizer:     an encoders.* tokenizer (class_path/init_args in YAML).
    backbone:      mormm.backbone.MoRBackbone with its config and router.
    num_classes:   linked from the data module.
    multi_label:   linked from the data module; BCE + mAP instead of cross-entropy + accuracy.
    pooling:       mormm.heads.MeanPooling (default), ClassTokenPooling or AttentionPooling.
    lr, weight_decay, warmup_steps, min_lr_ratio: AdamW with linear warm-up then cosine decay
                   to min_lr_ratio * lr over the trainer's estimated steps; norms, biases and
                   other 1-D parameters get no weight decay.
    label_smoothing: for single-label cross-entropy.
    compile:       torch.compile the backbone (static shapes make expert-choice compile well):
                   true for the default mode, or a mode name. Inference graphs on CUDA issue
                   their kernels from inductor's C++ wrapper (mormm.backbone.inference_config;
                   its first compile takes up to a minute longer): short clips are bound by the
                   host, and with the Python wrapper MoR beat vanilla by as much as the host
                   allowed (1 s audio on H200s: expert-choice 1.01-1.43x, token-choice
                   0.92-1.27x; with the C++ wrapper 1.43x and 1.27x on a host where the Python
                   one gave 1.03x and 0.96x). "reduce-overhead" (and "max-autotune") replay
                   the backbone as CUDA graphs instead, training too (1.38x and 1.26x;
                   benchmarks/README.md).
                   Gradients are then zeroed between optimizer steps, not freed. The options
                   come from mormm.backbone.compile_options (pointwise autotuning off).
    init_from:     uptraining source (mormm.uptrain.UptrainInit), applied when a fit starts
                   from scratch (not on resume, validate, test or predict).
    depthwise:     `mormm validate/test/predict` (and validation in `mormm fit`) run the
                   backbone over the stream of batches through mormm.backbone.DepthwiseBatcher:
                   N_r batches in flight, each shared layer called once for all of them (their
                   outputs are the forward's). Eager throughput on short clips, where the host's
                   launches set the pace (benchmarks/README.md); not with `compile`. Batches the
                   pipeline cannot take (padded clips, threshold inference) run through the
                   forward alone, counted and reported when the run ends. Evaluation takes one
                   dataloader.
    """

    def __init__(
        self,
        tokenizer: nn.Module,
        backbone: MoRBackbone,
        num_classes: int = 2,
        multi_label: bool = False,
        pooling: Pooling | None = None,
        head_dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.01,
        label_smoothing: float = 0.0,
        compile: bool | str = False,
        init_from: UptrainInit | None = None,
        depthwise: bool = False,
    ) -> None:
        super().__init__()
        if depthwise and compile:
            raise ValueError("model.depthwise and model.compile are two ways to cut the host's "
                             "work per batch; set one of them")
        self._cuda_graphs = False  # whether the compiled backbone replays as CUDA graphs
        if isinstance(compile, str):
            modes = torch._inductor.list_mode_options()
            if compile not in modes:
                raise ValueError(f"model.compile={compile!r} is not a torch.compile mode; use "
                                 f"true, false or one of {sorted(modes)}")
            # reduce-overhead and max-autotune replay CUDA graphs
            self._cuda_graphs = bool(modes[compile].get("triton.cudagraphs"))
        self.save_hyperparameters()
        self.model = MoRClassifier(tokenizer, backbone, num_classes, pooling, head_dropout)
        self.num_classes = num_classes
        self.multi_label = multi_label
        if multi_label:
            metrics = {
                "mAP": MultilabelAveragePrecision(num_classes, average="macro"),
                "acc": MultilabelAccuracy(num_classes),
            }
        else:
            metrics = {"acc": MulticlassAccuracy(num_classes, top_k=1)}
            if num_classes > 5:  # with 5 classes or fewer, top-5 accuracy is always 1
                metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5)
        self.train_metrics = MetricCollection({"acc": metrics["acc"].clone()}, prefix="train/")
        self.val_metrics = MetricCollection(metrics, prefix="val/")
        self.test_metrics = self.val_metrics.clone(prefix="test/")
        # Token-choice load of each micro-batch since the last optimizer step (averaged for the
        # loss-free bias update, so gradient accumulation sees the whole effective batch).
        self._loads: list[Tensor] = []
        # Evaluation's loss and depth and router statistics, averaged over the epoch, and the
        # (logits, labels) of the batches not yet in its metrics (_evaluate).
        self._epoch_means = EpochMeans()
        self._pending: list[tuple[Tensor, Tensor]] = []
        # model.depthwise: the batcher of this evaluation or predict run, its batches still in
        # flight, and the batches it could not take (run alone) by reason, of how many.
        self._batcher: DepthwiseBatcher | None = None
        self._in_flight: deque[tuple[dict, Tokens]] = deque()
        self._alone: Counter[str] = Counter()
        self._batches = 0

    @property
    def backbone(self) -> MoRBackbone:
        return self.model.backbone

    @property
    def _compile_mode(self) -> str | None:
        """The torch.compile mode of a compiled backbone (`compile: true`: None, the default)."""
        return None if self.hparams.compile is True else self.hparams.compile

    def configure_model(self) -> None:
        if self.hparams.compile:
            # In place: parameter names (and so checkpoints) stay those of the eager model.
            self.model.backbone.compile(options=compile_options(self._compile_mode))

    def on_fit_start(self) -> None:
        # Uptraining initialises a fresh run only. A resumed run (--ckpt_path) takes every weight
        # from its checkpoint and must not need the source file any more; neither do
        # validate/test/predict, which never reach here.
        init = self.hparams.init_from
        if init is not None and self.trainer.ckpt_path is None:
            uptrain(self.model, self.backbone, init)

    def forward(self, batch: dict) -> ClassifierOutput:
        if self._cuda_graphs:  # one forward per step: what the last one returned may be reused
            torch.compiler.cudagraph_mark_step_begin()
        if self.hparams.compile and not torch.is_grad_enabled():  # validate, test, predict
            with inference_config(self._compile_mode, self.device):
                return self.model(batch)
        return self.model(batch)

    def on_train_start(self) -> None:
        if self._cuda_graphs:
            # The backbone's backward, replayed as a CUDA graph, writes the gradients into the
            # same buffers every time; a gradient that is None takes that buffer over, and the
            # next micro-batch's backward then overwrites it (torch raises). Allocated gradients
            # are added to instead: keep them allocated, zeroed rather than freed.
            for p in self.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        optimizer.zero_grad(set_to_none=not self._cuda_graphs)

    # -- losses -------------------------------------------------------------------------------

    def _task_loss(self, logits: Tensor, label: Tensor) -> Tensor:
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, label.float())
        return F.cross_entropy(logits, label, label_smoothing=self.hparams.label_smoothing)

    @staticmethod
    def _clip_logits(logits: Tensor, batch: dict) -> Tensor:
        """Average the logits of a clip's evaluation views (clip_index maps views to clips)."""
        if "clip_index" not in batch:
            return logits
        idx = batch["clip_index"].to(logits.device)
        clips = len(batch["label"])
        total = logits.new_zeros(clips, logits.shape[-1]).index_add_(0, idx, logits)
        # Views counted by index_add_, not bincount, which on CUDA reads the indices' range
        # back to the host: a wait for the device in every evaluation step.
        count = logits.new_zeros(clips).index_add_(0, idx, logits.new_ones(idx.shape))
        return total / count.clamp(min=1)[:, None]

    def _train_logs_written(self) -> bool:
        """Whether Lightning writes this training step's on_step values to the logger: every
        `trainer.log_every_n_steps` steps, and when training stops. The depth and router
        statistics are logged on_step alone in training, so on the other steps they would be
        computed for nothing: about 130 small ops for expert-choice at N_r = 4 (34 without a
        router) and 11-18 `self.log` calls, which a step bound by the host (short clips on a GPU,
        benchmarks/README.md) pays in wall time. Lightning 2.6 keeps the test on its logger
        connector (private; without one, every step logs)."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return connector is None or connector.should_update_logs

    def _statistics(self, out: BackboneOutput) -> dict[str, Tensor]:
        """The depth statistics and the router's (mormm.lit.depth_stats, Router.statistics)."""
        stats = depth_stats(out, self.backbone.config.num_layers, self.backbone.plan)
        if self.backbone.router is not None:
            stats.update({f"router/{k}": v for k, v in
                          self.backbone.router.statistics(out.steps, out.valid).items()})
        return stats

    def _log_depth(self, out: BackboneOutput, batch_size: int) -> None:
        """Training: the statistics on_step, on the steps Lightning writes (_train_logs_written)."""
        self.log_dict({f"train/{k}": v for k, v in self._statistics(out).items()},
                      on_step=True, on_epoch=False, batch_size=batch_size)

    def on_validation_epoch_start(self) -> None:
        self._epoch_means = EpochMeans()
        self._pending = []  # the batches of an epoch that did not reach its end

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_metrics)

    def _log_epoch(self, stage: str, metrics: MetricCollection) -> None:
        """The evaluation epoch's loss, metrics and depth and router statistics, logged once
        (with model.depthwise, after the batches still in flight)."""
        if self._batcher is not None:
            plugin = self.trainer.precision_plugin
            context = plugin.val_step_context() if stage == "val" else plugin.test_step_context()
            self._finish_pipeline(context, lambda batch, out: self._evaluate(batch, out, metrics))
            self._report_alone()
        self._update_metrics(metrics)
        means = self._epoch_means.means(self.trainer.strategy)  # a new one each epoch start
        if not means:  # no batch evaluated on any rank
            metrics.reset()
            return
        if not self._epoch_means.weight:
            log.warning("%s: rank %d evaluated no batch this epoch (were all of its samples "
                        "skipped?); the logged values are the other ranks'", stage,
                        self.global_rank)
        logged = {f"{stage}/{k}": v for k, v in means.items()} | metrics.compute()
        metrics.reset()
        bar = {f"{stage}/loss", f"{stage}/acc"} if stage == "val" else set()
        self.log_dict({k: v for k, v in logged.items() if k in bar}, prog_bar=True)
        self.log_dict({k: v for k, v in logged.items() if k not in bar})

    # -- steps --------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self(batch)
        task = self._task_loss(out.logits, batch["label"])
        loss = task + out.backbone.aux_loss
        B = len(batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log("train/task_loss", task, batch_size=B)
        for k, v in out.backbone.losses.items():
            self.log(f"train/{k}", v, batch_size=B)
        if self._train_logs_written():
            self._log_depth(out.backbone, B)
        label = batch["label"]
        self.train_metrics.update(out.logits.detach(), label.int() if self.multi_label else label)
        self.log_dict(self.train_metrics, batch_size=B, on_step=False, on_epoch=True)
        if "load" in out.backbone.stats:  # for the bias update after the optimizer step
            # A copy: under CUDA graphs the backbone's outputs are rewritten by its next call.
            self._loads.append(out.backbone.stats["load"].detach().clone())
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        router = self.backbone.router
        if router is not None and self._loads:
            load = torch.stack(self._loads).mean(0)
            self._loads = []
            if self.trainer is not None and self.trainer.world_size > 1:
                load = self.all_gather(load).float().mean(0)
            router.after_optimizer_step({"load": load})

    def _eval_step(self, batch: dict, dataloader_idx: int, metrics: MetricCollection) -> None:
        if dataloader_idx:  # one set of metrics and epoch means per run
            raise ValueError(f"MoRModule evaluates one dataloader per run; this one has more "
                             f"(dataloader_idx={dataloader_idx}): evaluate them one by one")
        if self._batcher is None:
            self._evaluate(batch, self(batch), metrics)
        else:  # the batches left in flight finish when the epoch ends (_log_epoch)
            for done in self._pipeline(batch):
                self._evaluate(*done, metrics)

    def _evaluate(self, batch: dict, out: ClassifierOutput, metrics: MetricCollection) -> None:
        """Adds the batch to the epoch's metrics and means (`_log_epoch` logs them): a step bound
        by the host pays for every `self.log` (four small ops and Lightning's Python each). The
        metrics take the logits METRIC_CHUNK batches at a time: a multiclass update sizes a
        bincount from the data, which waits for the device, and every wait drains the queue the
        host had filled ahead (chunked, `mormm test`'s loop ran 6-25 % faster on the H200:
        benchmarks/metric_chunks.py)."""
        logits = self._clip_logits(out.logits, batch)
        label = batch["label"]
        self._pending.append((logits, label.int() if self.multi_label else label))
        if len(self._pending) >= METRIC_CHUNK:
            self._update_metrics(metrics)
        stats = {"loss": self._task_loss(logits, label), **self._statistics(out.backbone)}
        self._epoch_means.add(stats, len(label))

    def _update_metrics(self, metrics: MetricCollection) -> None:
        """The batches' logits and labels held back since the last update, into `metrics` in one
        update (the metrics' states are sums or the values themselves: the same result)."""
        if self._pending:
            preds, targets = zip(*self._pending)
            metrics.update(torch.cat(preds), torch.cat(targets))
            self._pending = []

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, self.test_metrics)

    # -- model.depthwise: a stream of batches through DepthwiseBatcher --------------------------

    def _start_pipeline(self) -> None:
        if self.hparams.depthwise:
            self._batcher, self._in_flight = DepthwiseBatcher(self.backbone), deque()
            self._alone, self._batches = Counter(), 0

    on_validation_start = on_test_start = _start_pipeline

    def on_predict_start(self) -> None:
        self._start_pipeline()
        if self._batcher is not None:  # None is how a filling pipeline's steps answer
            warnings.filterwarnings("ignore", message="predict returned None")

    def _pipeline(self, batch: dict) -> list[tuple[dict, ClassifierOutput]]:
        """Admit this batch; the batch that leaves the pipeline in this call with its output
        (none while it fills), or this one alone where the pipeline cannot take it."""
        tokens = self.model.prepare(batch)
        self._batches += 1
        why, out = self._batcher.offer(tokens)
        if why is not None:
            self._alone[why] += 1
            return [(batch, self.model.classify(tokens, self.backbone(tokens)))]
        self._in_flight.append((batch, tokens))
        return [] if out is None else [self._leave(out)]

    def _finish_pipeline(self, context, use) -> list:
        """`use(batch, output)` of each batch still in flight, oldest first, once it has run to
        its end. The steps left run outside the step hooks: under `context`, the run's
        precision (its autocast), as the others did, and in inference mode, also after the run
        returned."""
        with torch.inference_mode(), context:
            done = [use(*self._leave(out)) for out in self._batcher.flush()]
        self._batcher = None
        return done

    def _report_alone(self) -> None:
        for why, n in self._alone.items():
            log.warning("model.depthwise: %d of %d batches ran through the forward alone, not the "
                        "pipeline: %s. It takes unpadded clips routed by top-k (audio: "
                        "--data.clip_seconds crops clips to one length)", n, self._batches, why)
        self._alone = Counter()

    def predict_step(self, batch: dict, batch_idx: int) -> dict | None:
        """The predictions of this batch; with model.depthwise, of the batch that left the
        pipeline in this step (None while it fills; `flush_predictions` gives the rest), or of
        this batch where the pipeline cannot take it (it runs alone, records carry their keys)."""
        if self._batcher is None:
            return self._prediction(batch, self(batch))
        done = self._pipeline(batch)
        return self._prediction(*done[0]) if done else None

    def on_predict_epoch_end(self) -> None:
        self._report_alone()
        # Callbacks ran first: mormm predict's PredictionWriter has flushed the pipeline.
        if self._batcher is not None and self._batcher.in_flight:
            log.warning("model.depthwise: the data ran out with %d batch(es) still in flight "
                        "and no PredictionWriter (mormm.predict) to write them: their "
                        "predictions are what flush_predictions() returns",
                        self._batcher.in_flight)

    def flush_predictions(self) -> list[dict]:
        """model.depthwise: the predictions of the batches still in flight, oldest first."""
        if self._batcher is None:
            return []
        trainer = self._trainer
        precision = (nullcontext() if trainer is None
                     else trainer.precision_plugin.predict_step_context())
        return self._finish_pipeline(precision, self._prediction)

    def _leave(self, out: BackboneOutput) -> tuple[dict, ClassifierOutput]:
        batch, tokens = self._in_flight.popleft()
        return batch, self.model.classify(tokens, out)

    def _prediction(self, batch: dict, out: ClassifierOutput) -> dict:
        logits = self._clip_logits(out.logits, batch)
        probs = logits.sigmoid() if self.multi_label else logits.softmax(-1)
        return {"key": batch.get("key"), "meta": batch.get("meta"), "probs": probs,
                # Counted on this read into a new tensor: it outlives the next batch's forward,
                # which rewrites CUDA-graph outputs.
                "depth": out.backbone.depth, "content": out.tokens.content(),
                "clip_index": batch.get("clip_index")}

    # -- optimisation -------------------------------------------------------------------------

    def configure_optimizers(self):
        # Decay the weights of linear and convolutional layers only: norm gains, biases,
        # class/query tokens and position tables would only fight the normalisation. Decided by
        # module type, not tensor rank, which FSDP's flattened shards do not keep.
        weights = {id(m.weight) for m in self.modules()
                   if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if id(p) in weights else no_decay).append(p)
        hp = self.hparams
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
        )
        # Detached from a Trainer (the `trainer` property raises then): a nominal 1000 steps.
        trainer = self._trainer
        total = max(1, int(trainer.estimated_stepping_batches)) if trainer is not None else 1000
        warmup = min(hp.warmup_steps, max(0, total - 1))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            t = min(1.0, (step - warmup) / max(1, total - warmup))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- checkpoints --------------------------------------------------------------------------

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        head = checkpoint.get("state_dict", {}).get("model.head.fc.weight")
        if head is not None and head.shape[0] != self.num_classes:
            raise ValueError(
                f"the checkpoint was trained for {head.shape[0]} classes but the data has "
                f"{self.num_classes}; to fine-tune it on new classes use model.init_from "
                f"(uptraining copies everything but the head) instead of --ckpt_path"
            )
