"""The config: validation in words, presets and the lecture's epoch arithmetic."""
import pytest

from lora_dreambooth.config import (PRESETS, ConfigError, TrainConfig, apply_preset,
                                    epoch_arithmetic)


def test_defaults_are_valid():
    assert TrainConfig().problems() == []
    assert TrainConfig().resolution == 512


def test_every_problem_is_reported_at_once():
    config = TrainConfig(trigger="  ", rank=0, steps=0, learning_rate=5.0, network="glora",
                         resolution=500, regularization=0.5, class_prompt="")
    with pytest.raises(ConfigError) as caught:
        config.validate()
    problems = caught.value.problems
    assert "trigger must not be empty" in problems
    assert "rank must be between 1 and 128" in problems
    assert "steps must be between 1 and 100000" in problems
    assert "learning rate must be between 1e-07 and 0.1" in problems
    assert any(p.startswith("network type must be one of") for p in problems)
    assert any(p.startswith("resolution must be a multiple of 64") for p in problems)
    assert any(p.startswith("class prompt is needed") for p in problems)
    assert len(problems) == 7


@pytest.mark.parametrize("trigger", ["<wpg>", "wpg:1", "a>b"])
def test_trigger_with_prompt_syntax_is_refused(trigger):
    assert any("trigger must not contain" in p for p in TrainConfig(trigger=trigger).problems())


@pytest.mark.parametrize("name", ["../evil", "a/b", "c:\\x", "..", "bad|name", "trail."])
def test_name_with_path_characters_is_refused(name):
    assert any("LoRA name must not contain" in p for p in TrainConfig(name=name).problems())


def test_name_defaults_to_trigger():
    assert TrainConfig(trigger="wpg").output_name == "wpg"
    assert TrainConfig(trigger="wpg", name="my-lora").output_name == "my-lora"
    assert TrainConfig(trigger="wpg").effective_preview_prompt == "wpg"


def test_from_dict_coerces_and_rejects_unknown_and_bad_types():
    config = TrainConfig.from_dict({"trigger": "wpg", "steps": "300", "rank": 16.0,
                                    "train_text_encoder": "true", "learning_rate": "1e-3"})
    assert (config.steps, config.rank, config.train_text_encoder, config.learning_rate) == (300, 16, True, 1e-3)
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_dict({"trigger": "wpg", "stepz": 3, "rank": "many", "steps": 2.5})
    assert caught.value.problems == ["unknown setting 'stepz'"]
    with pytest.raises(ConfigError) as caught:  # no untyped catch-all field
        TrainConfig.from_dict({"trigger": "wpg", "extra": {"anything": 1}})
    assert caught.value.problems == ["unknown setting 'extra'"]
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_dict({"rank": "many", "steps": 2.5})
    assert len(caught.value.problems) == 2


def test_presets_follow_the_lecture():
    dedicated = apply_preset(TrainConfig(), "Dedicated")
    assert dedicated.regularization == 0
    assert 100 <= dedicated.steps <= 200
    assert dedicated.batch_size * dedicated.learning_rate == pytest.approx(1e-3)
    generative = apply_preset(TrainConfig(class_prompt="woman"), "Generative")
    assert 0.1 <= generative.regularization <= 1
    assert generative.steps > dedicated.steps
    assert generative.problems() == []
    assert set(PRESETS) == {"Dedicated", "Generative"}
    with pytest.raises(ConfigError):
        apply_preset(TrainConfig(), "Nope")


def test_epoch_arithmetic_matches_the_lecture():
    # "5 images, 3 epochs = 15 samples; batch 2 needs 8 steps" -> 8 steps at batch 2 = 16 samples.
    result = epoch_arithmetic(images=5, batch_size=2, accumulation=1, steps=8)
    assert result.samples_seen == 16 and result.epochs == pytest.approx(3.2)
    four = epoch_arithmetic(images=4, batch_size=2, accumulation=1, steps=400)
    assert four.epochs == 200
    assert four.describe(2, 1, 400) == "4 images, batch 2, accumulation 1, 400 steps → 800 samples, 200 epochs"
    assert epoch_arithmetic(images=4, batch_size=1, accumulation=4, steps=100).samples_per_step == 4
