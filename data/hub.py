"""What is fetched from the Hugging Face hub, pinned to a commit, and nothing that runs code:
the commit a hub dataset's revision is at (`dataset_commit`), a tokenizer.json (`download_tokenizer`),
and a model's config, safetensors weights and tokenizer files (`download_model`: init_from=gpt2).
huggingface_hub (a dependency of tokenizers and datasets) is imported only inside the functions.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from data.config import DataError, first_line

log = logging.getLogger(__name__)

HUB_TIMEOUT_S = 15.0
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


class HubUnreachable(Exception):
    """The hub could not give a file (offline, unknown or private repository, server error)."""


def is_commit_sha(revision: str | None) -> bool:
    """True for a full 40-hex commit sha (which, unlike a branch or tag, cannot move)."""
    return revision is not None and _COMMIT_SHA.fullmatch(revision) is not None


def dataset_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit sha of hub dataset repo_id at revision (None: the default branch); None when the
    hub cannot tell. DataError when the hub says that the revision does not exist."""
    if is_commit_sha(revision):
        return revision
    from huggingface_hub import HfApi
    from huggingface_hub.utils import RevisionNotFoundError

    try:
        return HfApi().dataset_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S).sha
    except RevisionNotFoundError:
        raise DataError(f"data.revision={revision!r} is not a branch, tag or commit of dataset {repo_id!r}; "
                        f"see https://huggingface.co/datasets/{repo_id}/commits for the ones it has") from None
    except Exception as e:  # huggingface_hub raises many kinds (offline mode, network, HTTP): all mean "cannot tell"
        log.info("could not ask the hub which commit %s of dataset %s is (%s); using the name as given",
                 revision or "the default branch", repo_id, first_line(e))
        return None


def download_tokenizer(repo_id: str, revision: str | None) -> tuple[Path, str | None]:
    """(local path of tokenizer.json in hub repo repo_id at revision, its commit sha, else the revision
    as given). DataError for a revision that does not exist; HubUnreachable for any other failure."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import RevisionNotFoundError

    try:
        path = Path(hf_hub_download(repo_id, "tokenizer.json", revision=revision))
    except RevisionNotFoundError:
        raise DataError(f"data.tokenizer_revision={revision!r} is not a branch, tag or commit of {repo_id!r}; "
                        f"see https://huggingface.co/{repo_id}/commits for the ones it has") from None
    except Exception as e:  # as above: offline, unknown repository, no such file, HTTP errors
        raise HubUnreachable(first_line(e)) from e
    commit = path.parent.name  # the cache keeps every file under snapshots/<commit sha>/
    return path, commit if is_commit_sha(commit) else revision


MODEL_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json", "vocab.json",
               "merges.txt"]  # weights as safetensors only: nothing pickled comes from the hub


def download_model(repo_id: str) -> Path:
    """The local directory (in the Hugging Face cache) of hub model repo_id's MODEL_FILES, or HubUnreachable."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES, etag_timeout=HUB_TIMEOUT_S))
    except Exception as e:  # as above: offline, unknown repository, HTTP errors
        raise HubUnreachable(first_line(e)) from e
