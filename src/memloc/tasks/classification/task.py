"""Classification with label noise: the paper's task, and the only place the probes' words for it live.

Training examples are clean (given label = true label), noisy (the label was
corrupted: what a model can only fit by memorizing) or rare (marked by a score
file); a probe looks for where the noisy examples are memorized and keeps the
clean ones. A model's output is a row of class logits; its prediction is the
argmax; it still "memorizes" a noisy example while it predicts the given
(wrong) label. The measured subsets are clean-train, noisy-train, rare-train
(all against the given labels) and test.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import ConfigError
from ...core.examples import model_input
from ...core.inference import predict
from ...core.precision import channels_last
from .data import Dataset
from .data import augment as augment_images


class ClassificationTask:
    """The probes' view of a :class:`~memloc.tasks.classification.data.Dataset` (see `memloc.tasks.Task`)."""

    name = "classification"
    class_labels = True
    subsets = ("clean_train", "noisy_train", "rare_train", "test")
    kinds = ("clean", "noisy", "rare")
    memorized_kind = "noisy"
    reference_kind = "clean"

    def __init__(self, data: Dataset):
        self.data = data

    @property
    def num_train(self) -> int:
        return self.data.num_train

    @property
    def known(self) -> bool:
        return bool(self.data.noise_known)

    # -- model input and output
    def example_input(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(n, *self.data.input_shape, device=device)

    def inputs(self, xb: torch.Tensor, device: torch.device, *, augment: bool = False) -> torch.Tensor:
        """Stored examples (B, ...) -> model input, normalized as the data says (random crop and flip of images
        with `augment`)."""
        x = model_input(xb, device, self.data.normalization)
        if augment:
            x = augment_images(x)
            if channels_last(device):
                x = x.contiguous(memory_format=torch.channels_last)
        return x

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (B, ...) of logits (B, ..., K) against class indices (B, ...)."""
        outputs = outputs.float()
        if outputs.dim() > 2:  # classes last, as the model gives them; cross_entropy wants them second
            outputs = outputs.movedim(-1, 1)
        return F.cross_entropy(outputs, targets, reduction="none")

    def margin(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Target logit minus the largest other logit (B,)."""
        out = outputs.detach().float()
        target = out.gather(1, targets[:, None]).squeeze(1)
        other = out.scatter(1, targets[:, None], float("-inf")).amax(1)
        return target - other

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.argmax(1)

    def match(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return predictions == targets.to(predictions.device)

    def targets(self, which: str) -> torch.Tensor | None:
        if which == "given":
            return self.data.y_train
        if which == "true":
            return self.data.y_true if self.known else None
        if which == "test":
            return self.data.y_test
        raise ValueError(f"unknown targets {which!r}")

    def check_outputs(self, outputs: torch.Tensor) -> None:
        """A model's outputs for a batch of 2 must be logits (2, K) over the data's K classes."""
        k = self.data.num_classes
        if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2 or outputs.shape[1] != k:
            got = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
            raise ConfigError(f"the model's output is {got} for a batch of 2, but the data has {k} classes: "
                              f"the model must return logits of shape (batch, {k})")

    def record_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) int labels a per-example record stores: the given and the true class (given where unknown)."""
        true = self.targets("true")
        return self.data.y_train, (self.data.y_train if true is None else true)

    # -- kinds and subsets
    def example_ids(self, idx: torch.Tensor, tie: str, split: str = "train") -> torch.Tensor:
        """An image is its own example: its dataset position is its id."""
        return idx

    def kind_mask(self, kind: str) -> torch.Tensor | None:
        """(N,) bool: clean and noisy need a known noise mask (None without one); rare is always known."""
        if kind == "rare":
            return self.data.is_rare
        if kind not in ("clean", "noisy"):
            raise ValueError(f"unknown kind {kind!r}")
        if not self.known:
            return None
        return self.data.is_noisy if kind == "noisy" else ~self.data.is_noisy

    def subset_masks(self) -> dict[str, torch.Tensor | None]:
        """Training subsets; clean-train is every example when the noise is unknown (nothing known to be noisy)."""
        clean = self.kind_mask("clean")
        masks = {"clean_train": clean if clean is not None else torch.ones_like(self.data.is_noisy),
                 "noisy_train": self.kind_mask("noisy"), "rare_train": self.kind_mask("rare")}
        return {k: (m if m is not None and bool(m.any()) else None) for k, m in masks.items()}

    def test_masks(self) -> dict[str, torch.Tensor | None]:
        """The held-out subsets: "test", every test example (None without a test split)."""
        n = len(self.data.y_test)
        return {"test": torch.ones(n, dtype=torch.bool) if n else None}

    def accuracy(self, hits_train: torch.Tensor, hits_test: torch.Tensor) -> np.ndarray:
        """(S, 4) float64: clean-, noisy-, rare-train and test accuracy from hits (S, N), (S, M); NaN if empty."""
        masks = self.subset_masks()
        s = hits_train.shape[0]
        cols = []
        for name in self.subsets[:-1]:
            m = masks[name]
            if m is None:
                cols.append(torch.full((s,), float("nan"), dtype=torch.float64))
            else:
                m = m.to(hits_train.device)
                cols.append((hits_train & m).sum(1).double().cpu() / int(m.sum()))
        if hits_test.shape[1]:
            cols.append(hits_test.double().mean(1).cpu())
        else:
            cols.append(torch.full((s,), float("nan"), dtype=torch.float64))
        return torch.stack(cols, 1).numpy()

    # -- a model on the whole data
    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, batch_size: int = 1024, with_indices: bool = False
                 ) -> dict[str, float | None]:
        """Eval-mode accuracy of every subset as fractions, keys "<subset>_acc" (None: empty or unknown), and
        "noisy_train_true_acc": the noisy examples predicted as their true class."""
        device = next(model.parameters()).device
        data = self.data
        pred = self.predict(predict(model, data.x_train, inputs=self.inputs, batch_size=batch_size,
                                    with_indices=with_indices, device=device)).to(data.y_train.device)
        hits = self.match(pred, data.y_train)[None]
        if len(data.x_test):
            pred_te = self.predict(predict(model, data.x_test, inputs=self.inputs, batch_size=batch_size,
                                           device=device)).to(data.y_test.device)
            hits_te = self.match(pred_te, data.y_test)[None]
        else:  # a dataset given without a test split (memloc.wrap_data)
            hits_te = torch.zeros(1, 0, dtype=torch.bool)
        acc = self.accuracy(hits, hits_te)[0]
        out = {f"{s}_acc": (None if np.isnan(v) else float(v)) for s, v in zip(self.subsets, acc)}
        test = out.pop("test_acc")
        noisy = data.is_noisy
        if bool(noisy.any()):  # how many of them are predicted as their true class instead of the given one
            out["noisy_train_true_acc"] = float(self.match(pred[noisy], data.y_true[noisy]).double().mean())
        out["test_acc"] = test
        return out
