"""Write docs/config-keys.md, the plugin's configuration keys by yaml file and section, from the yaml files themselves.

    python docs/build_config_keys.py           # rewrites docs/config-keys.md
    python docs/build_config_keys.py --check   # exits 1 when the committed file is out of date (a test runs this)

A section is the ``# ===== Name =====`` line above a key (dataset files have none: their keys are "Dataset"); a key is
a top-level ``name:`` line. Standard library only.
"""
import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROPERTIES = os.path.join(ROOT, "recbole_ur4rec", "properties")
OUTPUT = os.path.join(ROOT, "docs", "config-keys.md")
MODELS = ("UR4Rec", "FTRagRec", "FedDMMR", "DuoRec", "FastSASRec")
SECTION = re.compile(r"^# =+ (.+?) =+\s*$")
KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):")

INTRO = """# Configuration keys by section

Which section of the plugin's yaml files (`recbole_ur4rec/properties/`) each key is in. Every key's type, meaning and
valid range is the comment beside it in the yaml file; later layers (dataset yaml, config files, `config_dict`, the
command line) override these defaults. Sections: **Model** (architecture and the features the model uses), **Loss**
(loss types and weights), **Training schedule** (stages, epochs, learning rates and their schedule, and the
model-specific schedule: curriculum and alternation, memory refresh, federated rounds), **Evaluation**.
Written by `python docs/build_config_keys.py` from the yaml files (a test checks that it is current).
"""


def sections(path, default=None):
    """{section: [keys]} of one yaml file, in file order."""
    found, current = {}, default
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            marker, key = SECTION.match(line), KEY.match(line)
            if marker:
                current = marker.group(1)
            elif key:
                if current is None:
                    raise ValueError(f"{path} line {number}: key {key.group(1)!r} above any '# ===== Section =====' line")
                found.setdefault(current, []).append(key.group(1))
    return found


def table(title, relative, found):
    total = sum(len(keys) for keys in found.values())
    rows = [f"| {name} ({len(keys)}) | " + ", ".join(f"`{k}`" for k in keys) + " |" for name, keys in found.items()]
    return [f"## {title}", "", f"`{relative}`, {total} keys.", "", "| Section | Keys |", "|---|---|", *rows, ""]


def build():
    lines = [INTRO]
    for model in MODELS:
        relative = f"model/{model}.yaml"
        lines += table(model, relative, sections(os.path.join(PROPERTIES, relative)))
    lines += table("Every model (overall.yaml)", "overall.yaml", sections(os.path.join(PROPERTIES, "overall.yaml")))
    for name in sorted(os.listdir(os.path.join(PROPERTIES, "dataset"))):
        relative = f"dataset/{name}"
        lines += table(f"{name[:-len('.yaml')]} ({relative})", relative, sections(os.path.join(PROPERTIES, relative), "Dataset"))
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/config-keys.md is out of date")
    args = parser.parse_args(argv)
    text = build()
    if args.check:
        with open(OUTPUT, encoding="utf-8") as f:
            if f.read() != text:
                print("docs/config-keys.md is out of date: python docs/build_config_keys.py", file=sys.stderr)
                return 1
        print("docs/config-keys.md is up to date")
        return 0
    with open(OUTPUT, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(OUTPUT, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
