"""Training quality you can measure (issue 14): a world of coloured shapes whose truth is
known, a small real SD1-architecture base model trained on it, a judge that reads pictures
of it, and the DreamBooth quality table. Never shipped inside ``lora_dreambooth/``."""
