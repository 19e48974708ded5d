"""A script of bench/ (a folder of scripts, not a package) loaded as a module, for the tests of its functions, or
run in a process of its own for its JSON line."""
import json
import os
import subprocess
import sys


def load(name: str):
    """bench/<name>.py as a fresh module."""
    from sage_attention_pack.sage_core.bench import bench_script

    return bench_script(name)


def json_report(name: str, *args: str) -> dict:
    """Run bench/<name>.py with args in a process of its own, outside the Triton interpreter that the rest of the
    suite may run (it patches the language that the compiler would otherwise see), and return the JSON object its
    last line prints."""
    from sage_attention_pack.sage_core.bench import BENCH_SCRIPTS

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(BENCH_SCRIPTS / f"{name}.py"), *args], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
