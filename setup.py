"""Build the C fast path; all metadata lives in pyproject.toml.

FLOWSTATE_ASAN=1 builds the debug variant (AddressSanitizer + UBSan) used by the fuzz and leak
tests; see tests/unit/test_fastpath_c.py for how to run the suite under it.
"""

import os

from setuptools import Extension, setup

SOURCES = [
    "forwarder/_fastpath.c",
    "forwarder/fp_codec.c",
    "forwarder/fp_engine.c",
    "forwarder/fp_ring.c",
]
HEADERS = [
    "forwarder/fp_codec.h",
    "forwarder/fp_engine.h",
    "forwarder/fp_csum.h",
    "forwarder/fp_mmh3.h",
    "forwarder/fp_packet.h",
    "forwarder/fp_table.h",
]

extra_compile_args = ["-O2", "-Wall", "-Wextra", "-std=gnu11", "-fvisibility=hidden"]
extra_link_args: list[str] = []
if os.environ.get("FLOWSTATE_ASAN") == "1":
    # Debug build used by the fuzz and leak tests.
    extra_compile_args += [
        "-O1",
        "-g",
        "-fno-omit-frame-pointer",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=undefined",
    ]
    extra_link_args += ["-fsanitize=address,undefined"]

setup(
    ext_modules=[
        Extension(
            "forwarder._fastpath",
            sources=SOURCES,
            depends=HEADERS,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]
)
