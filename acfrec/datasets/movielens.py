"""MovieLens 100K movies joined to plot text: one component per plot sentence.

The plots (``movies_extrainfos.dat``, ``::``-separated, ML-1M ids: id, title, year, rating,
released, genres, director, writers, actors, plot, poster) name movies the IMDb way ("The
Shawshank Redemption"), ML-100K the MovieLens way ("Shawshank Redemption, The", "Postino, Il",
"Seven (Se7en)"). Both sides are reduced to keys that survive those differences:

* accents, case, punctuation and ``&``/``and`` are normalised;
* a trailing article in any of several languages (", The", ", Il", ", Das", ", L'") and a leading
  one are dropped, so "Usual Suspects, The" and "The Usual Suspects" meet;
* every parenthesised part ("(Se7en)", "(a.k.a. ...)", "(Hussard sur le toit, Le)") is an
  alternative title, as is the text outside the parentheses.

A movie matches a plot on (key, year); failing that on (key, year +- 1) when exactly one plot has
that key (release years drift by one between sources). When the ML-1M title list ``movies.dat``
sits next to the plot file (same ids, MovieLens-style titles), its titles are keys too.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from acfrec.data.components import ComponentStore, hashed_bow_sentences
from acfrec.errors import DataValidationError

logger = logging.getLogger(__name__)

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DEFAULT_ITEMS = DEFAULT_DATA / "ml-100k" / "ml-100k.item"
DEFAULT_PLOTS = DEFAULT_DATA / "movie-plots" / "movies_extrainfos.dat"

# Articles that MovieLens moves to the end of a title ("Postino, Il", "Boot, Das").
_ARTICLES = (
    "the a an le la les l il lo gli i un une uno una el los las das der die den det de het ein eine o os as"
).split()
_TRAILING_ARTICLE = re.compile(r",\s*(" + "|".join(_ARTICLES) + r")'?\s*$")
_LEADING_ARTICLE = re.compile(r"^(" + "|".join(_ARTICLES) + r")(\s+|'\s*)")
_PARENTHESISED = re.compile(r"\(([^()]*)\)")
_AKA = re.compile(r"^\s*a\.?k\.?a\.?\s*", re.IGNORECASE)
_SEGMENT = re.compile(r"\s*:\s+|\s+-+\s+")
_YEAR_IN_TITLE = re.compile(r"\s*\((\d{4})\)\s*$")
# A sentence ends at . ! or ? (optionally followed by a closing quote) before a capital or a quote,
# but not after a title ("Mr.") or an initial ("J. R. R. Tolkien").
_NOT_AFTER = "".join(rf"(?<!\b{abbreviation}\.)" for abbreviation in ("Mr", "Ms", "Dr", "St", "Jr", "Sr", "Mrs", "vs"))
_SENTENCE_END = re.compile(r"(?<=[.!?])" + _NOT_AFTER + r"(?<!\b[A-Z]\.)[\"')\]]?\s+(?=[\"'(A-Z0-9])")
_PLOT_FIELDS = 11
_PLOT_COLUMN = 9


def title_keys(title: str) -> list[str]:
    """Normalised keys of a title, best first: the main title, each parenthesised alternative,
    then the segments of those around ``:`` and `` - `` ("Star Wars: Episode V - The Empire
    Strikes Back" -> "empirestrikesback"). Keys keep letters and digits only ("Alien 3" =
    "Alien³", "Jungle2Jungle" = "Jungle 2 Jungle").

    >>> title_keys("Shawshank Redemption, The")
    ['shawshankredemption']
    >>> title_keys("Horseman on the Roof, The (Hussard sur le toit, Le)")
    ['horsemanontheroof', 'hussardsurletoit']
    """
    title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    titles = [_PARENTHESISED.sub(" ", title), *(_AKA.sub("", part) for part in _PARENTHESISED.findall(title))]
    segments = [part for whole in titles for part in _SEGMENT.split(whole) if part != whole]
    keys: list[str] = []
    for part in titles + segments:
        key = _normalise(part)
        if key and key not in keys:
            keys.append(key)
    return keys


def _normalise(title: str) -> str:
    text = title.lower().replace("&", " and ").strip()
    text = _TRAILING_ARTICLE.sub("", text).strip()
    text = _LEADING_ARTICLE.sub("", text, count=1)
    return re.sub(r"[^a-z0-9]+", "", text)


def split_sentences(text: str) -> list[str]:
    """Split a plot into sentences (a regex at ``.``/``!``/``?`` before a capital); blanks dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def read_items(items_file: Path) -> list[tuple[str, str, int | None]]:
    """``(item_id, title, year or None)`` of a RecBole ``ml-100k.item`` file (tab-separated, header)."""
    lines = Path(items_file).read_text(encoding="utf-8").splitlines()
    if not lines or not lines[0].startswith("item_id"):
        raise DataValidationError(f"{items_file}: expected a header starting with 'item_id', got {lines[:1]!r}")
    header = [name.split(":")[0] for name in lines[0].split("\t")]
    missing = {"item_id", "movie_title", "release_year"} - set(header)
    if missing:
        raise DataValidationError(f"{items_file}: missing column(s) {sorted(missing)} in header {header}")
    at = {name: header.index(name) for name in ("item_id", "movie_title", "release_year")}
    out = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataValidationError(f"{items_file}:{number}: {len(fields)} fields, header has {len(header)}")
        title, year = fields[at["movie_title"]], fields[at["release_year"]].strip()
        in_title = _YEAR_IN_TITLE.search(title)  # a few rows carry the year in the title instead
        if not year.isdigit() and in_title:
            title, year = _YEAR_IN_TITLE.sub("", title), in_title.group(1)
        out.append((fields[at["item_id"]], title, int(year) if year.isdigit() else None))
    return out


