"""The wiki-markup stripper used for the sample corpus."""

from __future__ import annotations

import io

from data.assets.wikitext import iter_wiki_articles, strip_wiki_markup


def test_strips_markup_and_keeps_prose():
    wiki = (
        "{{Infobox person|name=X|birth={{birth date|1900|1|1}}}}\n"
        "'''Ada''' was a [[mathematician]] and [[Writer (occupation)|writer]].<ref name=a>Cite {{cite|x}}</ref> "
        "She lived in [[London]]<ref>Book</ref>.<ref name=b/>\n"
        "== Early life ==\n"
        "<!-- hidden note -->Born in ''1815'' &ndash; see [http://example.com the site] and [http://bare.org].\n"
        "[[File:Ada.jpg|thumb|A [[portrait]] of Ada]]\n"
        '{| class="wikitable"\n|-\n| cell || {| nested |} \n|}\n'
        '* First item\n# Second <span style="x">item</span>\n'
        "<math>x^2</math>E = mc<sup>2</sup>&nbsp;ok\n"
        "[[Category:Mathematicians]]\n[[de:Ada Lovelace]]\n__NOTOC__"
    )
    text = strip_wiki_markup(wiki)
    assert text == (
        "Ada was a mathematician and writer. She lived in London.\n"
        "Early life\n"
        "Born in 1815 – see the site and .\n\n"
        "First item\nSecond item\nE = mc2 ok"
    )


def test_iter_articles_skips_redirects_other_namespaces_and_stubs():
    body = "Some prose about a topic. " * 20

    def page(title, ns, text, redirect=False):
        red = '<redirect title="T" />' if redirect else ""
        return (
            f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{red}<revision><timestamp>2016-01-01T00:00:00Z"
            f'</timestamp><text xml:space="preserve">{text}</text></revision></page>'
        )

    xml = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
        + page("Good", 0, "'''Good''' " + body + " [[Link|label]] &lt;ref&gt;gone&lt;/ref&gt;")
        + page("Talk:Good", 1, body)
        + page("Redir", 0, "#REDIRECT [[Good]]", redirect=True)
        + page("Stub", 0, "short")
        + "</mediawiki>"
    )
    arts = list(iter_wiki_articles(io.BytesIO(xml.encode())))
    assert [(t, ts) for t, ts, _ in arts] == [("Good", "2016-01-01T00:00:00Z")]
    assert arts[0][2].startswith("Good Some prose") and arts[0][2].endswith("label")


def test_a_double_escaped_ref_is_dropped_with_its_citation():
    # In the dump's XML, &amp;lt;ref&amp;gt; is wikitext "&lt;ref&gt;": a ref only once html-unescaped.
    assert strip_wiki_markup("Prose &lt;ref name=x&gt;Cited book&lt;/ref&gt; goes on.") == "Prose goes on."


def test_a_redirect_tag_alone_skips_a_page_and_only_that_page():
    body = "x" * 196  # 200 characters with "Ok: "

    def page(title, text, redirect=False, timestamp="2016-01-01T00:00:00Z"):
        red = '<redirect title="T" />' if redirect else ""
        stamp = f"<timestamp>{timestamp}</timestamp>" if timestamp else ""
        return f"<page><title>{title}</title><ns>0</ns>{red}<revision>{stamp}<text>Ok: {text}</text></revision></page>"

    xml = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
        + page("Moved", body, redirect=True)
        + page("Exactly 200", body)
        + page("Undated", body, timestamp="")
        + page("Too short", body[1:])
        + "</mediawiki>"
    )
    arts = list(iter_wiki_articles(io.BytesIO(xml.encode())))
    assert [(t, ts, len(text)) for t, ts, text in arts] == [
        ("Exactly 200", "2016-01-01T00:00:00Z", 200),
        ("Undated", "", 200),
    ]
