"""Every project writer, SIGKILLed mid-save: a reload finds the old artifact or the new one.

For each kind of save, two artifacts A and B that differ in every tensor and in their config
are saved in turn by a forked child, which :func:`tests.faults.kill_while_saving` kills at a
random moment. ``check`` reloads the folder with the project's own loader and compares every
reloaded tensor (``torch.equal``) and every config value with A's and with B's expected ones,
so a folder holding parts of both (or a file cut short) fails the test, and so does a
temporary file left behind. Replacing ``atomic_save`` by a plain in-place write (and the card's
atomic write by ``ModelCard.save``) makes these tests fail (checked by hand, in most runs for
every kind; the integer export, one file that safetensors itself writes through a temporary
file, only by the temporary file a kill leaves). ``tests/test_atomic.py`` holds the permanent
control of the harness itself.
"""

from __future__ import annotations

import copy
import json
import types
from collections import Counter

import pytest
import torch
from peft import LoraConfig, get_peft_model

import peft_configs  # noqa: F401  (registers the PEFT methods)
from hf_extensions.atomic import STAGING_NAME, recover_interrupted_save
from hf_extensions.bnn import PeerEnsemble, convert_to_bayesian
from hf_extensions.fhbi.particles import ParticleEnsemble
from hf_extensions.hierarchical_cl.taxonomy import ClassMixture, LabelTree
from hf_extensions.hub import build_model_card, read_model_card_metadata, save_model_card
from hf_extensions.models import (
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_mlp_classifier,
    tiny_stable_diffusion_pipeline,
    tiny_vit_classifier,
)
from tests.faults import kill_while_saving


class Mixed(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _one_thread():
    """No OpenMP thread team in the parent: a forked child that enters an OpenMP region after
    the parent used one waits forever for threads it does not have (GNU libgomp)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scramble(tensors, seed: int) -> None:
    """Give every floating tensor new random values (A and B then differ everywhere)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in tensors:
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))


def _which(found: dict, config, expected: dict) -> str:
    """``"a"`` or ``"b"``: the artifact whose every tensor and config ``found`` / ``config``
    equal; anything else is a mix."""
    for letter, (tensors, wanted) in expected.items():
        if (
            config == wanted
            and found.keys() == tensors.keys()
            and all(
                found[k].shape == tensors[k].shape and torch.equal(found[k], tensors[k])
                for k in tensors
            )
        ):
            return letter
    raise Mixed(f"the reloaded artifact (config {config}) is neither A nor B")


def _run(tmp_path, save, expected, load, interrupted=3):
    """Kill trials of ``save(letter)`` until ``interrupted`` kills landed inside a save (and
    both artifacts were seen); ``load()`` returns ``(tensors, config)``.

    (A single safetensors file is written atomically by safetensors itself, through a hidden
    temporary file; what a plain save of one leaves after a kill is that temporary file.)"""
    seen = kill_while_saving(
        tmp_path,
        lambda: save("a"),
        lambda: save("b"),
        lambda: _which(*load(), expected),
        interrupted=interrupted,
    )
    assert seen["interrupted"] >= interrupted and not (tmp_path / STAGING_NAME).exists()
    # nothing but the artifact is left: no temporary file of a killed write (safetensors' own
    # temporary files included: they died in the staging folder that recovery removed)
    assert not [p.name for p in tmp_path.rglob(".*")], sorted(tmp_path.rglob(".*"))
    return seen


# ---------------------------------------------------------------------------- the save kinds


def test_particle_ensemble(tmp_path):
    def build(rank, particles, seed):
        lora = LoraConfig(
            r=rank, lora_alpha=rank, target_modules=["q_proj"], modules_to_save=["classifier"]
        )
        ensemble = ParticleEnsemble(get_peft_model(tiny_vit_classifier(), lora), particles)
        _scramble(ensemble.particles, seed)
        return ensemble

    ensembles = {"a": build(2, 2, 1), "b": build(4, 3, 2)}  # another rank, another m

    def load():
        loaded = ParticleEnsemble.from_pretrained(tiny_vit_classifier(), tmp_path)
        tensors = dict(zip(loaded.names, loaded.particles))
        return tensors, (loaded.num_particles, loaded.model.peft_config["default"].r)

    expected = {
        k: (dict(zip(e.names, e.particles)), (e.num_particles, e.model.peft_config["default"].r))
        for k, e in ensembles.items()
    }
    _run(tmp_path, lambda k: ensembles[k].save_pretrained(tmp_path), expected, load)


