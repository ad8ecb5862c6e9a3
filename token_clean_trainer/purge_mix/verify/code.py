"""The code verifier: runs the code of a fused pair's response in the sandbox and checks what it claims.

A small model writes code that looks right and is not (`console.log(closure(3)(4)); // 12` prints 7). For each
language in the response's fenced code blocks, [`verify_code`] returns one [`Verdict`]:

- Python and JavaScript: the blocks of the language, joined in order into one program (later blocks use earlier
  definitions; blocks that only parse apart run apart), are parsed, run in the sandbox (`sandbox.py`), and every
  claim about their output is compared with what ran: comments (`print(x)  # 5`, `# Output: 5` under a print,
  `// => 5`), `>>>` sessions, an output block in the prose ("Output:" and a fence), prose sentences ("`add(2)(3)`
  returns 5", "this prints 12", whose expression is evaluated after the program);
- other languages: a parse check where a parser is on PATH (`bash -n`, `gcc`/`g++ -fsyntax-only`) or in Python
  (JSON, YAML); otherwise unverified.

`passed`: it ran (or parsed) and every checked claim matched. `failed`: a syntax error, an exception, a claim that does
not match, or a program the sandbox stopped (endless loop, memory, starting a process, opening a socket, writing
outside its folder). `unverified`: it needs a module or input that is not there, no parser exists here, or the
sandbox is unavailable (then nothing is executed).
"""

import ast
import dataclasses
import doctest
import io
import json
import re
import shutil
import tokenize
from dataclasses import dataclass, field
from typing import Any

from . import code_claims as claims_lib
from . import sandbox
from .base import FAILED, PASSED, UNVERIFIED, Verdict
from .sandbox import sandbox_available

__all__ = ["code_blocks", "sandbox_available", "verify_code"]

