"""The data engine: from one's own videos to training records (``docs/data.md``, "From your videos to a training run").

- `prepare`: videos -> 4k+1-frame clips at the training fps with per-character masks, keypoints, hand and face
  boxes, captions and OCR regions, and a pose-driven record per clip (``scail2-data prepare``).
- `motionpair`: the paper's synthesis loop (§3.2): reference images from a Candidate Selector, a Prompt Weaver and
  a Quality Checker around a multi-reference image generator; pose-driven animation and replacement generators;
  a VLM filter; reverse-driving packaging (``scail2-data motionpair``).
- `pose`: skeleton videos from 2-D keypoints (COCO-WholeBody, OpenPose layouts) and skeleton scaling.
- `clips`: what models are handed and return (`Clip`, `PoseTrack`, `Reference`, `GeneratedVideo`), shared with
  the preference builder (`scail2.preference`); `components`: the interfaces a model is plugged in through; `adapters`: commands, HTTP endpoints and our own
  pipeline behind them; `vlm` and `endpoints`: the OpenAI-compatible VLM components and their client;
  `standins`: deterministic components for the synthetic videos (tests, demos).

Nothing runs on import.
"""
