"""What an HTML page would load: for the tests that check summary pages are self-contained."""

from __future__ import annotations

from html.parser import HTMLParser


class PageSources(HTMLParser):
    """Every URL a page would load or link (src, href), and how many scripts it has."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.scripts += tag == "script"
        self.urls += [v or "" for k, v in attrs if k in ("src", "href")]


def sources(page: str) -> PageSources:
    """The URLs and script count of `page`."""
    parser = PageSources()
    parser.feed(page)
    return parser
