"""Caption tags as kohya users know them: shuffle_tags, keep_tokens, tag_dropout — seeded,
in the file's metadata, and the conditioning cache turned off only when prompts change."""
from __future__ import annotations

import collections
import copy

import pytest
import torch
from safetensors import safe_open

from lora_dreambooth.config import TrainConfig
from lora_dreambooth.data import DreamBoothDataset, TagPolicy
from lora_dreambooth.demo import draw_character, draw_class_image, write_images
from lora_dreambooth.train import TrainCallbacks, train_lora

PROMPT = "sks, red hair, smiling, outdoors, blue coat, hat, looking up"
FREE = ["red hair", "smiling", "outdoors", "blue coat", "hat", "looking up"]


def draws(policy: TagPolicy, seed: int, n: int, prompt: str = PROMPT) -> list[list[str]]:
    g = torch.Generator().manual_seed(seed)
    return [policy.apply(prompt, g).split(", ") for _ in range(n)]


def test_shuffle_keeps_the_first_keep_tokens_tags_and_permutes_the_rest():
    out = draws(TagPolicy(shuffle=True, keep=2), seed=5, n=200)
    assert all(tags[:2] == ["sks", "red hair"] for tags in out)
    assert all(sorted(tags[2:]) == sorted(FREE[1:]) for tags in out)  # a permutation, nothing lost
    orders = collections.Counter(tuple(tags[2:]) for tags in out)
    assert len(orders) > 50  # 5! = 120 orders: really shuffled, not one fixed order
    firsts = collections.Counter(tags[2] for tags in out)
    assert set(firsts) == set(FREE[1:])  # every free tag gets to come first
    assert draws(TagPolicy(shuffle=True, keep=2), seed=5, n=200) == out  # same seed, same orders
    assert draws(TagPolicy(shuffle=True, keep=2), seed=6, n=200) != out


def test_keep_tokens_zero_lets_the_trigger_move_as_in_kohya():
    out = draws(TagPolicy(shuffle=True, keep=0), seed=1, n=100)
    assert any(tags[0] != "sks" for tags in out)
    assert all(sorted(tags) == sorted(["sks"] + FREE) for tags in out)


def test_dropout_drops_each_free_tag_at_the_rate_and_never_a_kept_one():
    p, n = 0.3, 2000
    out = draws(TagPolicy(keep=1, dropout=p), seed=2, n=n)
    assert all(tags[0] == "sks" for tags in out)
    kept = collections.Counter(tag for tags in out for tag in tags[1:])
    for tag in FREE:
        rate = 1 - kept[tag] / n
        assert abs(rate - p) < 0.04, (tag, rate)  # binomial sd ≈ 0.01
    assert all(tags[1:] == [t for t in FREE if t in tags] for tags in out)  # no shuffle: order kept
    assert draws(TagPolicy(keep=1, dropout=p), seed=2, n=n) == out


