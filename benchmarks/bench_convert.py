"""Peak memory of ``scail2-convert`` on a large fp32 SAT checkpoint, as a ratio of the file size.

Builds a SCAIL-2 SAT training checkpoint of about 1.75 GB in fp32 (the Wan2.1-1.3B width with 8 blocks, SAT
names, fused q/k/v, plus RNG states like the released file), then runs the converter in a fresh process for
each case and reads that process's peak resident set size (``ru_maxrss`` of the child). The baseline is a
process that only imports the converter's modules.

    python benchmarks/bench_convert.py            # writes benchmarks/results/convert_cpu.json

Needs about 4 GB of free disk in the temporary folder and 3 GB of memory (to write the checkpoint).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import versions, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# Runs a module (``-m name args...``) or code (``-c code``) and reports the process's own peak RSS at exit.
# VmHWM is read from /proc: ru_maxrss would include the parent's resident set copied at fork time.
_MEASURED = """
import atexit, runpy, sys
def _report():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("PEAK_RSS_KB " + line.split()[1] + "\\n")
atexit.register(_report)
kind, target, *rest = sys.argv[1:]
sys.argv = [target, *rest]
if kind == "-m":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    exec(target)
"""


def _run(args: list[str]) -> dict:
    """Run ``-m module args`` or ``-c code`` in a fresh process; its wall time, output and own peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURED, *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{proc.stdout}\n{proc.stderr}")
    peak_kb = int(next(l.split()[1] for l in proc.stderr.splitlines() if l.startswith("PEAK_RSS_KB")))
    return {"wall_s": round(wall, 2), "peak_rss_bytes": peak_kb * 1024, "stdout": proc.stdout.strip()}


def build_checkpoint(path: Path, layers: int) -> dict:
    import numpy as np

    from scail2.models import SCAIL2Transformer, scail2_config
    from scail2.models.convert_sat import wan_to_sat

    cfg = scail2_config("wan2.1-1.3b", num_layers=layers)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in wan_to_sat(SCAIL2Transformer(cfg).state_dict()).items()}
    g = torch.Generator().manual_seed(0)
    module = {k: torch.randn(shape, generator=g) * 0.02 for k, shape in shapes.items()}
    checkpoint = {"iteration": 1, "module": module, "np_rng_state": np.random.get_state(), "torch_rng_state": torch.get_rng_state()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    (path.parent.parent / "latest").write_text("1\n")
    params = sum(int(torch.Size(s).numel()) for s in shapes.values())
    return {"geometry": cfg.to_dict(), "parameters": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tmp", default=None, help="folder for the checkpoint and outputs (default: system temp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(tmp) / "SCAIL-2"
        ckpt = root / "model" / "1" / "fsdp2_rank_0000_checkpoint.pt"
        setup = build_checkpoint(ckpt, args.layers)  # its tensors are freed on return
        size = ckpt.stat().st_size
        baseline = _run(["-c", "import torch, safetensors, scail2.cli.convert, scail2.models.loading"])
        cases = {}
        for name, extra in (("fp32 -> bf16", ["--dtype", "bf16"]), ("fp32 kept", [])):
            out = Path(tmp) / f"out-{len(cases)}"
            cmd = ["-m", "scail2.cli.convert", str(root), str(out), *extra]
            result = _run(cmd)
            out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            cases[name] = {
                "command": "scail2-convert SCAIL-2 OUT " + " ".join(extra),
                "wall_s": result["wall_s"],
                "peak_rss_bytes": result["peak_rss_bytes"],
                "peak_rss_over_file_size": round(result["peak_rss_bytes"] / size, 3),
                "peak_rss_above_baseline_over_file_size": round(
                    (result["peak_rss_bytes"] - baseline["peak_rss_bytes"]) / size, 3
                ),
                "output_bytes": out_bytes,
                "converter_output": result["stdout"],
            }
    payload = {
        "versions": versions("safetensors", "numpy"),
        "setup": {
            **setup,
            "source": "SAT training checkpoint (torch.save zip, fp32, fused q/k/v, RNG states), release-folder layout",
            "file_size_bytes": size,
            "baseline_import_peak_rss_bytes": baseline["peak_rss_bytes"],
            "measure": "VmHWM (peak resident set) of the converter's own process, read from /proc at exit; one run per case",
        },
        "cases": cases,
    }
    print(write_result("convert_cpu.json", payload))


if __name__ == "__main__":
    main()
