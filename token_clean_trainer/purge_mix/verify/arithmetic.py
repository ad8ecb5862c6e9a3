"""The arithmetic verifier: every calculation a fused pair states in prose ("3 + 4 = 7", "12 * 3 is 36", "15% of 200
is 30", "the sum of 3 and 4 is 7", "(5 + 3) / 2 = 8 / 2 = 4") is computed again, exactly, with sympy and compared
with the stated result.

Text is read by a small lexer and a recursive-descent parser written here (never `eval`, nor sympy's `parse_expr`,
which evaluates the code it builds); numbers become sympy rationals, so "0.1 + 0.2 = 0.3" holds. Numbers that are
not operands are lexed as what they are and never enter a calculation: dates ("2024-05-01", "5/1/2024"), times and
ratios ("10:30", "16:9"), versions ("3.11.2", "Python 3.11"), ranges and phone numbers ("1-5", "555-123-4567"),
list numbering ("1.", "Step 2:"). Code (fenced blocks, inline spans) is not prose and is left to the code verifier.
"""

import math
import re
from dataclasses import dataclass
from typing import Any

import sympy

from ..checks import split_code
from .base import FAILED, NOT_APPLICABLE, PASSED, Verdict

VERIFIER = "arithmetic"

# A line longer than this is not searched (a calculation sits in one sentence); an exponent whose result would have
# more digits than `_MAX_DIGITS` is not computed (sympy would, slowly: "9^9^9").
_MAX_TOKENS = 400
_MAX_DIGITS = 5000

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
}  # fmt: skip
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9}
NUMBER_WORDS = frozenset(_UNITS) | frozenset(_SCALES)

# Word operators and links, longest first, as the token the parser reads.
_PHRASES = [
    (r"(?:raised\s+)?to\s+the\s+power(?:\s+of)?", "^"),
    (r"multiplied\s+by|times", "*"),
    (r"divided\s+by", "/"),
    (r"plus", "+"),
    (r"minus", "-"),
    (r"mod(?:ulo)?", "mod"),
    (r"squared", "²"),
    (r"cubed", "³"),
    (r"(?:%|percent|per\s+cent)\s+of", "pct_of"),
    (r"sum\s+of", "fn:sum"),
    (r"product\s+of", "fn:product"),
    (r"difference\s+(?:between|of)", "fn:difference"),
    (r"quotient\s+of", "fn:quotient"),
    (r"(?:average|mean)\s+of", "fn:average"),
    (r"square\s+root\s+of", "fn:sqrt"),
    (r"is\s+(?:approximately|about|roughly|around|nearly|almost|close\s+to)", "~"),
    (r"(?:is\s+)?equal\s+to|equals|is|gives(?:\s+(?:us|you))?|makes|yields|results\s+in|comes\s+to", "is"),
    (r"and", "and"),
]
_WORD_OPS = re.compile(
    "|".join(rf"(?P<p{i}>(?<![A-Za-z])(?:{pattern})(?![A-Za-z]))" for i, (pattern, _) in enumerate(_PHRASES)),
    re.IGNORECASE,
)
# Numbers that are not operands come first, so that their digits are never read as one.
_LEXEMES = re.compile(
    r"(?P<skip>\d{4}-\d{1,2}-\d{1,2}|\d{1,2}[/.]\d{1,2}[/.]\d{2,4}"  # dates
    r"|\d+(?::\d+)+"  # times, ratios
    r"|\d+(?:\.\d+){2,}|\bv\d+(?:\.\d+)*"  # versions
    r"|\d+(?:\.\d+)?(?:[-–]\d+(?:\.\d+)?)+)(?!\.?\d)"  # ranges and phone numbers: a hyphen with no spaces
    r"|(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|\d+(?:\.\d+)?|\.\d+)"
    r"|(?P<op>\*\*|==|~=|[+\-−*×·/÷^²³()%,≈=])"
    r"|(?P<word>[A-Za-z]+(?:-[A-Za-z]+)*)"
    r"|(?P<currency>[$€£](?=\d))"
    r"|(?P<other>\S)"
)
_VERSION_WORDS = frozenset("version versions v release python java node ios android windows es ecmascript".split())
# A word after the stated result that makes it a comparison or a part, not a result ("is 2 times faster", "is one of").
_NOT_A_RESULT = frozenset(
    "of that which who more less fewer faster slower bigger larger smaller higher lower greater longer shorter "
    "times percent x".split()
)


