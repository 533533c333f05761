"""Build hook: developer-only scripts that sit beside the bundled sample volumes (the sample
generator) stay out of the wheel; everything else is configured in pyproject.toml."""

from setuptools import setup
from setuptools.command.build_py import build_py

#: Packages that carry data only: of their Python files, just ``__init__.py`` is installed.
DATA_ONLY_PACKAGES = {"napari_mias_sam.sample_data"}


class BuildPyWithoutDevScripts(build_py):
    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package in DATA_ONLY_PACKAGES:
            modules = [m for m in modules if m[1] == "__init__"]
        return modules


setup(cmdclass={"build_py": BuildPyWithoutDevScripts})
