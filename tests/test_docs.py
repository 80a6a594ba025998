"""The documentation: the site builds strictly (every link checked), the README's links resolve, the config
reference gives every key with its real default, and the commands page and every command shown match the CLI."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gid.cli import build_parser
from gid.config import DistillConfig, ModelConfig, validate
from gid.frameworks import FRAMEWORKS
from search.config import Finalize, FrameworkSweep, SweepConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = load_hooks()


def build_site(config_file: Path, site_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config_file), "--site-dir", str(site_dir)],
        capture_output=True, text=True, timeout=300, cwd=config_file.parent,
    )


def test_the_docs_site_builds_strictly(tmp_path):
    built = build_site(ROOT / "mkdocs.yml", tmp_path / "site")
    output = built.stdout + built.stderr
    assert built.returncode == 0 and "WARNING" not in output, output
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    pages = [page for entry in nav for page in entry.values()]
    assert sorted(pages) == sorted(["index.md", *(p.name for p in DOCS.glob("*.md"))])  # every page in the nav
    for page in pages:
        assert (tmp_path / "site" / ("" if page == "index.md" else page.removesuffix(".md")) / "index.html").is_file()


def test_a_broken_link_fails_the_build(tmp_path):
    """Strict mode is meaningful: a missing page, file or anchor, inside docs/ or out of it, fails the build."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config.update(docs_dir="docs", hooks=[str(DOCS / "hooks.py")], nav=[{"Home": "index.md"}, {"Page": "page.md"}])
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    (tmp_path / "README.md").write_text("# Home\n\n[a page](docs/page.md#a-heading), [an anchor](docs/page.md#nothing-1)\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(
        "# Page\n\n## A heading\n\n"
        "[no page](missing-page.md), [no file](../missing_file.py), [no anchor](../README.md#nothing-2), "
        "[fine](../README.md#home), [fine too](#a-heading), `[in code](../not-checked.md)`\n\n"
        "```\n[in a block](../not-checked-either.md)\n```\n"
    )
    built = build_site(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = built.stdout + built.stderr
    assert built.returncode != 0
    warnings = [line for line in output.splitlines() if "WARNING" in line]
    for broken in ("missing-page.md", "../missing_file.py", "#nothing-1", "../README.md#nothing-2"):
        assert any(broken in line for line in warnings), (broken, output)
    assert len(warnings) == 4, output  # code is not checked, good links are not reported


def relative_links(path: Path) -> list[str]:
    text = path.read_text()
    targets = [match.group(3) for match in hooks.markdown_links(text)]
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t)]


@pytest.mark.parametrize(
    "markdown", [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "clusters").rglob("*.md"))],
    ids=lambda path: str(path.relative_to(ROOT)),
)
def test_every_relative_link_of_a_markdown_file_outside_the_site_resolves(markdown):
    """README.md (the site's home page too, where mkdocs checks it again), and the recipes beside their files."""
    links = relative_links(markdown)
    assert links or markdown != README
    broken = []
    for target in links:
        path, _, anchor = target.partition("#")
        resolved = (markdown.parent / path).resolve() if path else markdown
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in hooks.heading_ids(resolved.read_text()):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken


def fenced_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def test_ci_runs_exactly_the_readmes_test_command():
    test_command = next(block for block in fenced_blocks(README.read_text()) if "python -m pytest" in block).strip()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == test_command


def test_the_readme_stays_a_front_page():
    assert len(README.read_text().splitlines()) <= 200


# The config reference


#: The reference's words for a default that is None (or, for optuna_storage, computed when the sweep runs).
NONE_IN_WORDS = {
    "none", "from the data", "VOC's 20", "the config file's name", "MLflow's",
    "per framework, by its base config's `distill.balance.mode`", "`sqlite:///<storage_path>/<name>/optuna.db`",
}
#: How the reference names the frameworks (model.variant's default is each framework's own).
FRAMEWORK_NAMES = {"RetinaNet": "retinanet", "FCOS": "fcos", "Faster R-CNN": "faster_rcnn"}


