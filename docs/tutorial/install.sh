python3 -m venv .venv && . .venv/bin/activate
pip install "/path/to/kafka-outbox[embedded,examples]" pytest mypy
