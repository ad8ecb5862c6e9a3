"""The code verifier runs a response's code confined and checks what it claims: sound code passes, a wrong claimed
output (the curried-closure answer that says 12 and prints 7) fails with both values named, and the sandbox stops
endless loops, forks, runaway allocation, file writes and sockets, as root too, leaving nothing on disk. Without
`unshare` nothing runs at all. Hand-written cases; the whole file takes a few seconds of sandboxed runs."""

import errno
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from token_clean_trainer.purge_mix.verify import sandbox
from token_clean_trainer.purge_mix.verify.code import code_blocks, verify_code
from token_clean_trainer.purge_mix.verify.code_claims import comment_claim, same_value

F = "```"
AVAILABLE, WHY = sandbox.sandbox_available()
needs_sandbox = pytest.mark.skipif(not AVAILABLE, reason=f"no sandbox on this machine: {WHY}")
needs_node = pytest.mark.skipif(
    shutil.which("node") is None, reason="node is not installed: JavaScript code is then unverified, not run"
)
CLOSURE = f"""Currying with a closure:
{F}javascript
const curriedAdd = (a) => (b) => a + b;
const closure = (a) => (b) => {{ return curriedAdd(a)(b); }};
console.log(closure(3)(4)); // 12
{F}
"""
PRIME = f"""A trial-division prime test:
{F}python
def is_prime(n):
    if n < 2:
        return False
    for i in range(2, int(n ** 0.5) + 1):
        if n % i == 0:
            return False
    return True

print(is_prime(7))  # True
print([n for n in range(20) if is_prime(n)])
# Output: [2, 3, 5, 7, 11, 13, 17, 19]
{F}
`is_prime(9)` returns `False`, and `is_prime(n)` returns True if n is prime."""
HEAPQ = f"""{F}python
import heapq
nums = [5, 1, 4, 2]
heapq.heapify(nums)
print(heapq.heappop(nums))  # prints 1
print(heapq.nsmallest(2, [5, 1, 4, 2]))  # [1, 2]
{F}
Output:
{F}
1
[1, 2]
{F}"""


def verdicts(response: str, **kwargs):
    return verify_code({"instruction": "Explain.", "response": response}, [], **kwargs)


def only(response: str, **kwargs):
    found = verdicts(response, **kwargs)
    assert len(found) == 1, found
    return found[0]


def python(code: str) -> str:
    return f"{F}python\n{code}\n{F}"


def javascript(code: str) -> str:
    return f"{F}javascript\n{code}\n{F}"


@pytest.fixture
def sandbox_folders():
    """The sandbox's temporary folders that exist after the test and did not before (there should be none)."""
    root = tempfile.gettempdir()
    before = {name for name in os.listdir(root) if name.startswith("tct-sandbox-")}
    left = []
    yield left
    left += [name for name in os.listdir(root) if name.startswith("tct-sandbox-") and name not in before]
    assert not left, f"sandbox folders left behind: {left}"


# ---------------------------------------------------------------------------------------------------------------------
# Parsing, no sandbox


def test_code_blocks_languages_and_output_blocks():
    text = (
        f"{F}py\nprint(1)\n{F}\nOutput:\n{F}\n1\n{F}\n~~~js\nconsole.log(1);\n~~~\n"
        f"{F}\ndef f(x):\n    return x\nprint(f(2))\n{F}\n{F}\nsome notes\n{F}\n{F}text\nplain\n{F}"
    )
    blocks = code_blocks(text)
    assert [(b.language, b.output) for b in blocks] == [
        ("python", False),
        ("", True),
        ("javascript", False),
        ("python", False),  # no tag: inferred
        ("", False),  # no tag, no code signals: not run
        ("", False),
    ]
    assert verdicts("No code here, only `inline` spans.") == []


@pytest.mark.parametrize(
    "comment, claimed",
    [
        ("# 5", "5"),
        ("# prints 5", "5"),
        ("# Output: Hello, Bob!", "Hello, Bob!"),
        ("// => [2, 4, 6]", "[2, 4, 6]"),
        ("# -> True", "True"),
        ("# 7 (3 plus 4)", "7"),
        ("# Output:", ""),
        ("# print the result", None),
        ("# returns a list of primes", None),
        ("# Output: the sum of the list", None),
        ("# (this is the slow part of the code)", None),
        ("# 5 apples", None),
        ("# Output: ...", None),
    ],
)
def test_comment_claims_read_values_not_prose(comment, claimed):
    assert comment_claim(comment) == claimed


