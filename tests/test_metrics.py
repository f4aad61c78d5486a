"""Metrics on hand-made predictions, checked against numbers worked out by hand."""
from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn

from p2ptrain.metrics import Metrics, evaluate
from p2ptrain.tasks import Task

# true:      0 0 0 1 1 2
# predicted: 0 0 1 1 2 2
TRUE = [0, 0, 0, 1, 1, 2]
PREDICTED = [0, 0, 1, 1, 2, 2]


class Oracle(nn.Module):
    """Predicts whatever class the input names; one weight so it has a device and a train/eval mode."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.tensor(3.0))

    def forward(self, x: Tensor) -> Tensor:
        assert not self.training  # evaluate must switch to eval mode
        return F.one_hot(x[:, 0].long(), self.num_classes).float() * self.scale


def oracle_task(predicted: list[int], true: list[int], num_classes: int = 3) -> Task:
    test = (torch.tensor(predicted, dtype=torch.float32)[:, None], torch.tensor(true))
    return Task(name="oracle", make_model=lambda: Oracle(num_classes), train=test, test=test,
                num_classes=num_classes, accuracy_bar=0.5)


def test_hand_made_example() -> None:
    m = evaluate(Oracle(3), oracle_task(PREDICTED, TRUE), batch_size=4)
    assert m.confusion_matrix == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m.accuracy == pytest.approx(4 / 6)
    assert m.precision == pytest.approx([1.0, 0.5, 0.5])
    assert m.recall == pytest.approx([2 / 3, 0.5, 1.0])
    assert m.f1 == pytest.approx([0.8, 0.5, 2 / 3])
    assert m.support == [3, 2, 1]
    assert m.macro_precision == pytest.approx(2 / 3)
    assert m.macro_recall == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert m.macro_f1 == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


@pytest.mark.parametrize("batch_size", [1, 4, 6, 1000])
def test_loss_is_the_mean_over_all_examples_whatever_the_batching(batch_size: int) -> None:
    task = oracle_task(PREDICTED, TRUE)
    model = Oracle(3)
    model.eval()
    with torch.no_grad():
        expected = float(F.cross_entropy(model(task.test[0]), task.test[1]))
    assert evaluate(model, task, batch_size=batch_size).loss == pytest.approx(expected)


def test_restores_train_mode_and_does_not_track_gradients() -> None:
    model = Oracle(3)
    model.train()
    evaluate(model, oracle_task(PREDICTED, TRUE))
    assert model.training and model.scale.grad is None
    model.eval()
    evaluate(model, oracle_task(PREDICTED, TRUE))
    assert not model.training


def test_zero_division_is_zero() -> None:
    # class 3 is neither true nor predicted; class 2 is predicted but never true
    m = Metrics.from_confusion([[1, 0, 1, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert m.precision == [1.0, 1.0, 0.0, 0.0]
    assert m.recall == [0.5, 1.0, 0.0, 0.0]
    assert m.f1 == pytest.approx([2 / 3, 1.0, 0.0, 0.0])
    assert Metrics.from_confusion([[0, 0], [0, 0]]).accuracy == 0.0


def test_agrees_with_scikit_learn() -> None:
    from sklearn.metrics import precision_recall_fscore_support

    generator = torch.Generator().manual_seed(0)
    true = torch.randint(0, 5, (300,), generator=generator).tolist()
    predicted = [t if i % 3 else (t + i) % 5 for i, t in enumerate(true)]
    m = evaluate(Oracle(5), oracle_task(predicted, true, num_classes=5), batch_size=64)
    p, r, f, s = precision_recall_fscore_support(true, predicted, labels=range(5), zero_division=0.0)
    assert m.precision == pytest.approx(p.tolist()) and m.recall == pytest.approx(r.tolist())
    assert m.f1 == pytest.approx(f.tolist()) and m.support == s.tolist()


def test_to_dict_is_json() -> None:
    m = evaluate(Oracle(3), oracle_task(PREDICTED, TRUE))
    data = json.loads(json.dumps(m.to_dict()))
    assert data["accuracy"] == pytest.approx(4 / 6)
    assert data["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert set(data) >= {"loss", "precision", "recall", "f1", "support", "macro_f1", "class_names"}


def test_renders_summary_per_class_table_and_confusion_matrix() -> None:
    m = Metrics.from_confusion([[2, 1, 0], [0, 1, 1], [0, 0, 1]], loss=0.5, class_names=["cat", "dog", "emu"])
    out = io.StringIO()
    Console(file=out, width=120, color_system=None).print(m)
    text = out.getvalue()
    assert "accuracy 0.6667" in text and "loss 0.5000" in text and "6 test examples" in text
    assert "precision" in text and "recall" in text and "F1" in text and "support" in text
    emu_row = next(line for line in text.splitlines() if line.startswith("│ emu"))
    assert [cell.strip() for cell in emu_row.split("│")[2:6]] == ["0.5000", "1.0000", "0.6667", "1"]
    assert "macro avg" in text
    assert "confusion matrix" in text and "true \\ predicted" in text
    confusion_row = next(line for line in text.splitlines() if "0 cat" in line)
    assert [cell.strip() for cell in confusion_row.split("│")[2:5]] == ["2", "1", "0"]


def test_rejects_logits_of_the_wrong_width() -> None:
    with pytest.raises(ValueError, match="expected \\(batch, 4\\)"):
        evaluate(Oracle(3), oracle_task([0, 1], [0, 1], num_classes=4))
