"""Low-bit fine-tuning with adapters: LoRA on a frozen (quantized) base with adapters stored down
to 1 bit, LR-QAT (the low-rank update inside the quantizer, folded into plain integer codes), the
adapter files (lowbit's packed form and PEFT's), and the stdlib adaptation tasks."""
from .adapter_quant import AdapterFormat
from .lora import LoRALinear, add_lora, lora_layers, parse_targets, remove_lora
from .lrqat import LRQATLinear, fold, prepare_lrqat

__all__ = ["AdapterFormat", "LoRALinear", "add_lora", "lora_layers", "parse_targets", "remove_lora",
           "LRQATLinear", "prepare_lrqat", "fold"]
