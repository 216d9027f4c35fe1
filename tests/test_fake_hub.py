"""push_to_hub of transformers, PEFT and diffusers lands in a local folder and reloads exactly."""

from __future__ import annotations

import io
import sys
import types
from concurrent.futures import Future

import diffusers.models.modeling_utils
import diffusers.pipelines.pipeline_utils
import diffusers.utils.hub_utils
import huggingface_hub
import huggingface_hub.hf_api
import huggingface_hub.repocard
import pytest
import torch
from diffusers import UNet2DConditionModel
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    ModelCard,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.repocard import RepoCard
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import AutoTokenizer, BertForSequenceClassification

from hf_extensions.hub import build_model_card, read_model_card_metadata
from hf_extensions.models import (
    byte_level_clip_tokenizer,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_stable_diffusion_pipeline,
)
from hf_extensions.testing import fake_hub


def _card(library_name: str, **hyperparameters):
    return build_model_card(
        "sam",
        "Sharpness-Aware Minimization for Efficiently Improving Generalization",
        arxiv_id="2010.01412",
        hyperparameters=hyperparameters,
        metrics={"accuracy": 0.75},
        library_name=library_name,
    )


def _assert_same_tensors(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name


def test_transformers_model_and_tokenizer(tmp_path):
    model, tokenizer = tiny_bert_classifier(seed=3), byte_level_clip_tokenizer()
    with fake_hub(tmp_path) as hub:
        url = model.push_to_hub("tiny-bert")  # a bare name gets the fake user's namespace
        tokenizer.push_to_hub("tiny-bert")
        _card("transformers", rho=0.05).push_to_hub("fake-user/tiny-bert")  # card after weights
        path = hub.repo_path("fake-user/tiny-bert")
    assert path == tmp_path / "fake-user" / "tiny-bert"
    assert url.repo_url.repo_id == "fake-user/tiny-bert"
    assert [c.message for c in hub.commits] == [
        "Upload BertForSequenceClassification",
        "Upload tokenizer",
        "Upload README.md with huggingface_hub",
    ]
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(
        hub.files("tiny-bert")
    )
    reloaded = BertForSequenceClassification.from_pretrained(path)
    _assert_same_tensors(model.state_dict(), reloaded.state_dict())
    text = "Pushed offline, reloaded exactly."
    assert AutoTokenizer.from_pretrained(path)(text).input_ids == tokenizer(text).input_ids
    metadata = read_model_card_metadata(path)
    assert metadata["method"] == "sam" and metadata["hyperparameters"] == {"rho": 0.05}
    assert metadata["metrics"] == {"accuracy": 0.75} and "arxiv:2010.01412" in metadata["tags"]


def test_peft_adapter_keeps_the_card_pushed_before_it(tmp_path):
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False)
    model = get_peft_model(tiny_gpt2(seed=0), config)
    with fake_hub(tmp_path) as hub:
        HfApi().create_repo("fake-user/lora")
        _card("peft", r=2, lora_alpha=4).push_to_hub("fake-user/lora")
        # transformers' push_to_hub loads the repo's card (through the fake Hub) and keeps it.
        model.push_to_hub("fake-user/lora")
        path = hub.repo_path("fake-user/lora")
    assert hub.files("fake-user/lora") == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    reloaded = PeftModel.from_pretrained(tiny_gpt2(seed=0), path)
    adapter = get_peft_model_state_dict(model)
    assert len(adapter) == 4 and all(t.abs().sum() > 0 for t in adapter.values())
    _assert_same_tensors(adapter, get_peft_model_state_dict(reloaded))
    _assert_same_tensors(model.state_dict(), reloaded.state_dict())
    metadata = read_model_card_metadata(path)
    assert metadata["library_name"] == "peft"
    assert metadata["hyperparameters"] == {"r": 2, "lora_alpha": 4}


def test_diffusers_unet_and_pipeline(tmp_path):
    pipe = tiny_stable_diffusion_pipeline(seed=0)
    with fake_hub(tmp_path) as hub:
        pipe.unet.push_to_hub("unet")
        _card("diffusers", steps=2).push_to_hub("fake-user/unet")
        pipe.push_to_hub("pipe")
    reloaded = UNet2DConditionModel.from_pretrained(hub.repo_path("unet"))
    _assert_same_tensors(pipe.unet.state_dict(), reloaded.state_dict())
    assert read_model_card_metadata(hub.repo_path("unet"))["hyperparameters"] == {"steps": 2}
    files = hub.files("pipe")
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors"} <= set(files)
    assert {"tokenizer/tokenizer.json", "README.md"} <= set(files)


def test_trainer_push_to_hub(tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), report_to=[], hub_model_id="trainer-run", use_cpu=True
    )
    trainer = Trainer(model=tiny_bert_classifier(), args=args)
    with fake_hub(tmp_path / "hub") as hub:
        future = trainer.push_to_hub(blocking=False)
    assert isinstance(future, Future) and future.done()
    assert {"model.safetensors", "README.md"} <= set(hub.files("fake-user/trainer-run"))


