"""CLI subcommands, one module each (see lmckit.cli)."""