def test_bnn_peer_ensemble(tmp_path):
    def build(mc_samples, prior_std, seed):
        peers = [convert_to_bayesian(tiny_mlp_classifier(), prior_std=prior_std) for _ in "ab"]
        ensemble = PeerEnsemble(peers, mc_samples=mc_samples)
        _scramble(ensemble.state_dict().values(), seed)
        return ensemble

    ensembles = {"a": build(3, 0.1, 1), "b": build(5, 0.2, 2)}

    def load():
        loaded = PeerEnsemble.from_pretrained(
            tmp_path, peer_factory=lambda i: tiny_mlp_classifier()
        )
        return loaded.state_dict(), loaded.ensemble_config()

    expected = {k: (e.state_dict(), e.ensemble_config()) for k, e in ensembles.items()}
    _run(tmp_path, lambda k: ensembles[k].save_pretrained(tmp_path), expected, load, interrupted=6)


def _mixtures(classes, components, seed):
    generator = torch.Generator().manual_seed(seed)
    return {
        c: ClassMixture(
            torch.randn(components, 32, generator=generator),
            torch.rand(components, 32, generator=generator),
            torch.rand(components, generator=generator),
        )
        for c in classes
    }


def test_continual_state(tmp_path):
    from peft_configs.prompt_pool import PromptPoolConfig
    from trainers import HierarchicalPromptCLConfig, HierarchicalPromptCLTrainer

    model = get_peft_model(
        tiny_vit_classifier(),
        PromptPoolConfig(pool_size=2, top_k=1, layers=[0], modules_to_save=["classifier"]),
    )
    trainer = HierarchicalPromptCLTrainer(
        model,
        HierarchicalPromptCLConfig(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True),
    )
    states = {
        "a": dict(
            task_classes=[[0, 1]], _groups=[[0, 1]], taxonomy=None,
            frozen_mixtures=_mixtures([0, 1], 2, 1), prompted_mixtures=_mixtures([0, 1], 2, 2),
            cache={(0, 1): 0.5}, tii=(torch.randn(10, 32), torch.randn(10)),
        ),
        "b": dict(
            task_classes=[[2, 3], [4, 5]], _groups=[[2, 4], [3, 5]],
            taxonomy={"even": [2, 4], "odd": [3, 5]},
            frozen_mixtures=_mixtures([2, 3, 4, 5], 3, 3), prompted_mixtures=_mixtures([2, 3], 3, 4),
            cache={(2, 3): 1.5, (2, 4): 2.5}, tii=(torch.randn(10, 32), torch.randn(10)),
        ),
    }  # fmt: skip

    def save(letter):
        state = states[letter]
        for name in ("task_classes", "_groups", "frozen_mixtures", "prompted_mixtures"):
            setattr(trainer, name, copy.deepcopy(state[name]))
        trainer.taxonomy = LabelTree(state["taxonomy"]) if state["taxonomy"] else None
        trainer.distances.cache = dict(state["cache"])
        trainer.tii_head = torch.nn.Linear(32, 10)
        with torch.no_grad():
            trainer.tii_head.weight.copy_(state["tii"][0])
            trainer.tii_head.bias.copy_(state["tii"][1])
        trainer.save_continual_state(tmp_path)

    def flatten(task_classes, groups, taxonomy, frozen, prompted, cache, tii):
        tensors = {"tii.weight": tii[0], "tii.bias": tii[1]}
        for space, mixtures in (("frozen", frozen), ("prompted", prompted)):
            for c, m in mixtures.items():
                tensors.update({f"{space}.{c}.{n}": getattr(m, n) for n in ("means", "variances", "weights")})  # fmt: skip
        return tensors, (task_classes, groups, taxonomy, cache)

    def load():
        trainer.load_continual_state(tmp_path)
        t = trainer
        taxonomy = None if t.taxonomy is None else t.taxonomy.to_dict()
        tii = (t.tii_head.weight.detach(), t.tii_head.bias.detach())
        return flatten(t.task_classes, t._groups, taxonomy, t.frozen_mixtures, t.prompted_mixtures, t.distances.cache, tii)  # fmt: skip

    expected = {k: flatten(*(s[n] for n in ("task_classes", "_groups", "taxonomy", "frozen_mixtures", "prompted_mixtures", "cache", "tii"))) for k, s in states.items()}  # fmt: skip
    _run(tmp_path, save, expected, load)


def _erased(concept, num_steps, seed):
    from hf_extensions.pipelines import ErasureConfig
    from hf_extensions.pipelines.erasure import ErasureResult
    from hf_extensions.pipelines.parameter_groups import in_group

    pipe = tiny_stable_diffusion_pipeline()
    _scramble(pipe.unet.parameters(), seed)
    names = [n for n, _ in pipe.unet.named_parameters() if in_group(n, "xattn")]
    pipe.erasure_result = ErasureResult(
        method="eap",
        concepts=[concept],
        config=ErasureConfig(num_steps=num_steps, progress_bar=False).to_dict(),
        trained_parameters=names,
    )
    return pipe