def test_comment_claim_about_the_assigned_variable():
    assert comment_claim("# total is 15", name="total") == "15"
    assert comment_claim("# total is the running sum", name="total") is None


@pytest.mark.parametrize(
    "claimed, actual, same",
    [
        ("[1, 2, 3]", "[ 1, 2, 3 ]", True),
        ("True", "true", True),
        ("None", "null", True),
        ("'hello'", "hello", True),
        ("7", "7.0", True),
        ("3.14", "3.141592653589793", True),
        ("7", "7.4", False),
        ('{"a": 1}', "{ a: 1 }", True),
        ("5", "Sum: 5", True),
        ("{'apple', 'banana'}", "{'banana', 'apple'}", True),
        ("[2, 3, 5, ...]", "[2, 3, 5, 7, 11]", True),
        ("12", "7", False),
        ("Hello, Bob.", "Hello, Bob", True),
    ],
)
def test_lenient_comparison(claimed, actual, same):
    assert same_value(claimed, actual) is same


def test_syntax_error_fails_without_running(monkeypatch):
    monkeypatch.setattr(sandbox.subprocess, "Popen", _refuse_popen)
    verdict = only(python("def f(x)\n    return x"))
    assert verdict.verifier == "code:python" and verdict.status == "failed"
    assert "syntax error" in verdict.reason and "line 1" in verdict.reason


# ---------------------------------------------------------------------------------------------------------------------
# Python through the sandbox


@needs_sandbox
@pytest.mark.parametrize("response", [PRIME, HEAPQ], ids=["prime", "heapq"])
def test_sound_python_passes_with_its_claims_checked(response, sandbox_folders):
    verdict = only(response)
    assert verdict.status == "passed", verdict
    assert verdict.details["claims_checked"] >= 3
    assert all(claim["status"] == "ok" for claim in verdict.details["claims"])
    assert verdict.details["executed_calls"] is True and verdict.details["blocks"] == 1


@needs_sandbox
def test_wrong_claimed_output_in_python_fails_naming_both_values():
    verdict = only(python("def add(a, b):\n    return a * b\n\nprint(add(2, 3))  # 5"))
    assert verdict.status == "failed"
    assert "`print(add(2, 3))`" in verdict.reason and "'6'" in verdict.reason and "'5'" in verdict.reason


@needs_sandbox
def test_right_claims_pass_in_their_forms():
    code = (
        "s = sum([2, 3])\nprint('Sum:', s)  # 5\nfor i in range(3):\n    print(i)\n# Output:\n# 0\n# 1\n# 2\n"
        "total = s * 2  # total is 10\nprint({'b': 2})  # => {'b': 2}"
    )
    verdict = only(python(code))
    assert verdict.status == "passed", verdict
    assert [c["status"] for c in verdict.details["claims"]] == ["ok"] * 4


@needs_sandbox
def test_repl_session_is_run_and_its_outputs_checked():
    session = ">>> def sq(x):\n...     return x * x\n>>> sq(4)\n16\n>>> [sq(i) for i in range(3)]\n[0, 1, 4]"
    assert only(python(session)).status == "passed"
    assert only(python(session.replace("16", "15"))).status == "failed"


@needs_sandbox
def test_prose_claims_are_evaluated_after_the_program():
    code = python("def add(a):\n    return lambda b: a + b")
    assert only(code + "\nSo `add(2)(3)` returns 5.").status == "passed"
    wrong = only(code + "\nSo `add(2)(3)` returns 6.")
    assert wrong.status == "failed" and "`add(2)(3)`" in wrong.reason and "'5'" in wrong.reason
    # A conditional statement about a free variable is no claim; a printed value is checked against the output.
    assert only(code + "\n`add(n)` returns True if n is positive.").status == "passed"
    assert only(python("print(sum([1, 2, 3]))") + "\nThis prints `7`.").status == "failed"


@needs_sandbox
def test_definitions_only_pass_and_say_nothing_was_called():
    verdict = only(python("def f(x):\n    return x + 1\n\nclass A:\n    pass"))
    assert verdict.status == "passed" and verdict.details["executed_calls"] is False


@needs_sandbox
def test_runtime_error_fails_and_an_announced_one_does_not():
    verdict = only(python("d = {}\nprint(d['missing'])"))
    assert verdict.status == "failed" and "KeyError" in verdict.reason and "line 2" in verdict.reason
    assert only(python("print(1)  # 1\nprint(1 / 0)  # raises ZeroDivisionError")).status == "passed"


