"""The Python side of the sandbox: runs one untrusted program (never imported by the package).

Copied into the run's folder and started by `_launch.py` as `python -s -S -B _tcv_boot.py CONFIG.json` inside the
namespaces. Before the program runs it
installs an audit hook (`sys.addaudithook`; the program cannot remove it) that ends the process at once, with a marker
line on stderr and exit status `FORBIDDEN_EXIT`, when the program starts a process, opens a network socket, writes a
file outside the sandbox's folder or loads native code. The kernel layers of `_launch.py` would refuse those anyway;
the hook says which operation it was, and it cannot be caught by the program (`os._exit`, not an exception). Reading
standard input ends the process the same way with `NEEDS_INPUT_EXIT`: the verifier has no input to give.

The program is compiled from its source with the probes of CONFIG applied to its syntax tree: a probed statement
is framed by begin/end markers on stdout (the output of that statement alone), or its value is written as a marker
(an expression statement, or the variable of an assignment). The expressions of CONFIG are evaluated after the
program, in its namespace. `sandbox.py` reads the markers back out of stdout.
"""

import ast
import builtins
import json
import os
import socket
import sys
import traceback

FORBIDDEN_EXIT = 113
NEEDS_INPUT_EXIT = 114

_PROCESS = ("os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen")
_PROCESS_EVENTS = dict.fromkeys(_PROCESS, "starts a process") | {"os.startfile": "starts a process"}
# Name lookups too: they are the first step of every connection, and would only fail here with a misleading error.
_SOCKET_EVENTS = frozenset(
    ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
     "socket.gethostbyaddr", "socket.getnameinfo")
)  # fmt: skip
_NATIVE_EVENTS = frozenset(("ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function"))
# Audit events that change the file system, and which of their arguments are the paths changed.
_PATH_EVENTS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.chmod": (0,), "os.chown": (0,),
    "os.link": (1,), "os.symlink": (1,), "os.truncate": (0,), "os.utime": (0,), "os.chflags": (0,),
    "os.lchflags": (0,), "os.lchmod": (0,), "shutil.copyfile": (1,), "shutil.copymode": (1,), "shutil.copystat": (1,),
    "shutil.copytree": (1,), "shutil.move": (0, 1), "shutil.rmtree": (0,), "shutil.chown": (0,),
    "shutil.make_archive": (0,), "shutil.unpack_archive": (1,),
}  # fmt: skip
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class Sandbox:
    """The audit hook and the probes' markers of one run; `nonce` makes the markers unlikely to occur by chance."""

    def __init__(self, nonce: str, root: str):
        self.nonce = nonce
        self.root = os.path.realpath(root)

    def marker(self, *parts) -> str:
        return "\x1f" + ":".join([self.nonce, *map(str, parts)]) + "\x1f"

    def stop(self, what: str, event: str, exit_code: int = FORBIDDEN_EXIT) -> None:
        try:
            sys.stdout.flush()
        except Exception:  # noqa: S110 - the process ends next; a broken stdout must not keep it alive
            pass
        os.write(2, ("\n" + self.marker("forbidden", what, event) + "\n").encode())
        os._exit(exit_code)

    def inside(self, path) -> bool:
        if isinstance(path, int):
            return True  # an open file descriptor: opening it was checked
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        resolved = os.path.realpath(str(path))
        return resolved == os.devnull or resolved == self.root or resolved.startswith(self.root + os.sep)

    def hook(self, event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
            if writes and not self.inside(path):
                self.stop("writes files", f"open({path!r})")
        elif event in _PATH_EVENTS:
            if not all(self.inside(args[i]) for i in _PATH_EVENTS[event] if args[i] is not None):
                self.stop("writes files", event)
        elif event in _PROCESS_EVENTS:
            self.stop(_PROCESS_EVENTS[event], event)
        elif event == "socket.__new__":
            # AF_UNIX socket pairs stay inside the process (asyncio's event loop makes one); network families do not.
            if args[1] != socket.AF_UNIX:
                self.stop("opens a socket", event)
        elif event in _SOCKET_EVENTS:
            self.stop("opens a socket", event)
        elif event in _NATIVE_EVENTS:
            self.stop("loads native code", event)


class _NoInput:
    """Standard input of the program: any read ends the run as 'needs input' (an empty stdin would make `input()`
    raise EOFError, which the program may catch and then go on with made-up data)."""

    def __init__(self, sandbox: Sandbox):
        self._sandbox = sandbox

    def _stop(self, *args, **kwargs):
        self._sandbox.stop("reads input", "sys.stdin", NEEDS_INPUT_EXIT)

    read = readline = readlines = fileno = __iter__ = __next__ = _stop

    def isatty(self) -> bool:
        return False


class Probes(ast.NodeTransformer):
    """Frames the probed statements (keyed by `(line, column)`) with calls of the marker functions."""

    def __init__(self, probes: list[dict]):
        self.probes = {(p["line"], p["col"]): p for p in probes}

    @staticmethod
    def _call(name: str, *args: ast.expr) -> ast.stmt:
        return ast.Expr(ast.Call(ast.Name(name, ast.Load()), list(args), []))

    def visit(self, node):
        node = super().visit(node)
        if not isinstance(node, ast.stmt):
            return node
        probe = self.probes.get((node.lineno, node.col_offset))
        if probe is None:
            return node
        pid = ast.Constant(probe["id"])
        if probe["kind"] in ("value", "both") and isinstance(node, ast.Expr):
            shown = ast.copy_location(self._call("__tcv_value", pid, node.value), node)
            if probe["kind"] == "value":
                return shown
            begin, end = self._call("__tcv_begin", pid), self._call("__tcv_end", pid)
            return [ast.copy_location(begin, node), shown, ast.copy_location(end, node)]
        if probe["kind"] == "value" and isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign) and node.value:
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            return [node, ast.copy_location(self._call("__tcv_value", pid, _load(target)), node)]
        begin, end = self._call("__tcv_begin", pid), self._call("__tcv_end", pid)
        return [ast.copy_location(begin, node), node, ast.copy_location(end, node)]


