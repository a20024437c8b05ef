"""The command line's two terminals (stdout for results, stderr for problems) and its one way to fail."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr; raise the returned exit (status 2)."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(2)
