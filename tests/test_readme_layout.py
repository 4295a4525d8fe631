"""The README's Layout section matches the tree: every module, package, script and document is
listed, and every file it lists exists."""

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _layout() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## Layout"):]
    start = section.index("```") + 3
    return section[start:section.index("```", start)]


def test_layout_lists_every_module_script_and_doc():
    layout = _layout()
    names = set(re.findall(r"[\w.-]+/?", layout))
    top = [e + ("/" if os.path.isdir(os.path.join(ROOT, "jbp", e)) else "")
           for e in os.listdir(os.path.join(ROOT, "jbp"))
           if not e.startswith(("__", ".")) and (e.endswith(".py")
                                                 or os.path.isdir(os.path.join(ROOT, "jbp", e)))]
    scripts = [os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "scripts", "*.py"))]
    docs = [os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))]
    missing = sorted(n for n in top + scripts + docs if n not in names)
    assert not missing, f"README Layout does not list {missing}"


def test_every_file_the_layout_lists_exists():
    files = set(re.findall(r"[\w-]+\.(?:py|md)\b", _layout()))
    on_disk = {os.path.basename(p) for pattern in ("jbp/**/*.py", "scripts/*.py", "docs/*.md")
               for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)}
    assert files and not files - on_disk, f"README Layout lists missing files {files - on_disk}"


def test_equations_name_the_code_that_implements_them():
    """Every "Code:" paragraph of docs/EQUATIONS.md names files that exist and functions
    (``_private`` or ``public()``) defined in them: the path from an equation to its rule stays
    true as the code moves."""
    with open(os.path.join(ROOT, "docs", "EQUATIONS.md"), encoding="utf-8") as f:
        paragraphs = re.findall(r"^Code: (.*?)(?=\n\n|\n#|\n- )", f.read(), re.S | re.M)
    assert len(paragraphs) >= 8
    for text in paragraphs:
        files = re.findall(r"`(jbp/[\w/]+\.py)`", text)
        names = re.findall(r"`(_\w+)`|`(\w+)\(\)`", text)
        names = [a or b for a, b in names]
        sources = ""
        for path in files:
            with open(os.path.join(ROOT, path), encoding="utf-8") as f:
                sources += f.read()
        assert files, text
        for name in names:
            assert re.search(rf"^def {name}\(", sources, re.M), (name, files)
