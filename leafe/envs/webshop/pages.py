"""WebShop's pages as text, and where each click leads: a pure state machine over `PageState`.

The pages and buttons are WebShop's (search, results 10 per page with "Next >"/"< Prev", item page
with option buttons, Description/Features/Reviews sub-pages, "Back to Search", "Buy Now"), rendered
in the compact text form agents are prompted with (ReAct's WebShop transcripts): one button per
`[...]`, then a line naming every valid action. Clicks are matched lower-case, as WebShop does.
Every page carries the instruction, as each of WebShop's pages does (ReAct's wrapper cut it from all
but the first; WebShop's own text env keeps it), and the item page shows "Rating: N.A.", as WebShop's
loader never reads ratings. Where the text differs from WebShop's `[SEP]`-joined page text: buttons
are `[...]`, the results page names its query, an empty sub-page says so ("(no reviews)").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from leafe.envs.webshop.data import Product

PAGE_SIZE = 10  # WebShop's PRODUCT_WINDOW
BACK_TO_SEARCH, NEXT, PREV, BUY = "back to search", "next >", "< prev", "buy now"
SUB_PAGES = ("description", "features", "reviews")


@dataclass(frozen=True)
class PageState:
    """Everything that decides the page shown: immutable, so a snapshot is the object itself."""

    page: str = "search"  # search | results | item | sub | done
    query: str = ""
    results: tuple[str, ...] = ()  # ASINs of the search, best first
    page_no: int = 1
    asin: str | None = None
    options: tuple[tuple[str, str], ...] = ()  # chosen (option name, value), in click order
    sub_page: str | None = None
    visited: frozenset[str] = field(default_factory=frozenset)

    @property
    def chosen(self) -> dict[str, str]:
        return dict(self.options)

    def choose(self, name: str, value: str) -> PageState:
        chosen = self.chosen
        chosen[name] = value
        return replace(self, options=tuple(chosen.items()))


def clickables(state: PageState, product: Product | None) -> dict[str, tuple[str, str]]:
    """Lower-case button text -> (kind, argument) for the buttons on the current page."""
    if state.page == "results":
        buttons = {BACK_TO_SEARCH: ("back", "")}
        if state.page_no > 1:
            buttons[PREV] = ("page", str(state.page_no - 1))
        if state.page_no * PAGE_SIZE < len(state.results):
            buttons[NEXT] = ("page", str(state.page_no + 1))
        for asin in page_results(state):
            buttons[asin.lower()] = ("item", asin)
        return buttons
    if state.page == "item" and product is not None:
        buttons = {BACK_TO_SEARCH: ("back", ""), PREV: ("results", "")}
        # One button per value; a value two options share selects the later option, as in WebShop,
        # where the page's radio inputs are keyed by value.
        for name, values in product.options.items():
            for value in values:
                buttons[value] = ("option", name)
        buttons.update({sub: ("sub", sub) for sub in SUB_PAGES})
        buttons[BUY] = ("buy", "")
        return buttons
    if state.page == "sub":
        return {BACK_TO_SEARCH: ("back", ""), PREV: ("item", state.asin or "")}
    return {}


def page_results(state: PageState) -> tuple[str, ...]:
    start = (state.page_no - 1) * PAGE_SIZE
    return state.results[start:start + PAGE_SIZE]


def render(state: PageState, products: dict[str, Product], instruction: str) -> str:
    """The page's text, with the goal's `instruction` at the top, and, last, the line of valid actions."""
    product = products.get(state.asin) if state.asin else None
    lines: list[str] = [f"Instruction: {instruction}"]
    if state.page == "search":
        lines = ["WebShop", *lines, "[Search]"]
    elif state.page == "results":
        lines += ["[Back to Search]", f"Results for: {state.query}",
                  f"Page {state.page_no} (Total results: {len(state.results)})"]
        if state.page_no > 1:
            lines.append("[< Prev]")
        if state.page_no * PAGE_SIZE < len(state.results):
            lines.append("[Next >]")
        for asin in page_results(state):
            item = products[asin]
            lines += [f"[{asin}]", item.title, item.price_tag]
        if not state.results:
            lines.append("No products match this search.")
    elif state.page == "item" and product is not None:
        lines += ["[Back to Search]", "[< Prev]"]
        lines += [f"You have clicked {value}." for _, value in state.options]
        for name, values in product.options.items():
            lines.append(f"{name} " + "".join(f"[{v}]" for v in values))
        lines += [product.title, f"Price: {product.price_tag}", f"Rating: {product.rating}",
                  "[Description]", "[Features]", "[Reviews]", "[Buy Now]"]
    elif state.page == "sub" and product is not None:
        lines += ["[Back to Search]", "[< Prev]", sub_page_text(state.sub_page or "", product)]
    lines.append(valid_actions_line(state, product))
    return "\n".join(lines)


def sub_page_text(sub_page: str, product: Product) -> str:
    if sub_page == "description":
        return product.description or "(no description)"
    if sub_page == "features":
        return "\n".join(product.bullet_points) or "(no features listed)"
    return "(no reviews)"  # the 1000-product data set ships no reviews


def valid_actions_line(state: PageState, product: Product | None) -> str:
    if state.page == "search":
        return "Valid actions: search[<your query>]"
    buttons = clickables(state, product)
    return "Valid actions: " + ", ".join(f"click[{b}]" for b in buttons)