@dataclass
class _Token:
    kind: str  # "num", "op", "word", "skip"
    text: str
    start: int
    end: int
    value: Any = None
    after_space: bool = True  # whitespace precedes the token
    sentence_start: bool = False


def words_to_number(words: list[str]) -> int | None:
    """The value of "twenty-one", "two hundred", "three thousand five hundred"; `None` if a word is not a number."""
    total = current = 0
    for word in words:
        if word in _UNITS:
            current += _UNITS[word]
        elif word == "hundred":
            current = max(current, 1) * 100
        elif word in _SCALES:
            total += max(current, 1) * _SCALES[word]
            current = 0
        else:
            return None
    return total + current


def _lex(line: str) -> list[_Token]:
    """Tokens of one prose line: numbers (digits or words, with their value), operators, links and other words."""
    tokens: list[_Token] = []
    pos = 0
    sentence_start = True
    while pos < len(line):
        if line[pos].isspace():
            pos += 1
            continue
        spaced = pos == 0 or line[pos - 1].isspace()
        phrase = _WORD_OPS.match(line, pos)
        if phrase is not None:
            op = _PHRASES[int(phrase.lastgroup[1:])][1]
            tokens.append(_Token("op", op, pos, phrase.end(), after_space=spaced, sentence_start=sentence_start))
            pos, sentence_start = phrase.end(), False
            continue
        match = _LEXEMES.match(line, pos)
        kind, text = match.lastgroup, match.group(0)
        token = _Token(kind, text, pos, match.end(), after_space=spaced, sentence_start=sentence_start)
        if kind == "num":
            token.value = sympy.Rational(text.replace(",", ""))
        elif kind == "op":
            token.text = {"**": "^", "==": "=", "−": "-", "×": "*", "·": "*", "÷": "/", "≈": "~", "~=": "~"}.get(
                text, text
            )
        elif kind == "word":
            parts = text.lower().split("-")
            value = words_to_number(parts) if all(p in NUMBER_WORDS for p in parts) else None
            if value is not None:
                token.kind, token.value = "num", sympy.Integer(value)
        if kind != "currency":
            tokens.append(token)
        sentence_start = kind == "other" and text in ".!?:;"
        pos = match.end()
    return _mark(tokens, line)


def _mark(tokens: list[_Token], line: str) -> list[_Token]:
    """Context the lexer cannot see token by token: "x" between numbers multiplies, "%" attached to a number is a
    percentage, a number right after a product name or "version" is a version, spaced "-" between years is a range."""
    for i, token in enumerate(tokens):
        prev = tokens[i - 1] if i else None
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if token.kind == "word" and token.text.lower() == "x" and prev is not None and nxt is not None:
            if (prev.kind == "num" or prev.text == ")") and (nxt.kind == "num" or nxt.text == "("):
                token.kind, token.text = "op", "*"
        elif token.kind == "op" and token.text == "%" and prev is not None and prev.kind == "num":
            token.text = "pct" if not token.after_space else "mod"
        elif token.kind == "num" and prev is not None and prev.kind == "word":
            capitalised = prev.text[:1].isupper() and not prev.sentence_start
            if capitalised or prev.text.lower() in _VERSION_WORDS:
                token.kind = "skip"
    for i in range(1, len(tokens) - 1):
        left, mid, right = tokens[i - 1], tokens[i], tokens[i + 1]
        if mid.text == "-" and left.kind == "num" and right.kind == "num" and _year_range(left, right, tokens, i):
            left.kind = right.kind = "skip"
    return tokens


def _year_range(left: _Token, right: _Token, tokens: list[_Token], i: int) -> bool:
    """A span of years ("1990 - 2000") or a range written with spaces ("from 3 - 5"), not a subtraction."""
    before = tokens[i - 2].text.lower() if i >= 2 else ""
    if before in ("from", "between", "pages", "chapters", "ages", "aged"):
        return True
    a, b = left.value, right.value
    return a.is_integer and b.is_integer and 1000 <= a < b <= 2999


class _NoParse(Exception):
    pass


_BINARY = {"+": 1, "-": 1, "*": 2, "/": 2, "mod": 2, "pct_of": 2}
_ARITY = {"fn:sum": 0, "fn:product": 0, "fn:average": 0, "fn:difference": 2, "fn:quotient": 2, "fn:sqrt": 1}


