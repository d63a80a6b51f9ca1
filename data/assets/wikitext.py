"""Wikipedia XML dump -> plain-text articles (for the bundled sample corpus).

A small regex-based wiki-markup stripper in the spirit of gensim's filter_wiki:
it keeps prose and link labels and drops templates, tables, refs, files,
categories, HTML tags and formatting. It is not a full MediaWiki parser; it only
has to turn a few thousand articles into readable English text.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from typing import IO

_FLAGS = re.DOTALL | re.IGNORECASE
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", _FLAGS)
# Blocks whose content is not prose at all.
_DROP_BLOCKS = re.compile(
    r"<(math|gallery|timeline|score|syntaxhighlight|source|pre|imagemap|chem|hiero)\b[^>]*>.*?</\1\s*>", _FLAGS
)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost template; applied until none left
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL)  # innermost table
_PARAM = re.compile(r"\{\{\{[^{}]*\}\}\}")
_NAMESPACED_LINK = re.compile(
    r"\[\[\s*(?:file|image|category|media|[a-z]{2,3}(?:-[a-z]+)?)\s*:[^\[\]]*\]\]", re.IGNORECASE
)
_LINK_WITH_LABEL = re.compile(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]")
_LINK = re.compile(r"\[\[([^\[\]|]*)\]\]")
_EXT_LINK_LABEL = re.compile(r"\[(?:https?:|ftp:|//)[^\s\]]*\s+([^\]]*)\]")
_EXT_LINK_BARE = re.compile(r"\[(?:https?:|ftp:|//)[^\s\]]*\]")
_TAG = re.compile(r"</?[a-z][a-z0-9]*\b[^<>]*?/?>", re.IGNORECASE)
_HEADING = re.compile(r"^[ \t]*(={1,6})[ \t]*(.*?)[ \t]*\1[ \t]*$", re.MULTILINE)
_BOLD_ITALIC = re.compile(r"'{2,}")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_MAGIC = re.compile(r"__[A-Z]+__")
_HRULE = re.compile(r"^-{4,}\s*$", re.MULTILINE)
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANKS = re.compile(r"\n\s*\n+")


def _until_stable(step: Callable[[str], str], text: str) -> str:
    """Apply `step` until nothing changes (peels nested constructs inside-out)."""
    while True:
        new = step(text)
        if new == text:
            return text
        text = new


def _label_unless_namespaced(link: re.Match[str]) -> str:
    """A plain link's label (group 1); a namespaced one ([[File:...]]) stays for _NAMESPACED_LINK to drop."""
    return link.group(0) if _NAMESPACED_LINK.fullmatch(link.group(0)) else link.group(1)


def _links_once(text: str) -> str:
    # Nested links ([[File:x|a [[b]] c]]): resolve inner plain links first, then drop
    # namespaced ones whose content has no brackets left (repeated by _until_stable).
    text = _LINK_WITH_LABEL.sub(_label_unless_namespaced, text)
    text = _LINK.sub(_label_unless_namespaced, text)
    return _NAMESPACED_LINK.sub("", text)


def strip_wiki_markup(text: str) -> str:
    """Plain text of one article's wikitext."""
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _DROP_BLOCKS.sub("", text)
    text = _PARAM.sub("", text)
    text = _until_stable(lambda t: _TEMPLATE.sub("", t), text)
    text = _until_stable(lambda t: _TABLE.sub("", t), text)
    text = _until_stable(_links_once, text)
    text = _EXT_LINK_LABEL.sub(r"\1", text)
    text = _EXT_LINK_BARE.sub("", text)
    text = html.unescape(text)  # &nbsp; &ndash; ... (after the XML layer's own unescaping)
    text = _DROP_BLOCKS.sub("", text)  # blocks that were written with entities (&lt;math&gt;)
    text = _REF.sub("", text)
    text = _TAG.sub("", text)
    text = _HEADING.sub(r"\2", text)
    text = _BOLD_ITALIC.sub("", text)
    text = _LIST_MARKER.sub("", text)
    text = _MAGIC.sub("", text)
    text = _HRULE.sub("", text)
    # Leftovers of unbalanced markup would otherwise leak in as noise.
    text = text.replace("{{", "").replace("}}", "").replace("[[", "").replace("]]", "")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines)
    return _BLANKS.sub("\n\n", text).strip()


def iter_wiki_articles(xml_file: IO[bytes], min_chars: int = 200) -> Iterator[tuple[str, str, str]]:
    """(title, timestamp, plain text) for each main-namespace, non-redirect article."""
    title: str | None = None
    ns: str | None = None
    timestamp: str | None = None
    text: str | None = None
    redirect = False
    for _event, elem in ET.iterparse(xml_file, events=("end",)):
        tag = elem.tag.rsplit("}", 1)[-1]  # drop the XML namespace
        if tag == "title":
            title = elem.text or ""
        elif tag == "ns":
            ns = elem.text
        elif tag == "redirect":
            redirect = True
        elif tag == "timestamp":
            timestamp = elem.text
        elif tag == "text":
            text = elem.text or ""
        elif tag == "page":
            body = text or ""  # a page without <text> has no prose: stripped to "", below min_chars
            if ns == "0" and not redirect and not body.lstrip().lower().startswith("#redirect"):
                plain = strip_wiki_markup(body)
                if len(plain) >= min_chars:
                    yield title or "", timestamp or "", plain
            title = ns = timestamp = text = None
            redirect = False
            elem.clear()
