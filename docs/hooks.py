"""mkdocs hooks (mkdocs.yml ``hooks:``): the README as the site's home page, GitHub's heading ids, and every link
to a file of the repository outside docs/ checked.

mkdocs checks links between pages and their anchors itself. A link out of docs/ (``../benchmarks/results/x.md``,
``../clusters/README.md#gpus-trials-and-nodes``) names no page of the site, so the Markdown keeps it as a link
(GitHub and editors follow it) and these hooks check it instead: the file or folder must exist in the repository,
and an anchor into a Markdown file must name one of its headings. A broken one is a warning, which
``strict: true`` turns into a failed build; a good one is shown in the site as the repository path, in code.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.repo_links")

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[ \t]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n\s*\n).)+?)(?<!`)\1(?!`)", re.DOTALL)
_LINK = re.compile(r"(!?)\[((?:(?!\n\s*\n)[^\[\]])*)\]\(([^()\s]+)\)")
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def github_slug(text: str, separator: str = "-") -> str:
    """A heading's id as GitHub makes it: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", separator)


def _blank(text: str) -> str:
    return re.sub(r"[^\n]", " ", text)


def _masked(markdown: str) -> str:
    """``markdown`` with code blocks and code spans blanked out, every other character where it was."""
    markdown = _FENCE.sub(lambda m: _blank(m.group(0)), markdown)
    return _CODE_SPAN.sub(lambda m: m.group(1) + _blank(m.group(2)) + m.group(1), markdown)


def markdown_links(markdown: str) -> list[re.Match]:
    """The inline links and images of a Markdown text, leaving out what stands in code."""
    return list(_LINK.finditer(_masked(markdown)))


def heading_ids(markdown: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (a repeated one gets -1, -2, ...)."""
    ids: set[str] = set()
    for match in _HEADING.finditer(_masked(markdown)):
        text = markdown[match.start(1):match.end(1)]
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text).replace("`", "").replace("*", "")
        slug, n = github_slug(text), 0
        while (slug if n == 0 else f"{slug}-{n}") in ids:
            n += 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


def on_config(config):
    # Headings get GitHub's ids in the site too, so that one anchor works in both.
    config.mdx_configs.setdefault("toc", {})["slugify"] = github_slug
    return config


def on_files(files, config):
    readme = Path(config.config_file_path).parent / "README.md"
    files.append(File.generated(config, "index.md", abs_src_path=str(readme)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    repo = Path(config.config_file_path).parent.resolve()
    docs = Path(config.docs_dir).resolve()
    source = Path(page.file.abs_src_path).resolve()
    page_dir = (docs / page.file.src_uri).parent
    pieces, end = [], 0
    for match in markdown_links(markdown):
        image, target = match.group(1), match.group(3)
        text = markdown[match.start(2):match.end(2)]
        if _SCHEME.match(target) or target.startswith(("#", "/")):
            continue  # another site's address, or an anchor on this page: mkdocs's own checks
        path, _, anchor = target.partition("#")
        resolved = Path(os.path.normpath(source.parent / path))
        if resolved == docs or docs in resolved.parents:  # a page or file of the site: mkdocs checks it
            new = os.path.relpath(resolved, page_dir).replace(os.sep, "/") + (f"#{anchor}" if anchor else "")
            if path.endswith("/"):
                new = new.rstrip("/") + "/"
            replacement = f"{image}[{text}]({new})"
        else:
            problem = _problem(resolved, anchor, repo)
            if problem:  # said once, here: the path shown below is not a link mkdocs would report again
                log.warning(f"Doc file '{page.file.src_uri}' links to '{target}', {problem}")
                shown = target
            else:
                shown = resolved.relative_to(repo).as_posix() + ("/" if resolved.is_dir() else "")
                shown += f"#{anchor}" if anchor else ""
            code = re.fullmatch(r"`[^`]*`", text.strip())
            replacement = f"`{shown}`" if code or not text.strip() else f"{text} (`{shown}`)"
        pieces += [markdown[end:match.start()], replacement]
        end = match.end()
    return "".join(pieces) + markdown[end:]


def _problem(resolved: Path, anchor: str, repo: Path) -> str | None:
    """What is wrong with a link to a file of the repository outside docs/, or None."""
    if resolved != repo and repo not in resolved.parents:
        return "which is outside the repository"
    if not resolved.exists():
        return "which does not exist"
    if anchor and resolved.suffix == ".md" and anchor not in heading_ids(resolved.read_text(encoding="utf-8")):
        return f"but {resolved.relative_to(repo).as_posix()} has no heading with the anchor '#{anchor}'"
    return None
