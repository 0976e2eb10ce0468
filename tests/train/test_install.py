"""A non-editable install works: the wheel carries conf/ (components presets included) and experiments/, and every
command runs from it.

The wheel is built from this checkout and installed into a fresh virtual environment whose only view of the
dependencies is the test environment's site-packages (added by a path file, so the editable install of the
checkout is not activated there). The commands then run from a folder outside the checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from .conftest import train_overrides

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("scail2-train", "scail2-animate", "scail2-convert", "scail2-data", "scail2-bench", "scail2-plan")


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(bin folder, environment) of a fresh venv with the wheel of this checkout installed."""
    tmp = tmp_path_factory.mktemp("install")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    built = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(ROOT)], tmp, env)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("scail2-*.whl")
    venv = tmp / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env)
    assert made.returncode == 0, made.stderr[-3000:]
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the checkout's editable install is visible through the path file; leave it alone.
    pip = _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)], tmp, env)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv / "bin", env


@pytest.mark.slow
def test_the_wheel_carries_the_configs_and_runs_a_demo(installed, data_root, tmp_path):
    bin_dir, env = installed
    where = _run([str(bin_dir / "python"), "-c", "import scail2.config.schema as s; print(s.__file__); print(s.config_dir()); print(s.experiments_dir())"], tmp_path, env)  # fmt: skip
    assert where.returncode == 0, where.stderr[-3000:]
    module, conf, experiments = (Path(line) for line in where.stdout.split())
    assert not module.is_relative_to(ROOT), f"{module}: the checkout, not the installed wheel"
    assert conf.is_relative_to(module.parents[1]) and (conf / "train.yaml").is_file()
    assert (experiments / "demo.yaml").is_file()
    assert (conf / "components" / "prepare" / "synthetic.yaml").is_file()  # scail2-data's components presets
    # The trained tiny VAE (package data) loads from the wheel: data.vae=trained works installed.
    vae = _run([str(bin_dir / "python"), "-c", "from scail2.encoders.tiny import TRAINED_VAE_DIR, trained_tiny_vae; print(TRAINED_VAE_DIR); print(sum(p.numel() for p in trained_tiny_vae().parameters()))"], tmp_path, env)  # fmt: skip
    assert vae.returncode == 0, vae.stderr[-3000:]
    vae_dir, parameters = vae.stdout.split()[-2:]
    assert Path(vae_dir).is_relative_to(module.parents[1]) and int(parameters) > 10**6

    out = tmp_path / "outputs"
    proc = _run([str(bin_dir / "scail2-train"), *train_overrides(data_root, out, "trainer.max_steps=2", "optim.scheduler.warmup_steps=1")], tmp_path, env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "Training finished" in proc.stdout
    assert list(out.glob("demo/*/model/diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_starts_from_the_wheel(installed, tmp_path, command):
    bin_dir, env = installed
    proc = _run([str(bin_dir / command), "--help"], tmp_path, env, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "usage" in (proc.stdout + proc.stderr).lower() or "scail2" in proc.stdout
