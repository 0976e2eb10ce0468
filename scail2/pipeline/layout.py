"""The on-disk layout of a SCAIL-2 pipeline folder and the checks that name what is missing.

::

    model_dir/
      model_index.json   {"_class_name": "SCAIL2Pipeline", "_format_version": 1, "components": {...}}
      transformer/       config.json + diffusion_pytorch_model.safetensors (or shards + index); any layout
                         ``scail2.models.load_transformer`` reads (ours, official SCAIL-2 Wan-branch weights)
      vae/               config.json, diffusion_pytorch_model.safetensors          (Wan2.1 VAE, diffusers)
      text_encoder/      config.json, model.safetensors (or shards + index)        (umT5-XXL encoder)
      tokenizer/         tokenizer_config.json, tokenizer.json or spiece.model     (umT5 tokenizer)
      image_encoder/     config.json, model.safetensors                            (CLIP ViT-H/14 vision tower)
      image_processor/   preprocessor_config.json                                  (CLIP preprocessing)
      scheduler/         scheduler_config.json   (optional: UniPC with shift 5 when absent)

The encoder folders are those of the Wan2.1-I2V diffusers release, so that release with its ``transformer/``
replaced by a SCAIL-2 transformer is a valid pipeline folder (its own ``model_index.json``, which names another
pipeline class, is then ignored). Every component can also be given by its own path.

The **official SCAIL-2 release** folder is read as it is downloaded (``RELEASE_FILES``)::

    SCAIL-2/
      model/latest, model/1/fsdp2_rank_0000_checkpoint.pt          transformer (SAT training checkpoint)
      Wan2.1_VAE.pth                                              VAE (original Wan2.1 keys)
      models_t5_umt5-xxl-enc-bf16.pth                             umT5-XXL encoder (Wan2.1 keys)
      umt5-xxl/                                                   umT5 tokenizer (google/umt5-xxl also works)
      models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth     CLIP ViT-H/14 (open-clip keys, visual tower used)

It is recognised by ``model/`` holding a SAT checkpoint, or by ``Wan2.1_VAE.pth`` next to original Wan weights
(then the transformer is the folder's own safetensors, e.g. an original Wan2.1 release). CLIP preprocessing is
then Wan's own (no ``image_processor/``), and the scheduler UniPC with shift 5 (no ``scheduler/``). A file kept
elsewhere is given by its own path (``transformer_path=`` ... or ``scail2-animate --image-encoder PATH``).
"""

from __future__ import annotations

import json
from pathlib import Path

from scail2.encoders._files import (
    IMAGE_ENCODER_FILES,
    IMAGE_PROCESSOR_FILES,
    TEXT_ENCODER_FILES,
    TOKENIZER_FILES,
    VAE_FILES,
    missing_files,
)
from scail2.utils.torch_files import describe_file

INDEX_NAME = "model_index.json"
PIPELINE_CLASS = "SCAIL2Pipeline"
FORMAT_VERSION = 1
COMPONENTS: tuple[str, ...] = (
    "transformer",
    "vae",
    "text_encoder",
    "tokenizer",
    "image_encoder",
    "image_processor",
    "scheduler",
)
TRANSFORMER_WEIGHTS = "diffusion_pytorch_model.safetensors"
_TRANSFORMER_FILE_SUFFIXES = (".safetensors", ".pt", ".pth")
OPTIONAL_COMPONENTS: tuple[str, ...] = ("image_processor", "scheduler")  # may be absent (see the docstring)
# Component -> file or folder names in the official SCAIL-2 release (first existing one is taken).
RELEASE_FILES: dict[str, tuple[str, ...]] = {
    "vae": ("Wan2.1_VAE.pth",),
    "text_encoder": ("models_t5_umt5-xxl-enc-bf16.pth",),
    "tokenizer": ("umt5-xxl", "google/umt5-xxl"),
    "image_encoder": ("models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",),
}
# Where a file missing from the SCAIL-2 release is found, for error messages.
_RELEASE_SOURCES = {
    "vae": "the SCAIL-2 release (zai-org/SCAIL-2) or any Wan2.1 release",
    "text_encoder": "the SCAIL-2 release or the Wan2.1-I2V-14B-720P release (Wan-AI)",
    "tokenizer": "the SCAIL-2 release (umt5-xxl/) or a Wan2.1 release (google/umt5-xxl/)",
    "image_encoder": "the Wan2.1-I2V-14B-720P release (Wan-AI/Wan2.1-I2V-14B-720P)",
}
_FLAGS = {
    "transformer": "--transformer",
    "vae": "--vae",
    "text_encoder": "--text-encoder",
    "tokenizer": "--tokenizer",
    "image_encoder": "--image-encoder",
    "image_processor": "--image-processor",
}
_ENCODER_SPECS = {
    "vae": VAE_FILES,
    "text_encoder": TEXT_ENCODER_FILES,
    "tokenizer": TOKENIZER_FILES,
    "image_encoder": IMAGE_ENCODER_FILES,
    "image_processor": IMAGE_PROCESSOR_FILES,
}