@pytest.fixture(scope="module")
def pipes():
    return {"a": _erased("a dog", 3, 1), "b": _erased("a cat", 4, 2)}


def test_erased_artifact_only_changed(tmp_path, pipes):
    from hf_extensions.pipelines import load_erased, save_erased

    base = types.SimpleNamespace(unet=copy.deepcopy(pipes["a"].unet))  # all load_erased uses

    def tensors(pipe):
        state = dict(pipe.unet.named_parameters())
        return {n: state[n] for n in pipe.erasure_result.trained_parameters}

    def record(pipe, card_directory=None):
        result = pipe.erasure_result
        card = (
            read_model_card_metadata(card_directory)["hyperparameters"]["erased_concepts"]
            if card_directory
            else result.concepts
        )
        return result.concepts, result.config["num_steps"], card

    def load():
        load_erased(base, tmp_path)
        return tensors(base), record(base, tmp_path)

    expected = {k: (tensors(p), record(p)) for k, p in pipes.items()}
    save = lambda k: save_erased(pipes[k], tmp_path, only_changed=True)  # noqa: E731
    _run(tmp_path, save, expected, load)


def test_erased_artifact_full_pipeline(tmp_path, pipes):
    from diffusers import UNet2DConditionModel

    from hf_extensions.pipelines import save_erased

    def load():  # diffusers reads a full save; recover first, as every project loader does
        recover_interrupted_save(tmp_path)
        unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
        card = read_model_card_metadata(tmp_path)["hyperparameters"]["erased_concepts"]
        return unet.state_dict(), card

    expected = {k: (p.unet.state_dict(), p.erasure_result.concepts) for k, p in pipes.items()}
    _run(tmp_path, lambda k: save_erased(pipes[k], tmp_path), expected, load, interrupted=6)


def _quantized(model, weight_bits, seed):
    """``model`` quantized round-to-nearest (weights only), every tensor scrambled first."""
    from hf_extensions.quantization import MetaAugConfig
    from hf_extensions.quantization.modules import quantize_model_rtn
    from hf_extensions.quantization.reconstruction import quant_layers

    _scramble(model.eval().parameters(), seed)
    config = MetaAugConfig(weight_bits=weight_bits, activation_bits=None)
    quantize_model_rtn(model, config)
    with (
        torch.no_grad()
    ):  # weights on their integer grid, W = s (q - z), as calibration leaves them
        for _, layer in quant_layers(model):
            view = [-1] + [1] * (layer.weight.dim() - 1)
            s = layer.weight_scale.reshape(view)
            z = layer.weight_zero_point.reshape(view).float()
            q = torch.clamp(torch.round(layer.weight / s) + z, 0, 2**layer.weight_bits - 1)
            layer.weight.copy_((q - z) * s)
    return model, config


def test_quantizer_save(tmp_path):
    from hf_extensions.quantization import MetaAugQuantizer, load_quantized
    from hf_extensions.quantization.models import DigitsResNet

    quantizers = {}
    for letter, bits, seed in (("a", 4, 1), ("b", 2, 2)):
        model, config = _quantized(DigitsResNet(width=4), bits, seed)
        quantizers[letter] = MetaAugQuantizer.from_pretrained(model)
        quantizers[letter].config = config

    def load():
        model = load_quantized(DigitsResNet(width=4), tmp_path)
        return model.state_dict(), json.loads((tmp_path / "quantization_config.json").read_text())

    expected = {k: (q.model.state_dict(), q.config.to_dict()) for k, q in quantizers.items()}
    _run(tmp_path, lambda k: quantizers[k].save(tmp_path), expected, load, interrupted=8)


def test_integer_export(tmp_path):
    """One safetensors file, which safetensors itself writes through a temporary file: a plain
    save of it cannot be caught mixed; a killed one leaves that temporary file (see `_run`)."""
    from hf_extensions.quantization import export_integer, load_integer_export
    from hf_extensions.quantization.models import DigitsResNet

    models = {"a": _quantized(DigitsResNet(width=4), 4, 1), "b": _quantized(DigitsResNet(width=4), 2, 2)}  # fmt: skip

    def load():
        model = load_integer_export(DigitsResNet(width=4), tmp_path)
        return model.state_dict(), model.layer1.conv1.weight_bits

    expected = {k: (m.state_dict(), m.layer1.conv1.weight_bits) for k, (m, _) in models.items()}
    save = lambda k: export_integer(models[k][0], tmp_path, config=models[k][1])  # noqa: E731
    _run(tmp_path, save, expected, load, interrupted=8)


