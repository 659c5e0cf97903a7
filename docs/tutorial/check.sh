pytest -q
mypy