class _Parser:
    """Recursive descent over a slice of tokens: `+ -` < `* / mod, % of` < unary minus < `^` (right-associative) <
    postfix `² ³ %` < numbers (with an optional unit word), parentheses and "the sum/product/... of a and b"."""

    def __init__(self, tokens: list[_Token]):
        self.tokens = tokens
        self.i = 0
        self.ops: list[str] = []  # the operators read, "/c" for a slash written without spaces ("24/7")

    def peek(self, offset: int = 0) -> _Token | None:
        return self.tokens[self.i + offset] if self.i + offset < len(self.tokens) else None

    def expr(self, level: int = 1) -> tuple[Any, str]:
        value, text = self.unary() if level == 2 else self.expr(2)
        while (token := self.peek()) is not None and token.kind == "op" and _BINARY.get(token.text) == level:
            saved = self.i
            self.i += 1
            try:
                right, right_text = self.unary() if level == 2 else self.expr(2)
            except _NoParse:
                self.i = saved  # "7 - that's it": the operator belongs to the words after the result
                break
            nxt = self.tokens[saved + 1]
            compact = token.text == "/" and not token.after_space and not nxt.after_space
            self.ops.append("/c" if compact else token.text)
            shown = "% of" if token.text == "pct_of" else f" {token.text}"
            value, text = _apply(token.text, value, right), f"{text}{shown} {right_text}"
        return value, text

    def unary(self) -> tuple[Any, str]:
        token = self.peek()
        if token is not None and token.kind == "op" and token.text in ("+", "-"):
            self.i += 1
            value, text = self.unary()
            return (-value, f"-{text}") if token.text == "-" else (value, text)
        base, text = self.postfix()
        token = self.peek()
        if token is not None and token.kind == "op" and token.text == "^":
            self.i += 1
            exponent, exp_text = self.unary()
            self.ops.append("^")
            return _power(base, exponent), f"{text}^{exp_text}"
        return base, text

    def postfix(self) -> tuple[Any, str]:
        value, text = self.primary()
        while (token := self.peek()) is not None and token.kind == "op" and token.text in ("²", "³", "pct"):
            self.i += 1
            self.ops.append(token.text)
            if token.text == "pct":
                value, text = value / 100, f"{text}%"
            else:
                value, text = _power(value, sympy.Integer(2 if token.text == "²" else 3)), f"{text}{token.text}"
        return value, text

    def primary(self) -> tuple[Any, str]:
        token = self.peek()
        if token is None:
            raise _NoParse
        if token.kind == "num":
            self.i += 1
            unit = self.peek()
            # "5 km + 3 km = 8 km": one word after a number is its unit when an operator or the end follows it.
            if unit is not None and unit.kind == "word" and (self.peek(1) is None or self.peek(1).kind == "op"):
                self.i += 1
            return token.value, token.text
        if token.kind == "op" and token.text == "(":
            self.i += 1
            value, text = self.expr()
            closing = self.peek()
            if closing is None or closing.text != ")":
                raise _NoParse
            self.i += 1
            return value, f"({text})"
        if token.kind == "op" and token.text in _ARITY:
            self.i += 1
            return self.function(token.text)
        raise _NoParse

    def function(self, name: str) -> tuple[Any, str]:
        """The arguments of "the sum of 3, 4 and 5", "the difference between 10 and 4", "the square root of 16"."""
        args = [self.postfix() if name == "fn:sqrt" else self.expr()]
        while _ARITY[name] != 1 and (token := self.peek()) is not None and token.text in ("and", ","):
            self.i += 1
            if token.text == "," and (nxt := self.peek()) is not None and nxt.text == "and":
                self.i += 1
            args.append(self.expr())
        if len(args) != _ARITY[name] if _ARITY[name] else len(args) < 2:
            raise _NoParse
        values, texts = [a[0] for a in args], [a[1] for a in args]
        self.ops.append(name)
        if name == "fn:sum":
            return sympy.Add(*values), f"({' + '.join(texts)})"
        if name == "fn:product":
            return sympy.Mul(*values), f"({' * '.join(texts)})"
        if name == "fn:average":
            return sympy.Add(*values) / len(values), f"({' + '.join(texts)}) / {len(values)}"
        if name == "fn:difference":
            return abs(values[0] - values[1]), f"|{texts[0]} - {texts[1]}|"
        if name == "fn:quotient":
            return _apply("/", values[0], values[1]), f"{texts[0]} / {texts[1]}"
        if values[0] < 0:
            raise _NoParse
        return sympy.sqrt(values[0]), f"sqrt({texts[0]})"


def _apply(op: str, left, right):
    if op in ("/", "mod") and right == 0:
        raise _NoParse  # nothing to check against: "x / 0 = infinity" is not arithmetic we can confirm
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    if op == "/":
        return left / right
    if op == "mod":
        return sympy.Mod(left, right)
    return left / 100 * right  # pct_of


