"""Runs untrusted programs (Python or JavaScript, from fused pairs) in a separate, confined process.

Each run gets, in layers (each stops what the one before may miss):

- `unshare -rnm --pid --fork --kill-child`: new user, network, mount and PID namespaces. No network (only a loopback
  that is down), no process outlives the run (killing `unshare` kills the namespace's init and with it every
  process in it), and a mount namespace of its own, which `_launch.py` makes read-only except for the run's fresh
  temporary folder;
- `_launch.py` inside the namespaces: RLIMIT_NPROC set there (so that it counts this sandbox only), and a seccomp
  filter that refuses `fork`/`vfork`/`clone` of processes, network sockets, mounts and new namespaces. The filter
  and the read-only mounts are kernel-enforced and also hold when the caller is root, where RLIMIT_NPROC is ignored;
- resource limits set in the child before exec: CPU time, address space, file size, open files, no core dumps;
- per language, a hook that names the forbidden operation and ends the run at once: a Python audit hook
  (`_py_boot.py`), node's permission model plus a preloaded script for JavaScript;
- an empty environment, an empty stdin, a wall-clock timeout that kills the whole process group, capped output.

Where `unshare` is missing or the namespaces cannot be made (a kernel or container that forbids unprivileged user
namespaces), nothing is run: every call answers `sandbox_unavailable`.
"""

import functools
import json
import math
import os
import re
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._py_boot import FORBIDDEN_EXIT, NEEDS_INPUT_EXIT

OK = "ok"
ERROR = "error"
TIMEOUT = "timeout"
MEMORY = "memory"
FORBIDDEN = "forbidden"
OUTPUT_TOO_LARGE = "output_too_large"
MISSING_MODULE = "missing_module"
NEEDS_INPUT = "needs_input"
SANDBOX_UNAVAILABLE = "sandbox_unavailable"
KINDS = (OK, ERROR, TIMEOUT, MEMORY, FORBIDDEN, OUTPUT_TOO_LARGE, MISSING_MODULE, NEEDS_INPUT, SANDBOX_UNAVAILABLE)

DEFAULT_TIMEOUT = 5.0
PYTHON_MEMORY_MB = 512
# node 20 reserves address space for V8 before it runs a line: measured here, it aborts at start-up under an
# RLIMIT_AS of 700 MB and starts at 800 MB. 2 GB leaves room for buffers; the JavaScript heap itself is capped lower
# (NODE_HEAP_MB), so that a runaway allocation ends in V8's "heap out of memory" rather than a failed mmap.
NODE_MEMORY_MB = 2048
NODE_HEAP_MB = 256
# Parsers (gcc's cc1 on C++ headers) need more than a small script.
TOOL_MEMORY_MB = 1024
FILE_SIZE_BYTES = 1 << 20
# Threads count as processes for RLIMIT_NPROC; node runs about ten.
MAX_PROCESSES = 64
MAX_OPEN_FILES = 256
OUTPUT_CAP = 256 * 1024
UNSHARE = "unshare"
NODE = "node"
_HERE = Path(__file__).resolve().parent
_LAUNCH = str(_HERE / "_launch.py")
# Copied into each run's folder, so that the program's import path starts there, as a script's does, and not in this
# package (where `code.py` would shadow the standard library's `code`).
_PY_BOOT_SOURCE = (_HERE / "_py_boot.py").read_text(encoding="utf-8")
SETUP_EXIT = 112  # _launch.SETUP_EXIT (not imported: that module loads ctypes, which only the child needs)
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0"}


