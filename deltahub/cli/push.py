"""`deltahub push`: a thin shell over :func:`deltahub.push_delta`.

Tokens come from where huggingface_hub looks (``HF_TOKEN``, ``hf auth login``) or ``--token``; they are never
echoed. The Hub is ``HF_ENDPOINT`` (default https://huggingface.co).
"""

from __future__ import annotations

from pathlib import Path

import click

from ._options import quiet_option, token_option


@click.command()
@click.argument("folder", type=click.Path(path_type=Path, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (and refuse to push to a public one).")
@click.option("--revision", metavar="BRANCH", help="Branch to commit to (created from main if missing).")
@click.option("--message", "-m", metavar="TEXT", help="Commit message (default: a summary of the delta).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--license", metavar="ID", help="License id for the model card, e.g. apache-2.0.")
@click.option(
    "--base-model",
    metavar="ID[@REV]",
    help="The base's Hub id (and revision), recorded in every pushed file instead of what the delta records "
    "(a local folder is never uploaded: without this it is left out, and the card cannot link the base).",
)
@click.option(
    "--reset-card-metadata",
    is_flag=True,
    help="Do not carry over what the card already on the Hub has (license, extra tags, datasets...).",
)
@token_option
@quiet_option
def push(
    folder: Path,
    repo_id: str,
    private: bool,
    revision: str | None,
    message: str | None,
    create_pr: bool,
    license: str | None,
    base_model: str | None,
    reset_card_metadata: bool,
    token: str | None,
    quiet: bool,
) -> None:
    """Upload the delta in FOLDER to the Hub repo REPO_ID in one commit.

    The delta is validated first; only its files (safetensors, index, delta_config.json, README.md card)
    are uploaded. The repo, and the branch, are created when missing. No local path goes up in any file: a
    base recorded as a local folder is replaced by --base-model, or left out with a note. A re-push keeps the
    Hub card's license and extra tags unless --license or --reset-card-metadata says otherwise.

    \b
    Examples:
      deltahub push ./math-delta acme/math-delta --private
      deltahub push ./math-delta acme/math-delta --base-model meta-llama/Llama-3.2-1B
      deltahub push ./math-delta acme/math-delta --revision v2-experiments -m "more steps"
      HF_ENDPOINT=https://hub.example.com deltahub push ./math-delta acme/math-delta
    """
    import warnings

    from ..hub import push_delta

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the notes are printed below, once
        result = push_delta(
            folder,
            repo_id,
            private=private or None,
            revision=revision,
            commit_message=message,
            create_pr=create_pr,
            token=token,
            license=license,
            base_model=base_model,
            keep_card_metadata=not reset_card_metadata,
        )
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if not quiet:
        click.echo(f"pushed {folder} to {repo_id}@{result.revision}: commit {result.sha}")
        click.echo(result.pr_url or result.url)
