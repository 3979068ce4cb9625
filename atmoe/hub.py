"""The Hugging Face Hub as a source: ``hf://ORG/REPO[@REVISION][/SUBFOLDER]``, offline first.

The grammar, strictly:

- ``ORG/REPO`` follows the Hub's repo id rules: two names of letters, digits, ``_``, ``-`` and ``.``,
  each starting and ending with a letter, digit or ``_``, without ``--`` or ``..``, the repo not
  ending in ``.git``, at most 96 characters in all.
- ``@REVISION`` (default ``main``) is a branch, a tag or a 40-hex commit: one path segment, so a
  branch whose name holds ``/`` is written with ``%2F`` (``@feature%2Fx``); the Hub's pull-request
  refs are the one exception, written as they are (``@refs/pr/3``).
- ``/SUBFOLDER`` is the rest, one or more ``/``-separated names; ``.``, ``..``, empty names, ``\\``
  and ``@`` are refused (an ``@`` after the repo is always a revision written in the wrong place:
  ``hf://org/repo/sub@v1`` is refused with the right form, ``hf://org/repo@v1/sub``).

A malformed source is one ``UsageError`` line. Only a ``str`` that starts with ``hf://`` is a
source: ``./hf:/x`` (or a ``Path``) is a local path.

Files are looked up in the local Hub cache first (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
huggingface_hub's default, read when the call is made) with ``huggingface_hub.try_to_load_from_cache``,
which reads the disk alone and resolves a branch or tag through the cache's ``refs/``. The Hub
itself (``hf_hub_download``) is asked only when a file is missing from the cache, the user allowed
downloads (``--allow-downloads`` / ``ATMOE_ALLOW_DOWNLOADS=1``), and ``HF_HUB_OFFLINE`` is not set.
The revision is resolved to its commit by the first file, and every other file is read at that
commit, so the files of one expert always come from one commit.
Every failure is one ``SourceUnavailable`` (or ``InvalidAdapter``) line, nothing half-done.

No torch here; ``huggingface_hub`` is imported only when a file is fetched.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeGuard
from urllib.parse import quote, unquote

from atmoe.adapter_format import CONFIG_FILE, WEIGHTS_FILE
from atmoe.errors import InvalidAdapter, SourceUnavailable, UsageError

SCHEME = "hf://"
FORM = "hf://ORG/REPO[@REVISION][/SUBFOLDER]"
DEFAULT_REVISION = "main"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # what an expert takes from the Hub: never a README or a pickle
MAX_REPO_ID = 96  # huggingface_hub's validate_repo_id

_NAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_REVISION = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_./-]*[A-Za-z0-9_])?$")
_PR_REF = re.compile(r"^refs/pr/[0-9]+$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = ("1", "true", "yes", "on")

DOWNLOADS_OFF = "downloads are off: pass --allow-downloads (or set ATMOE_ALLOW_DOWNLOADS=1) to fetch it"
HUB_OFFLINE = "HF_HUB_OFFLINE is set, so the Hub is not asked (unset it, and pass --allow-downloads, to fetch it)"


# -- the grammar ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubRef:
    """A parsed ``hf://`` source: ``revision`` None means ``main``; ``subfolder`` None the repo's root."""

    repo_id: str
    revision: str | None = None
    subfolder: str | None = None

    def path_of(self, filename: str) -> str:
        """A file's path inside the repository."""
        return f"{self.subfolder}/{filename}" if self.subfolder else filename

    def pinned(self, commit: str) -> str:
        """This source at ``commit``: what the catalog records, so a row names source and commit at once."""
        return str(HubRef(self.repo_id, commit, self.subfolder))

    def __str__(self) -> str:
        text = SCHEME + self.repo_id
        if self.revision is not None:
            text += "@" + (self.revision if _PR_REF.match(self.revision) else quote(self.revision, safe=""))
        return text + (f"/{self.subfolder}" if self.subfolder else "")


def is_hub_source(value: object) -> TypeGuard[str]:
    """Whether ``value`` names a Hub source (a ``str`` starting with ``hf://``); paths never do."""
    return isinstance(value, str) and value.startswith(SCHEME)


def _malformed(text: str, problem: str, form: str) -> UsageError:
    return UsageError(f"malformed hub source {text!r}: {problem}; expected {form}")