@dataclass(frozen=True)
class RunResult:
    """
    What happened to one program in the sandbox.

    Attributes:
        kind (`str`): One of `KINDS`: `"ok"`, `"error"` (exception or non-zero exit), `"timeout"`, `"memory"`,
            `"forbidden"`, `"output_too_large"`, `"missing_module"`, `"needs_input"`, `"sandbox_unavailable"`.
        reason (`str`): One line: the error (`"ZeroDivisionError: division by zero (line 3)"`), the forbidden
            operation (`"starts a process"`), the missing module, why the sandbox is unavailable; empty when ok.
        detail (`str`): The machine-readable part of the reason: the forbidden operation, the module's name.
        returncode (`int` or `None`): The exit status (negative: the signal), `None` when nothing ran.
        stdout (`str`): The program's standard output, with the probes' markers taken out.
        stderr (`str`): Its standard error (capped).
        segments (`dict[str, list[str]]`): For each output probe, what its statement printed, once per execution.
        values (`dict[str, list[dict]]`): For each value probe, and for the expression `i` under `"x{i}"`, the values
            shown (`{"repr", "str"}` in Python, `{"inspect", "str"}` in JavaScript, or `{"error"}`).
        seconds (`float`): Wall-clock time of the run.
    """

    kind: str
    reason: str = ""
    detail: str = ""
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    segments: dict[str, list[str]] = field(default_factory=dict)
    values: dict[str, list[dict]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.kind == OK


@functools.cache
def sandbox_available() -> tuple[bool, str]:
    """
    Whether programs can be run confined here, checked once per process by running a tiny program through every
    layer. Returns `(True, what confines them)` or `(False, why not)`; when `False`, nothing is ever executed.
    """
    if not sys.platform.startswith("linux"):
        return False, f"the sandbox needs Linux namespaces; this is {sys.platform}"
    if shutil.which(UNSHARE) is None:
        return False, f"`{UNSHARE}` (util-linux) is not on PATH: no network isolation, so code is not run"
    probe = _run_python("import os\nprint(6 * 7, os.getpid())", probes=(), expressions=(), timeout=10.0)
    if probe.kind != OK or probe.stdout.split() != ["42", "1"]:
        reason = probe.reason or probe.stderr.strip()[-200:] or probe.stdout.strip()[-200:]
        return False, f"`{UNSHARE} -rnm --pid` cannot confine a program here ({probe.kind}: {reason})"
    return True, "user, network, mount and pid namespaces; read-only mounts; seccomp; rlimits; language hooks"


def _limits(timeout: float, memory_mb: int):
    """The resource limits, set in the child between fork and exec (they are inherited through `unshare`). Each is
    lowered, never raised: where the caller already runs under a lower hard limit, that one stays."""
    cpu = math.ceil(timeout) + 1
    wanted = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL at the hard one
        resource.RLIMIT_AS: (memory_mb << 20, memory_mb << 20),
        resource.RLIMIT_FSIZE: (FILE_SIZE_BYTES, FILE_SIZE_BYTES),
        resource.RLIMIT_NOFILE: (MAX_OPEN_FILES, MAX_OPEN_FILES),
        resource.RLIMIT_CORE: (0, 0),
    }

    def apply():
        for limit, (soft, hard) in wanted.items():
            current = resource.getrlimit(limit)[1]
            if current != resource.RLIM_INFINITY:
                soft, hard = min(soft, current), min(hard, current)
            resource.setrlimit(limit, (soft, hard))

    return apply


