"""``lorafleet data``: write the demo datasets and check a training file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from contract.settings import CommonSettings
from lorafleet.console import console, err, fail

app = typer.Typer(no_args_is_help=True, help="Datasets.")
DEMO_DATA = Path("data/orders")


@app.command("demo")
def data_demo(
    out: Annotated[Path, typer.Option(help="Folder for the splits and schema.")] = DEMO_DATA,
    seed: int = 0,
) -> None:
    """Write the "orders" task: train/validation/test JSONL splits, the robustness split and its JSON Schema."""
    from training import orders_robust
    from training.demo_data import write

    for path in [*write(out, seed), orders_robust.write(out, seed)]:
        console.print(f"wrote {path}")


@app.command("check")
def data_check(
    path: Path,
    schema: Annotated[Path | None, typer.Option(help="JSON Schema every output must match.")] = None,
    max_length: Annotated[int, typer.Option(help="Longest example in tokens (needs the base model).")] = 512,
    tokens: Annotated[bool, typer.Option(help="Check token lengths with the base model's tokenizer.")] = True,
) -> None:
    """Check every row of a training file and report every problem at once (exit 1 on errors)."""
    from contract.examples import check
    from training.config import TrainConfig
    from training.train import check_data, prompt_format_of

    if not path.is_file():
        raise fail(f"{path}: no such file")
    settings = CommonSettings()
    if tokens and Path(settings.base_model_path(), "config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(settings.base_model_path())
        fmt = prompt_format_of(tok)
        cfg = TrainConfig.model_validate(
            {"data": path, "out": "unused", "schema": schema, "max_length": max_length, "skip_invalid": True}
        )
        report = check_data(cfg, tok, fmt)[0]
    else:
        from training.train import load_schema

        report = check(path, schema=load_schema(schema))
    for problem in report.problems:
        (err if problem.severity == "error" else console).print(str(problem), highlight=False, markup=False)
    console.print(
        f"{path}: {report.rows} rows, {len(report.examples)} usable, {len(report.errors)} errors, "
        f"{len(report.warnings)} warnings",
        highlight=False,
    )
    if report.errors:
        raise typer.Exit(1)


@app.command("toolcall")
def data_toolcall(
    source: Annotated[Path, typer.Option(help="Folder with the glaive and BFCL files.")] = Path(
        "../shared/data/toolcall"
    ),
    out: Annotated[
        Path, typer.Option(help="Folder for train.jsonl (BFCL), glaive.jsonl, test.jsonl and robust.jsonl.")
    ] = Path("data/toolcall"),
) -> None:
    """Convert glaive and BFCL function-calling data into JSON-output chat rows (BFCL ids % 4 == 0 held out)."""
    from training.toolcall import write

    counts = write(source, out)
    console.print(
        f"wrote {out}/train.jsonl ({counts['train']}), {out}/glaive.jsonl ({counts['glaive']}), "
        f"{out}/test.jsonl and {out}/robust.jsonl ({counts['test']} each); "
        f"skipped {counts['skipped_glaive']} glaive and {counts['skipped_bfcl']} BFCL rows"
    )