@needs_sandbox
def test_code_shown_as_wrong_is_not_run_as_the_answer():
    buggy = "The original code has a bug:\n" + python("def avg(xs):\n    return sum(xs) / len(xs)\nprint(avg([]))")
    fixed = "\nFixed:\n" + python("def avg(xs):\n    return sum(xs) / len(xs) if xs else 0.0\nprint(avg([]))  # 0.0")
    verdict = only(buggy + fixed)
    assert verdict.status == "passed" and verdict.details["skipped_blocks"] == 1
    assert only(buggy).status == "unverified"


@needs_sandbox
def test_missing_module_and_input_are_unverified():
    assert only(python("import numpy as np\nprint(np.zeros(2))")).status == "unverified"
    verdict = only(python("name = input('Name: ')\nprint('Hi', name)"))
    assert verdict.status == "unverified" and "input" in verdict.reason


@needs_sandbox
@pytest.mark.parametrize(
    "code, words",
    [
        ("while True:\n    pass", "loops past the 1.5 s limit"),
        ("import os\nos.close(1)\nos.close(2)\nwhile True:\n    pass", "loops past the 1.5 s limit"),
        ("import os\nos.fork()", "starts a process"),
        ("import subprocess\nsubprocess.run(['true'])", "starts a process"),
        ("blocks = []\nwhile True:\n    blocks.append(bytearray(10**8))", "runs out of memory"),
        ("import socket\nsocket.create_connection(('10.0.0.1', 80), timeout=1)", "opens a socket"),
    ],
    ids=["loop", "loop_without_output", "fork", "subprocess", "allocation", "socket"],
)
def test_sandbox_stops_python(code, words, sandbox_folders):
    verdict = only(python(code), timeout=1.5)
    assert verdict.status == "failed" and words in verdict.reason, verdict


@needs_sandbox
def test_sandbox_stops_file_writes_outside_its_folder(tmp_path, sandbox_folders):
    target = tmp_path / "written.txt"
    verdict = only(python(f"open({str(target)!r}, 'w').write('x')"))
    assert verdict.status == "failed" and "writes files" in verdict.reason
    assert not target.exists()
    # Inside its own folder (relative paths, tempfile) a program may write: that folder is removed afterwards.
    inside = only(python("open('out.txt', 'w').write('x')\nprint(open('out.txt').read())  # x"))
    assert inside.status == "passed", inside


# ---------------------------------------------------------------------------------------------------------------------
# JavaScript through the sandbox


@needs_sandbox
@needs_node
def test_curried_closure_claiming_12_fails_it_prints_7():
    verdict = only(CLOSURE)
    assert verdict.verifier == "code:javascript" and verdict.status == "failed"
    assert "`console.log(closure(3)(4))`" in verdict.reason and "'7'" in verdict.reason and "'12'" in verdict.reason


@needs_sandbox
@needs_node
def test_sound_javascript_passes():
    code = (
        "const isPrime = (n) => {\n  if (n < 2) return false;\n  for (let i = 2; i * i <= n; i++) if (n % i === 0) "
        "return false;\n  return true;\n};\nconsole.log(isPrime(7)); // true\n"
        "console.log([1, 2, 3].map((x) => x * 2)); // => [2, 4, 6]\nconst primes = [2, 3, 4, 5].filter(isPrime); "
        "// [2, 3, 5]"
    )
    verdict = only(javascript(code) + "\nCalling `isPrime(9)` gives `false`.")
    assert verdict.status == "passed", verdict
    assert verdict.details["claims_checked"] == 4


@needs_sandbox
@needs_node
def test_javascript_syntax_and_runtime_errors_fail():
    syntax = only(javascript("const x = ;"))
    assert syntax.status == "failed" and "syntax error" in syntax.reason
    runtime = only(javascript("const o = null;\nconsole.log(o.name);"))
    assert runtime.status == "failed" and "TypeError" in runtime.reason and "line 2" in runtime.reason


@needs_sandbox
@needs_node
@pytest.mark.parametrize(
    "code, words",
    [
        ("while (true) {}", "loops past the 1.5 s limit"),
        ("require('child_process').execSync('ls');", "starts a process"),
        ("try { require('child_process').spawnSync('ls'); } catch (e) {}\nconsole.log('caught');", "starts a process"),
        ("require('http').get('http://10.0.0.1/');", "opens a socket"),
    ],
    ids=["loop", "child_process", "child_process_caught", "socket"],
)
def test_sandbox_stops_javascript(code, words, sandbox_folders):
    verdict = only(javascript(code), timeout=1.5)
    assert verdict.status == "failed" and words in verdict.reason, verdict


