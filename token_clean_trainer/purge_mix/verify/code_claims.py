"""What a response claims its code prints or returns, and the lenient comparison of a claim with what ran.

Claims come from comments next to the code (`print(x)  # 5`, `console.log(f(2)); // => 4`, a `# Output:` comment
under a print), from an output block in the prose (`Output:` followed by a fence), and from prose sentences about an
expression ("`add(2)(3)` returns 5", "this prints `12`"). The parser prefers missing a claim to inventing one: a
comment that reads as prose (`# print the result`, `# returns a list of primes`) is no claim, nor is a value followed
by a condition ("returns `True` if n is prime").
"""

import ast
import re

# A comment that announces a value: "Output: 5", "prints 5", "-> 5", "=> 5", "returns 5", "= 5".
_MARKER = re.compile(
    r"^\s*(?P<marker>(?:expected\s+|sample\s+|console\s+)?(?:output|outputs|result|results|prints?|logs?|displays?|"
    r"returns?|gives|shows?|evaluates\s+to)\b\s*(?P<colon>:)?|->|=>|→|==?(?!=))\s*(?P<value>.*?)\s*$",
    re.IGNORECASE,
)
# Words that start a description rather than a value ("# returns the sum", "# Output: a list of primes").
_PROSE_START = re.compile(
    r"^(?:the|a|an|this|that|these|those|it|its|each|every|all|some|any|no|not|whether|true if|false if|list of|"
    r"number of|nothing|something|depends|should|will|would|may|might|can|if|when|for|in|of|to|with|is|are)\b",
    re.IGNORECASE,
)
_WORD_VALUES = {"true", "false", "none", "null", "undefined", "nan", "infinity", "-infinity"}
_NUMBER = re.compile(r"[-+]?(?:\d[\d_]*)?\.?\d+(?:[eE][-+]?\d+)?j?")
_NUMBERS = re.compile(r"[-+]?\d+(?:\.\d+)?(?:\s*,?\s*[-+]?\d+(?:\.\d+)?)+")
_PAIRS = {"[": "]", "(": ")", "{": "}", '"': '"', "'": "'", "`": "`"}
# What a claim cannot be compared with: an object's address (it changes on every run), node's abbreviations of deep
# or long values.
_ADDRESS = re.compile(r"\bat 0x[0-9a-fA-F]+|\[Object\]|\[Array\]|\.\.\. \d+ more items?")


def looks_like_value(text: str) -> bool:
    """A literal as a program would print it: a number, a boolean or null, a quoted string, a bracketed list,
    tuple, dict or set, or numbers separated by spaces or commas."""
    text = text.strip()
    if text.endswith(".") and not _NUMBER.fullmatch(text):
        text = text[:-1].rstrip()
    if not text:
        return False
    if _NUMBER.fullmatch(text) or text.lower() in _WORD_VALUES or _NUMBERS.fullmatch(text):
        return True
    if re.fullmatch(r"(?:Set|Map)\(\d+\) \{.*\}", text):
        return True
    if len(text) < 2 or _PAIRS.get(text[0]) != text[-1]:
        return False
    if text[0] in "[({":  # brackets around data, not around a remark ("(this is the slow part)")
        unquoted = re.sub(r"'[^']*'|\"[^\"]*\"", "''", text[1:-1])
        return not re.search(r"[A-Za-z]+\s+[A-Za-z]+\s+[A-Za-z]+", unquoted)
    return True


# A remark after the value: "7 (3 + 4)", "True because 7 is prime", "5 -- the sum".
_REMARK = re.compile(r"\s+(?:\(.*\)|(?:because|since|as|which|i\.e\.|e\.g\.|--|—|-)\s.*)$", re.IGNORECASE)


def _without_remark(value: str) -> str:
    head = _REMARK.sub("", value)
    return head if head != value and looks_like_value(head) else value


def comment_claim(comment: str, *, name: str | None = None) -> str | None:
    """
    The value a code comment claims (`"5"` for `# Output: 5` or `# 5`), `""` for a marker that announces the value
    on the next comment lines (`# Output:`), or `None` when the comment is not a claim. `name`: the variable the
    statement assigns, so that `# total is 15` / `// total = 15` claim its value.
    """
    text = comment.strip().lstrip("#/").strip()
    if name:
        text = re.sub(rf"^{re.escape(name)}\s*(?:is|==?|equals|:)\s*(?=\S)", "= ", text)
    match = _MARKER.match(text)
    if match is None:
        value = _without_remark(text)
        return value if looks_like_value(value) else None
    value = _without_remark(match.group("value").strip())
    if not value:
        return "" if match.group("colon") or match.group("marker").strip().lower() in ("output", "result") else None
    if looks_like_value(value):
        return value
    # Free text after "Output:" is a value ("# Output: Hello, Bob!"); after a verb it is usually a description.
    free = match.group("colon") and not _PROSE_START.match(value) and not value.endswith("?")
    return value if free and len(value) <= 200 and value.strip(". ") else None


