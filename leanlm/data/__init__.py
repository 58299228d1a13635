"""Text data: packaged evaluation / calibration texts, user .txt and .jsonl files, calibration windows."""
from leanlm.data.text import (calibration_samples, packaged_path, packaged_text, read_text, read_texts,
                              record_text)

__all__ = ["packaged_text", "packaged_path", "read_text", "read_texts", "record_text", "calibration_samples"]
