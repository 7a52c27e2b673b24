"""Write README.md from nbs/index.ipynb (nbdev-readme needs Quarto, which is not installable everywhere).

`python tools/nb2readme.py` rewrites README.md; `--check` fails when README.md is out of step.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def render(nb_path: Path) -> str:
    "Markdown cells as they are; code cells fenced as python, skipping cells marked hide."
    parts = []
    for cell in json.loads(nb_path.read_text())["cells"]:
        src = "".join(cell["source"]).strip()
        if not src or src.startswith("#| hide"):
            continue
        parts.append(src if cell["cell_type"] == "markdown" else f"```python\n{src}\n```")
    header = "<!-- generated from nbs/index.ipynb by tools/nb2readme.py: edit the notebook -->\n\n"
    # the notebook links images relative to nbs/, the README relative to the repository root
    return header + "\n\n".join(parts).replace("](images/", "](nbs/images/") + "\n"


def main() -> int:
    text, readme = render(ROOT / "nbs" / "index.ipynb"), ROOT / "README.md"
    if "--check" in sys.argv[1:]:
        if readme.read_text() != text:
            print("README.md is out of step with nbs/index.ipynb: run `make readme`")
            return 1
        return 0
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
