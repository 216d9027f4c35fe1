"""HierarchicalPromptCLTrainer: HiDe-Prompt learner + taxonomy SupCon + OT (arXiv 2410.04327)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import DatasetDict
from peft import PeftModel, get_peft_model
from transformers import DefaultDataCollator, PrinterCallback

import peft_configs  # noqa: F401
from hf_extensions.data import class_incremental_stream, load_digits
from hf_extensions.hierarchical_cl.supcon import (
    grouped_supervised_contrastive_loss,
    supervised_contrastive_loss,
)
from hf_extensions.hierarchical_cl.taxonomy import ClassMixture, LabelTree
from hf_extensions.models import tiny_vit_classifier
from hf_extensions.models.image_classification import pretrain_classifier
from peft_configs.prompt_pool import PromptPoolConfig
from trainers import HierarchicalPromptCLConfig, HierarchicalPromptCLTrainer
from trainers.hierarchical_cl_trainer import hide_regulariser, same_group_cosine

TREE = {
    "round": {"loops": ["0", "6", "8", "9"]},
    "straight": ["1", "4", "7"],
    "curvy": ["2", "3", "5"],
}


@pytest.fixture(scope="module")
def stream():
    data = load_digits(0)
    small = DatasetDict(
        train=data["train"].select(range(300)), test=data["test"].select(range(150))
    )
    return class_incremental_stream(
        small, num_tasks=3, classes_per_task=2, class_order=[0, 8, 1, 7, 3, 6]
    )


@pytest.fixture(scope="module")
def backbone():
    """A tiny ViT pretrained on digits' validation split (the frozen backbone), head reset."""
    data = load_digits(0)["validation"]
    model = tiny_vit_classifier(num_layers=2, seed=0)
    pixels = torch.as_tensor(np.asarray(data["pixel_values"], dtype=np.float32))
    pretrain_classifier(model, pixels, torch.as_tensor(data["labels"]), epochs=15, seed=0)
    torch.manual_seed(1)
    model.classifier.reset_parameters()
    return model


