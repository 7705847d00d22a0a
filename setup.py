"""Only what pyproject.toml cannot say: write flash_attn_metal_alias.pth at the top of site-packages (regular and
editable installs; it is listed in the wheel's RECORD, so uninstalling removes it). At every interpreter start it
installs the finder in _flash_attn_metal_alias.py, which serves `import flash_attn` where no real flash-attn is
installed."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "flash_attn_metal_alias.pth"
PTH_LINE = "import _flash_attn_metal_alias; _flash_attn_metal_alias.install()\n"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        # An editable wheel is assembled from the install directory, a regular one from build_lib.
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, PTH), "w") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list:
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
