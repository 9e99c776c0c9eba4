"""WebShop's product data, read from the user's download and cleaned the way WebShop's loader does.

The files are WebShop's own: `items_shuffle_1000.json` (raw products) and `items_ins_v2_1000.json`
(attributes and synthetic instructions per ASIN) for the 1000-product set, or `items_shuffle.json` and
`items_ins_v2.json` for the full set. We never ship or download them: `data_dir` or `$WEBSHOP_DATA`
names the folder. Reviews and ratings are not read, as in WebShop's loader (master), whose review
loading is commented out: every item page shows "Rating: N.A." and no reviews.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from leafe.envs.base import DataStatus, EnvError
from leafe.errors import CorruptFile
from leafe.files import expect, read_json

ENV_VAR = "WEBSHOP_DATA"
#: products= setting -> (products file, attributes/instructions file)
FILES = {
    "1000": ("items_shuffle_1000.json", "items_ins_v2_1000.json"),
    "all": ("items_shuffle.json", "items_ins_v2.json"),
}
#: WebShop prices a product without a price at $100.
NO_PRICE = 100.0


@dataclass(frozen=True)
class Product:
    asin: str
    title: str
    description: str
    bullet_points: tuple[str, ...]
    pricing: tuple[float, ...]  # one price, or the low and high ends of a range
    price_tag: str  # as the page shows it: "$19.99" or "$19.99 to $27.99"
    options: dict[str, tuple[str, ...]]  # option name -> values, both lower case, in file order
    attributes: tuple[str, ...]  # from the attributes file; WebShop's ('DUMMY_ATTR',) when it has none
    category: str
    query: str
    product_category: str
    rating: str
    instruction: str | None  # the synthetic instruction text, when the attributes file has one
    instruction_attributes: tuple[str, ...]


def data_status(data_dir: str | os.PathLike | None = None, products: str = "1000") -> DataStatus:
    """Where WebShop's item files are: `data_dir`, else $WEBSHOP_DATA (the one place that says so)."""
    if products not in FILES:
        raise EnvError(f"webshop products={products!r} is not one of {', '.join(FILES)}")
    names = FILES[products]
    hint = (f"get {names[0]} + {names[1]} from WebShop's data download (its setup.sh) into a folder and "
            f"set ${ENV_VAR} to it or pass data_dir=FOLDER")
    chosen = data_dir or os.environ.get(ENV_VAR)
    if not chosen:
        return DataStatus(False, f"${ENV_VAR} is not set", f"the webshop env needs WebShop's product data: {hint}")
    folder = Path(str(chosen))
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        return DataStatus(False, str(folder), f"{folder} has no {', '.join(missing)}: {hint}")
    return DataStatus(True, str(folder))


def resolve_data_dir(data_dir: str | os.PathLike | None, products: str = "1000") -> Path:
    """The folder with WebShop's item files; the `data_status` line as the error when it has none."""
    return Path(data_status(data_dir, products).require().where)


def data_files(data_dir: Path, products: str) -> tuple[Path, Path]:
    resolve_data_dir(data_dir, products)
    return tuple(data_dir / name for name in FILES[products])  # type: ignore[return-value]


def parse_pricing(raw: str | None) -> tuple[tuple[float, ...], str]:
    """WebShop's reading of a raw price string ('$19.99 - $27.99'): the numbers and the shown tag."""
    prices = []
    for part in (raw or "").split("$")[1:]:
        digits = re.sub(r"[^\d.]", "", part)
        try:
            prices.append(float(Decimal(digits)))
        except InvalidOperation:
            continue
    if not prices:
        return (NO_PRICE,), f"${NO_PRICE}"
    if len(prices) == 1:
        return (prices[0],), f"${prices[0]}"
    return (prices[0], prices[1]), f"${prices[0]} to ${prices[1]}"


def parse_options(raw: dict | str | None) -> dict[str, tuple[str, ...]]:
    """Option names and values lower-cased and '/' shown as ' | ', as WebShop's item page has them."""
    options: dict[str, tuple[str, ...]] = {}
    for name, contents in (raw or {}).items():
        if contents is None:
            continue
        options[name.lower()] = tuple(c["value"].strip().replace("/", " | ").lower() for c in contents)
    return options


def product_from_raw(raw: dict, info: dict | None) -> Product:
    info = info or {}
    bullets = raw.get("small_description") or []
    pricing, price_tag = parse_pricing(raw.get("pricing"))
    return Product(
        asin=raw["asin"],
        title=raw.get("name") or "",
        description=raw.get("full_description") or "",
        bullet_points=tuple(bullets) if isinstance(bullets, list) else (bullets,),
        pricing=pricing,
        price_tag=price_tag,
        options=parse_options(raw.get("customization_options")),
        attributes=tuple(info["attributes"]) if "attributes" in info else ("DUMMY_ATTR",),
        category=raw.get("category") or "",
        query=(raw.get("query") or "").lower().strip(),
        product_category=raw.get("product_category") or "",
        rating="N.A.",  # WebShop's loader leaves every rating out (see above)
        instruction=info.get("instruction"),
        instruction_attributes=tuple(info.get("instruction_attributes") or ()),
    )


@functools.lru_cache(maxsize=4)
def load_products(data_dir: Path, products: str = "1000") -> tuple[Product, ...]:
    """The products in file order (the order goals and the search index follow), without WebShop's
    skipped ASINs ('nan', longer than 10 characters) and repeats. Cached per folder and size."""
    products_path, info_path = data_files(data_dir, products)
    raw_products, infos = read_json(products_path, list), read_json(info_path, dict)
    seen: set[str] = set()
    out = []
    for number, raw in enumerate(raw_products):
        where = f"{products_path}: product {number}"
        asin = expect(expect(raw, dict, where).get("asin", "nan"), str, f"{where}: its asin")
        if asin == "nan" or len(asin) > 10 or asin in seen:
            continue
        seen.add(asin)
        info = _info(infos.get(asin), f"{info_path}: {asin}")
        try:
            out.append(product_from_raw(raw, info))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a field of another type than WebShop's
            raise CorruptFile(f"{products_path}: product {asin} is not in WebShop's format "
                              f"({type(exc).__name__}: {exc}); is it the right file?") from None
    return tuple(out)


def _info(info: object, where: str) -> dict | None:
    """A product's entry of the attributes file, checked: an object whose attribute fields are lists."""
    if info is None:
        return None
    expect(info, dict, where)
    for key in ("attributes", "instruction_attributes"):
        if info.get(key) is not None:
            expect(info[key], list, f"{where}.{key}")
    return info