def _power(base, exponent):
    """`base ** exponent`, refused when the result would have more than `_MAX_DIGITS` digits."""
    if not exponent.is_Rational or abs(exponent) > 10 * _MAX_DIGITS:
        raise _NoParse
    if base != 0 and abs(float(exponent)) * math.log10(max(abs(float(base)), 1e-300)) > _MAX_DIGITS:
        raise _NoParse
    if base == 0 and exponent < 0:
        raise _NoParse
    return sympy.Pow(base, exponent)


_LIST_MARKER = re.compile(r"^\s*(?:[-*+•>]|#+|\d{1,2}[.)]|\(?[a-zA-Z][.)]|(?:step|part)\s+\d+\s*[:.)])\s+", re.I)
# Markdown emphasis, not a power: "**3 + 4 = 7**" (but "2**10" and "2 ** 10" are powers).
_BOLD = re.compile(r"(?<![\d)\s])\*\*|\*\*(?![\d(\s])")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# A question that asks whether a calculation holds states nothing ("Is 3 + 4 = 8?", "Check if 2^10 = 1000?"); one
# that builds on it does ("Since 2 + 2 = 5, what is half of it?").
_ASKS = re.compile(
    r"^\W*(?:is|are|does|do|did|was|were|can|could|would|will|should|isn't|doesn't)\b.*\?\W*$"
    r"|\b(?:whether|if)\b.*\?\W*$",
    re.IGNORECASE | re.DOTALL,
)


def _lhs(tokens: list[_Token], lo: int, hi: int) -> tuple[Any, str, list[str], int] | None:
    """The longest expression that ends right before the link at `hi`: `(value, text, operators, first index)`."""
    for start in range(lo, hi):
        token = tokens[start]
        if not (token.kind == "num" or token.text in ("(", "-") or token.text.startswith("fn:")):
            continue
        if start > lo and (tokens[start - 1].text in _BINARY or tokens[start - 1].text == "^"):
            return None  # a tail of a longer expression that could not be read ("9^9^9"): never a shorter one
        parser = _Parser(tokens[start:hi])
        try:
            value, text = parser.expr()
        except _NoParse:
            continue
        if parser.i == hi - start:
            return value, text, parser.ops, start
    return None


def _rhs(tokens: list[_Token], lo: int, hi: int) -> tuple[Any, str, list[str], int] | None:
    """The stated result after the link at `lo - 1`: `(value, text, operators, index after it)`, or `None` when
    there is none or the words after it make it something else ("is 2 times faster", "is one of", "is not 8")."""
    parser = _Parser(tokens[lo:hi])
    try:
        value, text = parser.expr()
    except _NoParse:
        return None
    after = tokens[lo + parser.i] if lo + parser.i < len(tokens) else None
    if after is not None and (after.text.lower() in _NOT_A_RESULT or after.text in _BINARY or after.text == "^"):
        return None
    return value, text, parser.ops, lo + parser.i


def _decimals(text: str) -> int:
    match = re.fullmatch(r"-?[\d,]*\.(\d+)%?", text)
    return len(match.group(1)) if match else 0


def _agrees(computed, stated, stated_text: str, approximate: bool) -> bool:
    """Equal, or rounded or truncated to the decimals the text states ("2/3 = 0.67", "2/3 = 0.66", not "= 0.65");
    within 1% with a word of approximation ("22/7 ≈ 3.14"). Compared exactly, never in floats."""
    diff = abs(computed - stated)
    unit = sympy.Rational(1, 10 ** _decimals(stated_text))
    if approximate:
        return bool(diff <= max(abs(stated) / 100, unit / 2))
    if unit < 1 or not computed.is_Rational:
        truncated = 0 <= (computed - stated) * sympy.sign(computed) < unit
        return bool(diff <= unit / 2 or truncated)
    return bool(diff == 0)


def _show(value) -> str:
    if value.is_Integer and len(str(value)) <= 30:
        return str(value)
    if value.is_Rational and len(str(value)) <= 12:
        return f"{float(value):.10g} ({value})"
    return str(sympy.N(value, 10))


