"""`kto-loop` subcommands, one module each.

A command module defines NAME (the subcommand), HELP (one line), `add_arguments(parser)` and
`run(args, cfg) -> int`. `app.cli` discovers them, so adding a command never edits a shared file.
"""