def test_commit_operations_are_applied(tmp_path):
    api = HfApi()
    with fake_hub(tmp_path) as hub:
        api.create_repo("me/ops")
        source = tmp_path / "weights.bin"
        source.write_bytes(b"abc")
        api.create_commit(
            "me/ops",
            [
                CommitOperationAdd(path_in_repo="a/weights.bin", path_or_fileobj=str(source)),
                CommitOperationAdd(path_in_repo="b.txt", path_or_fileobj=b"bytes"),
                CommitOperationAdd(path_in_repo="c.txt", path_or_fileobj=io.BytesIO(b"fileobj")),
            ],
            commit_message="add",
        )
        api.create_commit(
            "me/ops",
            [
                CommitOperationCopy(src_path_in_repo="b.txt", path_in_repo="copy/b.txt"),
                CommitOperationDelete(path_in_repo="a/"),
                CommitOperationDelete(path_in_repo="c.txt"),
            ],
            commit_message="move",
        )
        root = hub.repo_path("me/ops")
        assert hub.files("me/ops") == ["b.txt", "copy/b.txt"]
        assert (root / "copy" / "b.txt").read_bytes() == b"bytes"
        assert hub.commits[-1].deleted == ("a/", "c.txt")
        with pytest.raises(ValueError, match="path_in_repo"):
            api.upload_file(path_or_fileobj=b"x", path_in_repo="../escape", repo_id="me/ops")
        with pytest.raises(ValueError, match="inside the repo"):
            hub.hf_hub_download("me/ops", "../../escape")
        with pytest.raises(EntryNotFoundError):
            api.delete_file("missing.txt", repo_id="me/ops")
        with pytest.raises(RepositoryNotFoundError):
            api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="me/unknown")
        with pytest.raises(RevisionNotFoundError):
            api.upload_file(
                path_or_fileobj=b"x", path_in_repo="x", repo_id="me/ops", revision="dev"
            )
        assert hub.files("me/ops") == ["b.txt", "copy/b.txt"]  # failed commits changed nothing


def test_invalid_card_yaml_is_refused(tmp_path):
    api = HfApi()
    with fake_hub(tmp_path) as hub:
        api.create_repo("me/cards")
        not_a_mapping = "---\n- a list\n---\ntext"
        broken_index = "---\nmodel-index:\n- results:\n  - task: {}\n---\n"
        for readme in (not_a_mapping, broken_index):
            with pytest.raises(ValueError, match="Invalid metadata"):
                api.upload_file(
                    path_or_fileobj=readme.encode(), path_in_repo="README.md", repo_id="me/cards"
                )
        assert hub.files("me/cards") == []
        ModelCard("---\nlicense: mit\n---\n\n# ok").push_to_hub("me/cards")
        assert hub.files("me/cards") == ["README.md"]


def test_upload_folder_patterns_branches_and_prs(tmp_path):
    folder = tmp_path / "folder"
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref")
    (folder / "keep.json").write_text("{}")
    (folder / "skip.log").write_text("log")
    api = HfApi()
    with fake_hub(tmp_path / "hub") as hub:
        api.create_repo("me/folder")
        api.upload_file(path_or_fileobj=b"old", path_in_repo="sub/old.json", repo_id="me/folder")
        api.upload_folder(
            repo_id="me/folder",
            folder_path=folder,
            path_in_repo="sub",
            ignore_patterns="*.log",
            delete_patterns="*.json",
        )
        assert hub.files("me/folder") == ["sub/keep.json"]
        api.create_branch("me/folder", branch="dev")
        api.upload_file(
            path_or_fileobj=b"d", path_in_repo="dev.txt", repo_id="me/folder", revision="dev"
        )
        assert hub.files("me/folder", revision="dev") == ["dev.txt", "sub/keep.json"]
        assert hub.files("me/folder") == ["sub/keep.json"]
        info = api.upload_file(
            path_or_fileobj=b"p", path_in_repo="pr.txt", repo_id="me/folder", create_pr=True
        )
        assert info.pr_num == 1 and info.pr_revision == "refs/pr/1"
        assert hub.files("me/folder", revision="refs/pr/1") == ["pr.txt", "sub/keep.json"]
        assert hub.files("me/folder") == ["sub/keep.json"]


def test_everything_is_restored_and_unpatched_calls_fail_fast(tmp_path):
    targets = [
        (HfApi, "create_repo"),
        (HfApi, "create_commit"),
        (HfApi, "create_branch"),
        (HfApi, "upload_folder"),
        (HfApi, "_validate_yaml"),
        (RepoCard, "validate"),
        (huggingface_hub.repocard, "hf_hub_download"),
        (huggingface_hub.hf_api, "create_repo"),
        (diffusers.utils.hub_utils, "create_repo"),
        (diffusers.utils.hub_utils, "upload_folder"),
        (diffusers.pipelines.pipeline_utils, "create_repo"),
        (diffusers.models.modeling_utils, "create_repo"),
    ]
    before = [vars(owner)[name] for owner, name in targets]
    late = types.ModuleType("late_import_during_fake_hub")
    sys.modules[late.__name__] = late
    try:
        with pytest.raises(RuntimeError, match="inside"), fake_hub(tmp_path):
            assert all(vars(o)[n] is not b for (o, n), b in zip(targets, before))
            exec("from huggingface_hub import create_repo, upload_folder", vars(late))
            assert late.create_repo("me/late").repo_id == "me/late"  # the fake one
            with pytest.raises(OfflineModeIsEnabled):  # not emulated: no network either
                HfApi().model_info("me/late")
            raise RuntimeError("error inside the context")
        assert all(vars(o)[n] is b for (o, n), b in zip(targets, before))
        assert late.create_repo is huggingface_hub.hf_api.create_repo
        assert late.upload_folder is huggingface_hub.hf_api.upload_folder
    finally:
        del sys.modules[late.__name__]