# ---------------------------------------------------------------------------------------------------------------------
# Comparison


_TOKEN = re.compile(
    r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[\w$]+|\.\.\.|\S"""
)


def _tokens(text: str) -> list:
    """Tokens of a printed value, compared loosely: quotes dropped (a quoted string is its words), numbers as
    floats with their decimals, `True`/`true`, `None`/`null` alike, whitespace ignored."""
    out = []
    for token in _TOKEN.findall(text):
        if token[0] in "'\"" and len(token) >= 2:
            out += [word.lower() if word.lower() in _WORD_VALUES else word for word in _TOKEN.findall(token[1:-1])]
        elif re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", token):
            decimals = len(token.split(".")[1]) if "." in token and "e" not in token.lower() else None
            out.append(("number", float(token), decimals))
        elif token.lower() in _WORD_VALUES:
            out.append({"none": "null"}.get(token.lower(), token.lower()))
        else:
            out.append(token)
    return out


def _same_token(claimed, actual) -> bool:
    if isinstance(claimed, tuple) and isinstance(actual, tuple):
        _, value, decimals = claimed
        if decimals:  # "3.14" claims pi to two decimals
            return abs(value - actual[1]) <= 0.5 * 10**-decimals + 1e-12
        return value == actual[1]
    return claimed == actual


def _same_tokens(claimed: list, actual: list) -> bool:
    if "..." in claimed:  # "[2, 3, 5, ...]": the part before the ellipsis must match
        head = claimed[: claimed.index("...")]
        return len(head) > 0 and len(actual) >= len(head) and all(map(_same_token, head, actual))
    return len(claimed) == len(actual) and all(map(_same_token, claimed, actual))


def _strip_outer(text: str) -> str:
    text = text.strip()
    if text.endswith(".") and not _NUMBER.fullmatch(text):
        text = text[:-1].rstrip()
    return text


def same_value(claimed: str, actual: str) -> bool:
    """Whether a claimed output or value matches the actual one, leniently: whitespace, quotes, a trailing period,
    commas between printed items, number formats (`7` and `7.0`; `3.14` for 3.14159...), `True` and `true`, set
    order, and a label the comment left out (`print("Sum:", s)  # 5`)."""
    claimed_tokens, actual_tokens = _tokens(_strip_outer(claimed)), _tokens(_strip_outer(actual))
    if not claimed_tokens:
        return not actual_tokens
    if _same_tokens(claimed_tokens, actual_tokens):
        return True
    without_commas = [t for t in claimed_tokens if t != ","], [t for t in actual_tokens if t != ","]
    if _same_tokens(*without_commas):
        return True
    if actual.strip().startswith("{") and ":" not in actual and claimed.strip().startswith("{"):
        return sorted(map(str, claimed_tokens)) == sorted(map(str, actual_tokens))  # a set, in another order
    n = len(claimed_tokens)
    label = actual_tokens[:-n]
    return bool(label) and label[-1] in (":", "=", "is") and _same_tokens(claimed_tokens, actual_tokens[-n:])


def same_output(claimed: str, actual_forms: list[str]) -> bool:
    """Whether a claim matches any of the forms the actual result can take (a value's repr and str, a statement's
    output in one execution or in all of them)."""
    return any(same_value(claimed, form) for form in actual_forms if not _ADDRESS.search(form))


def lines_within(claimed: str, output: str) -> bool:
    """Whether the lines of a claimed output block appear, in order, among the program's output lines (an output
    block may show part of the output, or the output of one of several blocks)."""
    # Prompt lines of a terminal session ("$ python app.py") are the command, not its output.
    wanted = [line for line in claimed.splitlines() if line.strip() and line.strip() != "..."]
    wanted = [line for line in wanted if not re.match(r"\s*(?:\$|>>>|>|PS>|C:\\.*>)\s", line)]
    actual = [line for line in output.splitlines() if line.strip()]
    if not wanted:
        return True
    if same_value(claimed, output):
        return True
    i = 0
    for line in actual:
        if i < len(wanted) and same_value(wanted[i], line):
            i += 1
    return i == len(wanted)


def unstable(text: str) -> bool:
    """Whether a shown value holds an object address, which no claim can predict."""
    return bool(_ADDRESS.search(text))


# ---------------------------------------------------------------------------------------------------------------------
# Prose claims

_VERBS = (
    r"(?:will\s+|would\s+|should\s+)?(?:returns?|return|gives?|give|yields?|yield|evaluates?\s+to|evaluate\s+to|"
    r"outputs?|output|prints?|print|produces?|produce|logs?|log|results?\s+in|is\s+equal\s+to|equals)"
)
_PRINT_VERB = re.compile(r"outputs?|output|prints?|print|logs?|log", re.IGNORECASE)
_BARE_VALUE = (
    r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|True|False|None|true|false|null|undefined|NaN"
    r"|\"[^\"\n]{0,80}\"|'[^'\n]{0,80}'|\[[^\]\n]{0,200}\]"
)
_CONDITION = re.compile(r"^\s*(?:if|when|whenever|for|unless|only|in case|otherwise|depending)\b", re.IGNORECASE)
# After a bare value: the end of a clause (so that "returns 5 elements" is no claim about the value 5).
_CLAUSE_END = re.compile(r"^\s*(?:$|[.,;:!)\]]|(?:and|because|since|as|which|while|but|so)\b)", re.IGNORECASE)
_EXPRESSION_CLAIM = re.compile(
    r"`(?P<expression>[^`\n]+)`\s*(?:\)\s*)?,?\s*" + _VERBS + r"\s*:?\s*(?:the\s+value\s+|the\s+result\s+)?"
    r"(?:`(?P<code>[^`\n]+)`|\*\*(?P<bold>[^*\n]+)\*\*|(?P<bare>" + _BARE_VALUE + r"))",
    re.IGNORECASE,
)
_OUTPUT_CLAIM = re.compile(
    r"\b(?:will\s+|would\s+|should\s+)?(?:prints?|outputs?|logs?|displays?)\s+(?:out\s+)?:?\s*"
    r"(?:`(?P<code>[^`\n]+)`|(?P<bare>" + _BARE_VALUE + r"))",
    re.IGNORECASE,
)


def _value_of(match: re.Match) -> tuple[str, bool]:
    """The claimed value of a prose match and whether it was written as code (backticks or bold)."""
    for name in ("code", "bold"):
        if match.groupdict().get(name):
            return match.group(name).strip(), True
    return match.group("bare").strip(), False


def _is_claim(text: str, match: re.Match, quoted: bool) -> bool:
    rest = text[match.end() :]
    if _CONDITION.match(rest):
        return False
    return quoted or bool(_CLAUSE_END.match(rest))


def _callable_expression(expression: str, language: str) -> bool:
    """A call with arguments written out (`add(2)(3)`, `fib(10)`): a bare name or a call on free variables
    (`is_prime(n)`) is not something the claim pins down (its value is evaluated anyway; it errors, unchecked)."""
    if "(" not in expression or not expression.rstrip(";").endswith((")", "]")):
        return False
    if language == "python":
        try:
            ast.parse(expression, mode="eval")
        except SyntaxError:
            return False
    return True


def _unwrap_print(expression: str) -> str | None:
    match = re.fullmatch(r"\s*(?:print|console\.log)\s*\((.*)\)\s*;?\s*", expression, re.DOTALL)
    return match.group(1) if match else None


def prose_claims(prose: str, language: str) -> list[dict]:
    """
    Claims in the prose: `{"expression", "claimed", "kind"}` with kind `"value"` (an expression in backticks that
    returns/gives/evaluates to a value; evaluated after the program) or `"output"` (the program prints a value,
    compared with its output lines). `language` decides which expressions parse.
    """
    claims = []
    for match in _EXPRESSION_CLAIM.finditer(prose):
        claimed, quoted = _value_of(match)
        expression = match.group("expression").strip().rstrip(";")
        inner = _unwrap_print(expression)
        if inner is not None:
            expression = inner
        if not _is_claim(prose, match, quoted) or not _callable_expression(expression, language):
            continue
        claims.append({"expression": expression, "claimed": claimed, "kind": "value", "span": match.span()})
    taken = [claim["span"] for claim in claims]
    for match in _OUTPUT_CLAIM.finditer(prose):
        if any(start <= match.start() < end for start, end in taken):
            continue
        claimed, quoted = _value_of(match)
        if _is_claim(prose, match, quoted) and (quoted or looks_like_value(claimed)):
            claims.append({"expression": "", "claimed": claimed, "kind": "output", "span": match.span()})
    return claims
