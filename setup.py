"""Build the compiled hot paths: native/<name>.pyx -> sidecar._native.<name>.

pyproject.toml declares the project; this file only builds. Switches (environment):
  LLM_SIDECAR_DEBUG=1     compile with -O0 -g and Cython line tracing off
  LLM_SIDECAR_ANNOTATE=1  write Cython's HTML annotation next to each .pyx
"""
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from Cython.Build import cythonize
except ImportError:
    sys.exit(
        "llm-sidecar: Cython >= 3.0 is required to build the native modules. "
        "Install with `pip install .` (it fetches Cython as a build requirement) "
        "or `pip install 'cython>=3.0'` first when building without isolation."
    )

from setuptools import Extension

HERE = Path(__file__).parent
NATIVE = "native"
NATIVE_MODULES = ["normalize", "tokens", "window", "lexical", "vectors", "shm"]
INCLUDE_DIRS = [NATIVE + "/includes"]
XXHASH_HEADER_DIRS = ["/usr/include", "/usr/local/include"]

XXHASH_HINT = (
    "llm-sidecar: the xxHash C header (xxhash.h) was not found. Install it with "
    "`apt-get install libxxhash-dev` (Debian/Ubuntu), `dnf install xxhash-devel` (Fedora), "
    "or `brew install xxhash` (macOS), or point CFLAGS=-I<dir> at a directory holding it."
)


def _have_xxhash_header():
    dirs = list(XXHASH_HEADER_DIRS)
    for flag in os.environ.get("CFLAGS", "").split() + os.environ.get("CPPFLAGS", "").split():
        if flag.startswith("-I"):
            dirs.append(flag[2:])
    return any(Path(d, "xxhash.h").is_file() for d in dirs)


class BuildNative(build_ext):
    """build_ext that fails with a sentence naming the missing piece."""

    def run(self):
        if not _have_xxhash_header():
            sys.exit(XXHASH_HINT)
        super().run()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            sys.exit(
                f"llm-sidecar: compiling {ext.name} failed ({exc}). It needs a C compiler "
                "and the Python headers (`apt-get install build-essential python3-dev`) "
                f"and the xxHash header. {XXHASH_HINT}"
            )


def extensions():
    debug = os.environ.get("LLM_SIDECAR_DEBUG") == "1"
    cflags = ["-O0", "-g"] if debug else ["-O3"]
    exts = [
        Extension(
            f"sidecar._native.{name}",
            [f"{NATIVE}/{name}.pyx"],
            include_dirs=INCLUDE_DIRS,
            extra_compile_args=cflags,
        )
        for name in NATIVE_MODULES
    ]
    return cythonize(
        exts,
        include_path=[NATIVE],
        annotate=os.environ.get("LLM_SIDECAR_ANNOTATE") == "1",
        compiler_directives={"language_level": 3, "embedsignature": True},
        quiet=True,
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildNative})
