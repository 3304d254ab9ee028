"""Build the C fast path; all metadata lives in pyproject.toml."""

import os

from setuptools import Extension, setup

extra_compile_args = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"]
extra_link_args: list[str] = []
if os.environ.get("FLOWSTATE_ASAN") == "1":
    # Debug build used by the fuzz and leak tests.
    extra_compile_args += ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined"]
    extra_link_args += ["-fsanitize=address,undefined"]

setup(
    ext_modules=[
        Extension(
            "forwarder._fastpath",
            sources=["forwarder/_fastpath.c"],
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]
)
