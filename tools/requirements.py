"""Print the project's pip requirements from pyproject.toml (one source of truth), with extras.

    python3 tools/requirements.py test hf   # core + the 'test' and 'hf' extras

The Makefile feeds this to one `pip install` so torch==2.13.0 resolves together with everything
else, without installing the repo itself as a package (it runs from the checkout).
"""

import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:]:
    if extra not in project["optional-dependencies"]:
        sys.exit(f"unknown extra {extra!r}; known: {sorted(project['optional-dependencies'])}")
    requirements += project["optional-dependencies"][extra]
print("\n".join(dict.fromkeys(requirements)))
