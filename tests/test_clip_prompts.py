"""CoOp-style prompt learner over a tiny CLIPModel (hf_extensions.pga.clip_prompts)."""

import pytest
import torch

from hf_extensions.models import tiny_clip
from hf_extensions.pga.clip_prompts import CLIPPromptLearner, pretrain_clip_on_labels

NAMES = ["zero", "one", "two"]


@pytest.fixture(scope="module")
def clip_and_tokenizer():
    return tiny_clip()


def _learner(clip_and_tokenizer, **kwargs):
    clip, tokenizer = clip_and_tokenizer
    options = {"n_ctx_shared": 5, "n_ctx_domain": 4, **kwargs}
    return CLIPPromptLearner(clip, tokenizer, NAMES, ["source", "target"], **options)


def test_prompts_are_the_only_trainable_tensors(clip_and_tokenizer):
    learner = _learner(clip_and_tokenizer)
    trainable = {n: tuple(p.shape) for n, p in learner.named_parameters() if p.requires_grad}
    width = learner.clip.text_model.embeddings.token_embedding.embedding_dim
    assert trainable == {
        "shared_ctx": (3, 5, width),
        "domain_ctx.source": (4, width),
        "domain_ctx.target": (4, width),
    }
    learner.train()
    assert learner.training and not learner.clip.training  # frozen encoders stay in eval mode
    shared = _learner(clip_and_tokenizer, class_specific_shared=False).shared_ctx
    assert tuple(shared.shape) == (5, width)


def test_context_embeddings_reproduce_the_hand_written_prompt(clip_and_tokenizer):
    """Contexts set to the token embeddings of "a photo of a" give exactly CLIP's text features
    of "a photo of a {class}." (embeddings path, positions and EOS pooling are right)."""
    clip, tokenizer = clip_and_tokenizer
    learner = _learner(clip_and_tokenizer)
    ids = tokenizer("a photo of a", add_special_tokens=False)["input_ids"]
    assert len(ids) == 9  # byte-level: 5 shared + 4 domain context vectors
    table = clip.text_model.embeddings.token_embedding.weight
    with torch.no_grad():
        learner.shared_ctx.copy_(table[ids[:5]].expand(3, -1, -1))
        learner.domain_ctx["source"].copy_(table[ids[5:]])
    expected = learner.zero_shot_text_features()
    torch.testing.assert_close(learner.text_features("source"), expected, atol=1e-6, rtol=0)
    # and a random context does not
    assert (learner.text_features("target") - expected).abs().max() > 1e-3


def test_domain_loss_gradient_reaches_only_its_prompts(clip_and_tokenizer):
    learner = _learner(clip_and_tokenizer)
    image = learner.image_features(torch.rand(4, 3, 16, 16))
    assert not image.requires_grad
    loss = learner.domain_loss(image, torch.tensor([0, 1, -100, 2]), "source")
    shared, source, target = torch.autograd.grad(
        loss,
        [learner.shared_ctx, learner.domain_ctx["source"], learner.domain_ctx["target"]],
        allow_unused=True,
    )
    assert shared.abs().sum() > 0 and source.abs().sum() > 0 and target is None
    # rows labelled -100 are ignored; a batch without labels gives a zero loss
    assert learner.domain_loss(image, torch.full((4,), -100), "source").item() == 0.0


def test_prediction_averages_domain_softmaxes(clip_and_tokenizer):
    learner = _learner(clip_and_tokenizer)
    pixels = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        image = learner.image_features(pixels)
        each = [
            learner.logits(image, learner.text_features(d)).softmax(-1) for d in learner.domains
        ]
        out = learner(pixels, labels=torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(out["logits"].exp(), (each[0] + each[1]) / 2)
    assert out["loss"].item() > 0


def test_pretraining_makes_zero_shot_meaningful_and_pseudo_labels_threshold():
    """A few seeded steps of class-text CLIP training on separable toy images lift zero-shot
    accuracy from chance; the threshold drops exactly the unconfident rows."""
    clip, tokenizer = tiny_clip(seed=1)
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    pixels = torch.rand(60, 3, 16, 16, generator=generator) * 0.2
    for k in range(3):  # class k lights up a horizontal band
        pixels[labels == k, :, 5 * k : 5 * k + 5, :] += 0.8
    learner = CLIPPromptLearner(clip, tokenizer, NAMES, ["source", "target"], n_ctx_shared=2)
    before = (learner.zero_shot_proba(pixels).argmax(-1) == labels).float().mean()
    pretrain_clip_on_labels(
        clip, tokenizer, pixels, labels, NAMES, steps=60, batch_size=60, learning_rate=1e-3
    )
    assert not any(p.requires_grad for p in clip.parameters())
    probs = learner.zero_shot_proba(pixels)
    after = (probs.argmax(-1) == labels).float().mean()
    assert after >= 0.9 > before
    threshold = float(probs.max(-1).values.median())
    pseudo = learner.pseudo_labels(pixels, threshold=threshold)
    confident = probs.max(-1).values >= threshold
    assert torch.equal(pseudo == -100, ~confident)
    assert torch.equal(pseudo[confident], probs.argmax(-1)[confident])
    with pytest.raises(ValueError, match="threshold"):
        learner.pseudo_labels(pixels, threshold=1.5)
