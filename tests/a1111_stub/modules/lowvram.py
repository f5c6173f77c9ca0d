"""Stand-in for modules/lowvram.py: A1111 marks a model set up for --lowvram/--medvram."""


def is_enabled(sd_model) -> bool:
    return sd_model.lowvram
