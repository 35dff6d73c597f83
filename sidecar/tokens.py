"""``sidecar.tokens``: the documented name of exact token counting
(``sidecar.tokens.count(text, model="gpt-4o")``); it lives in ``sidecar.text.tokens`` and
this module is that same module object."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("sidecar.text.tokens")