def _load(target: ast.expr) -> ast.expr:
    """The target of an assignment, read instead of written (`x`, `a.b`, `a[0]`)."""
    copy = ast.parse(ast.unparse(target), mode="eval").body
    return ast.copy_location(copy, target)


def _show(value) -> dict:
    shown = {}
    for name, render in (("repr", repr), ("str", str)):
        try:
            shown[name] = render(value)[:4000]
        except Exception as error:  # a broken __repr__ of the program's own class
            shown[name] = f"<{type(error).__name__}>"
    return shown


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        config = json.load(f)
    with open(config["program"], encoding="utf-8") as f:
        source = f.read()
    box = Sandbox(config["nonce"], os.getcwd())
    out = sys.stdout

    def value(pid, shown):
        out.write(box.marker("v", pid, json.dumps(_show(shown))))
        return shown

    tree = Probes(config.get("probes", [])).visit(ast.parse(source, "<snippet>"))
    code = compile(ast.fix_missing_locations(tree), "<snippet>", "exec")
    namespace = {
        "__name__": "__main__",
        "__builtins__": builtins,
        "__tcv_begin": lambda pid: out.write(box.marker("b", pid)),
        "__tcv_end": lambda pid: out.write(box.marker("e", pid)),
        "__tcv_value": value,
    }
    sys.argv = ["<snippet>"]
    sys.stdin = _NoInput(box)
    sys.addaudithook(box.hook)
    status = 0
    try:
        exec(code, namespace)  # noqa: S102 - this is the sandbox: the process is confined by _launch.py and the hook
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        status = 1
    if status == 0:
        for i, expression in enumerate(config.get("expressions", [])):
            try:
                shown = eval(compile(expression, "<claim>", "eval"), namespace)  # noqa: S307 - sandboxed as above
                out.write(box.marker("v", f"x{i}", json.dumps(_show(shown))))
            except BaseException as error:  # the claim's expression is not valid here: recorded, never fatal
                out.write(box.marker("v", f"x{i}", json.dumps({"error": f"{type(error).__name__}: {error}"[:300]})))
    out.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
