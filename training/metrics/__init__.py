"""Public benchmark metrics: LUNA16 FROC/CPM, VerSe id.rate, Tianchi keypoint hits; report figures."""

from training.metrics.froc import LUNA16_FP_RATES, FrocResult, froc_cpm
from training.metrics.keypoints import KeypointResult, aggregate_keypoints, keypoint_hits
from training.metrics.vertebrae import IdRate, aggregate_id_rates, identification_rate

__all__ = [
    "LUNA16_FP_RATES", "FrocResult", "IdRate", "KeypointResult", "aggregate_id_rates", "aggregate_keypoints",
    "froc_cpm", "identification_rate", "keypoint_hits",
]
