#!/usr/bin/env python
"""Export a trained detector — the student alone, never its teacher or KD adapters — to ONNX or
TorchScript, then verify the file against the PyTorch model.

    python tools/export_model.py --config-file configs/synthetic/faster_rcnn_MNv3_FGFI.yaml \\
        --format onnx --output output/export MODEL.WEIGHTS output/.../model_final.pth

The exported graph takes one RGB image, ``float32 (3, H, W)`` in ``[0, 1]`` (torchvision
backend) or the Detectron2 model's own input tensor ``(3, H, W)`` in its ``INPUT.FORMAT``, 0-255
(Detectron2 backend, through ``detectron2.export.TracingAdapter``), and returns
``boxes (D, 4)`` XYXY in the input's pixels, ``scores (D,)`` and contiguous ``labels (D,)``;
the resize, the network and the post-processing (NMS included) are in the graph. The torchvision
graph is traced with dynamic height and width (ONNX) — TorchScript is traced too, at the sample
images' size. ``model.onnx`` / ``model.ts`` is written to ``--output`` with ``export.json``.

**Verification** (a mismatch is an error, exit code 1): the exported model (onnxruntime for ONNX,
``torch.jit.load`` for TorchScript) and the PyTorch model run on ``--sample-images`` (default: the
first images of the config's ``DATASETS.TEST``); they must give the same number of detections,
the same labels, scores within ``--score-tol`` (1e-4) and boxes within ``--box-tol`` pixels
(0.01).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def sample_images(predictor, paths, count: int):
    """RGB uint8 images: ``paths``, else the first ``count`` of the config's test split."""
    import numpy as np
    from PIL import Image

    if not paths:
        if predictor.backend == "torchvision":
            from kd2.data import DatasetCatalog
        else:
            from detectron2.data import DatasetCatalog
        names = list(predictor.cfg.DATASETS.TEST)
        if not names:
            raise SystemExit("error: the config has no DATASETS.TEST: give --sample-images")
        paths = [r["file_name"] for r in DatasetCatalog.get(names[0])[:count]]
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(np.array(im.convert("RGB")))
    return out


class _TorchvisionExport:
    """The torchvision model as ``image (3, H, W) -> boxes, scores, labels``."""

    def __init__(self, predictor):
        import torch

        class Single(torch.nn.Module):
            def __init__(self, model, offset: int):
                super().__init__()
                self.model, self.offset = model, offset

            def forward(self, image):
                out = self.model([image])[0]
                return out["boxes"], out["scores"], out["labels"] - self.offset

        self.module = Single(predictor.model, predictor.label_offset).eval()
        self.predictor = predictor

    def inputs(self, image):
        return (self.predictor.model_inputs([image])[0],)


class _Detectron2Export:
    """The Detectron2 model through ``TracingAdapter`` (its own input tensor, flattened outputs)."""

    def __init__(self, predictor):
        import torch
        from detectron2.export import TracingAdapter

        self.predictor = predictor

        def inference(model, inputs):
            inst = model.inference(inputs, do_postprocess=False)[0]
            return [{"instances": inst}]

        example = [{"image": self.inputs(sample_image_for_adapter())[0]}]  # tensors only
        self.adapter = TracingAdapter(predictor.model, example, inference)

        class Single(torch.nn.Module):
            def __init__(self, adapter):
                super().__init__()
                self.adapter = adapter

            def forward(self, image):
                boxes, classes, scores, _ = self.adapter(image)  # Instances fields, sorted
                return boxes, scores, classes

        self.module = Single(self.adapter).eval()

    def inputs(self, image):
        return (self.predictor.model_inputs([image])[0]["image"],)


def sample_image_for_adapter():
    import numpy as np

    return np.zeros((64, 64, 3), dtype=np.uint8)


def reference(exporter, image):
    """The PyTorch module's outputs on ``image`` (numpy)."""
    import torch

    with torch.no_grad():
        return [t.detach().cpu().numpy() for t in exporter.module(*exporter.inputs(image))]


def export(exporter, image, fmt: str, out_dir: str) -> str:
    import torch

    args = exporter.inputs(image)
    if fmt == "onnx":
        path = os.path.join(out_dir, "model.onnx")
        torch.onnx.export(
            exporter.module,
            args,
            path,
            opset_version=17,
            dynamo=False,
            training=torch.onnx.TrainingMode.EVAL,
            input_names=["image"],
            output_names=["boxes", "scores", "labels"],
            dynamic_axes={"image": {1: "height", 2: "width"}},
        )
        return path
    path = os.path.join(out_dir, "model.ts")
    with torch.no_grad():
        traced = torch.jit.trace(exporter.module, args, check_trace=False, strict=False)
    traced.save(path)
    return path


