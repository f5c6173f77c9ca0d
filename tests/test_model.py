"""The model adapter: the only engine code that touches ldm internals."""
import pytest
import torch

from lora_dreambooth.model import LdmBackend, UnsupportedModelError


class A1111StyleEmbedder(torch.nn.Module):
    """The shape of A1111's FrozenCLIPEmbedderWithCustomWords: the embedder is `.wrapped`
    and the module itself is called with a list of prompts (no `.encode`)."""

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, prompts):
        return self.wrapped(prompts)


def test_noise_schedule_is_the_models_own(tiny_sd1):
    backend = LdmBackend(tiny_sd1)
    scheduler = backend.training_scheduler()
    assert torch.allclose(scheduler.alphas_cumprod.double(), tiny_sd1.alphas_cumprod.double(), atol=1e-6)
    assert scheduler.config.prediction_type == "epsilon"
    assert backend.sampling_scheduler().config.algorithm_type == "dpmsolver++"


def test_schedule_comes_from_the_fp32_alphas_cumprod_a1111_keeps_when_it_halves_the_model(tiny_sd1):
    """A1111 halves the model but keeps ``alphas_cumprod`` in fp32; ldm's ``betas`` buffer goes
    to fp16 with the rest, and a schedule built from it would be off by fp16 rounding."""
    exact = tiny_sd1.alphas_cumprod.double().clone()
    tiny_sd1.betas = tiny_sd1.betas.half()
    scheduler = LdmBackend(tiny_sd1).training_scheduler()
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), exact, rtol=0, atol=1e-6)


def test_latents_are_the_models_encoding_sampled_with_our_generator(tiny_sd1):
    backend = LdmBackend(tiny_sd1)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    moments = backend.encode_moments(pixels)
    ours = backend.latents_from_moments(moments, torch.Generator().manual_seed(7))
    torch.manual_seed(7)  # ldm samples the posterior from the global RNG
    with torch.no_grad():
        reference = tiny_sd1.get_first_stage_encoding(tiny_sd1.encode_first_stage(pixels))
    assert torch.allclose(ours, reference, atol=1e-6)
    other = backend.latents_from_moments(moments, torch.Generator().manual_seed(8))
    assert not torch.allclose(ours, other)


@pytest.mark.parametrize("height, width", [(64, 64), (64, 128), (72, 100), (65, 67)])
def test_the_latent_shape_is_known_without_encoding(tiny_sd1, height, width):
    backend = LdmBackend(tiny_sd1)
    pixels = torch.zeros(2, 3, height, width)
    encoded = torch.chunk(backend.encode_moments(pixels), 2, dim=1)[0].shape
    assert backend.latent_shape(pixels.shape) == encoded


def test_wrapped_embedder_gives_the_same_conditioning(tiny_sd1):
    plain = LdmBackend(tiny_sd1).encode_prompts(["a photo of wpg", ""])
    tiny_sd1.cond_stage_model = A1111StyleEmbedder(tiny_sd1.cond_stage_model)
    wrapped = LdmBackend(tiny_sd1).encode_prompts(["a photo of wpg", ""])
    assert torch.equal(plain, wrapped)
    assert plain.shape == (2, 77, 32)


def test_v_parameterization_uses_velocity(tiny_clip_dir):
    from lora_dreambooth.tiny import build_tiny_sd1
    backend = LdmBackend(build_tiny_sd1(clip_dir=tiny_clip_dir, parameterization="v"))
    assert backend.training_scheduler().config.prediction_type == "v_prediction"


def test_unsupported_families_are_refused_with_a_message(tiny_sd1):
    tiny_sd1.is_sdxl = True
    with pytest.raises(UnsupportedModelError, match="SDXL"):
        LdmBackend(tiny_sd1)
    with pytest.raises(UnsupportedModelError):
        LdmBackend(torch.nn.Linear(2, 2))


def test_gradient_checkpointing_gives_the_same_gradients_and_leaves_no_trace(tiny_sd1):
    backend = LdmBackend(tiny_sd1)
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    cond = backend.encode_prompts(["a photo"]).detach()
    target = next(m for m in tiny_sd1.model.diffusion_model.modules() if type(m).__name__ == "ResBlock")
    weight = target.in_layers[2].weight

    def grad(checkpointing: bool) -> torch.Tensor:
        weight.grad = None
        with backend.gradient_checkpointing(checkpointing):
            if checkpointing:
                assert "forward" in vars(target)
            backend.predict(x, t, cond).square().mean().backward()
        return weight.grad.clone()

    assert torch.allclose(grad(False), grad(True), atol=1e-6)
    assert all("forward" not in vars(m) for m in tiny_sd1.modules())