def _read(process: subprocess.Popen, deadline: float) -> tuple[bytes, bytes, str | None]:
    """Both pipes until they close, the deadline passes or the output outgrows its cap; the last value says which
    limit stopped the reading (`None`: the program closed its output)."""
    chunks = {process.stdout: [], process.stderr: []}
    sizes = dict.fromkeys(chunks, 0)
    with selectors.DefaultSelector() as selector:
        for pipe in chunks:
            selector.register(pipe, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return b"".join(chunks[process.stdout]), b"".join(chunks[process.stderr]), TIMEOUT
            for key, _ in selector.select(min(left, 0.5)):
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                    continue
                chunks[key.fileobj].append(data)
                sizes[key.fileobj] += len(data)
                if sizes[key.fileobj] > OUTPUT_CAP:
                    return b"".join(chunks[process.stdout]), b"".join(chunks[process.stderr]), OUTPUT_TOO_LARGE
    return b"".join(chunks[process.stdout]), b"".join(chunks[process.stderr]), None


def _remove(folder: str) -> None:
    def unlock(function, path, _):  # the program may have taken the write bit off its own files
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
        function(path)

    shutil.rmtree(folder, onerror=unlock)


def _execute(
    argv: list[str], files: dict[str, str], *, timeout: float, memory_mb: int, mode: str = "program"
) -> tuple[int | None, str, str, str | None, float]:
    """
    Runs `argv` confined, in a fresh temporary folder (`{root}` in `argv`) holding `files`. Returns `(returncode, stdout, stderr, limit hit, seconds)`; the folder is removed before returning.
    """
    root = os.path.realpath(tempfile.mkdtemp(prefix="tct-sandbox-"))
    try:
        for name, text in files.items():
            Path(root, name).write_text(text, encoding="utf-8")
        command = [shutil.which(UNSHARE) or UNSHARE, "-rnm", "--pid", "--fork", "--kill-child", sys.executable]
        command += ["-s", "-S", "-B", _LAUNCH, root, str(MAX_PROCESSES), mode, "--"]
        command += [part.replace("{root}", root) for part in argv]
        env = {**_ENV, "HOME": root, "TMPDIR": root}
        start = time.monotonic()
        try:
            process = subprocess.Popen(
                command,
                cwd=root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group, killed whole on timeout
                preexec_fn=_limits(timeout, memory_mb),  # the limits must be in place before exec
            )
        except (OSError, subprocess.SubprocessError) as error:
            return None, "", f"sandbox setup failed: cannot start {command[0]}: {error}", SANDBOX_UNAVAILABLE, 0.0
        try:
            out, err, limit = _read(process, start + timeout)
            if limit is None:  # the output is closed; the program may still run (it closed its pipes, or a child)
                try:
                    process.wait(timeout=max(0.0, start + timeout - time.monotonic()))
                except subprocess.TimeoutExpired:
                    limit = TIMEOUT
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.stdout.close()
            process.stderr.close()
            returncode = process.wait()
        seconds = time.monotonic() - start
        text = (out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))
        return returncode, *text, limit, seconds
    finally:
        _remove(root)


def _parse_markers(stdout: str, nonce: str) -> tuple[str, dict[str, list[str]], dict[str, list[dict]]]:
    """Splits the probes' markers out of stdout: the program's own output, each probe's segments, the values."""
    pattern = re.compile("\x1f" + re.escape(nonce) + r":(b|e|v):([^:\x1f]*):?([^\x1f]*)\x1f")
    clean, segments, values = [], {}, {}
    open_probes: list[tuple[str, list[str]]] = []
    position = 0
    for match in pattern.finditer(stdout):
        text = stdout[position : match.start()]
        clean.append(text)
        for _, parts in open_probes:
            parts.append(text)
        position = match.end()
        kind, pid, payload = match.groups()
        if kind == "b":
            open_probes.append((pid, []))
        elif kind == "e":
            for i in range(len(open_probes) - 1, -1, -1):
                if open_probes[i][0] == pid:
                    segments.setdefault(pid, []).append("".join(open_probes.pop(i)[1]))
                    break
        else:
            try:
                values.setdefault(pid, []).append(json.loads(payload))
            except ValueError:
                values.setdefault(pid, []).append({"error": "unreadable value"})
    clean.append(stdout[position:])
    return "".join(clean), segments, values