def run_exported(path: str, fmt: str, inputs):
    import numpy as np

    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return session.run(None, {"image": inputs[0].numpy()})
    import torch

    model = torch.jit.load(path)
    with torch.no_grad():
        return [np.asarray(t.cpu()) for t in model(*inputs)]


def compare(ref, got, box_tol: float, score_tol: float) -> str | None:
    """``None`` when the outputs agree, else what differs. Detections are matched one to one
    (same label, scores within ``score_tol``, the closest box), so the order of (near-)equal
    scores does not matter."""
    import numpy as np

    (rb, rs, rl), (gb, gs, gl) = ref, got
    if len(rs) != len(gs):
        return f"{len(gs)} detections instead of {len(rs)}"
    rb, rs = np.asarray(rb, np.float64).reshape(-1, 4), np.asarray(rs, np.float64)
    gb, gs = np.asarray(gb, np.float64).reshape(-1, 4), np.asarray(gs, np.float64)
    rl, gl = np.asarray(rl).astype(np.int64), np.asarray(gl).astype(np.int64)
    free = np.ones(len(gs), dtype=bool)
    worst_box, worst_score = 0.0, 0.0
    for i in np.argsort(-rs, kind="stable"):
        ok = free & (gl == rl[i]) & (np.abs(gs - rs[i]) <= score_tol)
        if not ok.any():
            return f"no exported detection matches label {rl[i]} at score {rs[i]:.6f}"
        dist = np.where(ok, np.abs(gb - rb[i]).max(axis=1), np.inf)
        j = int(dist.argmin())
        free[j] = False
        worst_box = max(worst_box, float(dist[j]))
        worst_score = max(worst_score, float(abs(gs[j] - rs[i])))
    if worst_box > box_tol:
        return f"boxes differ by up to {worst_box:.3f} px (tolerance {box_tol})"
    return None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--output", required=True)
    p.add_argument("--sample-images", nargs="*", default=[])
    p.add_argument("--num-samples", type=int, default=3)
    p.add_argument("--box-tol", type=float, default=0.01)
    p.add_argument("--score-tol", type=float, default=1e-4)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.WEIGHTS W")
    args = p.parse_args(argv)
    if not os.path.isfile(args.config_file):
        raise SystemExit(f"error: --config-file {args.config_file!r} does not exist")
    import warnings

    import torch

    from kd2.engine.predictor import load_predictor

    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    try:
        predictor = load_predictor(args.config_file, args.opts)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    images = sample_images(predictor, args.sample_images, args.num_samples)
    exporter = (
        _TorchvisionExport(predictor)
        if predictor.backend == "torchvision"
        else _Detectron2Export(predictor)
    )
    os.makedirs(args.output, exist_ok=True)
    path = export(exporter, images[0], args.format, args.output)
    checks = []
    for i, image in enumerate(images):
        ref = reference(exporter, image)
        got = run_exported(path, args.format, exporter.inputs(image))
        problem = compare(ref, got, args.box_tol, args.score_tol)
        checks.append({"image": i, "detections": int(len(ref[1])), "problem": problem})
    report = {
        "file": path,
        "format": args.format,
        "backend": predictor.backend,
        "architecture": type(predictor.model).__name__,
        "classes": predictor.class_names,
        "checks": checks,
        "box_tol_px": args.box_tol,
        "score_tol": args.score_tol,
        "torch": torch.__version__,
    }
    with open(os.path.join(args.output, "export.json"), "w") as f:
        json.dump(report, f, indent=2)
    bad = [c for c in checks if c["problem"]]
    if bad:
        print(json.dumps(report, indent=2))
        print(
            f"error: the exported model disagrees with PyTorch on {len(bad)} of {len(checks)} "
            f"sample images: {bad[0]['problem']}",
            file=sys.stderr,
        )
        raise SystemExit(1)
    print(f"wrote {path}; verified on {len(checks)} images "
          f"({sum(c['detections'] for c in checks)} detections) within {args.box_tol} px / "
          f"{args.score_tol}")  # fmt: skip
    return report


if __name__ == "__main__":
    main()
