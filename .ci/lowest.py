"""Print `name==lowest` for the packages whose declared range CI tests at its low end.

The lowest version is read from pyproject.toml's own `>=` bound, so the range and what CI tests
cannot drift apart.
"""

import re
import sys
from pathlib import Path

import tomllib

PACKAGES = sys.argv[1:] or ["transformers", "peft", "accelerate", "huggingface_hub"]

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
# the core dependencies, then the extras' (boto3 of the s3 extra, say)
requirements = [
    *project["dependencies"],
    *(r for extra in project.get("optional-dependencies", {}).values() for r in extra),
]
for wanted in PACKAGES:
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
        if name.lower() == wanted.lower():
            lowest = re.search(r">=\s*([0-9][^,;\s]*)", requirement)
            if lowest is None:
                sys.exit(f"{requirement!r} declares no lower bound")
            print(f"{name}=={lowest.group(1)}")
            break
    else:
        sys.exit(f"{wanted} is not a dependency in pyproject.toml")