# Preloaded into node (`--require`): the probes' marker functions, and for each forbidden operation a replacement
# that ends the process at once (an exception could be caught by the program); the permission model and seccomp
# would refuse these operations anyway, this names them. Reading stdin ends the run as 'needs input'.
_JS_PRELOAD = r"""'use strict';
(() => {
  const N = __NONCE__;
  const fs = require('fs');
  const util = require('util');
  const mark = (...parts) => '\x1f' + [N, ...parts].join(':') + '\x1f';
  const out = (text) => process.stdout.write(text);
  const stop = (what, op, code) => {
    try { fs.writeSync(2, '\n' + mark('forbidden', what, op) + '\n'); } catch (e) { /* the process ends anyway */ }
    (typeof process.reallyExit === 'function' ? process.reallyExit : process.exit)(code);
  };
  const patch = (name, members, what) => {
    const mod = require(name);
    for (const member of members) {
      if (typeof mod[member] === 'function') mod[member] = function () { stop(what, `${name}.${member}`, __FORBIDDEN__); };
    }
  };
  const spawners = ['spawn', 'spawnSync', 'exec', 'execSync', 'execFile', 'execFileSync', 'fork'];
  patch('child_process', spawners, 'starts a process');
  patch('worker_threads', ['Worker'], 'starts a process');
  patch('cluster', ['fork'], 'starts a process');
  for (const name of ['net', 'tls', 'http2']) patch(name, ['connect', 'createConnection'], 'opens a socket');
  for (const name of ['http', 'https']) patch(name, ['request', 'get'], 'opens a socket');
  patch('dgram', ['createSocket'], 'opens a socket');
  const net = require('net');
  net.Socket.prototype.connect = function () { stop('opens a socket', 'net.Socket.connect', __FORBIDDEN__); };
  net.Server.prototype.listen = function () { stop('opens a socket', 'net.Server.listen', __FORBIDDEN__); };
  if (typeof globalThis.fetch === 'function') {
    globalThis.fetch = function () { stop('opens a socket', 'fetch', __FORBIDDEN__); };
  }
  Object.defineProperty(process, 'stdin', {
    configurable: true, get() { stop('reads input', 'process.stdin', __NEEDS_INPUT__); },
  });
  const cut = (text) => String(text).slice(0, 4000);
  const show = (value) => {
    const shown = {};
    try { shown.inspect = cut(util.inspect(value)); } catch (e) { shown.inspect = '<error>'; }
    try { shown.str = cut(String(value)); } catch (e) { shown.str = '<error>'; }
    return shown;
  };
  const define = (name, fn) => Object.defineProperty(globalThis, name, { value: fn, enumerable: false });
  define('__tcv_begin', (id) => out(mark('b', id)));
  define('__tcv_end', (id) => out(mark('e', id)));
  define('__tcv_value', (id, value) => { out(mark('v', id, JSON.stringify(show(value)))); return value; });
  define('__tcv_expr', (i, thunk) => {
    let shown;
    try { shown = show(thunk()); } catch (e) { shown = { error: cut(e) }; }
    out(mark('v', 'x' + i, JSON.stringify(shown)));
  });
})();
"""


def _instrument_js(source: str, probes: Sequence[dict], expressions: Sequence[str]) -> str:
    """
    Applies the probes to single-line statements (`{"id", "line", "start", "end", "kind", "name"?}`: the statement
    is `line[start:end]`): an output probe frames it with markers in a block, a value probe passes the expression
    (or, with `name`, the declared variable) through `__tcv_value`. The expressions are appended, each through a
    direct `eval` in the program's scope, so that one that does not parse is a caught error, not a broken program.
    """
    lines = source.split("\n")
    for probe in sorted(probes, key=lambda p: (p["line"], -p["start"])):
        line = lines[probe["line"] - 1]
        body = line[probe["start"] : probe["end"]].rstrip().rstrip(";")
        pid = json.dumps(str(probe["id"]))
        if probe["kind"] == "output":
            new = f"{{ __tcv_begin({pid}); {body}; __tcv_end({pid}); }}"
        elif probe["kind"] == "both":  # what the call prints, and its value
            new = f"{{ __tcv_begin({pid}); __tcv_value({pid}, ({body})); __tcv_end({pid}); }}"
        elif probe.get("name"):
            new = f"{body}; __tcv_value({pid}, {probe['name']});"
        else:
            new = f"__tcv_value({pid}, ({body}));"
        lines[probe["line"] - 1] = line[: probe["start"]] + new + line[probe["end"] :]
    tail = [f"__tcv_expr({i}, () => eval({json.dumps(expression)}));" for i, expression in enumerate(expressions)]
    return "\n".join(lines) + ("\n;" + "\n".join(tail) + "\n" if tail else "")


