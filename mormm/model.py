"""Tokenizer -> backbone -> pooling -> classifier, as one plain nn.Module (no Lightning here).

The tokenizer, backbone and pooling are passed in as objects, so YAML swaps each by class_path.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from encoders.tokens import Tokens
from mormm.backbone import BackboneOutput, MoRBackbone
from mormm.heads import ClassifierHead, MeanPooling, Pooling


@dataclass
class ClassifierOutput:
    logits: Tensor  # (B, C)
    tokens: Tokens  # what entered the backbone (after pooling.prepare)
    backbone: BackboneOutput


class MoRClassifier(nn.Module):
    def __init__(
        self,
        tokenizer: nn.Module,
        backbone: MoRBackbone,
        num_classes: int,
        pooling: Pooling | None = None,
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dim = getattr(tokenizer, "dim", backbone.dim)
        if dim != backbone.dim:
            raise ValueError(
                f"tokenizer dim={dim} does not match backbone config.dim={backbone.dim}; set both "
                f"to the same width"
            )
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        self.tokenizer = tokenizer
        self.backbone = backbone
        self.pooling = pooling if pooling is not None else MeanPooling()
        self.head = ClassifierHead(backbone.dim, num_classes, head_dropout)

    @property
    def input_keys(self) -> tuple[str, ...]:
        return tuple(self.tokenizer.input_keys)

    def tokenize(self, batch: dict) -> Tokens:
        missing = [k for k in self.input_keys if k not in batch and k in _REQUIRED_KEYS]
        if missing:
            raise ValueError(
                f"the batch lacks {missing} that {type(self.tokenizer).__name__} needs (it has "
                f"{sorted(k for k in batch if not k.startswith('_'))}); check data.modalities"
            )
        return self.tokenizer(**{k: batch[k] for k in self.input_keys if k in batch})

    def forward(self, batch: dict) -> ClassifierOutput:
        tokens = self.prepare(batch)
        return self.classify(tokens, self.backbone(tokens))

    def prepare(self, batch: dict) -> Tokens:
        """What enters the backbone: the batch's tokens, with what the pooling adds."""
        return self.pooling.prepare(self.tokenize(batch))

    def classify(self, tokens: Tokens, out: BackboneOutput) -> ClassifierOutput:
        """The head on the backbone's output for `tokens` (however the backbone was run)."""
        return ClassifierOutput(self.head(self.pooling(out.hidden, out.valid)), tokens, out)


# Inputs without which no tokenizer can run; lengths and sample rate are optional extras.
_REQUIRED_KEYS = ("audio", "video", "image")