def test_a_prompt_that_cannot_vary_is_kept_as_written_and_draws_nothing():
    policy = TagPolicy(shuffle=True, keep=1, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    assert policy.apply("sks,  one tag", g) == "sks,  one tag"  # one free tag: nothing to shuffle
    assert torch.equal(g.get_state(), before)
    assert not policy.varies("sks, one tag") and policy.varies("sks, a, b")
    assert not TagPolicy().varies(PROMPT)  # everything off
    assert TagPolicy(keep=1, dropout=0.1).varies("sks, a") and not TagPolicy(keep=2, dropout=0.1).varies("sks, a")


def test_config_checks_the_tag_fields():
    problems = TrainConfig(keep_tokens=-1, tag_dropout=1.5).problems()
    assert "keep tokens (tags kept in place, the trigger first) must be between 0 and 100" in problems
    assert "tag dropout must be between 0 and 1" in problems
    config = TrainConfig.from_dict({"shuffle_tags": "true", "keep_tokens": 2, "tag_dropout": "0.1"})
    assert (config.shuffle_tags, config.keep_tokens, config.tag_dropout) == (True, 2, 0.1)
    assert config.problems() == []


# --- the dataset and a run ----------------------------------------------------------------

@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tags")
    instance = write_images(str(root / "instance"), draw_character, 3)
    for i in range(3):
        with open(f"{instance}/{i:02d}.txt", "w", encoding="utf-8") as f:
            f.write(f"pose {i}, red hair, blue coat, smiling")
    return {"instance": instance, "class": write_images(str(root / "class"), draw_class_image, 2)}


def config(images: dict[str, str], **changes) -> TrainConfig:
    values = dict(trigger="wpg", instance_dir=images["instance"], steps=6, learning_rate=1e-3,
                  batch_size=1, rank=4, alpha=4.0, resolution=64, seed=3)
    values.update(changes)
    return TrainConfig(**values)


def prompt_stream(dataset: DreamBoothDataset, seed: int, n: int) -> list[str]:
    it = dataset.micro_batches(2, torch.Generator().manual_seed(seed))
    return [p for _ in range(n) for p in next(it).prompts]


def test_dataset_prompts_vary_per_use_with_the_seed_and_the_class_prompt_never(captioned):
    dataset = DreamBoothDataset(config(captioned, shuffle_tags=True, tag_dropout=0.2, regularization=0.5,
                                       class_dir=captioned["class"], class_prompt="a person"))
    assert dataset.prompts_vary
    stream = prompt_stream(dataset, seed=1, n=30)
    instance = [p for p in stream if p != "a person"]
    assert len(instance) == len(stream) / 2  # every class example kept "a person"
    assert all(p.startswith("wpg, ") or p == "wpg" for p in instance)
    assert len(set(instance)) > 10  # orders and dropped tags differ between uses
    assert not set(instance) <= set(dataset.prompts())
    assert prompt_stream(dataset, seed=1, n=30) == stream
    assert prompt_stream(dataset, seed=2, n=30) != stream


def test_without_tag_options_batches_carry_the_prompts_as_written(captioned):
    dataset = DreamBoothDataset(config(captioned))
    assert not dataset.prompts_vary
    assert set(prompt_stream(dataset, seed=1, n=10)) == set(dataset.prompts())


def test_conditioning_cache_is_off_when_tags_change_per_step_and_on_otherwise(
        tiny_sd1, captioned, tmp_path, encoded_prompts):
    """Without tag options the cache is on (test_train proves it encodes each prompt once)."""
    train_lora(tiny_sd1, config(captioned, shuffle_tags=True), str(tmp_path / "a"), str(tmp_path / "ra"))
    assert len(encoded_prompts) == 6  # one micro-batch per step, encoded as it comes
    assert len({p for prompts, _ in encoded_prompts for p in prompts}) > 3  # shuffled variants reached the text encoder
    encoded_prompts.clear()
    # Shuffling a single free tag changes nothing: the cache stays on, each prompt encoded once.
    one_tag = config(captioned, shuffle_tags=True, keep_tokens=4)
    train_lora(tiny_sd1, one_tag, str(tmp_path / "c"), str(tmp_path / "rc"))
    assert sorted(prompts for prompts, _ in encoded_prompts) == sorted([p] for p in DreamBoothDataset(one_tag).prompts())
    assert len(encoded_prompts) == 3


def test_a_run_with_shuffled_tags_trains_and_records_kohya_metadata(tiny_sd1, captioned, tmp_path):
    log: list[str] = []
    result = train_lora(tiny_sd1, config(captioned, shuffle_tags=True, keep_tokens=2, tag_dropout=0.25),
                        str(tmp_path / "lora"), str(tmp_path / "run"), TrainCallbacks(on_log=log.append))
    assert result.steps_done == 6 and not result.cancelled
    assert any("encoded at every step" in line for line in log)
    with safe_open(result.path, "pt") as f:
        metadata = f.metadata()
        assert any(f.get_tensor(k).abs().sum() > 0 for k in f.keys() if "lora_up" in k)
    assert metadata["ss_shuffle_caption"] == "True"
    assert metadata["ss_keep_tokens"] == "2"
    assert metadata["ss_caption_tag_dropout_rate"] == "0.25"


def test_a_resumed_run_sees_the_prompts_of_an_uninterrupted_one(tiny_sd1, captioned, tmp_path, encoded_prompts):
    """The replay of a resumed run draws each replayed micro-batch's tags too, so steps 3-4
    get exactly the prompts an uninterrupted 4-step run gave them."""
    twin = copy.deepcopy(tiny_sd1)
    calls = encoded_prompts
    tags = dict(shuffle_tags=True, tag_dropout=0.3)
    train_lora(tiny_sd1, config(captioned, steps=4, **tags), str(tmp_path / "s"), str(tmp_path / "rs"))
    straight = list(calls)
    calls.clear()
    first = train_lora(twin, config(captioned, steps=2, **tags), str(tmp_path / "f"), str(tmp_path / "rf"))
    train_lora(twin, config(captioned, steps=2, resume_from=first.path,
                            resume_optimizer=str(tmp_path / "rf" / "optimizer.safetensors"), **tags),
               str(tmp_path / "n"), str(tmp_path / "rn"))
    assert len(straight) == 4 and calls == straight
