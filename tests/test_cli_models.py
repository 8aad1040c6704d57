"""Model files the CLI and loader tests build in a temporary directory (no tests here).

``make_model_files(folder)`` writes ``models.py`` (factories) and, from the
same seeded weights, every MODEL form of the CLI contract.
"""

from __future__ import annotations

import pickle
import sys
import warnings
from pathlib import Path

import torch

MODELS_SOURCE = """
import warnings

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        raise ValueError("kaboom")


def build():
    torch.manual_seed(0)
    return MLP()


def build_seq():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))


def build_other():
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5), nn.Linear(5, 2))


def build_nan():
    model = build()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    return model


def chatty():
    print("chatty factory output")
    warnings.warn("a user warning from the factory")
    return build()


def boom():
    return Boom()


def noparams():
    return nn.Sequential(nn.ReLU())


def notmodule():
    return 42


def conv():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def embed():
    return nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 50))


def scripted():
    return torch.jit.script(build())


def exported():
    batch = torch.export.Dim("batch", min=1, max=1024)
    return torch.export.export(build(), (torch.randn(4, 12),), dynamic_shapes=({0: batch},))


instance = build()
"""


class Evil:
    """Unpickling this creates ``target``: the canary of the pickle-refusal tests."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.target, "w"))


def load_models_module(folder: Path):  # noqa: ANN201
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_test_models_{abs(hash(str(folder)))}", folder / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_model_files(folder: Path) -> dict[str, Path]:
    """Write every model form into ``folder``; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "models.py").write_text(MODELS_SOURCE)
    models = load_models_module(folder)
    model = models.build()
    files = {"models": folder / "models.py"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files["torchscript"] = folder / "model.ts"
        torch.jit.save(torch.jit.script(model), str(files["torchscript"]))
        files["export"] = folder / "model.pt2"
        batch = {0: torch.export.Dim("batch", min=1, max=1024)}  # any batch size, like a real export
        program = torch.export.export(model, (torch.randn(4, 12),), dynamic_shapes=(batch,))
        torch.export.save(program, str(files["export"]))
    files["state_dict"] = folder / "weights.pt"
    torch.save(model.state_dict(), files["state_dict"])
    files["checkpoint"] = folder / "checkpoint.pt"
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, files["checkpoint"]
    )
    from safetensors.torch import save_file

    files["safetensors"] = folder / "weights.safetensors"
    save_file(model.state_dict(), str(files["safetensors"]))
    files["pickle"] = folder / "full.pt"  # nn.Sequential only: importable in any process
    torch.save(models.build_seq(), files["pickle"])
    files["inputs"] = folder / "inputs.pt"
    torch.save(torch.randn(6, 12, generator=torch.Generator().manual_seed(1)), files["inputs"])
    files["evil_pickle"] = folder / "evil.pkl"
    files["evil_zip"] = folder / "evil.pt"
    with open(files["evil_pickle"], "wb") as handle:
        pickle.dump(Evil(folder / "PWNED_raw"), handle)
    torch.save({"weight": torch.zeros(2), "payload": Evil(folder / "PWNED_zip")}, files["evil_zip"])
    return files


def canaries(folder: Path) -> list[Path]:
    return [folder / "PWNED_raw", folder / "PWNED_zip"]


def python() -> str:
    return sys.executable
