"""``sidecar.protocol``: the name applications import the wire protocol's requests and
replies under (``from sidecar.protocol import Fingerprint``); they live in ``sidecar.wire``
and this module is that same module object."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("sidecar.wire")
