"""Build llama-cpp-python once (work in progress)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"
LLAMA_CPP_DIR = Path.home() / ".cache" / "peftkit" / f"llama-cpp-python-{LLAMA_CPP_VERSION}"


def llama_cpp():  # noqa: ANN201
    """Import llama_cpp, building it from its source distribution into a cache folder once."""
    if not (LLAMA_CPP_DIR / "llama_cpp" / "__init__.py").is_file():
        partial = LLAMA_CPP_DIR.with_name(LLAMA_CPP_DIR.name + ".partial")
        env = dict(os.environ)
        # Only the shared library is needed: no multimodal library, tests, examples or tools.
        env["CMAKE_ARGS"] = (
            "-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
            "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
        )
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", "2")
        print(f"building llama-cpp-python {LLAMA_CPP_VERSION} from source into {LLAMA_CPP_DIR} "
              "(many minutes, once)", flush=True)  # fmt: skip
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-binary", "llama-cpp-python",
             "--target", str(partial), f"llama-cpp-python=={LLAMA_CPP_VERSION}",
             "diskcache>=5.6", "jinja2>=3", "markupsafe>=2"],
            check=True, env=env,
        )  # fmt: skip
        partial.replace(LLAMA_CPP_DIR)
    # Appended, not prepended: the venv's own numpy and typing-extensions stay in charge.
    if str(LLAMA_CPP_DIR) not in sys.path:
        sys.path.append(str(LLAMA_CPP_DIR))
    return importlib.import_module("llama_cpp")


if __name__ == "__main__":
    print(llama_cpp().__version__)
