"""``module.compile`` and ``module.attention_backend`` reach `scail2.models.parallelize` through the module's
``configure_model`` (compilation itself is checked against eager in tests/test_parallelize.py, marked slow)."""

from __future__ import annotations

from scail2.config import compose_config
from scail2.models.parallelize import checkpointed_blocks, compiled
from scail2.train import build_module, build_trainer


def test_module_settings_reach_parallelize(tmp_path):
    cfg = compose_config(["experiment=demo", "logger=none", f"paths.run_dir={tmp_path}", "module.compile=true",
                          "module.activation_checkpointing=true", "module.attention_backend=math",
                          "export.enabled=false", "callbacks.progress=null"])
    module = build_module(cfg)
    trainer = build_trainer(cfg)
    module.trainer = trainer
    module.configure_model()
    net = module.net
    assert compiled(net) and checkpointed_blocks(net) == [0, 1]
    assert {m.attention_backend for m in net.modules() if hasattr(m, "attention_backend")} == {"math"}