def reference_table(heading: str) -> dict[str, str]:
    """A table of docs/config.md: each key and the text of its default.

    A row may name several keys (``a.b.c``, then ``.d`` or ``d`` for ``a.b.d``) and give their defaults in order,
    comma-separated, or one default for them all.
    """
    section = (DOCS / "config.md").read_text().split(f"\n## {heading}\n")[1].split("\n## ")[0]
    table = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        keys_cell, defaults_cell = (cell.strip() for cell in line.split("|")[1:3])
        first, *more = re.findall(r"`([^`]+)`", keys_cell)
        parent = first.rsplit(".", 1)[0]
        keys = [first] + [key if "." in key.lstrip(".") else f"{parent}.{key.lstrip('.')}" for key in more]
        defaults = re.split(r",\s*(?![^\[]*\])", defaults_cell) if more else [defaults_cell]  # not inside [...]
        if len(defaults) == 1:
            defaults *= len(keys)
        assert len(defaults) == len(keys), line
        table.update(zip(keys, defaults))
    return table


def documented_value(text: str):
    if text in NONE_IN_WORDS:
        return None
    value = yaml.safe_load(text.strip("`"))
    return float(value) if isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?e-?\d+", value) else value  # 1e-4


def leaves(tree: dict, prefix: str = "") -> dict:
    """A nested dict's values by dotted key."""
    out = {}
    for key, value in tree.items():
        out.update(leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_the_config_reference_gives_every_key_with_its_real_default():
    table = reference_table("Config file reference")
    defaults = leaves(validate({"distill": {"teacher": "t.pt"}}).to_dict())
    assert sorted(table) == sorted(defaults)  # every key, and no key the config does not have

    assert table.pop("distill.teacher") == "required" and DistillConfig.model_fields["teacher"].is_required()
    variants = {  # "`v2` RetinaNet, `v1` FCOS and Faster R-CNN"
        FRAMEWORK_NAMES[name]: variant
        for variant, names in re.findall(r"`(\w+)` ([^,`]+)", table.pop("model.variant"))
        for name in names.strip().split(" and ")
    }
    assert variants == {framework: ModelConfig(framework=framework).variant for framework in FRAMEWORKS}
    documented = {key: documented_value(text) for key, text in table.items()}
    assert documented == {key: defaults[key] for key in documented}


def test_the_sweep_file_reference_gives_every_key_with_its_real_default():
    table = reference_table("Sweep file reference")
    sweep = SweepConfig.model_validate({"name": "x", "frameworks": {"fcos": {"config": "c.yaml"}}})
    defaults = {key.replace("frameworks.fcos.", "frameworks.<fw>."): value
                for key, value in leaves(sweep.model_dump(mode="json")).items()}
    assert sorted(table) == sorted(defaults)

    for key, model, field in (("name", SweepConfig, "name"), ("frameworks.<fw>.config", FrameworkSweep, "config")):
        assert table.pop(key) == "required" and model.model_fields[field].is_required()
    documented = {key: documented_value(text) for key, text in table.items()}
    assert documented == {key: defaults[key] for key in documented}
    finalize_row = next(line for line in (DOCS / "config.md").read_text().splitlines() if line.startswith("| `finalize` |"))
    stage = Finalize()  # its keys' defaults, named in its row
    assert f"`top` ({stage.top})" in finalize_row and f"`seeds` ({stage.seeds})" in finalize_row
    assert f"`overrides` (`{stage.overrides}`" in finalize_row


# The commands


def leaf_commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every command that runs (``gid data synth``, ``gid train``, ...) by its prog, with its parser."""
    subparsers = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not subparsers:
        return {parser.prog: parser}
    return {prog: leaf for sub in subparsers[0].choices.values() for prog, leaf in leaf_commands(sub).items()}


def commands_page_sections() -> dict[str, str]:
    text = (DOCS / "commands.md").read_text()
    return {m.group(1): m.group(2) for m in re.finditer(r"^## `(gid [^`]+)`\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)}


def test_the_commands_page_has_every_command_and_exactly_its_options():
    commands, sections = leaf_commands(build_parser()), commands_page_sections()
    assert sorted(sections) == sorted(commands)
    for prog, parser in commands.items():
        options = {option for action in parser._actions for option in action.option_strings} - {"-h", "--help"}
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", sections[prog]))
        assert named == options, prog


def gid_command_lines(text: str) -> list[str]:
    """The `gid ...` command lines of a Markdown text's code blocks, continuation lines joined."""
    lines = []
    for block in fenced_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("gid "):
                lines.append(line)
    return lines


@pytest.mark.parametrize("markdown", [README, *sorted(DOCS.glob("*.md"))], ids=lambda path: path.name)
def test_every_command_shown_is_one_gid_accepts(markdown):
    lines = gid_command_lines(markdown.read_text())
    parser = build_parser()
    for line in lines:
        argv = shlex.split(re.sub(r"\$\([^)]*\)", "FILE", line), comments=True)[1:]  # $(...): one argument
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{markdown.name}: gid does not accept `{line}`")
