"""Preview-level evidence of the loop and pretrained rules (GF309, GF404): what shows only
with ``--preview``, and the look-alikes that stay silent even there."""

from __future__ import annotations

import textwrap

from gradfence.lint import Selection, Settings, check_source


def _found(code: str, source: str, preview: bool = True) -> list[tuple[int, str]]:
    settings = Settings(Selection(select=(code,)), preview=preview)
    found = check_source(textwrap.dedent(source), "x.py", settings)
    return [(d.line, d.confidence) for d in found]


RUNNING_MEAN = """
    import torch

    class Normalise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(3))

        def forward(self, x):
            self.mean = 0.9 * self.mean + 0.1 * x.mean(0)
            return x - self.mean
"""


def test_running_statistic_updated_with_the_graph_is_a_preview_finding() -> None:
    assert _found("GF404", RUNNING_MEAN) == [(10, "low")]
    assert _found("GF404", RUNNING_MEAN, preview=False) == []


def test_running_statistic_updated_without_the_graph_is_silent() -> None:
    for update in (
        "self.mean = 0.9 * self.mean + 0.1 * x.detach().mean(0)",
        "self.mean = self.mean.type_as(x)",
        "self.mean = self.mean.to(x.device)",
    ):
        source = RUNNING_MEAN.replace("self.mean = 0.9 * self.mean + 0.1 * x.mean(0)", update)
        assert _found("GF404", source) == [], update
    guarded = RUNNING_MEAN.replace(
        "            self.mean = 0.9",
        "            with torch.no_grad():\n                self.mean = 0.9",
    )
    assert _found("GF404", guarded) == []


FROZEN_PROJECT_MODEL = """
    import torch
    from .encoders import build_encoder

    class Tagger(torch.nn.Module):
        def __init__(self, name, train_encoder):
            super().__init__()
            self.encoder = build_encoder(name)
            if not train_encoder:
                for param in self.encoder.parameters():
                    param.requires_grad = False
            self.head = torch.nn.Linear(768, 9)
"""


def test_frozen_submodule_built_by_a_project_call_is_a_preview_finding() -> None:
    assert _found("GF309", FROZEN_PROJECT_MODEL) == [(10, "low")]
    assert _found("GF309", FROZEN_PROJECT_MODEL, preview=False) == []


def test_frozen_torch_layer_is_silent_even_in_preview() -> None:
    source = FROZEN_PROJECT_MODEL.replace("build_encoder(name)", "torch.nn.Linear(768, 768)")
    assert _found("GF309", source) == []


SCALER = """
    import torch

    class Scaler:
        @torch.inference_mode()
        def fit(self, data):
            self.scale = data.std(0)
            self.seen = len(data)
            self.report = data.mean(0)

        def train_step(self, model, x, y, optimizer):
            loss = ((model(x) * self.scale - y) ** 2).mean()
            loss.backward()
            optimizer.step()
"""


def test_inference_tensor_on_an_object_read_in_training_is_a_preview_finding() -> None:
    """Not a module: whether the read saves the tensor for backward (``model(x) * scale``
    does, ``x - mean`` on an input does not) is beyond the analysis: low confidence. An
    attribute never read where the class trains is silent even in preview."""
    assert _found("GF402", SCALER) == [(7, "low")]
    assert _found("GF402", SCALER, preview=False) == []
