"""`deltahub push` and `deltahub pull`: thin shells over :func:`deltahub.hub.push_delta` / ``pull_delta``.

Tokens come from where huggingface_hub looks (``HF_TOKEN``, ``hf auth login``) or ``--token``; they are never
echoed. The Hub is ``HF_ENDPOINT`` (default https://huggingface.co).
"""

from __future__ import annotations

from pathlib import Path

import click

_TOKEN_HELP = "Hub token (default: HF_TOKEN or the `hf auth login` cache). Never printed."


@click.command()
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (and refuse to push to a public one).")
@click.option("--revision", metavar="BRANCH", help="Branch to commit to (created from main if missing).")
@click.option("--message", "-m", metavar="TEXT", help="Commit message (default: a summary of the delta).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--license", metavar="ID", help="License id for the model card, e.g. apache-2.0.")
@click.option("--token", metavar="TOKEN", help=_TOKEN_HELP)
def push(
    folder: Path,
    repo_id: str,
    private: bool,
    revision: str | None,
    message: str | None,
    create_pr: bool,
    license: str | None,
    token: str | None,
) -> None:
    """Upload the delta in FOLDER to the Hub repo REPO_ID in one commit.

    The delta is validated first; only its files (safetensors, index, delta_config.json, README.md card)
    are uploaded. The repo, and the branch, are created when missing.

    \b
    Examples:
      deltahub push ./math-delta acme/math-delta --private
      deltahub push ./math-delta acme/math-delta --revision v2-experiments -m "more steps"
      HF_ENDPOINT=https://hub.example.com deltahub push ./math-delta acme/math-delta
    """
    from ..hub import push_delta

    result = push_delta(
        folder,
        repo_id,
        private=private or None,
        revision=revision,
        commit_message=message,
        create_pr=create_pr,
        token=token,
        license=license,
    )
    click.echo(f"pushed {folder} to {repo_id}@{result.revision}: commit {result.sha}")
    click.echo(result.pr_url or result.url)


@click.command()
@click.argument("repo_id")
@click.option("--revision", "-r", metavar="REV", help="Branch, tag or commit sha (default: main).")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Copy the delta's files into this folder (atomically) instead of printing the cache path.",
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--token", metavar="TOKEN", help=_TOKEN_HELP)
def pull(repo_id: str, revision: str | None, out: Path | None, overwrite: bool, token: str | None) -> None:
    """Download the delta REPO_ID (or REPO_ID@REV) into the Hugging Face cache and validate it.

    Prints the delta's folder (the cache snapshot, or --out). Only the delta's files are downloaded. With
    HF_HUB_OFFLINE=1 the cached copy is used without any request.

    \b
    Examples:
      deltahub pull acme/math-delta
      deltahub pull acme/math-delta@v1 --out ./math-delta
      deltahub pull acme/math-delta --revision 3f2a9c0e... --out ./pinned
    """
    from ..hub import parse_delta_ref, pull_delta

    repo, ref_revision = parse_delta_ref(repo_id)
    if revision is not None and ref_revision is not None and revision != ref_revision:
        raise click.UsageError(f"two revisions: {ref_revision!r} in {repo_id!r} and --revision {revision!r}")
    folder = pull_delta(
        repo, revision=revision or ref_revision, token=token, local_dir=out, overwrite=overwrite
    )
    click.echo(str(folder))
