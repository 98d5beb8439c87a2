"""The network as NVFlare sees it: a module built from the experiment config alone.

NVFlare's persistor rebuilds the server's initial model from ``{"path": class, "args": {...}}``;
a MONAI network object loses its constructor arguments there. This wrapper is built from the same
config dict the sites read, through the same task code, so server and sites cannot disagree.
"""

from __future__ import annotations

from torch import nn

from monai_fl.config import ExperimentConfig


class ConfiguredNetwork(nn.Module):
    """``experiment.build_model()`` for an experiment config given as a plain dict."""

    def __init__(self, config: dict, data_root: str | None = None):
        super().__init__()
        from monai_fl.experiment import model_for_config

        # Kept under the argument names so NVFlare's job export can record the constructor call.
        self.config, self.data_root = config, data_root

        self.net = model_for_config(ExperimentConfig.from_dict(config), data_root)

    def forward(self, x):
        return self.net(x)
