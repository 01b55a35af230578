"""Model and data factories for tests/test_module_job.py (``--model-factory tests/_factories.py:tiny_cnn``)."""
import torch
from torch import nn

NOT_CALLABLE = 5


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )


def cnn_data():
    """Calibration batches and (inputs, labels): labels are the float model's classes with every fifth
    one changed, so the float accuracy is 0.8 and the quantized one can differ."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 8, 8, generator=g)
    xe = torch.randn(40, 3, 8, 8, generator=g)
    with torch.no_grad():
        labels = tiny_cnn()(xe).argmax(-1)
    labels[::5] = (labels[::5] + 1) % 5
    return {"calibration": [x[:32], x[32:]], "evaluation": (xe, labels)}


def cnn_inputs_only():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 8, 8, generator=g)], torch.randn(24, 3, 8, 8, generator=g)


def tiny_mlp() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 4))


def mlp_data_with_metric():
    """Calibration batches and an evaluation callable returning two named metrics."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 12, generator=g)
    target = torch.randn(50, 4, generator=g)

    def evaluate(model):
        y = model(x)
        return {"mse": float(((y - target) ** 2).mean()), "mean_output": float(y.mean())}

    return [x[:25], x[25:]], evaluate


def not_a_model():
    return "a string"


def bad_data():
    return 42


_drift = [0]


def drifting_cnn() -> nn.Module:
    """Other weights at every call (a factory that does not rebuild the same float model)."""
    _drift[0] += 1
    torch.manual_seed(100 + _drift[0])
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5))
