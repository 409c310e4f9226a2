"""`SiteProbe` composes across stages: the statistics of a model cut into pipeline stages, each stage probed on its
own with the forward composite carried forward and the backward one carried back (what `PipelineEngine`
does across ranks), equal those of the whole model (`connection_diagnostics`), for every arm."""

from __future__ import annotations

import pytest
import torch

from mhc_train.model.transformer import build_model
from mhc_train.parallel.pipeline import cut_stage
from mhc_train.train.diagnostics import SiteProbe, connection_diagnostics, summarise
from tests.support.configs import ARMS, conn_cfg, tiny_model_cfg


@pytest.mark.parametrize("arm", sorted(ARMS))
@pytest.mark.parametrize("n_stages", [2, 4])
def test_stages_compose_to_the_whole_model(arm, n_stages):
    cfg = conn_cfg(arm, phi_init_std=0.5) if arm.startswith("mhc") else conn_cfg(arm)
    model = build_model(tiny_model_cfg(n_layer=4), cfg, seed=3)
    tokens = torch.randint(0, 256, (2, 12))
    whole = connection_diagnostics(model, tokens)
    probes, h, prefix = [], tokens, None
    for s in range(n_stages):
        stage = cut_stage(model, s, n_stages)
        probes.append(SiteProbe())
        with probes[-1].capture(stage):
            h = stage(h)
        prefix = probes[-1].forward(prefix)
    suffix = None
    for probe in reversed(probes):
        suffix = probe.backward(suffix)
    sites = {name: stats for probe in probes for name, stats in probe.sites.items()}
    assert str(summarise(sites)) == str(whole)  # same products in the same order: bit-identical (NaN-safe compare)
