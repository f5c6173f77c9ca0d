"""lora-dreambooth: DreamBooth LoRA training on the model A1111 already holds.

The engine (everything here but ``host``) imports nothing from A1111. It reads top to
bottom like the lecture: ``config`` → ``data`` → ``model`` / ``targets`` → ``adapters`` →
``train`` → ``export``.
"""
