// Runs Python code on real MicroPython (the WebAssembly port) under Node.js,
// for tests/mpy.py.
//
//   node mpy_runner.mjs <path to micropython.mjs>  < job.json
//
// job.json: {"heapsize": bytes, "files": {"/agent/cbor.py": "..."},
//            "steps": ["code", ...]}
// The files are written into MicroPython's in-memory filesystem (cwd "/" is
// on sys.path). Each step then runs as its own top-level program in one
// interpreter, so globals carry over. This port only garbage-collects
// between top-level runs (gc.collect() inside a run is deferred), and grows
// its heap on demand instead of raising MemoryError; so at the end of each
// step we record the GC heap's total size: a total above the requested
// heapsize means that step did not fit in it.
//
// We print one JSON object: {status: 0, or 1 after a Python exception;
// failed_step; stdout; stderr (the traceback); elapsed_ms (all steps);
// heap_totals (one per step that finished)}.

import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

function writeFiles(FS, files) {
  for (const path of Object.keys(files).sort()) {
    const parts = path.split("/").filter((part) => part);
    let dir = "";
    for (const part of parts.slice(0, -1)) {
      dir += "/" + part;
      if (!FS.analyzePath(dir).exists) FS.mkdir(dir);
    }
    FS.writeFile(path, files[path]);
  }
}

function text(bytes) {
  return Buffer.from(bytes).toString("utf8");
}

async function main() {
  const job = JSON.parse(readFileSync(0, "utf8"));
  const { loadMicroPython } = await import(pathToFileURL(process.argv[2]).href);
  const out = [];
  const err = [];
  let sink = out;
  const mp = await loadMicroPython({
    heapsize: job.heapsize,
    linebuffer: false,
    stdout: (bytes) => sink.push(...bytes),
    stderr: (bytes) => err.push(...bytes),
  });
  writeFiles(mp.FS, job.files);

  const result = { status: 0, failed_step: null, heap_totals: [], elapsed_ms: 0 };
  // The heap is read at the end of each step, inside the same run: the
  // areas it grew by are released by the collection after the run.
  mp.registerJsModule("_mpy_runner", {
    begin: () => { sink = []; },
    end: () => {
      const match = /GC: total: (\d+)/.exec(text(sink));
      result.heap_totals.push(match ? Number(match[1]) : null);
      sink = out;
    },
  });
  const trailer = "\nimport _mpy_runner, micropython\n" +
    "_mpy_runner.begin()\nmicropython.mem_info()\n_mpy_runner.end()\n";
  for (let i = 0; i < job.steps.length && result.status === 0; i++) {
    const started = performance.now();
    try {
      mp.runPython(job.steps[i] + trailer);
    } catch (error) {
      if (error.name !== "PythonError") throw error;
      err.push(...Buffer.from(error.message, "utf8"));
      result.status = 1;
      result.failed_step = i;
    }
    result.elapsed_ms += performance.now() - started;
  }
  result.stdout = text(out);
  result.stderr = text(err);
  process.stdout.write(JSON.stringify(result));
}

main().catch((error) => {
  process.stderr.write("mpy_runner: " + (error && error.stack ? error.stack : error) + "\n");
  process.exitCode = 2;
});