def _node_permission_flags() -> list[str]:
    """node's permission model: reading anywhere (node loads itself and its modules), writing only in the sandbox's
    folder, no child processes, workers, native addons or WASI (all denied once the model is on)."""
    flag = _node_permission_flag(shutil.which(NODE) or NODE)
    return [flag, "--allow-fs-read=*", "--allow-fs-write={root}"] if flag else []


@functools.cache
def _node_permission_flag(node: str) -> str | None:
    try:
        help_text = subprocess.run([node, "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    # node 20-22: --experimental-permission; 23.5 and later: --permission.
    for flag in ("--experimental-permission", "--permission"):
        if re.search(re.escape(flag) + r"\b", help_text):
            return flag
    return None


# Python's MemoryError, V8's heap limit and its failure to reserve address space, C++'s bad_alloc.
_MEMORY_WORDS = (
    "memoryerror",
    "out of memory",
    "allocation failed",
    "cannot allocate memory",
    "bad_alloc",
    "process oom",
)
_PY_LINE = re.compile(r'File "<snippet>", line (\d+)')
_JS_LINE = re.compile(r"program\.m?js:(\d+)")
_MISSING_PY = re.compile(r"^ModuleNotFoundError: No module named '([^']+)'", re.MULTILINE)
_MISSING_JS = re.compile(r"Cannot find (?:module|package) '([^']+)'")
_JS_DENIED = {
    "FileSystemWrite": "writes files",
    "ChildProcess": "starts a process",
    "WorkerThreads": "starts a process",
}
_OS_DENIED = (
    (re.compile(r"Read-only file system|EROFS"), "writes files"),
    (re.compile(r"getaddrinfo|EAI_AGAIN|ENOTFOUND|name resolution"), "opens a socket"),
    (re.compile(r"\bconnect EPERM|\bsocket\b.*Operation not permitted|EPERM.*socket"), "opens a socket"),
    (re.compile(r"\bspawn\w* .*EPERM|fork.*Operation not permitted|EPERM.*spawn"), "starts a process"),
)


def _error_line(stderr: str, language: str) -> str:
    """The error's one line: the last line of a Python traceback; for node, the line after the caret under the
    failing source line (or the first `...Error: ...` line), with the line number of the program where known."""
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return ""
    if language == "python":
        message, where = lines[-1], _PY_LINE.findall(stderr)
    elif language == "tool":
        message, where = next((x for x in lines if re.search(r"\berror\b", x, re.I)), lines[-1]), []
    else:
        carets = [i for i, line in enumerate(lines) if set(line.strip()) == {"^"}]
        named = [line for line in lines if re.match(r"\s*(?:Uncaught )?[A-Z]\w*(?:Error|Exception)\b", line)]
        if carets and carets[0] + 1 < len(lines):
            message = lines[carets[0] + 1]
        else:
            message = named[0] if named else next((x for x in reversed(lines) if not x.startswith("Node.js v")), "")
        where = _JS_LINE.findall(stderr)[:1]
    message = re.sub(r"\S*tct-sandbox-[^/\s]+/", "", message).strip()[:300]  # the temporary folder means nothing later
    return f"{message} (line {where[-1]})" if where else message


def _classify(language: str, returncode, stderr: str, limit: str | None, timeout: float) -> tuple[str, str, str]:
    """`(kind, reason, detail)` of a finished run."""
    forbidden = re.search("\x1f[0-9a-f]+:forbidden:([^:\x1f]*):([^\x1f]*)\x1f", stderr)
    if (returncode == SETUP_EXIT or limit == SANDBOX_UNAVAILABLE) and "sandbox setup failed" in stderr:
        return SANDBOX_UNAVAILABLE, stderr.strip().splitlines()[-1][:300], ""
    if limit == TIMEOUT or returncode in (-signal.SIGXCPU, -signal.SIGKILL) and limit is None:
        return TIMEOUT, f"did not finish within {timeout:g} s", ""
    if limit == OUTPUT_TOO_LARGE:
        return OUTPUT_TOO_LARGE, f"wrote more than {OUTPUT_CAP // 1024} KiB of output", ""
    if returncode == -signal.SIGXFSZ:
        return OUTPUT_TOO_LARGE, f"wrote a file over {FILE_SIZE_BYTES >> 20} MB", ""
    if forbidden and returncode == NEEDS_INPUT_EXIT:
        return NEEDS_INPUT, "reads standard input, which the verifier cannot give", forbidden.group(2)
    if forbidden and returncode == FORBIDDEN_EXIT:
        return FORBIDDEN, forbidden.group(1), forbidden.group(2)
    if returncode == 0:
        return OK, "", ""
    message = _error_line(stderr, language)
    if any(word in stderr.lower() for word in _MEMORY_WORDS):
        return MEMORY, "ran out of its memory limit", ""
    missing = (_MISSING_PY if language == "python" else _MISSING_JS).search(stderr)
    if missing:
        return MISSING_MODULE, f"needs the module {missing.group(1)!r}, which is not available here", missing.group(1)
    permission = re.search(r"ERR_ACCESS_DENIED.*?permission: '(\w+)'", stderr, re.DOTALL)
    if permission:
        what = _JS_DENIED.get(permission.group(1), "uses a denied permission")
        return FORBIDDEN, what, permission.group(1)
    if "multiprocessing" in stderr and re.search(r"Read-only file system|Operation not permitted", message):
        # multiprocessing fails on its first semaphore (in the read-only /dev/shm), before it starts a process.
        return FORBIDDEN, "starts a process", message
    for pattern, what in _OS_DENIED:
        if pattern.search(message):
            return FORBIDDEN, what, message
    return ERROR, message or f"exited with status {returncode}", ""


def _result(language, returncode, stdout, stderr, limit, seconds, nonce, timeout) -> RunResult:
    clean, segments, values = _parse_markers(stdout, nonce)
    kind, reason, detail = _classify(language, returncode, stderr, limit, timeout)
    stderr = re.sub("\n?\x1f[^\x1f]*\x1f\n?", "", stderr)[-OUTPUT_CAP:]
    return RunResult(kind, reason, detail, returncode, clean, stderr, segments, values, round(seconds, 3))


@functools.cache
def javascript_available() -> tuple[bool, str]:
    """Whether node is here and runs in the sandbox (its permission model and V8 under the limits), checked once."""
    available, why = sandbox_available()
    if not available:
        return False, why
    if shutil.which(NODE) is None:
        return False, "node is not on PATH"
    probe = _run_javascript("console.log(6 * 7)", probes=(), expressions=(), timeout=10.0, module=False)
    if probe.kind != OK or probe.stdout.strip() != "42":
        reason = probe.reason or probe.stderr.strip()[-200:]
        return False, f"node does not run in the sandbox here ({probe.kind}: {reason})"
    return True, f"node with {_node_permission_flag(shutil.which(NODE)) or 'no permission model'}"


def _refused() -> RunResult | None:
    """A `sandbox_unavailable` result where the sandbox cannot confine a program (then nothing is started)."""
    available, why = sandbox_available()
    return None if available else RunResult(SANDBOX_UNAVAILABLE, why)


def run_python(
    source: str, *, probes: Sequence[dict] = (), expressions: Sequence[str] = (), timeout: float = DEFAULT_TIMEOUT
) -> RunResult:
    """
    Runs a Python program in the sandbox (the interpreter running this package, without site-packages: the
    standard library only, so that a verdict does not depend on what happens to be installed).

    Args:
        source (`str`): The program.
        probes (`Sequence[dict]`): Statements to observe, each `{"id", "line", "col", "kind"}` (the statement's
            first line and column): kind `"output"` records what the statement prints, `"value"` the value of an
            expression statement or of an assignment's target.
        expressions (`Sequence[str]`): Expressions evaluated after the program, in its namespace (values under
            `"x0"`, `"x1"`, ... of `RunResult.values`). Only evaluated when the program ends without error.
        timeout (`float`): Wall-clock seconds before the process group is killed.
    """
    return _refused() or _run_python(source, probes=probes, expressions=expressions, timeout=timeout)


def _run_python(source, *, probes, expressions, timeout) -> RunResult:
    nonce = secrets.token_hex(8)
    config = {"program": "program.py", "nonce": nonce, "probes": list(probes), "expressions": list(expressions)}
    files = {"program.py": source, "config.json": json.dumps(config), "_tcv_boot.py": _PY_BOOT_SOURCE}
    # -s -S -B: no user or system site-packages, no bytecode written. Not -I (-E): PYTHONHASHSEED=0 in the (empty
    # otherwise) environment makes set and dict-of-str orders, and so printed outputs, the same on every run.
    argv = [sys.executable, "-s", "-S", "-B", "{root}/_tcv_boot.py", "{root}/config.json"]
    returncode, out, err, limit, seconds = _execute(argv, files, timeout=timeout, memory_mb=PYTHON_MEMORY_MB)
    return _result("python", returncode, out, err, limit, seconds, nonce, timeout)


def run_javascript(
    source: str,
    *,
    probes: Sequence[dict] = (),
    expressions: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
    module: bool = False,
) -> RunResult:
    """
    Runs a JavaScript program with node in the sandbox; `module=True` runs it as an ES module (`import`/`export`).
    `probes` are single-line statements (see `_instrument_js`), `expressions` as in [`run_python`].
    """
    available, why = javascript_available()
    if not available:
        return RunResult(SANDBOX_UNAVAILABLE, why)
    return _run_javascript(source, probes=probes, expressions=expressions, timeout=timeout, module=module)


def _run_javascript(source, *, probes, expressions, timeout, module) -> RunResult:
    node = shutil.which(NODE) or NODE
    nonce = secrets.token_hex(8)
    name = "program.mjs" if module else "program.js"
    preload = _JS_PRELOAD.replace("__NONCE__", json.dumps(nonce)).replace("__FORBIDDEN__", str(FORBIDDEN_EXIT))
    files = {
        name: _instrument_js(source, probes, expressions),
        "preload.js": preload.replace("__NEEDS_INPUT__", str(NEEDS_INPUT_EXIT)),
    }
    argv = [node, *_node_permission_flags(), "--no-warnings", f"--max-old-space-size={NODE_HEAP_MB}"]
    argv += ["--require", "{root}/preload.js", f"{{root}}/{name}"]
    returncode, out, err, limit, seconds = _execute(argv, files, timeout=timeout, memory_mb=NODE_MEMORY_MB)
    return _result("javascript", returncode, out, err, limit, seconds, nonce, timeout)


def run_tool(
    argv: Sequence[str], files: dict[str, str], *, timeout: float = DEFAULT_TIMEOUT, memory_mb: int = TOOL_MEMORY_MB
) -> RunResult:
    """
    Runs a trusted parser (`bash -n`, `gcc -fsyntax-only`) on untrusted files in the sandbox: the same namespaces,
    read-only mounts and limits, but processes may be started (gcc runs cc1). `{root}` in `argv` is the folder
    that holds `files`. Its stderr is the parser's message; kind `"error"` means the parser rejected the input.
    """
    refused = _refused()
    if refused:
        return refused
    argv = [shutil.which(argv[0]) or argv[0], *argv[1:]]  # the launcher execs a path, it does not search PATH
    returncode, out, err, limit, seconds = _execute(argv, files, timeout=timeout, memory_mb=memory_mb, mode="tool")
    return _result("tool", returncode, out, err, limit, seconds, "-", timeout)
