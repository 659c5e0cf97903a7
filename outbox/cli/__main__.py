"""``python -m outbox.cli``: the same as the ``outbox`` command."""

from outbox.cli.commands import main

main()
