"""Training in low precision: trainable quantizers, QAT layers, and the one training loop that
``lowbit train`` (and the adapter, low-precision-training and scaling-law commands) run."""
from .act_quant import ActivationFakeQuant, calibrate_act_clips
from .qat import QATLinear, convert, packed_weights, prepare_qat, trainable_groups
from .quantizers import WeightFakeQuant

__all__ = ["QATLinear", "WeightFakeQuant", "ActivationFakeQuant", "calibrate_act_clips", "prepare_qat", "convert", "packed_weights", "trainable_groups"]
