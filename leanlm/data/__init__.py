"""Text data: packaged evaluation texts and calibration mix, user .txt and .jsonl files, calibration windows."""
from leanlm.data.calib import DEFAULT_MIX, calibration_plan, calibration_samples, parse_calib
from leanlm.data.text import (packaged_path, packaged_text, read_text, read_texts,
                              record_text)

__all__ = ["packaged_text", "packaged_path", "read_text", "read_texts", "record_text", "calibration_samples",
           "calibration_plan", "parse_calib", "DEFAULT_MIX"]