def _check_name(text: str, name: str, what: str, form: str) -> None:
    if not name:
        raise _malformed(text, f"the {what} is empty", form)
    if not _NAME.match(name) or "--" in name or ".." in name:
        raise _malformed(
            text,
            f"{what} {name!r} is not a Hub name (letters, digits, '_', '-' and '.', "
            "starting and ending with a letter, digit or '_', no '--' or '..')",
            form,
        )


def _check_revision(text: str, revision: str, form: str) -> None:
    if _PR_REF.match(revision):
        return
    if not _REVISION.match(revision) or ".." in revision or "//" in revision or revision.endswith(".lock"):
        raise _malformed(text, f"revision {revision!r} is not a branch, tag or commit name", form)


def parse_hub_ref(text: str, *, subfolder: bool = True) -> HubRef:
    """Parse ``hf://ORG/REPO[@REVISION][/SUBFOLDER]`` (see the module's docstring); ``subfolder=False``
    refuses a ``/SUBFOLDER`` (a base model is a whole repository)."""
    form = FORM if subfolder else "hf://ORG/REPO[@REVISION]"
    if not is_hub_source(text):
        raise _malformed(str(text), "it does not start with hf://", form)
    rest = text[len(SCHEME) :]
    parts = rest.split("/")
    if len(parts) < 2:
        raise _malformed(text, "no repository: name it as ORG/REPO", form)
    org, repo_and_revision, tail = parts[0], parts[1], parts[2:]
    repo, at, revision_text = repo_and_revision.partition("@")
    _check_name(text, org, "organisation", form)
    _check_name(text, repo, "repository", form)
    repo_id = f"{org}/{repo}"
    if repo.endswith(".git") or len(repo_id) > MAX_REPO_ID:
        raise _malformed(
            text, f"{repo_id!r} is not a Hub repo id (no '.git' ending, at most {MAX_REPO_ID} chars)", form
        )
    revision: str | None = None
    if at:
        if revision_text == "refs" and len(tail) >= 2 and _PR_REF.match(f"refs/{tail[0]}/{tail[1]}"):
            revision_text, tail = f"refs/{tail[0]}/{tail[1]}", tail[2:]
        revision = unquote(revision_text)
        if not revision:
            raise _malformed(text, "nothing after '@'", form)
        _check_revision(text, revision, form)
    folder: str | None = None
    if tail:
        if not subfolder:
            raise _malformed(text, f"a base model is a whole repository, not {'/'.join(tail)!r} inside one", form)
        for name in tail:
            if name in ("", ".", ".."):
                raise _malformed(text, f"the subfolder has an empty, '.' or '..' part ({'/'.join(tail)!r})", form)
            if "@" in name:
                folder_text, _, revision_guess = "/".join(tail).rpartition("@")
                raise _malformed(
                    text,
                    f"'@' in the subfolder: a revision goes right after the repository, as in "
                    f"{SCHEME}{repo_id}@{revision_guess}/{folder_text}",
                    form,
                )
            if "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
                raise _malformed(text, f"subfolder part {name!r} has a backslash or a control character", form)
        folder = "/".join(tail)
    return HubRef(repo_id, revision, folder)


# -- the environment -----------------------------------------------------------------------------


def downloads_allowed() -> bool:
    """Whether the user allowed downloads (``--allow-downloads`` / ``ATMOE_ALLOW_DOWNLOADS=1``).

    Catalog data never decides on its own to reach the network: a composition or an imported
    archive whose base model is a hub id loads from this machine's files and cache only, and an
    ``hf://`` expert is read from the cache only, unless the user allowed downloads."""
    return os.environ.get("ATMOE_ALLOW_DOWNLOADS", "").strip().lower() in _TRUE


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now; huggingface_hub reads it once, at import."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def network_refusal() -> str | None:
    """Why the Hub may not be asked now (the end of an error message), or None when it may."""
    if not downloads_allowed():
        return DOWNLOADS_OFF
    if hub_offline():
        return HUB_OFFLINE
    return None


