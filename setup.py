"""Ships the Hydra configs (``conf/``) and the experiment files (``experiments/``) inside the package.

They live at the top of the source tree, where researchers edit them; a built wheel carries a copy of both under
``scail2/_configs/`` so that a non-editable ``pip install .`` finds them (`scail2.config.schema.config_dir`).
Everything else is declared in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("conf", "experiments")


class BuildWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the source tree's folders in place
            return
        root = Path(__file__).resolve().parent
        for name in SHIPPED:
            target = Path(self.build_lib) / "scail2" / "_configs" / name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(root / name, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithConfigs})
