"""Test-set metrics for a model on a task: accuracy, loss, per-class precision/recall/F1, confusion matrix."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from rich.console import Console, ConsoleOptions, RenderableType
from rich.table import Table
from rich.text import Text
from torch import Tensor, nn

from p2ptrain.tasks.base import Task


@dataclass(frozen=True)
class Metrics:
    """Classification metrics on one test set. Any ratio whose denominator is zero is 0.0.

    ``confusion_matrix[true][predicted]`` counts test examples; ``support[c]`` is the number of
    examples whose true class is ``c``.
    """

    accuracy: float
    loss: float  # mean test loss per example
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    macro_precision: float
    macro_recall: float
    macro_f1: float
    confusion_matrix: list[list[int]]
    class_names: list[str]

    @classmethod
    def from_confusion(cls, confusion: Sequence[Sequence[int]], *, loss: float = 0.0,
                       class_names: Sequence[str] | None = None) -> Metrics:
        """Metrics derived from a square confusion matrix (rows = true class, columns = predicted)."""
        cm = torch.as_tensor(confusion, dtype=torch.float64)
        if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
            raise ValueError(f"confusion matrix must be square, got shape {tuple(cm.shape)}")
        n = cm.shape[0]
        names = [str(c) for c in range(n)] if class_names is None else list(class_names)
        if len(names) != n:
            raise ValueError(f"{len(names)} class names for {n} classes")
        hits, actual, predicted = cm.diagonal(), cm.sum(1), cm.sum(0)
        precision = _ratio(hits, predicted)
        recall = _ratio(hits, actual)
        f1 = _ratio(2 * precision * recall, precision + recall)
        total = cm.sum()
        return cls(
            accuracy=float(hits.sum() / total) if total > 0 else 0.0,
            loss=float(loss),
            precision=precision.tolist(),
            recall=recall.tolist(),
            f1=f1.tolist(),
            support=[int(s) for s in actual.tolist()],
            macro_precision=float(precision.mean()) if n else 0.0,
            macro_recall=float(recall.mean()) if n else 0.0,
            macro_f1=float(f1.mean()) if n else 0.0,
            confusion_matrix=[[int(v) for v in row] for row in cm.tolist()],
            class_names=names,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with one key per field."""
        return {
            "accuracy": self.accuracy, "loss": self.loss,
            "precision": self.precision, "recall": self.recall, "f1": self.f1, "support": self.support,
            "macro_precision": self.macro_precision, "macro_recall": self.macro_recall, "macro_f1": self.macro_f1,
            "confusion_matrix": self.confusion_matrix, "class_names": self.class_names,
        }

    def renderables(self) -> list[RenderableType]:
        """A summary line, a per-class precision/recall/F1/support table and the confusion matrix."""
        summary = Text.assemble(("accuracy ", "bold"), f"{self.accuracy:.4f}", ("   loss ", "bold"), f"{self.loss:.4f}",
                                ("   macro F1 ", "bold"), f"{self.macro_f1:.4f}",
                                f"   ({sum(self.support)} test examples)")
        per_class = Table(title="per class", title_justify="left")
        per_class.add_column("class")
        for name in ("precision", "recall", "F1", "support"):
            per_class.add_column(name, justify="right")
        for i, name in enumerate(self.class_names):
            per_class.add_row(name, f"{self.precision[i]:.4f}", f"{self.recall[i]:.4f}", f"{self.f1[i]:.4f}",
                              str(self.support[i]))
        per_class.add_section()
        per_class.add_row("macro avg", f"{self.macro_precision:.4f}", f"{self.macro_recall:.4f}",
                          f"{self.macro_f1:.4f}", str(sum(self.support)), style="bold")
        confusion = Table(title="confusion matrix", title_justify="left")
        confusion.add_column("true \\ predicted")
        for i in range(len(self.class_names)):
            confusion.add_column(str(i), justify="right")
        for i, row in enumerate(self.confusion_matrix):
            # the diagonal in bold so the mistakes stand out as the non-bold non-zeros
            confusion.add_row(f"{i} {self.class_names[i]}" if self.class_names[i] != str(i) else str(i),
                              *[f"[bold]{v}[/]" if i == j else (str(v) if v else "[dim]0[/]")
                                for j, v in enumerate(row)])
        return [summary, per_class, confusion]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[RenderableType]:
        yield from self.renderables()


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batch_size: int = 1000, *,
             class_names: Sequence[str] | None = None) -> Metrics:
    """Metrics of ``model`` on ``task.test``, computed in eval mode in batches of ``batch_size``.

    The model's train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    inputs, labels = task.test
    n, k = len(labels), task.num_classes
    device = next(model.parameters(), torch.empty(0)).device
    confusion = torch.zeros(k * k, dtype=torch.int64)
    loss_sum = 0.0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            x = task.prepare(inputs[start:start + batch_size]).to(device)
            y = labels[start:start + batch_size]
            logits = model(x)
            if logits.dim() != 2 or logits.shape[1] != k:
                raise ValueError(f"model returned logits of shape {tuple(logits.shape)}, expected (batch, {k})")
            # task.loss averages over the batch; weight by batch size so a short last batch counts fairly
            loss_sum += float(task.loss(logits, y.to(device))) * len(y)
            predicted = logits.argmax(dim=1).cpu()
            confusion += torch.bincount(y * k + predicted, minlength=k * k)
    finally:
        model.train(was_training)
    return Metrics.from_confusion(confusion.view(k, k).tolist(), loss=loss_sum / n if n else 0.0,
                                  class_names=class_names)


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-300), torch.zeros_like(numerator))
