"""A local stand-in for the Hugging Face Hub, so that ``push_to_hub`` can be tested offline.

``with fake_hub(tmp_path) as hub:`` makes every ``push_to_hub`` of the ecosystem commit into
``tmp_path/<namespace>/<name>`` instead of the network:

* ``transformers`` models and tokenizers and ``peft`` adapters (``PushToHubMixin``: the shared
  ``HfApi`` instance's ``create_repo`` / ``create_branch`` / ``create_commit``, and
  ``ModelCard.load`` of the repo's existing card, which goes through ``hf_hub_download``);
* ``diffusers`` models, schedulers and pipelines (their modules bind ``create_repo`` /
  ``upload_folder`` at import time, so these names are replaced wherever they were imported);
* ``Trainer.push_to_hub`` (``upload_folder``, also with ``run_as_future=True``);
* ``ModelCard.push_to_hub`` (``upload_file`` -> ``create_commit``; the remote YAML validation,
  ``RepoCard.validate`` and ``HfApi._validate_yaml``, is done locally instead).

Commits really apply ``CommitOperationAdd`` (from a path, bytes or a file object),
``CommitOperationDelete`` and ``CommitOperationCopy`` to the local folder, refuse paths that
leave the repository, check a README's YAML as the Hub would, and fail like the Hub for an
unknown repo, revision or file. Branches live beside the main folder as
``<name>@<quoted branch>`` and ``create_pr=True`` opens ``refs/pr/<n>``. Everything is restored on
exit, including names that modules imported while the context was open. Run with
``HF_HUB_OFFLINE=1``: anything left unpatched (``model_info``, dataset pushes, downloads other
than a repo card) then fails fast instead of reaching the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import sys
import urllib.parse
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from unittest import mock

import huggingface_hub.hf_api as hf_api_module
import huggingface_hub.repocard as repocard_module
from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    DatasetCard,
    HfApi,
    ModelCard,
    RepoUrl,
    SpaceCard,
    constants,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.repocard import RepoCard
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects, validate_repo_id

try:  # huggingface_hub 2.x speaks httpx2, 1.x httpx; errors carry a response of that library.
    import httpx2 as _http
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    import httpx as _http

__all__ = ["FakeCommit", "FakeHub", "fake_hub"]

#: HfApi methods replaced on the class, and replaced wherever a module holds the bound
#: ``huggingface_hub.<name>`` (``from huggingface_hub import create_repo``, as diffusers does).
_PATCHED_API_METHODS = ("create_repo", "create_branch", "create_commit", "upload_folder")
_REPO_TYPE_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_CARD_CLASS = {"model": ModelCard, "dataset": DatasetCard, "space": SpaceCard}


@dataclass(frozen=True)
class FakeCommit:
    """One commit that landed in the fake Hub (for assertions on what was pushed)."""

    repo_id: str
    repo_type: str
    revision: str
    message: str
    description: str
    added: tuple[str, ...]
    deleted: tuple[str, ...]
    oid: str


def _http_error(
    error_class: type[HfHubHTTPError], status: int, message: str, url: str
) -> Exception:
    """An error of the class and status the Hub would answer with (they need a response)."""
    response = _http.Response(status, request=_http.Request("POST", url))
    return error_class(message, response=response)


def _check_card_yaml(content: str, repo_type: str) -> None:
    """Validate a README's metadata locally, as the Hub's ``/api/validate-yaml`` would.

    Parsing with the card class of the repo type checks that the front matter is a YAML mapping
    and, for models, that a ``model-index`` is well formed. Raises ``ValueError`` otherwise.
    """
    card_class = _CARD_CLASS.get(repo_type, RepoCard)
    try:
        card_class(content)
    except Exception as error:
        raise ValueError(f"Invalid metadata in README.md.\n- {error}") from error


class FakeHub:
    """The state of a fake Hub rooted at a local folder; yielded by :func:`fake_hub`."""

    def __init__(self, root: str | Path, namespace: str = "fake-user") -> None:
        self.root = Path(root)
        self.namespace = namespace
        self.commits: list[FakeCommit] = []
        self._pull_requests: dict[str, int] = {}

    # ----------------------------------------------------------------------------- queries
    def full_repo_id(self, repo_id: str) -> str:
        """``repo_id`` with the namespace the Hub would add to a bare name."""
        repo_id = repo_id if "/" in repo_id else f"{self.namespace}/{repo_id}"
        validate_repo_id(repo_id)
        return repo_id

    def repo_path(
        self, repo_id: str, revision: str | None = None, repo_type: str | None = None
    ) -> Path:
        """The local folder of a repository's branch (``main`` by default)."""
        repo_type = repo_type or constants.REPO_TYPE_MODEL
        if repo_type not in _REPO_TYPE_PREFIX:
            raise ValueError(f"repo_type={repo_type!r} must be one of {list(_REPO_TYPE_PREFIX)}.")
        folder = self.root / _REPO_TYPE_PREFIX[repo_type] / self.full_repo_id(repo_id)
        if revision is None or revision == constants.DEFAULT_REVISION:
            return folder
        return folder.with_name(f"{folder.name}@{urllib.parse.quote(revision, safe='')}")

    def repo_exists(self, repo_id: str, repo_type: str | None = None) -> bool:
        """Whether ``create_repo`` has made this repository."""
        return self.repo_path(repo_id, repo_type=repo_type).is_dir()

    def files(
        self, repo_id: str, revision: str | None = None, repo_type: str | None = None
    ) -> list[str]:
        """Sorted POSIX paths of the files in a repository branch."""
        folder = self.repo_path(repo_id, revision, repo_type)
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    # ------------------------------------------------------------------------ Hub methods
    def create_repo(
        self,
        repo_id: str,
        *,
        token: str | bool | None = None,
        private: bool | None = None,
        repo_type: str | None = None,
        exist_ok: bool = False,
        **hub_side_options: Any,
    ) -> RepoUrl:
        """Make ``root/<namespace>/<name>``; settings with no local meaning are accepted."""
        del token, private, hub_side_options
        repo_type = repo_type or constants.REPO_TYPE_MODEL
        repo_id = self.full_repo_id(repo_id)
        folder = self.repo_path(repo_id, repo_type=repo_type)
        url = self._url(repo_id, repo_type)
        if folder.is_dir() and not exist_ok:
            raise _http_error(HfHubHTTPError, 409, f"409 Conflict: {repo_id} already exists.", url)
        folder.mkdir(parents=True, exist_ok=True)
        return RepoUrl(url, endpoint=constants.ENDPOINT)

    def create_branch(
        self,
        repo_id: str,
        *,
        branch: str,
        revision: str | None = None,
        token: str | bool | None = None,
        repo_type: str | None = None,
        exist_ok: bool = False,
    ) -> None:
        """Copy ``revision`` (default ``main``) of the repository to a new branch folder."""
        del token
        source = self._existing_branch(repo_id, revision, repo_type)
        target = self.repo_path(repo_id, branch, repo_type)
        if target.is_dir():
            if exist_ok:
                return
            raise _http_error(HfHubHTTPError, 409, f"409 Conflict: branch {branch!r} exists.", "")
        shutil.copytree(source, target)

    def create_commit(
        self,
        repo_id: str,
        operations: Iterable[CommitOperationAdd | CommitOperationDelete | CommitOperationCopy],
        *,
        commit_message: str,
        commit_description: str | None = None,
        token: str | bool | None = None,
        repo_type: str | None = None,
        revision: str | None = None,
        create_pr: bool | None = None,
        num_threads: int = 5,
        parent_commit: str | None = None,
        run_as_future: bool = False,
        _hot_reload: bool | None = None,
    ) -> CommitInfo | Future[CommitInfo]:
        """Apply the operations to the branch folder, all checked before any is applied."""
        del token, num_threads, parent_commit, _hot_reload
        repo_type = repo_type or constants.REPO_TYPE_MODEL
        repo_id = self.full_repo_id(repo_id)
        operations = list(operations)
        pr_url = None
        if create_pr:
            base = self._existing_branch(repo_id, revision, repo_type)
            number = self._pull_requests.get(repo_id, 0) + 1
            self._pull_requests[repo_id] = number
            revision = f"refs/pr/{number}"
            shutil.copytree(base, self.repo_path(repo_id, revision, repo_type))
            pr_url = f"{self._url(repo_id, repo_type)}/discussions/{number}"
        folder = self._existing_branch(repo_id, revision, repo_type)

        additions, deletions, copies = [], [], []
        for operation in operations:
            target = self._inside(folder, operation.path_in_repo)
            if isinstance(operation, CommitOperationAdd):
                if operation.path_in_repo == constants.REPOCARD_NAME:
                    with operation.as_file() as file:
                        _check_card_yaml(file.read().decode("utf-8"), repo_type)
                additions.append((operation, target))
            elif isinstance(operation, CommitOperationDelete):
                if not target.exists():
                    raise _http_error(
                        RemoteEntryNotFoundError, 404, f"No {operation.path_in_repo} to delete.", ""
                    )
                deletions.append((operation, target))
            elif isinstance(operation, CommitOperationCopy):
                source_folder = self._existing_branch(
                    operation.src_repo_id or repo_id,
                    operation.src_revision,
                    operation.src_repo_type or repo_type,
                )
                source = self._inside(source_folder, operation.src_path_in_repo)
                if not source.is_file():
                    raise _http_error(
                        RemoteEntryNotFoundError,
                        404,
                        f"No {operation.src_path_in_repo} to copy.",
                        "",
                    )
                copies.append((source, target))
            else:
                raise TypeError(f"Unknown commit operation {operation!r}.")

        for _, target in deletions:
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
        for source, target in copies:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        for operation, target in additions:
            target.parent.mkdir(parents=True, exist_ok=True)
            with operation.as_file() as file, target.open("wb") as out:
                shutil.copyfileobj(file, out)

        digest = hashlib.sha1(f"{repo_id}:{revision}:{len(self.commits)}".encode()).hexdigest()
        commit = FakeCommit(
            repo_id=repo_id,
            repo_type=repo_type,
            revision=revision or constants.DEFAULT_REVISION,
            message=commit_message,
            description=commit_description or "",
            added=tuple(op.path_in_repo for op, _ in additions)
            + tuple(op.path_in_repo for op in operations if isinstance(op, CommitOperationCopy)),
            deleted=tuple(op.path_in_repo for op, _ in deletions),
            oid=digest,
        )
        self.commits.append(commit)
        info = CommitInfo(
            commit_url=f"{self._url(repo_id, repo_type)}/commit/{digest}",
            commit_message=commit_message,
            commit_description=commit.description,
            oid=digest,
            _endpoint=constants.ENDPOINT,
            pr_url=pr_url,
        )
        return _maybe_future(info, run_as_future)

    def upload_folder(
        self,
        *,
        repo_id: str,
        folder_path: str | Path,
        path_in_repo: str | None = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        token: str | bool | None = None,
        repo_type: str | None = None,
        revision: str | None = None,
        create_pr: bool | None = None,
        parent_commit: str | None = None,
        allow_patterns: list[str] | str | None = None,
        ignore_patterns: list[str] | str | None = None,
        delete_patterns: list[str] | str | None = None,
        run_as_future: bool = False,
    ) -> CommitInfo | Future[CommitInfo]:
        """One commit of the folder's files, with the Hub's pattern and ``.git`` rules."""
        folder_path = Path(folder_path)
        prefix = f"{path_in_repo.strip('/')}/" if path_in_repo and path_in_repo != "." else ""
        ignore = (
            [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        )
        local = sorted(
            p.relative_to(folder_path).as_posix() for p in folder_path.rglob("*") if p.is_file()
        )
        additions = [
            CommitOperationAdd(path_or_fileobj=folder_path / rel, path_in_repo=prefix + rel)
            for rel in filter_repo_objects(
                local,
                allow_patterns=allow_patterns,
                ignore_patterns=ignore + DEFAULT_IGNORE_PATTERNS,
            )
        ]
        deletions = []
        if delete_patterns is not None:
            existing = self.files(repo_id, None if create_pr else revision, repo_type)
            relative = {f[len(prefix) :]: f for f in existing if f.startswith(prefix)}
            added = {op.path_in_repo for op in additions}
            deletions = [
                CommitOperationDelete(path_in_repo=relative[rel], is_folder=False)
                for rel in filter_repo_objects(relative, allow_patterns=delete_patterns)
                if relative[rel] != ".gitattributes" and relative[rel] not in added
            ]
        return self.create_commit(
            repo_id,
            [*deletions, *additions],
            commit_message=commit_message or "Upload folder using huggingface_hub",
            commit_description=commit_description,
            repo_type=repo_type,
            revision=revision,
            create_pr=create_pr,
            run_as_future=run_as_future,
        )

    def hf_hub_download(
        self,
        repo_id: str,
        filename: str,
        *,
        subfolder: str | None = None,
        repo_type: str | None = None,
        revision: str | None = None,
        **download_options: Any,
    ) -> str:
        """Serve a file of a fake repository (used by ``ModelCard.load(repo_id)``)."""
        del download_options
        folder = self._existing_branch(repo_id, revision, repo_type)
        path_in_repo = f"{subfolder.strip('/')}/{filename}" if subfolder else filename
        path = self._inside(folder, path_in_repo)
        if not path.is_file():
            raise _http_error(
                RemoteEntryNotFoundError, 404, f"{path_in_repo} not in {repo_id}.", ""
            )
        return str(path)

    # ---------------------------------------------------------------------------- helpers
    @staticmethod
    def _url(repo_id: str, repo_type: str) -> str:
        """The repository's Hub URL (``CommitInfo`` and ``RepoUrl`` parse ids from it)."""
        return f"{constants.ENDPOINT}/{_REPO_TYPE_PREFIX[repo_type]}{repo_id}"

    def _existing_branch(self, repo_id: str, revision: str | None, repo_type: str | None) -> Path:
        """The folder of an existing branch, or the error the Hub would give."""
        if not self.repo_exists(repo_id, repo_type):
            raise _http_error(
                RepositoryNotFoundError, 404, f"Repository Not Found: {repo_id}.", str(repo_id)
            )
        folder = self.repo_path(repo_id, revision, repo_type)
        if not folder.is_dir():
            raise _http_error(
                RevisionNotFoundError, 404, f"Revision Not Found: {revision} in {repo_id}.", ""
            )
        return folder

    @staticmethod
    def _inside(folder: Path, path_in_repo: str) -> Path:
        """``folder / path_in_repo``, refusing absolute paths and ``..`` (the Hub does too)."""
        relative = PurePosixPath(path_in_repo.replace("\\", "/"))
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise ValueError(f"Invalid path_in_repo {path_in_repo!r}: must stay inside the repo.")
        return folder.joinpath(*relative.parts)


def _maybe_future(info: CommitInfo, run_as_future: bool) -> CommitInfo | Future[CommitInfo]:
    """A finished ``Future`` when the caller asked for one (``Trainer`` pushes in background)."""
    if not run_as_future:
        return info
    future: Future[CommitInfo] = Future()
    future.set_result(info)
    return future


def _as_method(function: Any) -> Any:
    """Wrap a FakeHub bound method so that it can replace an ``HfApi`` method on the class."""

    def method(_api: HfApi, *args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    method.__name__ = function.__name__
    method.__doc__ = function.__doc__
    return method


def _module_aliases(values: dict[str, Any]) -> list[tuple[Any, str, str]]:
    """Every ``(module, global name, key)`` where a module global is the object ``values[key]``.

    One pass over ``sys.modules`` comparing identities (a few hundredths of a second).
    """
    keys_by_id = {id(value): key for key, value in values.items()}
    found = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, held in list(namespace.items()):
            key = keys_by_id.get(id(held))
            if key is not None and held is values[key]:
                found.append((module, name, key))
    return found


def _validate_card(card: RepoCard, repo_type: str | None = None) -> None:
    """``RepoCard.validate`` without the network."""
    _check_card_yaml(str(card), repo_type or card.repo_type)


def _validate_yaml(
    _api: HfApi, content: str, *, repo_type: str | None = None, token: bool | str | None = None
) -> None:
    """``HfApi._validate_yaml`` without the network."""
    del token
    _check_card_yaml(content, repo_type or constants.REPO_TYPE_MODEL)


@contextlib.contextmanager
def fake_hub(root: str | Path, namespace: str = "fake-user") -> Iterator[FakeHub]:
    """Redirect the Hub writes of transformers, PEFT, diffusers and huggingface_hub to ``root``.

    Yields a :class:`FakeHub`: ``hub.repo_path("user/name")`` is where a repository landed
    (pass it to ``from_pretrained``), ``hub.files(...)`` lists it and ``hub.commits`` records
    every commit. A bare repository name gets the ``namespace``, as the Hub gives your user name.
    All patches are undone on exit, also after an exception.
    """
    hub = FakeHub(root, namespace=namespace)
    hub.root.mkdir(parents=True, exist_ok=True)
    originals = {name: getattr(hf_api_module, name) for name in _PATCHED_API_METHODS}
    with contextlib.ExitStack() as stack:
        for name in _PATCHED_API_METHODS:
            stack.enter_context(mock.patch.object(HfApi, name, _as_method(getattr(hub, name))))
        stack.enter_context(mock.patch.object(HfApi, "_validate_yaml", _validate_yaml))
        stack.enter_context(mock.patch.object(RepoCard, "validate", _validate_card))
        stack.enter_context(
            mock.patch.object(repocard_module, "hf_hub_download", hub.hf_hub_download)
        )
        # Module-level aliases are methods bound to huggingface_hub's global HfApi when they
        # were created: re-bind them (now resolving to the fakes) wherever they are held.
        fakes = {name: getattr(hf_api_module.api, name) for name in _PATCHED_API_METHODS}
        for module, attribute, name in _module_aliases(originals):
            stack.enter_context(mock.patch.object(module, attribute, fakes[name]))
        stack.callback(_restore_late_imports, fakes, originals)
        yield hub


def _restore_late_imports(fakes: dict[str, Any], originals: dict[str, Any]) -> None:
    """Put the real functions back in modules imported while the fake Hub was open."""
    for module, attribute, name in _module_aliases(fakes):
        setattr(module, attribute, originals[name])