def hub_cache_dir() -> Path:
    """The local Hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub`` as set now, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


# -- fetching ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fetched:
    """Files of one commit, in the local Hub cache: ``files`` maps each name asked for to its path."""

    ref: HubRef
    commit: str
    files: dict[str, Path]

    @property
    def source(self) -> str:
        return self.ref.pinned(self.commit)


def _commit_of(path: Path, repo_path: str) -> str:
    """The commit of a file that huggingface_hub found or fetched: the cache keeps every file at
    ``snapshots/<commit>/<path in the repo>``, the layout it documents."""
    snapshot = path.parents[len(PurePosixPath(repo_path).parts) - 1]
    if snapshot.parent.name != "snapshots" or not COMMIT.match(snapshot.name):
        raise SourceUnavailable(f"{path}: not in the Hub cache's snapshots/<commit>/ layout")
    return snapshot.name


def _from_cache(ref: HubRef, filenames: Sequence[str]) -> Fetched | None:
    """Every file at one commit from the local cache, or None if one is missing. Only the disk is
    read (``try_to_load_from_cache``): even with ``local_files_only`` ``hf_hub_download`` may reach
    the network (huggingface_hub 2.4 builds request headers first, and fetches its list of AI-agent
    harnesses from huggingface.co for them, unless HF_HUB_OFFLINE was set when it was imported)."""
    from huggingface_hub import try_to_load_from_cache

    commit: str | None = None
    files: dict[str, Path] = {}
    for name in filenames:
        found = try_to_load_from_cache(
            ref.repo_id,
            ref.path_of(name),
            cache_dir=str(hub_cache_dir()),
            revision=commit or ref.revision or DEFAULT_REVISION,
        )
        if not isinstance(found, str):  # None, or the cached fact that the Hub has no such file
            return None
        files[name] = Path(found)
        commit = commit or _commit_of(files[name], ref.path_of(name))
    assert commit is not None
    return Fetched(ref, commit, files)


def _from_hub(ref: HubRef, filenames: Sequence[str]) -> Fetched:
    """Every file at one commit from the Hub (into the cache): the first file resolves the revision,
    the rest are read at its commit."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import logging as hub_logging

    commit: str | None = None
    files: dict[str, Path] = {}
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # its retry warnings would bury the one line the user gets
    try:
        for name in filenames:
            path = Path(
                hf_hub_download(
                    ref.repo_id,
                    ref.path_of(name),
                    revision=commit or ref.revision or DEFAULT_REVISION,
                    cache_dir=str(hub_cache_dir()),
                )
            )
            files[name] = path
            commit = commit or _commit_of(path, ref.path_of(name))
    finally:
        hub_logging.set_verbosity(verbosity)
    assert commit is not None
    return Fetched(ref, commit, files)


def cached_snapshot(repo_id: str, revision: str | None, marker: str = "config.json") -> Path | None:
    """The folder of ``repo_id`` at ``revision`` in the local cache, if ``marker`` is there (disk only)."""
    found = _from_cache(HubRef(repo_id, revision), [marker])
    return None if found is None else found.files[marker].parent


def _cache_miss(ref: HubRef, filenames: Sequence[str], refusal: str) -> Exception:
    """What of ``ref`` the local cache lacks, as the error to raise: the cache's own layout
    (``models--ORG--REPO/refs``, ``snapshots``, ``.no_exist``) says which part is missing."""
    cache = hub_cache_dir()
    repo_dir = cache / ("models--" + ref.repo_id.replace("/", "--"))
    revision = ref.revision or DEFAULT_REVISION
    if not repo_dir.is_dir():
        return SourceUnavailable(f"{ref}: {ref.repo_id} is not in the local Hub cache ({cache}); {refusal}")
    commit: str | None = revision if COMMIT.match(revision) else None
    refs_file = repo_dir / "refs" / revision
    if commit is None and refs_file.is_file():
        commit = refs_file.read_text(encoding="utf-8").strip()
    if commit is None or not (repo_dir / "snapshots" / commit).is_dir():
        return SourceUnavailable(
            f"{ref}: revision {revision!r} of {ref.repo_id} is not in the local Hub cache ({cache}); {refusal}"
        )
    where = f"'{ref.subfolder}'" if ref.subfolder else "the repository's root"
    if any((repo_dir / ".no_exist" / commit / ref.path_of(name)).is_file() for name in filenames):  # a 404 before
        return _no_adapter(ref, where, commit)
    missing = [name for name in filenames if not (repo_dir / "snapshots" / commit / ref.path_of(name)).exists()]
    missing = missing or list(filenames)  # a refs/ file huggingface_hub cannot read (a stray newline)
    return SourceUnavailable(
        f"{ref}: no {' or '.join(missing)} in {where} at commit {commit} in the local Hub cache ({cache}); {refusal}"
    )


