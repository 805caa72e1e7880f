"""A project-local Python environment (target/client-venv) for the client libraries tests use.

Scripts call `reexec_in_venv(["pika==1.3.2"])` first: it creates the venv and installs what is
missing, then re-runs the script under the venv's interpreter (once; an environment variable
marks the child).
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV = os.path.join(ROOT, "target", "client-venv")
MARK = "SHARDMQ_CLIENT_VENV_CHILD"


def ensure(packages):
    python = os.path.join(VENV, "bin", "python3")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    for package in packages:
        module = package.split("==")[0]
        check = subprocess.run([python, "-c", f"import {module}"], capture_output=True)
        if check.returncode != 0:
            subprocess.run([python, "-m", "pip", "install", "-q", package], check=True)
    return python


def reexec_in_venv(packages):
    """Returns in the venv child; the parent exits with the child's status."""
    if os.environ.get(MARK) == "1":
        return
    python = ensure(packages)
    env = dict(os.environ, **{MARK: "1"})
    sys.exit(subprocess.run([python] + sys.argv, env=env).returncode)
