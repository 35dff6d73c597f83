"""``sidecar.normalize``: the documented name of prompt normalisation and fingerprints
(``sidecar.normalize.Normalizer().fingerprint(text)``); it lives in
``sidecar.text.normalize`` and this module is that same module object."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("sidecar.text.normalize")
