"""Product detector: YOLO training/evaluation/export (ultralytics behind detector.yolo) and the neutral
``load_detector(weights).detect(frames)`` API the pipeline uses."""
from detector.config import DetectorConfig
from detector.infer import Detections, Detector, load_detector

__all__ = ["DetectorConfig", "Detections", "Detector", "load_detector"]
