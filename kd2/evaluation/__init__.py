"""Evaluation: COCO box AP (pycocotools) and the inference loop."""

from kd2.evaluation.coco_evaluation import BBOX_METRICS, COCOEvaluator, inference_on_dataset

__all__ = ["BBOX_METRICS", "COCOEvaluator", "inference_on_dataset"]
