"""`deltahub pull`: a thin shell over :func:`deltahub.pull_delta`.

Tokens come from where huggingface_hub looks (``HF_TOKEN``, ``hf auth login``) or ``--token``; they are never
echoed. The Hub is ``HF_ENDPOINT`` (default https://huggingface.co).
"""

from __future__ import annotations

from pathlib import Path

import click

from ._options import quiet_option, token_option


@click.command()
@click.argument("repo_id")
@click.option("--revision", "-r", metavar="REV", help="Branch, tag or commit sha (default: main).")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Copy the delta's files into this folder (atomically) instead of printing the cache path.",
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
@token_option
@quiet_option
def pull(
    repo_id: str, revision: str | None, out: Path | None, overwrite: bool, token: str | None, quiet: bool
) -> None:
    """Download the delta REPO_ID (or REPO_ID@REV) into the Hugging Face cache and validate it.

    Prints the delta's folder (the cache snapshot, or --out), also with --quiet (it is the result). Only the delta's files are downloaded. With
    HF_HUB_OFFLINE=1 the cached copy is used without any request.

    \b
    Examples:
      deltahub pull acme/math-delta
      deltahub pull acme/math-delta@v1 --out ./math-delta-v1
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
