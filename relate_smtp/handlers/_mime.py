"""Text-level MIME helpers that reproduce MimeKit's decoding on top of stdlib parts.

The original host stored what MimeKit returned; these helpers give the same strings
from the compat32 parser's raw header values and payload bytes: charset decoding with
MimeKit's fallbacks, RFC 2047 encoded words, msg-id lists, mailbox lists, RFC 3676
flowed text, and the cleaning and truncation every stored string goes through.
"""

from __future__ import annotations

import binascii
import codecs
import functools
import re
from email.utils import getaddresses

# MimeKit decodes text with no (or an unknown) charset as strict UTF-8 and falls back to
# ISO-8859-1 when that fails. We treat a declared US-ASCII the same way: ASCII is a subset
# of UTF-8, and 8-bit bytes under an ASCII label are almost always UTF-8 in practice.
_UNKNOWN_CHARSET_LABELS = frozenset({"", "us-ascii", "ascii", "us_ascii", "ansi_x3.4-1968"})

# Labels Python does not know but MimeKit (via .NET) maps to a real encoding.
_CHARSET_ALIASES = {
    "iso-8859-8-i": "iso-8859-8",
    "iso-8859-6-i": "iso-8859-6",
    "iso-8859-6-e": "iso-8859-6",
    "iso-8859-8-e": "iso-8859-8",
    "unicode-1-1-utf-7": "utf-7",
    "ks_c_5601-1987": "cp949",
    "x-gbk": "gbk",
}