_LANGUAGES = {
    "python": ("python", "py", "python3", "py3", "pycon", "python-repl"),
    "javascript": ("javascript", "js", "node", "nodejs", "mjs", "cjs", "es6", "ecmascript"),
    "typescript": ("typescript", "ts", "tsx"),
    "jsx": ("jsx",),
    "shell": ("bash", "sh", "shell", "zsh", "ksh"),
    "c": ("c", "h"),
    "cpp": ("cpp", "c++", "cc", "cxx", "hpp", "hxx"),
    "json": ("json",),
    "yaml": ("yaml", "yml"),
}
_TAGS = {tag: language for language, tags in _LANGUAGES.items() for tag in tags}
# Fences that show output, a terminal session or prose: not code to run.
_NOT_CODE = {
    "text", "txt", "plaintext", "plain", "output", "out", "result", "console", "terminal", "shell-session",
    "sh-session", "bash-session", "log", "logs", "markdown", "md", "diff", "csv", "tsv", "none", "raw", "stdout",
}  # fmt: skip
_EXECUTABLE = ("python", "javascript")
# Parsers run in the sandbox (tool mode): argv with {root}/program.<ext>.
_PARSERS = {
    "shell": ("sh", ["bash", "-n", "{root}/program.sh"]),
    "c": ("c", ["gcc", "-fsyntax-only", "-w", "-x", "c", "{root}/program.c"]),
    "cpp": ("cpp", ["g++", "-fsyntax-only", "-w", "-x", "c++", "-std=c++17", "{root}/program.cpp"]),
}
_OPEN_FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})\s*\{?\.?(?P<tag>[\w+#.-]*)[^\n`]*$")
# The line before an output block: "Output:", "This prints:", "You should see:", "Result:" (alone).
_OUTPUT_LEAD = re.compile(
    r"^.{0,80}(?:\boutputs?\b|\bprints?\b|\bprinted\b|\bdisplays?\b|\byou(?:'ll| will| should) see\b|\blogs?\b)[^\n]*:$"
    r"|^\W*results?\W*:$",
    re.IGNORECASE,
)
# The sentence before a block that presents it as wrong code (the bug a fix starts from, a mistake to avoid).
_SHOWN_WRONG = re.compile(
    r"\b(?:buggy|broken|incorrect|faulty|problematic|erroneous|flawed|wrong|mistakes?|anti-?pattern|bad practice"
    r"|original code|(?:does ?n[o']t|won'?t|will not) work|will (?:fail|raise|throw|crash)|has an? (?:bug|error)"
    r"|(?:raises|throws) an?\s+\w*(?:error|exception)|contains an? (?:bug|error)|don'?t do this|avoid this)\b",
    re.IGNORECASE,
)
_NONDETERMINISTIC = {
    "python": re.compile(r"\brandom\b|\btime\.(?:time|perf_counter|monotonic)\(|\.now\(|\.today\(|\buuid\b|\bsecrets\b"
                         r"|\bos\.urandom\b|\bid\(|\bhash\(|\bthreading\b|\bos\.getpid\b"),
    "javascript": re.compile(r"Math\.random|Date\.now|new Date\(|\bcrypto\b|performance\.now|process\.hrtime"
                             r"|\bsetTimeout\b|\bsetInterval\b"),
}  # fmt: skip
_READS_INPUT = {
    "python": re.compile(r"\binput\(|\bsys\.stdin\b|\bsys\.argv\b|\bfileinput\b|\bargparse\b|\bgetpass\b"),
    "javascript": re.compile(r"\bprocess\.stdin\b|\bprocess\.argv\b|\breadline\b|\bprompt\("),
}
_LIMIT_WORDS = {
    sandbox.TIMEOUT: "loops past the {timeout:g} s limit",
    sandbox.MEMORY: "runs out of memory",
    sandbox.OUTPUT_TOO_LARGE: "{reason}",
}


@dataclass
class Block:
    """One fenced block of a response: its language (`""` when not code), fence tag, code and span in the text."""

    language: str
    tag: str
    code: str
    start: int
    end: int
    output: bool = False  # an output block announced by the prose ("Output:" on the line before)
    shown_wrong: bool = False  # introduced as wrong ("Here is the buggy code:"): the answer does not claim it works


@dataclass
class Program:
    """One program to run: its source, the sandbox probes and the claims checked on its result."""

    source: str
    blocks: list[int]
    probes: list[dict] = field(default_factory=list)
    claims: list[dict] = field(default_factory=list)
    expressions: list[str] = field(default_factory=list)
    where: Any = None  # line of the program -> "block 2, line 3", for the reader


def _infer_language(code: str) -> str:
    """The language of a fence without a tag, from simple signals; `""` (not code) unless one language clearly
    leads: output, prose and terminal sessions in bare fences are common and must not run."""
    python = len(re.findall(r"^\s*(?:def |class \w+[:(]|import \w|from \w+ import |elif |print\(|for \w+ in )", code,
                            re.M))  # fmt: skip
    python += len(re.findall(r":\s*$", code, re.M)) > 0 and bool(re.search(r"^\s{4}\S", code, re.M))
    script = len(re.findall(r"\b(?:const|let|var) \w+\s*=|\bfunction\s*\w*\(|=>|console\.log\(|\brequire\(|===", code))
    script += len(re.findall(r";\s*$", code, re.M)) > 1
    if python >= 2 and python > script:
        return "python"
    if script >= 2 and script > python:
        return "javascript"
    return ""


def code_blocks(text: str) -> list[Block]:
    """
    The fenced blocks of `text` (```` ``` ```` or `~~~`, with or without a language tag; an unclosed fence runs to
    the end), with the language normalised (`"python"`, `"javascript"`, `"c"`, ...; `""` for output and prose) and
    the blocks that the prose announces as output ("Output:" just before) marked `output=True`.
    """
    lines = text.split("\n")
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    blocks, i = [], 0
    while i < len(lines):
        match = _OPEN_FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        fence, tag = match.group("fence"), match.group("tag").lower()
        body, j = [], i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped and set(stripped) == {fence[0]} and len(stripped) >= len(fence):
                break
            if stripped.endswith(fence) and fence[0] == "`":  # "    return x```": code and fence on one line
                body.append(lines[j].rstrip()[: -len(fence)])
                break
            body.append(lines[j])
            j += 1
        code = "\n".join(body)
        lead = next((line for line in reversed(lines[max(0, i - 2) : i]) if line.strip()), "")
        lead = lead.replace("*", "").replace("_", " ").strip()
        output = (tag in _NOT_CODE or not tag and not _infer_language(code)) and bool(_OUTPUT_LEAD.search(lead))
        language = "" if tag in _NOT_CODE or output else _TAGS.get(tag, tag if tag else _infer_language(code))
        before = text[blocks[-1].end if blocks else 0 : starts[i]].rstrip()
        sentence = re.split(r"(?<=[.!?])\s+|\n\s*\n", before)[-1] if before else ""
        wrong = bool(_SHOWN_WRONG.search(sentence[-300:]))
        blocks.append(Block(language, tag, code, starts[i], starts[min(j + 1, len(lines))], output, wrong))
        i = j + 1
    return blocks


def _prose_segments(text: str, blocks: list[Block]) -> list[tuple[str, int]]:
    """The prose between the blocks, each with the index of the block that precedes it (-1 before the first)."""
    segments, position = [], 0
    for k, block in enumerate(blocks):
        segments.append((text[position : block.start], k - 1))
        position = block.end
    segments.append((text[position:], len(blocks) - 1))
    return segments


def _defines(source: str, name: str) -> bool:
    pattern = rf"\b(?:def|class|function|const|let|var)\s+{re.escape(name)}\b|^\s*{re.escape(name)}\s*="
    return bool(re.search(pattern, source, re.M))


def _claim_language(
    claim: dict, near: int, blocks: list[Block], languages: list[str], sources: dict[str, str]
) -> str | None:
    """The language a prose or output-block claim is about: the one that defines the function the expression calls,
    else the executable block nearest before the claim (or the first one after it)."""
    name = re.match(r"\s*([A-Za-z_$][\w$]*)", claim.get("expression", ""))
    if name:
        for language in languages:
            if _defines(sources[language], name.group(1)):
                return language
    before = [b.language for b in blocks[: near + 1] if b.language in languages]
    after = [b.language for b in blocks[near + 1 :] if b.language in languages]
    return (before[-1:] or after[:1] or [None])[0]


# ---------------------------------------------------------------------------------------------------------------------
# Python


def _repl_session(code: str) -> tuple[str, list[tuple[int, str]]] | None:
    """A `>>>` session as a script and the outputs it shows: `(source, [(first line of the example, want)])`.
    Examples that show a traceback are left out (they would stop the script)."""
    if not re.search(r"^\s*>>>", code, re.M):
        return None
    try:
        examples = doctest.DocTestParser().get_examples(code)
    except ValueError:
        return None
    lines, wants = [], []
    for example in examples:
        if example.want.lstrip().startswith("Traceback"):
            continue
        if example.want.strip():
            wants.append((len(lines) + 1, example.want))
        lines += example.source.rstrip("\n").split("\n")
    return "\n".join(lines), wants


def _is_print(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id in ("print", "pprint")
    )


def _prints_elsewhere(node: ast.AST) -> bool:
    """`print(..., file=sys.stderr)`: its output is not on stdout, where the probes look."""
    return _is_print(node) and any(keyword.arg in ("file", "stream") for keyword in node.value.keywords)


def _simple_statements(tree: ast.AST) -> dict[int, ast.stmt]:
    """The last simple statement (expression or assignment) ending on each line."""
    ends = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr | ast.Assign | ast.AnnAssign | ast.AugAssign):
            if node.end_lineno not in ends or ends[node.end_lineno].col_offset < node.col_offset:
                ends[node.end_lineno] = node
    return ends


def _assigned_name(node: ast.AST | None) -> str | None:
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return targets[0].id if len(targets) == 1 and isinstance(targets[0], ast.Name) else None


def _comments(source: str) -> list[tuple[int, str, bool]]:
    """`(line, text, trailing)` of each comment; trailing: code precedes it on its line."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return []
    return [(t.start[0], t.string, bool(t.line[: t.start[1]].strip())) for t in tokens if t.type == tokenize.COMMENT]


def _following_claim(comments: list[tuple[int, str, bool]], index: int) -> tuple[str, int] | None:
    """The claim of a comment line under a statement, with the value lines that follow a bare `# Output:` or a
    column of literal comment lines (`# 0`, `# 1`, ...); `(claim, lines used)`."""
    line, text, _ = comments[index]
    first = claims_lib.comment_claim(text)
    if first is None:
        return None
    values, used = ([first] if first else []), 1
    for next_line, next_text, trailing in comments[index + 1 : index + 30]:
        value = next_text.lstrip("#/ ").rstrip()
        if trailing or next_line != line + used or not value:
            break
        if first and not claims_lib.looks_like_value(value):
            break
        values.append(value)
        used += 1
    return ("\n".join(values), used) if values else None


def _python_claims(source: str, tree: ast.AST, where) -> tuple[list[dict], list[dict]]:
    """Probes and claims of the comments of a Python program (see the module docstring). `where(line)` names a
    program line for the reader ("block 2, line 3")."""
    statements, lines = _simple_statements(tree), source.split("\n")
    probes, claims, probed = [], [], {}
    comments = _comments(source)
    skip = set()
    for index, (line, text, trailing) in enumerate(comments):
        if index in skip:
            continue
        if trailing:
            node = statements.get(line)
            claimed, standalone = claims_lib.comment_claim(text, name=_assigned_name(node)), False
        else:
            previous = next((n for n in range(line - 1, 0, -1) if lines[n - 1].strip()), 0)
            node = statements.get(previous) if previous and not lines[previous - 1].lstrip().startswith("#") else None
            found = _following_claim(comments, index) if node is not None else None
            claimed, standalone = (found[0], True) if found else (None, False)
            skip.update(range(index, index + (found[1] if found else 1)))
        if node is None or not claimed or _prints_elsewhere(node):
            continue
        if isinstance(node, ast.Expr):
            kind = "output" if _is_print(node) else "both"
        elif standalone:
            continue  # a comment under an assignment usually introduces the next code
        else:
            kind = "value"
        key = (node.lineno, node.col_offset)
        if key not in probed:
            probed[key] = f"p{len(probed)}"
            probes.append({"id": probed[key], "line": node.lineno, "col": node.col_offset, "kind": kind})
        expression = ast.get_source_segment(source, node) or lines[node.lineno - 1].strip()
        claims.append(_claim(probed[key], "comment", where(line), expression, claimed, kind, standalone))
    return probes, claims


def _claim(pid, source, where, expression, claimed, kind, whole_output=False) -> dict:
    return {
        "id": pid,
        "source": source,
        "where": where,
        "expression": expression,
        "claimed": claimed,
        "kind": kind,
        "whole_output": whole_output,  # also accept the claim as lines of the whole output (a comment under prints)
    }


def _repl_claims(tree: ast.AST, wants: list[tuple[int, str]], offset: int, where, start: int) -> tuple[list, list]:
    """Probes and claims of a `>>>` session's shown outputs: an expression's echo (its repr) or what it printed."""
    probes, claims = [], []
    bounds = [line + offset for line, _ in wants] + [10**9]
    body = tree.body if isinstance(tree, ast.Module) else []
    for k, (_, want) in enumerate(wants):
        nodes = [n for n in body if bounds[k] <= n.lineno < bounds[k + 1]]
        nodes = [n for n in nodes if n.lineno < bounds[k] + 50]
        if not nodes:
            continue
        pid = f"r{start + k}"
        single = len(nodes) == 1 and isinstance(nodes[0], ast.Expr) and not _is_print(nodes[0])
        kind = "both" if single else "output"
        probes += [{"id": pid, "line": n.lineno, "col": n.col_offset, "kind": kind} for n in nodes]
        claims.append(_claim(pid, ">>> session", where(bounds[k]), ast.unparse(nodes[0]), want.strip(), kind))
    return probes, claims


def _executes_calls(tree: ast.AST) -> bool:
    """Whether the program calls anything at module level (not only inside definitions)."""
    pending = list(getattr(tree, "body", []))
    while pending:
        node = pending.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            continue
        if isinstance(node, ast.Call):
            return True
        pending.extend(ast.iter_child_nodes(node))
    return False


def _python_programs(blocks: list[Block], indexes: list[int]) -> tuple[list[Program], str | None]:
    """The Python program(s) of the blocks with their probes and comment claims, or a syntax error."""
    parts = []
    for k in indexes:
        session = _repl_session(blocks[k].code)
        parts.append((k, *(session or (blocks[k].code, []))))
    joined = "\n\n".join(code for _, code, _ in parts)
    try:
        ast.parse(joined)
        groups = [parts]
    except SyntaxError:
        for number, (_, code, _) in enumerate(parts, 1):
            try:
                ast.parse(code)
            except SyntaxError as error:
                label = f"block {number}, " if len(parts) > 1 else ""
                return [], f"syntax error: {error.msg} ({label}line {error.lineno})"
        groups = [[part] for part in parts]
    programs = []
    for group in groups:
        source, offsets, position = "", [], 1
        for _, code, _ in group:
            offsets.append(position)
            source += code + "\n\n"
            position += code.count("\n") + 2
        tree = ast.parse(source)

        def where(line, group=group, offsets=offsets):
            n = max(i for i, start in enumerate(offsets) if start <= line)
            number = indexes.index(group[n][0]) + 1
            return (f"block {number}, " if len(indexes) > 1 else "") + f"line {line - offsets[n] + 1}"

        probes, claims = _python_claims(source, tree, where)
        for n, (_, _, wants) in enumerate(group):
            more = _repl_claims(tree, wants, offsets[n] - 1, where, len(claims))
            probes, claims = probes + more[0], claims + more[1]
        programs.append(Program(source, [k for k, _, _ in group], probes, claims, where=where))
    return programs, None


# ---------------------------------------------------------------------------------------------------------------------
# JavaScript

_JS_LOG = re.compile(r"^(\s*)(console\.(?:log|info)\(.*\))\s*;?\s*$")
_JS_DECLARATION = re.compile(r"^(\s*)((?:const|let|var)\s+([A-Za-z_$][\w$]*)\s*=\s*.+?)\s*;?\s*$")
_JS_CALL = re.compile(
    r"^(\s*)((?!(?:if|for|while|switch|return|function|class|new|typeof|await|yield|throw|delete|catch|else|do)\b"
    r"|console\.)"
    r"[A-Za-z_$][\w$.]*\s*\(.*\))\s*;?\s*$"
)
_JS_CONTINUES = tuple(",=+-*/&|?:.>")


def _js_lines(source: str) -> list[tuple[str, str | None, bool]]:
    """`(code, comment, complete)` per line: the code before a `//` comment, the comment, and whether the line is
    a whole statement candidate (it starts outside strings, template literals, block comments and brackets, and its
    brackets and braces balance)."""
    out, state, depth = [], None, 0
    for line in source.split("\n"):
        clean, braces, comment, end, i = state is None and depth == 0, 0, None, len(line), 0
        while i < len(line):
            char = line[i]
            if state == "/*":
                if line.startswith("*/", i):
                    state, i = None, i + 1
            elif state:
                if char == "\\":
                    i += 1
                elif char == state:
                    state = None
            elif line.startswith("//", i):
                comment, end = line[i + 2 :], i
                break
            elif line.startswith("/*", i):
                state, i = "/*", i + 1
            elif char in "'\"`":
                state = char
            elif char in "([{" or char in ")]}":
                depth += (char in "([") - (char in ")]")
                braces += (char == "{") - (char == "}")
            i += 1
        if state in ("'", '"'):
            state = None  # an unterminated quote ends with its line
        depth = max(depth, 0)
        out.append((line[:end], comment, clean and state is None and depth == 0 and braces == 0))
    return out


def _js_statement(code: str, previous: str) -> tuple[str, int, int, str | None] | None:
    """`(kind, start, end, declared name)` of a one-line statement that a probe can frame, else `None`."""
    if previous.rstrip().endswith(_JS_CONTINUES) or code.lstrip().startswith((".", "?", ":")):
        return None
    for pattern, kind in ((_JS_LOG, "output"), (_JS_DECLARATION, "value"), (_JS_CALL, "both")):
        match = pattern.match(code)
        if match:
            start = len(match.group(1))
            name = match.group(3) if kind == "value" else None
            return kind, start, len(code.rstrip()), name
    return None


def _js_claims(source: str, where) -> tuple[list[dict], list[dict]]:
    """Probes and claims of the `//` comments of a JavaScript program (on a statement's line or under it)."""
    lines, raw = _js_lines(source), source.split("\n")
    probes, claims, probed, previous_code, skip = [], [], {}, "", set()
    statements = {}
    for number, (code, _, complete) in enumerate(lines, 1):
        if code.strip():
            found = _js_statement(code, previous_code) if complete else None
            if found:
                statements[number] = found
            previous_code = code
    comment_lines = [(n, "//" + c, bool(code.strip())) for n, (code, c, _) in enumerate(lines, 1) if c is not None]
    for index, (line, text, trailing) in enumerate(comment_lines):
        if index in skip:
            continue
        if trailing:
            name = statements[line][3] if line in statements else None
            target, claimed, standalone = line, claims_lib.comment_claim(text, name=name), False
        else:
            target = next((n for n in range(line - 1, 0, -1) if raw[n - 1].strip()), 0)
            target = target if target and lines[target - 1][0].strip() else 0  # under code, not under a comment
            found = _following_claim(comment_lines, index) if target in statements else None
            claimed, standalone = (found[0], True) if found else (None, False)
            skip.update(range(index, index + (found[1] if found else 1)))
        if target not in statements or not claimed or (standalone and statements[target][0] == "value"):
            continue
        kind, start, end, name = statements[target]
        if target not in probed:
            probed[target] = f"p{len(probed)}"
            probe = {"id": probed[target], "line": target, "start": start, "end": end, "kind": kind, "name": name}
            probes.append(probe)
        expression = lines[target - 1][0][start:end].rstrip().rstrip(";")
        claims.append(_claim(probed[target], "comment", where(line), expression, claimed, kind, standalone))
    return probes, claims


def _js_programs(blocks: list[Block], indexes: list[int], timeout: float) -> tuple[list[Program], str | None]:
    """The JavaScript program(s) of the blocks: joined when they parse together (`node --check`), else one per
    block; a block that does not parse alone is a syntax error."""
    codes = [blocks[k].code for k in indexes]
    joined = "\n\n".join(codes)
    error = _js_syntax(joined, timeout)
    groups = [list(range(len(indexes)))]
    if error and len(codes) > 1:
        for number, code in enumerate(codes, 1):
            block_error = _js_syntax(code, timeout)
            if block_error:
                return [], f"syntax error: {block_error} (block {number})"
        groups, error = [[n] for n in range(len(codes))], None
    if error:
        return [], f"syntax error: {error}"
    programs = []
    for group in groups:
        source = "\n\n".join(codes[n] for n in group) + "\n"
        offsets = [1]
        for n in group[:-1]:
            offsets.append(offsets[-1] + codes[n].count("\n") + 2)

        def where(line, group=group, offsets=offsets):
            n = max(i for i, start in enumerate(offsets) if start <= line)
            return (f"block {group[n] + 1}, " if len(indexes) > 1 else "") + f"line {line - offsets[n] + 1}"

        probes, claims = _js_claims(source, where)
        programs.append(Program(source, [indexes[n] for n in group], probes, claims, where=where))
    return programs, None


def _is_module(source: str) -> bool:
    return bool(re.search(r"^\s*(?:import\s+[\w{*'\"]|export\s+(?:default|const|function|class|let|var|\{))", source,
                          re.M))  # fmt: skip


def _js_syntax(source: str, timeout: float) -> str | None:
    """node's parse error for `source` (`node --check`, in the sandbox), or `None` when it parses."""
    node = shutil.which(sandbox.NODE)
    name = "program.mjs" if _is_module(source) else "program.js"
    argv = [node, "--check", "{root}/" + name]
    result = sandbox.run_tool(argv, {name: source}, timeout=timeout, memory_mb=sandbox.NODE_MEMORY_MB)
    if result.kind != sandbox.ERROR:  # parsed, or not checked (the run that follows reports why)
        return None
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    message = next((line for line in lines if re.match(r"\w*Error\b", line)), lines[-1] if lines else result.reason)
    where = re.search(r"program\.m?js:(\d+)", result.stderr)
    return message + (f" (line {where.group(1)})" if where else "")


# ---------------------------------------------------------------------------------------------------------------------
# Running and judging


def _forms(claim: dict, result: sandbox.RunResult) -> list[str] | None:
    """The actual results a claim may match, or `None` when its statement never ran (nothing to compare)."""
    segments = result.segments.get(claim["id"], [])
    values = [v for v in result.values.get(claim["id"], []) if "error" not in v]
    shown = [v.get("repr", v.get("inspect", "")) for v in values] + [v.get("str", "") for v in values]
    if claim["kind"] == "output":
        return ["".join(segments), *segments] if segments else None
    if claim["kind"] == "value":
        return shown or None
    if not segments and not values:
        return None
    echoes = [s + v.get("repr", v.get("inspect", "")) for s, v in zip(segments, values)]
    printed = ["".join(segments), *segments]
    # The first form is the one a mismatch reports: what the statement printed, if anything, else its value.
    return printed + shown + echoes if "".join(segments).strip() else shown + printed + echoes


def _check(claim: dict, result: sandbox.RunResult, nondeterministic: bool) -> dict:
    """The claim with its outcome: `status` `"ok"`, `"mismatch"` or `"unchecked"` (why in `note`), and `actual`."""
    claimed = claim["claimed"]
    if claim["source"] == "output block":
        ok, actual = claims_lib.lines_within(claimed, result.stdout), result.stdout.strip()
    elif claim["source"] == "prose" and claim["kind"] == "output":
        output_lines = [line for line in result.stdout.splitlines() if line.strip()]
        ok, actual = claims_lib.same_output(claimed, [result.stdout, *output_lines]), result.stdout.strip()
    else:
        forms = _forms(claim, result)
        if forms is None:
            errors = [v["error"] for v in result.values.get(claim["id"], []) if "error" in v]
            note = f"could not be evaluated ({errors[0]})" if errors else "its statement never ran"
            return {**claim, "status": "unchecked", "note": note}
        ok = claims_lib.same_output(claimed, forms)
        if not ok and claim.get("whole_output"):
            ok = claims_lib.lines_within(claimed, result.stdout)
        actual = forms[0].strip()
        printed = "".join(result.segments.get(claim["id"], [])).strip()
        claim = {**claim, "printed": claim["kind"] == "output" or claim["kind"] == "both" and bool(printed)}
    if ok:
        return {**claim, "status": "ok", "actual": actual[:500]}
    if nondeterministic or claims_lib.unstable(actual):
        return {**claim, "status": "unchecked", "actual": actual[:500], "note": "the output changes between runs"}
    return {**claim, "status": "mismatch", "actual": actual[:500]}


def _mismatch_reason(claim: dict) -> str:
    actual = claim["actual"] if "\n" not in claim["actual"] else claim["actual"].replace("\n", " / ")
    if claim["source"] in ("output block", "prose") and claim["kind"] == "output" or claim["source"] == "output block":
        return f"the {claim['source']} claims the output {claim['claimed']!r}, but the program prints {actual[:200]!r}"
    verb = "prints" if claim.get("printed") else "gives"
    where = f" ({claim['where']})" if claim.get("where") else ""
    return (
        f"`{claim['expression'][:120]}`{where} {verb} {actual[:200]!r}, but the {claim['source']} claims "
        f"{claim['claimed'][:200]!r}"
    )


def _run(language: str, program: Program, timeout: float) -> sandbox.RunResult:
    if language == "python":
        return sandbox.run_python(program.source, probes=program.probes, expressions=program.expressions,
                                  timeout=timeout)  # fmt: skip
    module = _is_module(program.source)
    result = sandbox.run_javascript(
        program.source, probes=program.probes, expressions=program.expressions, timeout=timeout, module=module
    )
    if result.kind == sandbox.ERROR and "SyntaxError" in result.reason and program.probes:
        # A probe broke a statement that only looked like one line: run it as written, its claims unchecked.
        result = sandbox.run_javascript(
            program.source, expressions=program.expressions, timeout=timeout, module=module
        )
    return result


_EXPECTS_ERROR = re.compile(r"\b(?:raises?|raised|throws?|thrown|errors?|exceptions?|fails?|crash\w*)\b", re.I)


def _error_at(program: Program, result: sandbox.RunResult) -> tuple[list[int], str]:
    """The program lines in a failed run's traceback (innermost last for Python, first for node) and the reason
    with its line named for the reader ("block 2, line 3")."""
    frames = re.findall(r'File "<snippet>", line (\d+)|program\.m?js:(\d+)', result.stderr)
    lines = [int(python or javascript) for python, javascript in frames]
    found = re.search(r"\(line (\d+)\)$", result.reason)
    if not found or program.where is None:
        return lines, result.reason
    return lines, result.reason[: found.start()] + f"({program.where(int(found.group(1)))})"


def _expected_error(program: Program, lines: list[int]) -> bool:
    """Whether the code says that it fails there: a comment on a line of the traceback (the call or the raise), or
    just above or below it, that names an error ("# raises ZeroDivisionError", "// throws"). A demonstration of an
    exception is not a wrong program."""
    source = program.source.split("\n")
    near = {n for line in lines for n in (line - 1, line, line + 1) if 0 < n <= len(source)}
    comments = [re.split(r"#|//", source[n - 1], maxsplit=1)[1] for n in near if re.search(r"#|//", source[n - 1])]
    return any(_EXPECTS_ERROR.search(comment) for comment in comments)


def _outcome(language: str, program: Program, result: sandbox.RunResult, timeout: float) -> tuple[str, str]:
    """`(status, reason)` of a run that did not end normally."""
    reads_input = bool(_READS_INPUT[language].search(program.source))
    missing_file = re.search(r"FileNotFoundError|ENOENT|No such file or directory", result.reason)
    if result.kind == sandbox.SANDBOX_UNAVAILABLE:
        return UNVERIFIED, f"cannot run code here: {result.reason}"
    if result.kind == sandbox.MISSING_MODULE:
        return UNVERIFIED, f"cannot check here: {result.reason}"
    if result.kind == sandbox.NEEDS_INPUT or (reads_input and result.kind == sandbox.ERROR):
        return UNVERIFIED, "cannot check here: the program reads input (stdin or command-line arguments)"
    if result.kind == sandbox.ERROR and missing_file:
        return UNVERIFIED, f"cannot check here: the program reads a file that is not part of it ({result.reason})"
    if result.kind == sandbox.ERROR:
        lines, reason = _error_at(program, result)
        if _expected_error(program, lines):
            return PASSED, ""
        return FAILED, f"the program fails: {reason}"
    if result.kind == sandbox.FORBIDDEN:
        return FAILED, f"the program {result.reason}, which the sandbox does not allow ({result.detail[:120]})"
    if result.kind in _LIMIT_WORDS:
        return FAILED, "the program " + _LIMIT_WORDS[result.kind].format(timeout=timeout, reason=result.reason)
    return FAILED, f"the program fails: {result.reason}"


def _judge(language: str, programs: list[Program], results: list[sandbox.RunResult], timeout: float) -> Verdict:
    name = f"code:{language}"
    details: dict[str, Any] = {
        "language": language,
        "blocks": sum(len(p.blocks) for p in programs),
        "programs": len(programs),
        "seconds": round(sum(r.seconds for r in results), 3),
        "kinds": [r.kind for r in results],
    }
    for program, result in zip(programs, results):
        if result.kind != sandbox.OK:
            status, reason = _outcome(language, program, result, timeout)
            details["stderr"] = "\n".join(result.stderr.strip().splitlines()[-3:])[-500:]
            if status != PASSED:
                return Verdict(name, status, reason, details)
            details["expected_error"] = result.reason
    # Output blocks and prose about the output are about everything the language's code prints.
    everything = dataclasses.replace(results[-1], stdout="".join(r.stdout for r in results))
    checked = []
    for program, result in zip(programs, results):
        unstable = bool(_NONDETERMINISTIC[language].search(program.source))
        for claim in program.claims:
            whole = claim["source"] == "output block" or claim["source"] == "prose" and claim["kind"] == "output"
            checked.append(_check(claim, everything if whole else result, unstable))
    details["claims"] = [{k: v for k, v in c.items() if k not in ("id", "whole_output")} for c in checked]
    details["claims_checked"] = sum(c["status"] != "unchecked" for c in checked)
    details["executed_calls"] = any(_ran_calls(language, p, r) for p, r in zip(programs, results))
    details["stdout"] = everything.stdout[:1000]
    mismatches = [c for c in checked if c["status"] == "mismatch"]
    if mismatches:
        more = f" (and {len(mismatches) - 1} more wrong claim(s))" if len(mismatches) > 1 else ""
        return Verdict(name, FAILED, _mismatch_reason(mismatches[0]) + more, details)
    if any(_READS_INPUT[language].search(p.source) for p in programs) and not details["claims_checked"]:
        return Verdict(name, UNVERIFIED, "cannot check here: the program reads input", details)
    return Verdict(name, PASSED, "", details)


def _ran_calls(language: str, program: Program, result: sandbox.RunResult) -> bool:
    if language == "python":
        try:
            return _executes_calls(ast.parse(program.source))
        except SyntaxError:
            return False
    return bool(result.stdout.strip() or result.segments or result.values)


def _attach_prose_claims(text: str, blocks: list[Block], programs: dict[str, list[Program]]) -> None:
    """Adds the output blocks and prose claims of the response to the program they are about."""
    languages = list(programs)
    sources = {language: "\n".join(p.source for p in programs[language]) for language in languages}
    for k, block in enumerate(blocks):
        if block.output and block.code.strip():
            language = _claim_language({}, k - 1, blocks, languages, sources)
            if language:
                claim = _claim("", "output block", f"block after code block {k}", "", block.code.strip(), "output")
                programs[language][-1].claims.append(claim)
    for prose, near in _prose_segments(text, blocks):
        for language in languages:
            for found in claims_lib.prose_claims(prose, language):
                if _claim_language(found, near, blocks, languages, sources) != language:
                    continue
                if found["kind"] == "output" and re.fullmatch(r"[A-Za-z_$][\w$]*", found["claimed"]):
                    if _defines(sources[language], found["claimed"]) or found["claimed"] in sources[language]:
                        continue  # "prints `result`": the name of a variable, not a value
                program = programs[language][-1]
                pid = ""
                if found["kind"] == "value":
                    pid = f"x{len(program.expressions)}"
                    program.expressions.append(found["expression"])
                program.claims.append(_claim(pid, "prose", "", found["expression"], found["claimed"], found["kind"]))


# ---------------------------------------------------------------------------------------------------------------------
# Other languages: parse checks

_C_SYNTAX = re.compile(r"expected|stray|missing terminating|unterminated|before .* token|at end of input", re.I)
_C_FRAGMENT = "{includes}\nvoid __tcv_fragment(void) {{\n{body}\n}}\n"


def _parse_in_python(language: str, code: str) -> str | None:
    if language == "json":
        try:
            json.loads(code)
        except ValueError as error:
            return f"invalid JSON: {error}"
        return None
    import yaml  # only for YAML blocks; PyYAML is a dependency of the recipes

    try:
        yaml.safe_load(code)
    except yaml.YAMLError as error:
        return "invalid YAML: " + " ".join(str(error).split())[:200]
    return None


def _c_errors(language: str, code: str, timeout: float) -> tuple[list[str], str]:
    """The compiler's error lines for `code`, and the kind of run (`"ok"`, `"error"`, or why it did not run)."""
    extension, argv = _PARSERS[language]
    result = sandbox.run_tool(argv, {f"program.{extension}": code}, timeout=timeout)
    errors = [line.split("error:", 1)[1].strip() for line in result.stderr.splitlines() if "error:" in line]
    return errors, result.kind if result.kind != sandbox.ERROR or errors else sandbox.OK


def _verify_c(language: str, code: str, timeout: float) -> tuple[str, str, dict]:
    """C and C++: a syntax error fails; names declared outside the snippet (a fragment without its includes) or a
    missing header leave it unverified. A fragment of statements is checked again as a function body."""
    errors, kind = _c_errors(language, code, timeout)
    if kind not in (sandbox.OK, sandbox.ERROR):
        return UNVERIFIED, f"cannot check here: the parser did not finish ({kind})", {}
    if any(_C_SYNTAX.search(e) for e in errors):
        includes = "\n".join(line for line in code.splitlines() if line.lstrip().startswith("#"))
        body = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith("#"))
        fragment_errors, _ = _c_errors(language, _C_FRAGMENT.format(includes=includes, body=body), timeout)
        if not any(_C_SYNTAX.search(e) for e in fragment_errors):
            return PASSED, "", {"checked_as": "function body"}
        return FAILED, f"syntax error: {next(e for e in errors if _C_SYNTAX.search(e))[:200]}", {"errors": errors[:5]}
    if errors:
        return (
            UNVERIFIED,
            f"cannot check here: {errors[0][:200]} (declared outside the snippet?)",
            {"errors": errors[:5]},
        )
    return PASSED, "", {}


def _verify_other(language: str, blocks: list[Block], timeout: float) -> Verdict:
    """A parse check of each block where a parser exists; unverified otherwise."""
    name = f"code:{language}"
    details: dict[str, Any] = {"language": language, "blocks": len(blocks), "executed_calls": False}
    in_python = language in ("json", "yaml")
    tool = _PARSERS.get(language)
    if not in_python and (tool is None or shutil.which(tool[1][0]) is None):
        return Verdict(name, UNVERIFIED, f"no parser for {language} here", details)
    if not in_python:
        available, why = sandbox.sandbox_available()
        if not available:
            return Verdict(name, UNVERIFIED, f"cannot run a parser here: {why}", details)
    for number, block in enumerate(blocks, 1):
        label = f" (block {number})" if len(blocks) > 1 else ""
        if in_python:
            error = _parse_in_python(language, block.code)
            status, reason, extra = (FAILED, error, {}) if error else (PASSED, "", {})
        elif language in ("c", "cpp"):
            status, reason, extra = _verify_c(language, block.code, timeout)
        else:
            result = sandbox.run_tool(tool[1], {f"program.{tool[0]}": block.code}, timeout=timeout)
            status = PASSED if result.kind == sandbox.OK else FAILED if result.kind == sandbox.ERROR else UNVERIFIED
            reason = (
                "" if status == PASSED else f"syntax error: {result.reason}" if status == FAILED else result.reason
            )
            extra = {}
        details.update(extra)
        if status != PASSED:
            return Verdict(name, status, reason + label, details)
    details["parsed"] = True
    return Verdict(name, PASSED, "", details)


def verify_code(candidate: dict, sources: list[dict], *, timeout: float = 5.0) -> list[Verdict]:
    """
    Verifies the code of a fused pair's response (see the module docstring).

    Args:
        candidate (`dict`): The fused pair, `{"instruction", "response"}`; only the response's code is checked (code
            in an instruction is often the broken code the task asks to fix).
        sources (`list[dict]`): The source pairs (unused: a program's correctness does not depend on them; taken for
            the common signature of the verifiers).
        timeout (`float`): Wall-clock seconds per program run.

    Returns:
        `list[Verdict]`: One verdict per language with code (`"code:python"`, `"code:javascript"`, `"code:<lang>"`),
        in order of first appearance; empty when the response has no fenced code.
    """
    text = (candidate or {}).get("response") or ""
    blocks = code_blocks(text)
    by_language: dict[str, list[int]] = {}
    for k, block in enumerate(blocks):
        if block.language and not block.output:
            by_language.setdefault(block.language, []).append(k)
    if not by_language:
        return []
    available, why = sandbox.sandbox_available()
    verdicts: dict[str, Verdict] = {}
    programs: dict[str, list[Program]] = {}
    for language, every in by_language.items():
        indexes = [k for k in every if not blocks[k].shown_wrong]
        if not indexes:
            reason = "the response shows this code only as wrong (a bug to fix or a mistake to avoid)"
            verdicts[language] = Verdict(f"code:{language}", UNVERIFIED, reason, {"skipped_blocks": len(every)})
        elif language not in _EXECUTABLE:
            verdicts[language] = _verify_other(language, [blocks[k] for k in indexes], timeout)
        elif not available:
            verdicts[language] = Verdict(f"code:{language}", UNVERIFIED, f"cannot run code here: {why}",
                                         {"language": language, "blocks": len(indexes)})  # fmt: skip
        elif language == "javascript" and not sandbox.javascript_available()[0]:
            reason = f"cannot run JavaScript here: {sandbox.javascript_available()[1]}"
            verdicts[language] = Verdict("code:javascript", UNVERIFIED, reason, {"language": language})
        else:
            make = (
                _python_programs(blocks, indexes) if language == "python" else _js_programs(blocks, indexes, timeout)
            )
            if make[1]:
                verdicts[language] = Verdict(f"code:{language}", FAILED, make[1], {"language": language})
            else:
                programs[language] = make[0]
    _attach_prose_claims(text, blocks, programs)
    for language, language_programs in programs.items():
        results = [_run(language, program, timeout) for program in language_programs]
        verdicts[language] = _judge(language, language_programs, results, timeout)
        skipped = sum(blocks[k].shown_wrong for k in by_language[language])
        if skipped:  # the blocks introduced as wrong were left out of the program
            verdicts[language].details["skipped_blocks"] = skipped
    return [verdicts[language] for language in by_language]
