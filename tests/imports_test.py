"""Importing tfx is free of side effects a caller would trip over."""
import json
import subprocess
import sys

# Imports every module of tfx in a fresh interpreter, as a notebook or another program might,
# and reports the absl flags that tfx's own modules define (its libraries define theirs).
IMPORT_ALL = """
import importlib, json, pkgutil, sys
from absl import flags
import tfx
modules = [m.name for m in pkgutil.walk_packages(tfx.__path__, "tfx.")]
for name in modules:
    importlib.import_module(name)
print(json.dumps({"modules": modules, "flags": {module: [flag.name for flag in defined]
                  for module, defined in flags.FLAGS.flags_by_module_dict().items()
                  if module.startswith("tfx")},
                  "parsed": flags.FLAGS.is_parsed(), "pyplot": "matplotlib.pyplot" in sys.modules}))
"""


def test_importing_every_module_defines_no_flags_and_parses_none():
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.splitlines()[-1])
    assert {"tfx.train.trainer", "tfx.compress.average", "tfx.data.prepare", "tfx.tpu.aot", "tfx.export.ctranslate2"} <= set(report["modules"])
    assert report["flags"] == {}  # two modules defining --config at import collide
    assert not report["parsed"] and not report["pyplot"]