def test_prompt_dsi(tmp_path):
    from hf_extensions.prompt_dsi.dsi import DSIModel

    def build(peft, docs, seed):
        encoder = tiny_bert_classifier().bert
        if peft:
            encoder = get_peft_model(encoder, LoraConfig(r=2, target_modules=["query"]))
        model = DSIModel(encoder, docs[0], pooling="mean" if peft else "cls")
        for n in docs[1:]:
            model.add_documents(n)
        _scramble([p for p in model.parameters() if p.requires_grad or not peft], seed)
        return model

    models = {"a": build(True, [4, 2], 1), "b": build(False, [3], 2)}  # adapter vs full encoder

    def load():
        loaded = DSIModel.from_pretrained(tmp_path, tiny_bert_classifier().bert)
        return loaded.state_dict(), (loaded.pooling, [b.shape[0] for b in loaded.docid_blocks])

    expected = {
        k: (m.state_dict(), (m.pooling, [b.shape[0] for b in m.docid_blocks]))
        for k, m in models.items()
    }
    _run(tmp_path, lambda k: models[k].save_pretrained(tmp_path), expected, load)


def test_shared_prefix_export(tmp_path):
    from peft import PeftModel

    from peft_configs import SharedPrefixTuningConfig

    def build(tokens, seed):
        config = SharedPrefixTuningConfig(num_virtual_tokens=tokens, task_type="CAUSAL_LM")
        model = get_peft_model(tiny_gpt2(), config)
        _scramble([p for n, p in model.named_parameters() if "shared_prefix" in n], seed)
        return model

    models = {"a": build(2, 1), "b": build(3, 2)}

    def load():  # stock PEFT reads the export; recover first, as every project loader does
        recover_interrupted_save(tmp_path)
        loaded = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path))
        config = loaded.peft_config["default"].num_virtual_tokens
        return {"prefix": loaded.prompt_encoder["default"].embedding.weight}, config

    expected = {
        k: ({"prefix": m.materialized_prefix()}, m.peft_config["default"].num_virtual_tokens)
        for k, m in models.items()
    }
    save = lambda k: models[k].export_prefix_tuning(tmp_path)  # noqa: E731
    _run(tmp_path, save, expected, load, interrupted=8)


@pytest.mark.parametrize("trainer_kind", ["bnn"])
def test_trainer_save(tmp_path, trainer_kind):
    from trainers.bnn_mutual_config import BayesianMutualLearningConfig
    from trainers.bnn_mutual_trainer import BayesianMutualLearningTrainer

    trainers = {}
    for letter, mc_samples, seed in (("a", 3, 1), ("b", 5, 2)):
        peers = [convert_to_bayesian(tiny_mlp_classifier()) for _ in "ab"]
        ensemble = PeerEnsemble(peers, mc_samples=mc_samples)
        _scramble(ensemble.state_dict().values(), seed)
        args = BayesianMutualLearningConfig(
            output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, mc_samples=mc_samples
        )
        trainers[letter] = BayesianMutualLearningTrainer(model=ensemble, args=args)

    def load():
        loaded = PeerEnsemble.from_pretrained(
            tmp_path, peer_factory=lambda i: tiny_mlp_classifier()
        )
        return loaded.state_dict(), loaded.ensemble_config()

    expected = {k: (t.model.state_dict(), t.model.ensemble_config()) for k, t in trainers.items()}
    _run(tmp_path, lambda k: trainers[k]._save(str(tmp_path)), expected, load, interrupted=6)


def test_model_card_single_file(tmp_path):
    """A single-file write (temporary file + ``os.replace``): there is no staging folder, so
    an interrupted write shows as the temporary file the kill left behind."""
    text = "x" * 2_000_000  # long enough for kills to land inside the write
    cards = {
        k: build_model_card(f"method-{k}", None, hyperparameters={"k": k}, extra_text=text)
        for k in "ab"
    }

    def check():
        metadata = read_model_card_metadata(tmp_path)
        body = (tmp_path / "README.md").read_text()
        if metadata["method"] != f"method-{metadata['hyperparameters']['k']}" or text not in body:
            raise Mixed("the card mixes two writes or was cut short")
        return metadata["hyperparameters"]["k"]

    seen, left = Counter(), []
    for seed in range(30):  # runs of trials until a kill has landed inside a write
        seen += kill_while_saving(
            tmp_path,
            lambda: save_model_card(cards["a"], tmp_path),
            lambda: save_model_card(cards["b"], tmp_path),
            check,
            interrupted=0,
            seed=seed,
        )
        left = [p.name for p in tmp_path.iterdir() if p.name != "README.md"]
        if left:
            break
    assert seen["a"] and seen["b"] and left