@needs_sandbox
@needs_node
def test_javascript_file_write_outside_is_refused(tmp_path, sandbox_folders):
    target = tmp_path / "written.txt"
    verdict = only(javascript(f"require('fs').writeFileSync({str(target)!r}, 'x');"))
    assert verdict.status == "failed" and "writes files" in verdict.reason
    assert not target.exists()


# ---------------------------------------------------------------------------------------------------------------------
# The kernel layers alone, and the refusal to run without them


@needs_sandbox
def test_kernel_layers_hold_without_the_language_hooks(tmp_path, sandbox_folders):
    """Plain `python -c` (no audit hook) in the sandbox, as whatever user runs the tests (root in CI): seccomp
    refuses fork and network sockets, the mounts outside the run's folder are read-only."""
    target = tmp_path / "kernel.txt"
    program = (
        "import os, socket\n"
        "def attempt(name, action):\n"
        "    try:\n        action()\n        print(name, 'allowed')\n"
        "    except OSError as error:\n        print(name, error.errno)\n"
        "attempt('fork', lambda: os.fork() or os._exit(0))\n"
        "attempt('socket', lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))\n"
        f"attempt('write', lambda: open({str(target)!r}, 'w'))\n"
        "attempt('here', lambda: open('here.txt', 'w').close())\n"
    )
    returncode, out, err, limit, _ = sandbox._execute([sys.executable, "-c", program], {}, timeout=5, memory_mb=512)
    assert returncode == 0 and limit is None, err
    assert out.split("\n")[:4] == [
        f"fork {errno.EPERM}",
        f"socket {errno.EPERM}",
        f"write {errno.EROFS}",
        "here allowed",
    ]
    assert not target.exists()


def _refuse_popen(*args, **kwargs):
    raise AssertionError(f"a process was started: {args}")


def test_without_unshare_nothing_runs_and_the_verdict_is_unverified(monkeypatch):
    monkeypatch.setattr(sandbox, "UNSHARE", "unshare-that-does-not-exist")
    monkeypatch.setattr(sandbox.subprocess, "Popen", _refuse_popen)
    sandbox.sandbox_available.cache_clear()
    sandbox.javascript_available.cache_clear()
    try:
        available, why = sandbox.sandbox_available()
        assert not available and "unshare-that-does-not-exist" in why
        found = verdicts(PRIME + "\n" + CLOSURE + f"\n{F}bash\necho hi\n{F}")
        assert [v.verifier for v in found] == ["code:python", "code:javascript", "code:shell"]
        assert all(v.status == "unverified" for v in found)
        assert "unshare" in found[0].reason
        assert sandbox.run_python("print(1)").kind == sandbox.SANDBOX_UNAVAILABLE
        assert sandbox.run_javascript("console.log(1)").kind == sandbox.SANDBOX_UNAVAILABLE
    finally:
        monkeypatch.undo()
        sandbox.sandbox_available.cache_clear()
        sandbox.javascript_available.cache_clear()


def test_other_languages_parse_check_or_unverified():
    typescript = only(f"{F}ts\nconst x: number = 5;\n{F}")
    assert typescript.status == "unverified" and "no parser for typescript" in typescript.reason
    assert only(f'{F}json\n{{"a": 1,}}\n{F}').status == "failed"
    assert only(f'{F}json\n{{"a": [1, 2]}}\n{F}').status == "passed"
    if AVAILABLE and shutil.which("bash"):
        assert only(f"{F}bash\nfor i in 1 2; do echo $i; done\n{F}").status == "passed"
        assert only(f"{F}bash\nif true; then echo x\n{F}").status == "failed"
    if AVAILABLE and shutil.which("gcc"):
        assert only(f"{F}c\nint main(void) {{ return 0 }}\n{F}").status == "failed"


def test_unshare_is_on_this_machine_where_the_ci_runs():
    """The sandbox needs util-linux's unshare; say so plainly where the tests run without it."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed: code verdicts here are all 'unverified'")
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unprivileged user namespaces are disabled here: {probe.stderr.strip()}")
    assert AVAILABLE, WHY
