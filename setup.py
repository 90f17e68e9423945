"""pip-installable library part of mixclf_ros: `pip install .` gives the mixing/certification
library, the model zoo and the `mixclf-eval` CLI without ROS 2.

The ROS 2 package (message type, node, launch files) is built with colcon from CMakeLists.txt;
this file is not used by colcon.
"""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent


def pinned(requirements_file: str) -> list[str]:
    lines = (here / requirements_file).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="mixclf_ros",
    version="0.1.0",
    description="Mixed standard/robust image classifier with certified radii (library and CLI)",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["mixclf_ros", "mixclf_ros.*"]),
    package_data={"mixclf_ros.models": ["zoo/*.pt", "zoo/*.json"]},
    install_requires=pinned("requirements.txt"),
    extras_require={"test": pinned("requirements-dev.txt"), "cluster": pinned("requirements-cluster.txt")},
    entry_points={"console_scripts": ["mixclf-eval = mixclf_ros.evaluation.cli:main"]},
)