def _no_adapter(ref: HubRef, where: str, commit: str | None = None) -> InvalidAdapter:
    at = f" at commit {commit}" if commit else ""
    return InvalidAdapter(
        f"{ref}: no PEFT LoRA adapter in {where}{at} ({' and '.join(ADAPTER_FILES)} expected; "
        "only safetensors weights are accepted)"
    )


def fetch(ref: HubRef, filenames: Sequence[str]) -> Fetched:
    """``filenames`` of ``ref``'s folder at one commit, from the cache, or the Hub when allowed.

    Raises ``SourceUnavailable`` (not in the cache while the Hub may not be asked, unknown
    revision, no network, gated or private repository) or ``InvalidAdapter`` (no such file there:
    ``filenames`` are what make an adapter)."""
    cached = _from_cache(ref, filenames)
    if cached is not None:
        return cached
    refusal = network_refusal()
    if refusal is not None:
        raise _cache_miss(ref, filenames, refusal)
    try:
        return _from_hub(ref, filenames)
    except Exception as error:  # huggingface_hub raises many types; the user needs one line
        raise _hub_error(ref, error) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _hub_error(ref: HubRef, error: Exception) -> Exception:
    """huggingface_hub's exceptions (0.34 to 2.x) as the toolkit's, one line each."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(error, LocalEntryNotFoundError):  # before EntryNotFoundError: a subclass of it
        cause = error.__cause__ or error.__context__
        detail = _first_line(cause) if cause is not None else "the connection failed or the Hub did not answer"
        return SourceUnavailable(f"{ref}: cannot reach the Hugging Face Hub ({detail}); check the network or proxy")
    if isinstance(error, GatedRepoError):  # before RepositoryNotFoundError: a subclass of it
        return SourceUnavailable(
            f"{ref}: {ref.repo_id} is gated: accept its conditions on huggingface.co, then {login}"
        )
    if isinstance(error, RepositoryNotFoundError):
        return SourceUnavailable(f"{ref}: no repository {ref.repo_id} on the Hub, or it is private ({login})")
    if isinstance(error, RevisionNotFoundError):
        revision = ref.revision or DEFAULT_REVISION
        return SourceUnavailable(f"{ref}: {ref.repo_id} has no branch, tag or commit {revision!r}")
    if isinstance(error, EntryNotFoundError):
        return _no_adapter(ref, f"'{ref.subfolder}'" if ref.subfolder else "the repository's root")
    if isinstance(error, HfHubHTTPError):
        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
        if status == 401:
            return SourceUnavailable(f"{ref}: the Hub refused access (HTTP 401); {login}")
        return SourceUnavailable(
            f"{ref}: the Hub answered {f'HTTP {status}' if status else 'an error'}: {_first_line(error)}"
        )
    if isinstance(error, SourceUnavailable | InvalidAdapter):
        return error
    return SourceUnavailable(f"{ref}: cannot fetch from the Hugging Face Hub ({_first_line(error)})")


# -- an adapter ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StagedAdapter:
    """An adapter fetched from the Hub, as a folder of regular files (what ``validate_adapter`` reads)."""

    path: Path
    source: str  # hf://ORG/REPO@<commit>[/SUBFOLDER]
    commit: str


def _place(blob: Path, target: Path) -> None:
    """``target`` gets ``blob``'s bytes: a hard link where the filesystem allows, else a copy."""
    try:
        os.link(blob, target)
    except OSError:
        shutil.copyfile(blob, target)


@contextmanager
def staged_adapter(source: str | HubRef) -> Iterator[StagedAdapter]:
    """The adapter of ``hf://...`` (``adapter_config.json`` and ``adapter_model.safetensors`` of its
    folder, nothing else) in a temporary folder of regular files, removed on exit.

    The cache holds snapshot files as symbolic links into ``blobs/``; an expert's files must be
    regular files, so the blobs are linked (or copied) into a folder of their own."""
    ref = source if isinstance(source, HubRef) else parse_hub_ref(source)
    fetched = fetch(ref, ADAPTER_FILES)
    with tempfile.TemporaryDirectory(prefix="atmoe-hf-") as folder:
        for name, path in fetched.files.items():
            _place(path.resolve(), Path(folder) / name)
        yield StagedAdapter(Path(folder), fetched.source, fetched.commit)
