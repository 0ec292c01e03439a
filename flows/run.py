"""`python -m flows.run STAGE`: run one stage's Prefect flow (what `dvc.yaml` calls)."""

from __future__ import annotations

import os
import sys

import typer

from rrec.config import ConfigError

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    stage: str = typer.Argument(..., help="download, window, prompts, backbone, items, train, evaluate, baselines or report"),
    params: str = typer.Option("params.yaml", help="parameter file, relative to --root"),
    root: str = typer.Option(".", help="project root holding data/, models/, reports/"),
    method: str = typer.Option(None, help="train/evaluate: the method (contrastive or recpo)"),
) -> None:
    # Without PREFECT_API_URL each stage starts Prefect's temporary server; on a busy
    # machine it can take longer than Prefect's default 20 s to answer.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.stages import STAGE_FLOWS

    if stage not in STAGE_FLOWS:
        typer.echo(f"unknown stage {stage!r}; choose one of: {', '.join(STAGE_FLOWS)}", err=True)
        raise typer.Exit(2)
    kwargs = {"params_path": params, "root": root}
    if stage in ("train", "evaluate"):
        if method is None:
            typer.echo(f"stage {stage} needs --method contrastive|recpo", err=True)
            raise typer.Exit(2)
        kwargs["method"] = method
    try:
        STAGE_FLOWS[stage](**kwargs)
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    sys.exit(app())