def _sentence_calculations(sentence: str) -> list[dict[str, Any]]:
    tokens = _lex(sentence)
    if len(tokens) > _MAX_TOKENS:
        return []
    links = [i for i, token in enumerate(tokens) if token.kind == "op" and token.text in ("=", "is", "~")]
    out = []
    for n, k in enumerate(links):
        lo = links[n - 1] + 1 if n else 0
        hi = links[n + 1] if n + 1 < len(links) else len(tokens)
        lhs, rhs = _lhs(tokens, lo, k), _rhs(tokens, k + 1, hi)
        if lhs is None or rhs is None or not (lhs[2] or rhs[2]):
            continue
        (left, left_text, left_ops, first), (right, right_text, right_ops, end) = lhs, rhs
        # "24/7 is ...", "3/4 is ...": a slash with no spaces before a word link is a name or a fraction, not a sum.
        if sentence[tokens[k].start].isalpha() and all(op == "/c" for op in left_ops + right_ops):
            continue
        if not (left.is_real and right.is_real and left.is_finite and right.is_finite):
            continue
        approximate = tokens[k].text == "~"
        ok = _agrees(left, right, right_text, approximate)
        if not ok and right_ops == ["pct"]:  # "50 / 200 * 100 = 25%": the percentage written as a number
            ok = _agrees(left, right * 100, right_text.rstrip("%"), approximate)
        out.append(
            {
                "text": sentence[tokens[first].start : tokens[end - 1].end],
                "expression": left_text,
                "stated": right_text if not right_ops else f"{right_text} = {_show(right)}",
                "computed": _show(left),
                "ok": ok,
            }
        )
    return out


def find_calculations(text: str) -> list[dict[str, Any]]:
    """
    The calculations stated in the prose of `text` (code removed), each as `{"text", "expression", "stated",
    "computed", "ok"}`: the span as written, the left side as read ("(5 + 3) / 2"), the stated result, the exact
    value, and whether they agree. A question that asks whether a calculation holds is skipped ("Is 3 + 4 = 8?").
    """
    prose, _ = split_code(text)
    out = []
    for line in _BOLD.sub("", prose).splitlines():
        line = _LIST_MARKER.sub("", line)
        for sentence in _SENTENCE_END.split(line):
            if sentence.strip() and not _ASKS.search(sentence):
                out.extend(_sentence_calculations(sentence))
    return out


def find_expressions(text: str) -> list[tuple[str, Any]]:
    """`(as written, exact value)` of every expression with an operator in the prose of `text`, questions included
    ("What is 15% of 200?" gives `("15% of 200", 30)`): numbers an answer may derive rather than invent."""
    prose, _ = split_code(text)
    out = []
    for line in _BOLD.sub("", prose).splitlines():
        line = _LIST_MARKER.sub("", line)
        tokens = _lex(line)
        i = 0
        while i < min(len(tokens), _MAX_TOKENS):
            token, before = tokens[i], tokens[i - 1].text if i else ""
            parser = _Parser(tokens[i:])
            starts = token.kind == "num" or token.text == "(" or token.text.startswith("fn:")
            if starts and before not in _BINARY and before != "^":
                try:
                    value, _ = parser.expr()
                except _NoParse:
                    parser.i = 0
                if parser.ops and value.is_real and value.is_finite:
                    out.append((line[token.start : tokens[i + parser.i - 1].end], value))
            i += max(parser.i, 1)
    return out


def verify_arithmetic(candidate: dict[str, str], sources: list[dict[str, str]]) -> Verdict:
    """
    Check every calculation the candidate states in its instruction and response prose.

    Args:
        candidate (`dict[str, str]`): The fused `{"instruction", "response"}` pair.
        sources (`list[dict[str, str]]`): The rows it was fused from (unused: a calculation is right or wrong on its
            own; kept for the verifiers' common signature).

    Returns:
        [`Verdict`] named `"arithmetic"`: `"not_applicable"` without a calculation, `"failed"` naming the first wrong
        one (its text, the stated and the computed value), `"passed"` with the list checked in `details`.
    """
    checked = []
    for field_name in ("instruction", "response"):
        for calc in find_calculations(candidate.get(field_name) or ""):
            checked.append({"field": field_name, **calc})
    if not checked:
        return Verdict(VERIFIER, NOT_APPLICABLE, "no calculation stated in the prose", {"calculations": []})
    details = {"calculations": checked}
    wrong = [calc for calc in checked if not calc["ok"]]
    if wrong:
        first = wrong[0]
        more = f" ({len(wrong) - 1} more wrong)" if len(wrong) > 1 else ""
        reason = (
            f'the {first["field"]} states "{first["text"]}", but {first["expression"]} = {first["computed"]}, '
            f"not {first['stated']}{more}"
        )
        return Verdict(VERIFIER, FAILED, reason, details)
    return Verdict(VERIFIER, PASSED, "", details)