def read_index(root: Path) -> dict | None:
    """Our ``model_index.json`` under ``root``, or None when absent or written for another pipeline class."""
    index = root / INDEX_NAME
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{index} is not valid JSON ({exc}); rewrite it with SCAIL2Pipeline.save_pretrained") from exc
    if data.get("_class_name") != PIPELINE_CLASS:
        return None
    version = data.get("_format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{index} has format version {version}; this scail2 reads up to {FORMAT_VERSION}: upgrade scail2"
        )
    return data


def write_index(root: Path, folders: dict[str, str]) -> Path:
    path = root / INDEX_NAME
    payload = {"_class_name": PIPELINE_CLASS, "_format_version": FORMAT_VERSION, "components": folders}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def is_release_folder(root: Path) -> bool:
    """Whether ``root`` is laid out as the official SCAIL-2 (or an original Wan2.1) release, not as a pipeline
    folder: ``model/`` with a SAT checkpoint, or ``Wan2.1_VAE.pth``, and no ``transformer/`` folder."""
    from scail2.models.loading import find_sat_checkpoint

    root = Path(root)
    if not root.is_dir() or (root / "transformer").is_dir() or read_index(root) is not None:
        return False
    try:
        sat = find_sat_checkpoint(root) if (root / "model").is_dir() else None
    except ValueError:  # a broken model/ folder is still a release folder; the transformer check reports it
        return True
    return sat is not None or (root / RELEASE_FILES["vae"][0]).is_file()


def _release_paths(root: Path) -> dict[str, Path | None]:
    # The transformer is the release folder itself: load_transformer finds model/<latest>/ (or the folder's own
    # safetensors), and transformer_problem reports a broken model/ folder with the reason.
    paths: dict[str, Path | None] = {"transformer": root}
    for name, candidates in RELEASE_FILES.items():
        paths[name] = next((root / c for c in candidates if (root / c).exists()), root / candidates[0])
    paths["image_processor"] = None  # Wan's CLIP preprocessing comes with the Wan CLIP file
    paths["scheduler"] = None  # UniPC, shift 5
    return paths


def resolve_paths(root: str | Path | None, overrides: dict[str, str | Path | None]) -> dict[str, Path | None]:
    """Path of every component: the explicit override, else the release file, the index's subfolder or the
    default subfolder name. ``image_processor`` / ``scheduler`` may come back None (not needed; see above)."""
    required = [name for name in COMPONENTS if name not in OPTIONAL_COMPONENTS]
    missing_root = [name for name in required if overrides.get(name) is None]
    if root is None and missing_root:
        flags = ", ".join(_FLAGS[n] for n in missing_root)
        raise ValueError(
            f"no model folder given and no path for {missing_root}; pass the folder (--model) or those paths "
            f"({flags})"
        )
    if root is None:
        defaults: dict[str, Path | None] = {name: None for name in COMPONENTS}
    elif is_release_folder(Path(root)):
        defaults = _release_paths(Path(root))
    else:
        index = read_index(Path(root))
        folders = (index or {}).get("components", {})
        defaults = {name: Path(root) / folders.get(name, name) for name in COMPONENTS}
    paths = {name: Path(overrides[name]) if overrides.get(name) is not None else defaults[name] for name in COMPONENTS}
    # A Wan CLIP file brings Wan's preprocessing: no processor folder is needed unless one is given or present.
    encoder, processor = paths["image_encoder"], paths["image_processor"]
    if overrides.get("image_processor") is None and encoder is not None and encoder.is_file():
        if processor is None or not processor.is_dir():
            paths["image_processor"] = None
    elif paths["image_processor"] is None and encoder is not None and encoder.is_dir():
        raise ValueError(
            f"the CLIP image encoder {encoder} is a folder: pass its processor config too (--image-processor)"
        )
    return paths


