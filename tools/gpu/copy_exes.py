"""Copies the executables of the named cargo targets, read from cargo's `--message-format=json` on stdin, into
DEST (used by prepare.sh and prepare_branch.sh).

    cargo build ... --message-format=json | python3 copy_exes.py DEST NAME...
"""

import json
import shutil
import sys

dest, names = sys.argv[1], set(sys.argv[2:])
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    name = m.get("target", {}).get("name")
    if exe and name in names:
        shutil.copy(exe, f"{dest}/{name}")