@functools.lru_cache(maxsize=256)
def _codec_for(charset: str) -> str | None:
    """The Python codec for a MIME charset label, or None when it is unknown."""
    label = charset.strip().strip("\"'").lower()
    if "*" in label:  # RFC 2231 §5 language suffix: "utf-8*en"
        label = label.split("*", 1)[0]
    if label in _UNKNOWN_CHARSET_LABELS:
        return None
    label = _CHARSET_ALIASES.get(label, label)
    try:
        name = codecs.lookup(label).name
        b"".decode(name)  # rejects bytes-to-bytes codecs such as base64 or rot13
    except (LookupError, ValueError):
        return None
    return name


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode ``data`` as MimeKit's ``TextPart.Text`` does.

    A known charset decodes with U+FFFD for bad bytes (.NET's default fallback); an
    unknown or missing one is strict UTF-8, else ISO-8859-1, so no text is ever lost.
    """
    codec = _codec_for(charset) if charset else None
    if codec is not None:
        try:
            return data.decode(codec, "replace")
        except (UnicodeError, LookupError):
            pass  # codecs such as idna accept only strict decoding
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def fix_8bit(value: str) -> str:
    """Turn raw 8-bit header bytes (surrogate-escaped by the parser) into text.

    Raw UTF-8 in headers is legal with SMTPUTF8 (RFC 6532); MimeKit reads it as UTF-8
    with an ISO-8859-1 fallback, as for an unlabelled body.
    """
    if value.isascii():
        return value
    return decode_bytes(value.encode("utf-8", "surrogateescape"), None)


def unfold(value: str) -> str:
    """RFC 5322 §2.2.3 unfolding as MimeKit does it: drop line breaks, trim the ends."""
    if "\r" in value or "\n" in value:
        value = value.replace("\r", "").replace("\n", "")
    return value.strip(" \t")


# RFC 2047 §2 encoded-word; MimeKit's loose mode also finds words glued to other text.
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?]*)\?=")
_BLANK = re.compile(r"[ \t\r\n]*")


def _decode_word_payload(encoding: str, text: str) -> bytes | None:
    if encoding in "qQ":
        return binascii.a2b_qp(text.encode("ascii", "replace"), header=True)
    compact = "".join(text.split())
    compact += "=" * (-len(compact) % 4)
    try:
        return binascii.a2b_base64(compact.encode("ascii", "replace"))
    except binascii.Error:
        return None


def decode_rfc2047(value: str) -> str:
    """Decode RFC 2047 encoded words leniently, never failing.

    Blank space between adjacent encoded words is dropped (RFC 2047 §6.2), and adjacent
    words in the same charset are joined before decoding so a multi-byte character split
    across two words survives. A malformed word is kept as literal text.
    """
    if "=?" not in value:
        return value
    out: list[str] = []
    pending = bytearray()
    pending_charset = ""
    pos = 0
    for match in _ENCODED_WORD.finditer(value):
        data = _decode_word_payload(match.group(2), match.group(3))
        if data is None:
            continue  # left in place as literal text
        between = value[pos : match.start()]
        charset = match.group(1)
        adjacent = pos > 0 and _BLANK.fullmatch(between) is not None and bool(pending_charset)
        if adjacent and charset.lower() == pending_charset.lower():
            pending += data
        else:
            if pending_charset:
                out.append(decode_bytes(bytes(pending), pending_charset))
            if not adjacent:
                out.append(between)
            pending = bytearray(data)
            pending_charset = charset
        pos = match.end()
    if pending_charset:
        out.append(decode_bytes(bytes(pending), pending_charset))
    out.append(value[pos:])
    return "".join(out)


def decode_header_text(value: str) -> str:
    """A header value as MimeKit's ``Header.Value``: 8-bit fixed, decoded, unfolded.

    Unfolding last also drops line breaks smuggled inside encoded words, which would
    otherwise end up in a one-line field such as the subject.
    """
    return unfold(decode_rfc2047(fix_8bit(bounded(value))))


# Header values are cut to this many characters before they are parsed. The widest
# column a header feeds holds 2,000 characters (SPEC §8); encoded words (base64 of
# UTF-8), folding and comments expand text by well under 8x, so nothing storable is lost.
HEADER_PARSE_BOUND = 16 * 1024
_ELISION = "<>"  # joins the kept head and tail of a cut msg-id list without gluing ids


def bounded(value: str, limit: int = HEADER_PARSE_BOUND) -> str:
    """``value`` cut to ``limit`` characters, so parsing cost never follows input size."""
    return value if len(value) <= limit else value[:limit]


def bounded_ends(value: str, limit: int = HEADER_PARSE_BOUND) -> str:
    """``value`` cut to its first and last ``limit // 2`` characters.

    For References, whose first id is the thread root and whose last ids are the
    parent (RFC 5322 §3.6.4): both ends matter, the middle does not.
    """
    if len(value) <= limit:
        return value
    half = limit // 2
    return value[:half] + _ELISION + value[-half:]


_MSG_ID = re.compile(r"<([^<>]*)>")
_SPECIAL = re.compile(r'[("]')


def _skip_comment(value: str, start: int) -> int:
    """Index just past the RFC 5322 §3.2.2 comment opening at ``start``, or -1.

    Comments nest and ``\\`` escapes the next character; -1 means unterminated.
    """
    depth = 0
    i, n = start, len(value)
    while i < n:
        char = value[i]
        if char == "\\":
            i += 2
            continue
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def _skip_quoted(value: str, start: int) -> int:
    """Index just past the RFC 5322 §3.2.4 quoted string opening at ``start``, or -1."""
    i, n = start + 1, len(value)
    while i < n:
        char = value[i]
        if char == "\\":
            i += 2
        elif char == '"':
            return i + 1
        else:
            i += 1
    return -1


def _without_comments_and_quotes(value: str) -> str:
    """``value`` with comments and quoted strings blanked, in one linear pass.

    They hide angle brackets from msg-id scanning, as MimeKit's tokenizer skips them.
    An unterminated comment ends the list (MimeKit stops there); an unterminated quote
    is kept as text, and so is every later quote, which the same scan proves
    unterminated too. Every character is visited a bounded number of times.
    """
    out: list[str] = []
    pos = 0
    quotes_open = True
    n = len(value)
    while pos < n:
        match = _SPECIAL.search(value, pos)
        while match is not None and match.group() == '"' and not quotes_open:
            match = _SPECIAL.search(value, match.end())
        if match is None:
            out.append(value[pos:])
            break
        start = match.start()
        out.append(value[pos:start])
        if match.group() == "(":
            end = _skip_comment(value, start)
            if end < 0:
                break
        else:
            end = _skip_quoted(value, start)
            if end < 0:
                quotes_open = False
                out.append('"')
                pos = start + 1
                continue
        out.append(" ")
        pos = end
    return "".join(out)


def message_ids(value: str) -> list[str]:
    """The msg-ids of an In-Reply-To or References value, without brackets.

    Like MimeKit's ``EnumerateReferences``, only bracketed ids count; phrases between
    them (``In-Reply-To: your message of …``) are skipped. Folding inside an id is
    removed. Linear in the input, which is cut to :data:`HEADER_PARSE_BOUND` first.
    """
    value = fix_8bit(bounded_ends(value))
    if "(" in value or '"' in value:
        value = _without_comments_and_quotes(value)
    ids: list[str] = []
    for inner in _MSG_ID.findall(value):
        msg_id = "".join(inner.split())
        if msg_id:
            ids.append(msg_id)
    return ids


def message_id(value: str) -> str:
    """The Message-ID without angle brackets or surrounding white space ("" if none)."""
    ids = message_ids(value)
    if ids:
        return ids[0]
    return "".join(unfold(fix_8bit(bounded(value))).strip("<> \t").split())


# Address-list text parsed per recipient header kind (To, Cc, Bcc): one header at the
# 100 KiB limit, or a thousand mailboxes of a hundred characters; the rest is not parsed.
ADDRESS_LIST_BOUND = 128 * 1024


def mailboxes(values: list[str], *, limit: int | None = None) -> list[tuple[str, str]]:
    """(display name, address) for each mailbox of address-list headers, groups expanded.

    Display names are RFC 2047 decoded after the list is split, so an encoded comma or
    angle bracket cannot break the list apart. Entries without a usable ``local@domain``
    address (empty groups, ``<>``, fragments of garbage) are skipped. At most ``limit``
    mailboxes are returned, and at most :data:`ADDRESS_LIST_BOUND` characters of the
    values are parsed, so the cost is bounded whatever the header holds.
    """
    result: list[tuple[str, str]] = []
    texts = [unfold(fix_8bit(v)) for v in _within(values, ADDRESS_LIST_BOUND)]
    for name, address in _simple_addresses(texts) or _stdlib_addresses(texts):
        address = address.strip()
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain or any(c.isspace() for c in address):
            continue
        if "=?" in name:
            name = decode_rfc2047(bounded(name))
        result.append((name.strip(), address))
        if limit is not None and len(result) >= limit:
            break
    return result


def _within(values: list[str], budget: int) -> list[str]:
    """The leading values that fit in ``budget`` characters, the last one cut to fit."""
    kept: list[str] = []
    for value in values:
        if budget <= 0:
            break
        kept.append(bounded(value, budget))
        budget -= len(value)
    return kept


def _stdlib_addresses(texts: list[str]) -> list[tuple[str, str]]:
    """``getaddresses`` for lists with quoted strings, comments or groups.

    It is linear in its input, but recurses per nested comment or group: text nested
    deeper than the interpreter's recursion limit has no mailboxes to offer.
    """
    try:
        return getaddresses(texts)
    except RecursionError:
        return []


# Characters whose presence needs the full RFC 5322 parser: quoted strings, comments,
# groups, escapes, and route or obsolete syntax.
_COMPLEX_LIST = re.compile(r'["():;\\\[\]]')


def _simple_addresses(texts: list[str]) -> list[tuple[str, str]] | None:
    """``getaddresses``'s answer for plain lists (``Name <a@b>, c@d``), or None.

    The stdlib parser walks the text a character at a time and dominates the cost of a
    typical message; lists with nothing but bare phrases, angle addresses and commas
    are split here instead and give the same pairs. String methods only: each item is
    scanned a fixed number of times, so the split is linear in the text.
    """
    result: list[tuple[str, str]] = []
    for text in texts:
        if _COMPLEX_LIST.search(text) is not None:
            return None
        for item in text.split(","):
            if not item or item.isspace():
                continue
            pair = _simple_mailbox(item.strip())
            if pair is None:
                return None
            result.append(pair)
    return result


def _simple_mailbox(item: str) -> tuple[str, str] | None:
    """``phrase <addr>`` or a bare ``addr`` (no white space), else None."""
    if "<" not in item and ">" not in item:
        return None if _has_space(item) else ("", item)
    opening = item.find("<")
    if opening < 0 or item.count("<") != 1 or item.count(">") != 1 or not item.endswith(">"):
        return None
    phrase = item[:opening]
    address = item[opening + 1 : -1].strip()
    if "@" in phrase or not address or _has_space(address):
        return None
    return " ".join(phrase.split()), address


def _has_space(text: str) -> bool:
    return len(text.split(maxsplit=1)) != 1 or text != text.strip()


def unflow(text: str, *, delete_space: bool) -> str:
    """RFC 3676 format=flowed to plain text, as MimeKit's ``FlowedToText`` renders it.

    Lines ending in a space join the next line of the same quote depth; a leading
    stuffed space is removed; quoted paragraphs are re-prefixed with ``>`` marks. Each
    paragraph ends with "\\n" (the original ran on Linux). A trailing flowed line with
    no final line break is kept rather than dropped.
    """
    lines = re.split(r"\r\n|\r|\n", text)
    if lines and lines[-1] == "":
        lines.pop()
    out: list[str] = []
    para: list[str] = []
    para_depth = -1

    def flush() -> None:
        prefix = ">" * para_depth + " " if para_depth > 0 else ""
        out.append(prefix + "".join(para) + "\n")
        para.clear()

    for line in lines:
        depth = len(line) - len(line.lstrip(">"))
        unquoted = line[depth:]
        if unquoted.startswith(" "):
            unquoted = unquoted[1:]  # after quote marks, or RFC 3676 §4.4 space-stuffing
        if para_depth == -1:
            para_depth = depth
        elif depth != para_depth:
            flush()
            para_depth = depth
        if not unquoted.endswith(" "):
            para.append(unquoted)
            flush()
            para_depth = -1
        else:
            para.append(unquoted[:-1] if delete_space else unquoted)
    if para:
        flush()
    return "".join(out)


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean(value: str) -> str:
    """Make a string storable: lone surrogates become U+FFFD and NULs are dropped.

    PostgreSQL text cannot hold NUL, and lone surrogates cannot be encoded as UTF-8.
    """
    if "\x00" in value:
        value = value.replace("\x00", "")
    if not value.isascii():
        value = _SURROGATE.sub("\ufffd", value)
    return value


def fit(value: str, limit: int) -> str:
    """Clean ``value`` and truncate it to a column of ``limit`` characters."""
    value = clean(value)
    return value if len(value) <= limit else value[:limit]


def fit_references(ids: list[str], limit: int) -> str:
    """Join ids in MimeKit's ``<a> <b>`` form, dropping whole ids to fit ``limit``.

    No ids give ``""``, as the original stored (MimeKit's list is never null; SPEC §5).
    RFC 5322 §3.6.4 suggests that a trimmed References keeps the first id (the thread
    root) and the most recent ones (the parent), so those are the ids kept.
    """
    if not ids:
        return ""
    tokens = [f"<{clean(i)}>" for i in ids]
    joined = " ".join(tokens)
    if len(joined) <= limit:
        return joined
    head = tokens[0]
    if len(head) > limit:
        return head[:limit]
    tail: list[str] = []
    used = len(head)
    for token in reversed(tokens[1:]):
        if used + 1 + len(token) > limit:
            break
        tail.append(token)
        used += 1 + len(token)
    return " ".join([head, *reversed(tail)])