def _trainer(tmp_path, backbone, pool_size=3, **overrides) -> HierarchicalPromptCLTrainer:
    torch.manual_seed(0)  # the prompts are drawn from the global generator
    model = get_peft_model(
        copy.deepcopy(backbone),
        PromptPoolConfig(
            pool_size=pool_size,
            top_k=1,
            layers=[0, 1],
            prompt_length=3,
            key_source="fixed",
            modules_to_save=["classifier"],
        ),
    )
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        num_train_epochs=1,
        learning_rate=0.03,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        num_components=3,
        ot_samples=40,
        ca_epochs=2,
        tii_epochs=3,
        replay_factor=2,
        reg_glob=0.05,
        reg_sub=0.1,
    )
    settings.update(overrides)
    trainer = HierarchicalPromptCLTrainer(
        model,
        HierarchicalPromptCLConfig(**settings),
        taxonomy=LabelTree(TREE),
        data_collator=DefaultDataCollator(),
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


# ------------------------------------------------------------------------------- losses
def test_grouped_supcon_with_gamma_and_self_equals_the_per_group_loop():
    torch.manual_seed(0)
    features = torch.randn(24, 5, dtype=torch.float64)
    labels = torch.randint(0, 6, (24,))
    labels[-1] = 9  # a class in no group: ignored
    groups = [[0, 1, 2], [3, 4], [5]]
    gamma = torch.rand(10, 10, dtype=torch.float64)
    gamma = (gamma + gamma.T) / 2
    for include_self in (False, True):
        value = grouped_supervised_contrastive_loss(
            features, labels, groups, 0.2, gamma, include_self
        )
        expected = 0.0
        for group in groups:
            mask = torch.isin(labels, torch.tensor(group))
            if int(mask.sum()) > 1:
                expected += float(
                    supervised_contrastive_loss(
                        features[mask], labels[mask], 0.2, gamma, include_self
                    )
                )
        assert float(value) == pytest.approx(expected / len(groups), rel=1e-10)


def test_hide_regulariser_is_the_cross_entropy_of_the_similarity_rows():
    torch.manual_seed(0)
    features, centroids = torch.randn(4, 3), torch.randn(5, 3)
    rows = torch.cat([centroids, features])
    expected = np.mean(
        [-torch.log_softmax(rows @ rows[i] / 0.8, dim=0)[i].item() for i in range(len(rows))]
    )
    assert float(hide_regulariser(features, centroids, 0.8)) == pytest.approx(expected, rel=1e-5)
    alone = np.mean(
        [-torch.log_softmax(features @ features[i] / 0.8, 0)[i].item() for i in range(4)]
    )
    assert float(hide_regulariser(features, None, 0.8)) == pytest.approx(alone, rel=1e-5)


def test_same_group_cosine_matches_a_hand_computation():
    new = {7: torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    old = {1: torch.tensor([1.0, 1.0]), 2: torch.tensor([-1.0, 0.0])}
    value = same_group_cosine(new, old, [[1, 7], [2]])
    assert value == pytest.approx(float(np.mean([1 / np.sqrt(2), 1 / np.sqrt(2)])))
    assert same_group_cosine(new, old, [[1], [2, 3]]) is None


def test_supcon_terms_push_new_features_away_from_same_group_old_ones():
    """The mechanism on free features: the grouped term lowers cos(new, old same-group mean)."""
    torch.manual_seed(0)
    old_mean = torch.randn(16)
    old = old_mean + 0.3 * torch.randn(64, 16)
    start = old_mean + torch.randn(16) + 0.3 * torch.randn(16, 16)
    labels = torch.cat([torch.full((16,), 5), torch.full((64,), 3)])

    def final_cosine(weight: float) -> float:
        new = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([new], lr=0.01)
        for _ in range(100):
            loss = weight * grouped_supervised_contrastive_loss(
                torch.cat([new, old]), labels, [[3, 5]], 0.1
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return float(F.cosine_similarity(new.detach(), old_mean[None]).mean())

    assert final_cosine(1.0) < final_cosine(0.0) - 0.1  # weight 0: the features stay put


# ------------------------------------------------------------------------------- config
def test_trainer_refuses_a_model_without_a_prompt_pool(tmp_path):
    with pytest.raises(ValueError, match="prompt-pool"):
        HierarchicalPromptCLTrainer(
            tiny_vit_classifier(), HierarchicalPromptCLConfig(output_dir=str(tmp_path))
        )


# ------------------------------------------------------------------------------- learner
@pytest.fixture(scope="module")
def learned(stream, backbone, tmp_path_factory):
    """A learner after the whole 3-task stream, plus the frozen backbone weights before it."""
    trainer = _trainer(tmp_path_factory.mktemp("learned"), backbone)
    base = trainer.model.get_base_model()
    frozen_before = {
        name: p.detach().clone()
        for name, p in base.named_parameters()
        if "prompt_pool" not in name and "classifier" not in name
    }
    prompts_after_task0 = {}
    original_begin = trainer._begin_task

    def begin(dataset, classes):
        original_begin(dataset, classes)
        if len(trainer.task_classes) == 2:
            prompts_after_task0["pool"] = trainer._pool().prompts().clone()

    trainer._begin_task = begin
    result = trainer.fit_stream(stream)
    return trainer, result, frozen_before, prompts_after_task0


def test_stream_result_has_the_accuracy_matrix_and_metrics(learned):
    trainer, result, _, _ = learned
    acc = np.array(result["accuracy_matrix"])
    assert acc.shape == (3, 3)
    assert np.isnan(acc[np.triu_indices(3, k=1)]).all()
    assert np.isfinite(acc[np.tril_indices(3)]).all()
    assert result["faa"] == pytest.approx(acc[-1].mean())
    assert len(result["tii_accuracy"]) == 3
    # task 1 (1, 7) shares no leaf with task 0 (0, 8); task 2's 6 shares "round/loops" with 0, 8
    assert len(result["same_group_cosine"]) == 1
    assert trainer.seen_classes == [0, 8, 1, 7, 3, 6]
    # the learner is far above chance (1/6) on the 6 classes after the stream
    assert result["faa"] > 0.4


def test_only_prompts_and_head_change_the_backbone_stays_bit_identical(learned):
    trainer, _, frozen_before, _ = learned
    base = trainer.model.get_base_model()
    for name, p in base.named_parameters():
        if name in frozen_before:
            assert torch.equal(p, frozen_before[name]), name


def test_prompt_of_a_new_task_starts_from_the_previous_one(learned):
    trainer, _, _, snapshot = learned
    pool = snapshot["pool"]
    assert torch.equal(pool[1], pool[0])  # copied at the start of task 1
    assert not torch.equal(trainer._pool().prompts()[1], trainer._pool().prompts()[0])


def test_statistics_ot_cache_and_groups_grow_with_the_stream(learned):
    trainer, _, _, _ = learned
    assert set(trainer.frozen_mixtures) == set(trainer.prompted_mixtures) == {0, 8, 1, 7, 3, 6}
    assert trainer.distances.solves == 15  # each of the 6·5/2 pairs solved once (cached)
    assert sorted(map(sorted, trainer._groups)) == [[0, 6, 8], [1, 7], [3]]


def test_replay_draws_only_earlier_classes_from_their_mixtures(backbone, tmp_path):
    trainer = _trainer(tmp_path, backbone)
    trainer.task_classes = [[0, 8], [1, 7]]
    trainer.prompted_mixtures = {
        c: ClassMixture(torch.full((2, 3), float(c)), torch.zeros(2, 3), torch.tensor([0.5, 0.5]))
        for c in (0, 8)
    }
    trainer._build_replay_table()
    features, labels = trainer._replay(10)
    assert features.shape == (20, 3) and set(labels.tolist()) <= {0, 8}
    assert torch.equal(features, labels[:, None].float().expand(-1, 3))  # zero variance: the mean
    again, _ = trainer._replay(10)
    assert torch.equal(features, again)  # seeded by (seed, step, rank)


def test_loss_is_masked_ce_plus_the_weighted_terms(stream, backbone, tmp_path):
    trainer = _trainer(tmp_path, backbone, hide_reg=0.3, reg_glob=0.2, reg_sub=0.5)
    trainer.train_task(stream[0]["train"], stream.task_classes[0])
    trainer._begin_task(stream[1]["train"], stream.task_classes[1])
    rows = stream[1]["train"].select(range(8))
    batch = DefaultDataCollator()([{k: r[k] for k in ("pixel_values", "labels")} for r in rows])
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with trainer._head_input() as captured:
        logits = trainer.model(pixel_values=batch["pixel_values"], prompt_ids=1).logits
    features = captured[0]
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[1, 7]] = True
    ce = F.cross_entropy(logits.masked_fill(~mask, float("-inf")), batch["labels"])
    replay_features, replay_labels = trainer._replay(8)
    all_f = torch.cat([features, replay_features])
    all_y = torch.cat([batch["labels"], replay_labels])
    expected = (
        ce
        + 0.3 * hide_regulariser(features, trainer._old_centroids, 0.8)
        + 0.2 * supervised_contrastive_loss(all_f, all_y, 0.1)
        + 0.5
        * grouped_supervised_contrastive_loss(all_f, all_y, trainer._groups, 0.1, trainer._gamma)
    )
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    trainer.args.hierarchical, trainer.args.hide_reg = False, 0.0
    assert float(trainer.compute_loss(trainer.model, dict(batch))) == pytest.approx(
        float(ce), rel=1e-5
    )


def test_training_a_class_twice_or_past_the_pool_is_refused(stream, backbone, tmp_path):
    trainer = _trainer(tmp_path, backbone, pool_size=1)
    trainer.train_task(stream[0]["train"], stream.task_classes[0])
    with pytest.raises(ValueError, match="earlier task"):
        trainer.train_task(stream[0]["train"], stream.task_classes[0])
    with pytest.raises(ValueError, match="pool_size"):
        trainer.train_task(stream[1]["train"], stream.task_classes[1])


def test_rescoring_matches_the_official_formula_written_as_loops(learned):
    trainer, _, _, _ = learned
    torch.manual_seed(0)
    logits = torch.full((4, 10), float("-inf"))
    seen = trainer.seen_classes
    logits[:, seen] = torch.randn(4, len(seen))
    features = torch.randn(4, trainer.prompted_mixtures[0].means.shape[1])
    got = trainer._rescore(logits, features)
    w = trainer.eval_distances.matrix(trainer.prompted_mixtures, 10)
    expected = torch.full_like(logits, float("-inf"))
    for n in range(4):
        dist = {}
        for c in seen:
            m = trainer.prompted_mixtures[c]
            dist[c] = min(
                float(((features[n] - mu) ** 2 / (var + 1e-6)).sum().sqrt())
                for mu, var in zip(m.means, m.variances)
            )
        energies, scaled = [], {}
        for group in trainer._groups:
            best = max(group, key=lambda c: float(logits[n, c]))
            d = sum(float(w[best, j]) * dist[j] for j in group)
            e = np.exp(float(logits[n, best]) - 0.01 * d)
            energies.append(e)
            for j in group:
                scaled[j] = float(logits[n, j]) * e
        for j, v in scaled.items():
            expected[n, j] = v / sum(energies)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_save_and_reload_predict_identically(learned, stream, backbone, tmp_path):
    trainer, _, _, _ = learned
    trainer.save_model(str(tmp_path))
    before = trainer.predict_classes(stream[2]["test"])
    reloaded = PeftModel.from_pretrained(copy.deepcopy(backbone), str(tmp_path))
    fresh = HierarchicalPromptCLTrainer(
        reloaded,
        copy.copy(trainer.args),
        data_collator=DefaultDataCollator(),
    )
    fresh.load_continual_state(tmp_path)
    after = fresh.predict_classes(stream[2]["test"])
    for key in ("predictions", "task_predictions"):
        np.testing.assert_array_equal(before[key], after[key])
    assert fresh.taxonomy.to_dict() == TREE
