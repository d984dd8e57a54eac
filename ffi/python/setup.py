"""Builds the shmcluster wheel with setuptools-rust: the C library
(``ffi/Cargo.toml``, a cdylib, as ``shmcluster/libshmcluster.so``) and the
``shmcluster`` command (``Cargo.toml`` at the repository root, installed as a
script: on the PATH of the environment it is installed into).

Why setuptools-rust and not maturin: the wheel carries two artifacts of two
crates of the workspace, a cdylib with no Python bindings (the package loads
it with ctypes) and a binary. setuptools-rust builds each with its own
extension (``RustExtension`` with ``Binding.NoBinding``, ``RustBin``);
maturin builds one artifact per wheel (its ``bindings`` are pyo3, cffi,
uniffi or bin; a cdylib beside a bin is maturin#368, open since 2020).

cargo builds into the workspace's target directory (``CARGO_TARGET_DIR`` if
set), so a second build, or one after ``cargo build --release``, reuses it.

``SHMCLUSTER_FEATURES`` adds cargo features of the root crate to the
command, comma-separated: ``SHMCLUSTER_FEATURES=nats pip install ffi/python``
builds ``shmcluster run --nats`` (hosts joined through NATS).
"""

import os

from setuptools import setup
from setuptools_rust import Binding, RustBin, RustExtension
from setuptools_rust.build import build_rust

try:  # setuptools >= 70.1 has its own bdist_wheel
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # pragma: no cover - older setuptools with wheel
    from wheel.bdist_wheel import bdist_wheel

LIBRARY = "libshmcluster.so"
FEATURES = [f.strip() for f in os.environ.get("SHMCLUSTER_FEATURES", "").split(",") if f.strip()]


class BuildRust(build_rust):
    """Installs the cdylib as ``shmcluster/libshmcluster.so``: it is no
    Python extension module, so it gets the C library's own name, not an
    ``.cpython-311-x86_64-linux-gnu.so`` one."""

    def get_dylib_ext_path(self, ext, target_fname):
        path = super().get_dylib_ext_path(ext, target_fname)
        return os.path.join(os.path.dirname(path), LIBRARY)


class PlatformWheel(bdist_wheel):
    """``py3-none-<platform>``: the package is Python-version independent
    (ctypes, no extension module) but its library and command are not
    platform independent."""

    def get_tag(self):
        _, _, platform = super().get_tag()
        return "py3", "none", platform


setup(
    rust_extensions=[
        RustExtension(
            "shmcluster.libshmcluster",
            path="../Cargo.toml",
            binding=Binding.NoBinding,
            py_limited_api=False,
        ),
        RustBin("shmcluster", path="../../Cargo.toml", args=["--bin", "shmcluster"], features=FEATURES),
    ],
    cmdclass={"build_rust": BuildRust, "bdist_wheel": PlatformWheel},
    zip_safe=False,
)
