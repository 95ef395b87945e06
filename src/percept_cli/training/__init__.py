"""``percept train``: FARE and TeCoA adversarial fine-tuning, MLP-head and LoRA fine-tuning on 2AFC data."""