def _not_weights(path: Path) -> str | None:
    """What a file is when it cannot be weights (a Git LFS pointer, an empty file, an HTML page ...), else None."""
    found = describe_file(path)
    ok = ("a zip-format torch.save file", "a legacy (non-zip)", "a safetensors file")
    return None if found.startswith(ok) else found


def transformer_problem(path: Path) -> str | None:
    """Why ``path`` cannot hold transformer weights, or None."""
    from scail2.models.loading import find_sat_checkpoint
    from scail2.utils.torch_files import CheckpointError

    fix = f"convert a SCAIL-2 checkpoint into it with `scail2-convert <checkpoint> {path}`"
    if path.is_file():
        if path.suffix not in _TRANSFORMER_FILE_SUFFIXES:
            return f"transformer weights {path} end in {path.suffix!r}; use .safetensors (or .pt/.pth) or a folder"
        found = _not_weights(path)
        return None if found is None else f"transformer weights {path} are {found}"
    if not path.is_dir():
        return f"no transformer at {path} (expected a folder with config.json and {TRANSFORMER_WEIGHTS}); {fix}"
    if any(path.glob("*.safetensors")) or (path / f"{TRANSFORMER_WEIGHTS}.index.json").is_file():
        return None
    try:
        sat = find_sat_checkpoint(path)
    except CheckpointError as exc:
        return str(exc)
    if sat is not None:
        return transformer_problem(sat)
    return (
        f"transformer folder {path} has no {TRANSFORMER_WEIGHTS} (or its shards and index) and no "
        f"model/<iteration>/fsdp2_rank_0000_checkpoint.pt; {fix}"
    )


def folder_problems(paths: dict[str, Path | None], release: bool = False) -> list[str]:
    """Every missing component file, each message naming the file and where it comes from."""
    problems = []
    message = transformer_problem(paths["transformer"])
    if message:
        problems.append(message)
    for name, spec in _ENCODER_SPECS.items():
        path = paths[name]
        if path is None:
            continue
        if name in ("vae", "text_encoder", "image_encoder") and path.is_file():
            found = _not_weights(path)  # single original files (Wan2.1_VAE.pth, the umT5 / CLIP .pth)
            if found is not None:
                problems.append(f"{spec.what} file {path} is {found}")
            continue
        if release and name in RELEASE_FILES and not path.exists():
            problems.append(
                f"no {spec.what} at {path} (the official release names it {' or '.join(RELEASE_FILES[name])}; "
                f"it comes with {_RELEASE_SOURCES[name]}); put it there or pass {_FLAGS[name]} PATH"
            )
            continue
        message = missing_files(path, spec)
        if message:
            if path.is_file():
                message = f"{spec.what} path {path} is {describe_file(path)}; expected a folder with {spec.expected()}"
            problems.append(message)
    scheduler = paths["scheduler"]
    if scheduler is not None and scheduler.is_dir() and not (scheduler / "scheduler_config.json").is_file():
        problems.append(
            f"scheduler folder {scheduler} has no scheduler_config.json (remove the folder to use UniPC with shift 5)"
        )
    return problems


def check_folder(
    root: str | Path | None, overrides: dict[str, str | Path | None] | None = None
) -> dict[str, Path | None]:
    """Resolve and check every component path; one FileNotFoundError lists all missing files."""
    overrides = overrides or {}
    required = [n for n in COMPONENTS if n not in OPTIONAL_COMPONENTS]
    if root is not None and not Path(root).is_dir() and not all(overrides.get(n) for n in required):
        raise FileNotFoundError(
            f"no model folder at {root} (found {describe_file(root)}); expected a pipeline folder with "
            f"{', '.join(c + '/' for c in COMPONENTS[:-1])} or the official SCAIL-2 release folder "
            "(see docs/inference.md)"
        )
    paths = resolve_paths(root, overrides)
    problems = folder_problems(paths, release=root is not None and is_release_folder(Path(root)))
    if problems:
        raise FileNotFoundError("cannot load the SCAIL-2 pipeline:\n- " + "\n- ".join(problems))
    return paths
