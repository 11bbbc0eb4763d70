"""Only here to put ``peft_scale_autoload.pth`` at the top of site-packages (setuptools has no declarative way)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "peft_scale_autoload.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
