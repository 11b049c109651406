"""Uploading an export folder to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from scratchpath import __version__
from scratchpath.errors import ScratchpathError
from scratchpath.export.write import CARD_FILE
from scratchpath.weights import CONFIG_FILE, WEIGHTS_FILE, first_line, load_config


def push_to_hub(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Add scratchpath backbone",
) -> str:
    """Upload an export folder to the Hugging Face Hub as model repository ``repo_id`` (created
    when missing); it then loads with ``timm.create_model("hf-hub:REPO", pretrained=True)`` or
    ``AutoModel.from_pretrained("REPO")``. The token is ``token``, else ``HF_TOKEN`` or the one
    ``hf auth login`` stored. Returns the URL of the commit.

    Raises:
        ScratchpathError: not an export, or the Hub refused or could not be reached (offline,
            ``HF_HUB_OFFLINE=1``, no or a wrong token); the local export is untouched.
    """
    model_dir = Path(model_dir)
    load_config(model_dir)  # an export, not any folder
    if not (model_dir / WEIGHTS_FILE).is_file():
        raise ScratchpathError(f"{model_dir}: no {WEIGHTS_FILE}")
    from huggingface_hub import HfApi

    api = HfApi(token=token, library_name="scratchpath", library_version=__version__)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=model_dir,
            allow_patterns=[WEIGHTS_FILE, CONFIG_FILE, CARD_FILE],
            commit_message=commit_message,
        )
    # huggingface_hub raises its own, httpx's and OSError types for the same causes (offline,
    # no route, bad token, refused name); to the user they are all one failed upload
    except Exception as err:
        raise ScratchpathError(
            f"--push-to-hub: {repo_id}: upload failed ({first_line(err)}); the export in "
            f"{model_dir} is complete, push it later with the same command"
        ) from None
    return str(getattr(commit, "commit_url", commit))