def read_plots(plots_file: Path) -> dict[str, tuple[str, int | None, str]]:
    """``plot id -> (title, year, plot)`` of ``movies_extrainfos.dat`` (empty and "N/A" plots kept as "")."""
    out = {}
    for number, line in enumerate(Path(plots_file).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("::")
        if len(fields) != _PLOT_FIELDS:
            raise DataValidationError(f"{plots_file}:{number}: {len(fields)} '::'-separated fields, expected {_PLOT_FIELDS}")
        plot = fields[_PLOT_COLUMN].strip()
        year = fields[2].strip()
        out[fields[0]] = (fields[1], int(year) if year.isdigit() else None, "" if plot == "N/A" else plot)
    return out


def _movielens_titles(movies_file: Path) -> Iterable[tuple[str, str, int | None]]:
    """``(id, title, year)`` of an ML-1M ``movies.dat`` ("id::Title (Year)::genres")."""
    for line in movies_file.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split("::")
        if len(fields) == 3:
            found = _YEAR_IN_TITLE.search(fields[1])
            title = _YEAR_IN_TITLE.sub("", fields[1])
            yield fields[0], title, int(found.group(1)) if found else None


def match_plots(items_file: Path = DEFAULT_ITEMS, plots_file: Path = DEFAULT_PLOTS) -> dict[str, str]:
    """``ML-100K item id -> plot id`` for every movie matched to a non-empty plot."""
    plots = {pid: entry for pid, entry in read_plots(plots_file).items() if entry[2]}
    titles = [(pid, title, year) for pid, (title, year, _) in plots.items()]
    movies_file = Path(plots_file).with_name("movies.dat")
    if movies_file.is_file():
        titles += [entry for entry in _movielens_titles(movies_file) if entry[0] in plots]
    by_key: dict[tuple[str, int | None], set[str]] = defaultdict(set)
    by_title: dict[str, set[str]] = defaultdict(set)
    for pid, title, year in titles:
        for key in title_keys(title):
            by_key[key, year].add(pid)
            by_title[key].add(pid)
    matched = {}
    for item_id, title, year in read_items(items_file):
        if year is None:
            continue
        keys = title_keys(title)
        found = next((by_key[k, year] for k in keys if (k, year) in by_key), None)
        if found is None:  # a year off by one, when the title alone is unambiguous
            near = [
                by_title[k] for k in keys
                if len(by_title[k]) == 1 and any((k, year + d) in by_key for d in (-1, 1))
            ]
            found = near[0] if near else None
        if found:
            matched[item_id] = min(found, key=int)
    return matched


def plot_sentences(items_file: Path = DEFAULT_ITEMS, plots_file: Path = DEFAULT_PLOTS) -> dict[str, list[str]]:
    """``ML-100K item id -> plot sentences`` for every movie with a matched, non-empty plot.

    Args:
        items_file: RecBole ``ml-100k.item`` (item_id, movie_title, release_year, class).
        plots_file: ``movies_extrainfos.dat``; ``movies.dat`` beside it adds ML-1M titles as keys.
    """
    for path in (items_file, plots_file):
        if not Path(path).is_file():
            raise DataValidationError(f"plot join: {path} does not exist")
    plots = read_plots(plots_file)
    return {item: split_sentences(plots[pid][2]) for item, pid in match_plots(items_file, plots_file).items()}


def plot_component_store(
    path: str | Path,
    dim: int = 256,
    items_file: Path = DEFAULT_ITEMS,
    plots_file: Path = DEFAULT_PLOTS,
    seed: int = 0,
) -> ComponentStore:
    """Write (atomically) and open a ComponentStore: one hashed bag-of-words ``dim``-vector per plot sentence.

    Only matched movies are in the store; the others take ACF's no-content path when aligned.
    """
    sentences = plot_sentences(items_file, plots_file)
    items = sorted(sentences, key=int)
    matrix, offsets = hashed_bow_sentences([sentences[i] for i in items], dim=dim, seed=seed)
    meta = {
        "encoder": "hashed_bow_sentences",
        "encoder_config": {"dim": dim, "seed": seed},
        "source": {"items": str(items_file), "plots": str(plots_file)},
        "n_matched": len(items),
    }
    logger.info("plot store %s: %d movies, %d sentences", path, len(items), matrix.shape[0])
    return ComponentStore.write(path, items, (matrix, offsets), meta=meta)


__all__ = ["match_plots", "plot_component_store", "plot_sentences", "split_sentences", "title_keys"]
