"""Run code on real MicroPython (the WebAssembly port under Node.js).

    out = run_micropython("import agent.cbor; print(agent.cbor.dumps(1))")

The repo's packages (all their .py files) are copied into MicroPython's
in-memory filesystem first, so `import agent.cbor` loads the same source
CPython tests. The runtime is the npm package declared in the repo's
package.json (`npm install` puts it in node_modules/), driven by
tests/mpy_runner.mjs.

The heap budget, and what this port does to it: the WebAssembly port grows
its heap on demand (up to 128 MiB) instead of raising MemoryError, and it
garbage-collects only between top-level runs; `gc.collect()` inside a run
is deferred. So `heapsize` alone limits nothing. We measure instead: after
`code` and at the end of each of `steps` (each a separate top-level run in
the same interpreter, globals shared, GC in between) we read the heap's
total size, and fail if it ever grew past `heap_kb`. That is conservative: a step
passes only if everything it allocates, garbage included, fits beside what
is live. Split long work into steps to stay within a small budget.

Tests call `require_micropython()` first: it skips when node or the package
is missing, but fails instead when TETHER_REQUIRE_ALL=1 (CI), so nothing
is skipped silently there.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "mpy_runner.mjs"
PACKAGE = REPO / "node_modules" / "@micropython" / "micropython-webassembly-pyscript"
MICROPYTHON_MJS = PACKAGE / "micropython.mjs"


class MicroPythonError(Exception):
    """The code raised on MicroPython, outgrew its heap, or the runtime failed."""


def unavailable_reason():
    """Why MicroPython cannot run here, or None if it can."""
    if shutil.which("node") is None:
        return "node is not on PATH"
    if not MICROPYTHON_MJS.is_file():
        return "%s is missing; run `npm install` at the repo root" % MICROPYTHON_MJS
    return None


def micropython_available():
    return unavailable_reason() is None


def require_micropython():
    """Skip the calling test if MicroPython is unavailable; fail under CI."""
    import pytest

    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get("TETHER_REQUIRE_ALL") == "1":
        pytest.fail("MicroPython required (TETHER_REQUIRE_ALL=1): " + reason)
    pytest.skip("MicroPython unavailable: " + reason)


def package_files(modules):
    """{"/agent/cbor.py": source, ...} for every .py file of each package."""
    files = {}
    for name in modules:
        root = REPO / name
        if not root.is_dir():
            raise MicroPythonError("no package %r at %s" % (name, root))
        for path in sorted(root.rglob("*.py")):
            files["/" + path.relative_to(REPO).as_posix()] = path.read_text("utf-8")
    return files


def run_micropython(code, heap_kb=128, modules=("agent",), timeout_s=60, steps=()):
    """Run `code`, then each of `steps`, on MicroPython; return stdout."""
    return run_micropython_report(code, heap_kb, modules, timeout_s, steps)["stdout"]


def run_micropython_report(code, heap_kb=128, modules=("agent",), timeout_s=60, steps=()):
    """Like run_micropython, but return {"stdout", "elapsed_ms", "heap_peak_bytes"}.

    Raises MicroPythonError with MicroPython's traceback if the code raises,
    if the heap outgrew `heap_kb` KiB, or if it runs past `timeout_s`.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise MicroPythonError("MicroPython unavailable: " + reason)
    all_steps = [code] + list(steps)
    job = {"heapsize": heap_kb * 1024, "files": package_files(modules), "steps": all_steps}
    result = _run_node(job, timeout_s)
    if result["status"] != 0:
        raise MicroPythonError(
            "MicroPython raised in step %d of %d:\n%s\n--- stdout (tail) ---\n%s"
            % (result["failed_step"], len(all_steps), result["stderr"].rstrip(),
               result["stdout"][-2000:])
        )
    _check_heap(result["heap_totals"], heap_kb, len(all_steps))
    return {
        "stdout": result["stdout"],
        "elapsed_ms": result["elapsed_ms"],
        "heap_peak_bytes": max(result["heap_totals"]),
    }


def _run_node(job, timeout_s):
    try:
        proc = subprocess.run(
            [shutil.which("node"), str(RUNNER), str(MICROPYTHON_MJS)],
            input=json.dumps(job).encode("utf-8"),
            capture_output=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise MicroPythonError("MicroPython did not finish within %s s" % timeout_s) from None
    if proc.returncode != 0:
        raise MicroPythonError(
            "mpy_runner.mjs failed with status %d:\n%s"
            % (proc.returncode, proc.stderr.decode("utf-8", "replace"))
        )
    return json.loads(proc.stdout.decode("utf-8"))


def _check_heap(heap_totals, heap_kb, steps):
    if len(heap_totals) != steps or None in heap_totals:
        raise MicroPythonError("could not read the heap size after every step: %r" % heap_totals)
    for index, total in enumerate(heap_totals):
        if total > heap_kb * 1024:
            raise MicroPythonError(
                "step %d needed more than the %d KiB heap: it grew to %d bytes "
                "(this port collects only between steps; split the work into "
                "more steps or raise heap_kb)" % (index, heap_kb, total)
            )
