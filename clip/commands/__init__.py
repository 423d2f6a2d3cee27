"""CLI subcommands, one module each (see clip.cli)."""
