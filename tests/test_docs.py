"""The documentation: the site builds with `mkdocs build --strict` and renders in a real headless browser (Debian's
chromium) with working navigation; every method config has a page that shows it; the README is a short front page
whose links resolve; the Results page keeps every measured table row of the former README; Troubleshooting quotes
real error lines; the API reference's objects have docstrings; every script answers --help."""
import functools
import http.server
import importlib
import inspect
import os
import re
import runpy
import subprocess
import sys
import threading
from urllib.parse import urljoin

import pytest
import yaml

from conftest import ROOT
from test_report import BROWSER_FLAGS, browser

DOCS = ROOT / "docs"
README = ROOT / "README.md"
FORMER_README = "7f90c57"  # the commit whose README.md held every measured table before the docs site
METHODS = sorted(p.stem for p in (ROOT / "configs" / "attrib").glob("*.yaml"))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert r.returncode == 0, r.stderr[-4000:]
    return out, r.stderr


def test_site_builds_strictly(site):
    out, log = site
    assert not [line for line in log.splitlines() if line.startswith(("WARNING", "ERROR"))], log
    for page in ["index.html", "getting-started/index.html", "results/index.html", "reference/api/index.html"]:
        assert (out / page).exists(), page
    api = (out / "reference" / "api" / "index.html").read_text()
    for name in ("load", "attribute", "run", "counterfactual", "evaluate", "report", "Denoiser", "Scores"):
        assert f'id="mucs.api.{name}"' in api, name  # mkdocstrings rendered the reference
    mucs_page = (out / "methods" / "mucs" / "index.html").read_text()
    assert "lr_factor" in mucs_page and "t_sched_infer" in mucs_page  # its config, included as it is


@pytest.fixture(scope="module")
def served(site):
    """The built site over HTTP on a free local port (as a reader's browser sees it)."""
    handler = functools.partial(QuietHandler, directory=str(site[0]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield site[0], f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def load(exe, tmp_path, url):
    """(DOM after the page's scripts ran, the browser's console messages)."""
    out = subprocess.run([exe, *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}",
                          "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout, [line for line in out.stderr.splitlines() if ":CONSOLE" in line]


def test_site_renders_in_chromium_and_its_navigation_reaches_every_method(served, tmp_path):
    exe = browser()
    folder, base = served
    (folder / "console-check.html").write_text('<script>console.error("seen")</script>')
    assert any('"seen"' in m for m in load(exe, tmp_path, base + "console-check.html")[1])  # the check can fail

    dom, console = load(exe, tmp_path, base)
    assert not console, console
    assert '<h1 id="mucs">' in dom
    nav = {m: urljoin(base, href) for href in re.findall(r'href="([^"]+)" class="md-nav__link', dom)
           for m in [href.rstrip("/").rsplit("/", 1)[-1]] if "methods/" in href}
    assert set(METHODS) <= set(nav), f"methods missing from the navigation: {set(METHODS) - set(nav)}"
    for m in METHODS:
        dom, console = load(exe, tmp_path, nav[m])
        assert not console, (m, console)
        assert re.search(rf'<h1 id="{m}">{m}', dom), m
        assert "md-code__button" in dom, m  # Material's script ran: copy buttons on the page's config block


def test_every_method_config_has_a_page_that_shows_it():
    nav = (ROOT / "mkdocs.yml").read_text()
    for m in METHODS:
        page = DOCS / "methods" / f"{m}.md"
        assert page.exists(), f"configs/attrib/{m}.yaml has no docs/methods/{m}.md"
        assert f'--8<-- "configs/attrib/{m}.yaml"' in page.read_text(), f"{page} does not include its config"
        assert f"methods/{m}.md" in nav, f"{page} is not in the navigation of mkdocs.yml"


def links(text):
    return re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)


def test_readme_is_a_short_front_page_whose_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    setup = re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
    assert [line.split("#")[0].strip() for line in setup] == ["bash scripts/demo.sh", "bash scripts/run_tests.sh"]
    assert text.index("bash scripts/demo.sh") < 200  # the two commands come first
    local = [t for t in links(text) if not t.startswith("http")]
    assert "docs/own-images.md" in local and "docs/adding-a-method.md" in local
    for target in local:
        assert (ROOT / target).exists(), f"README links to missing {target}"
    picture = next(ROOT / t for t in local if t.endswith(".png"))
    assert picture.stat().st_size <= 100_000
    assert "## Tests" in text and not re.search(r"this session|previous session|today|we measured", text, re.I)


def unlink(text):
    return re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)


# tables of the former README that describe settings, not measurements, and the page that holds them now
SETTINGS_TABLES = {"| stage | does |": "concepts.md", "| job | model, precond |": "datasets.md",
                   "| preset | subsets x seeds |": "lds-logo.md", "| stage | runs |": "reproducing.md",
                   "| name | scores training item j by |": "methods/index.md",
                   "| setting | default |": "methods/guda.md"}


def test_results_page_keeps_every_measured_table_row_of_the_former_readme():
    r = subprocess.run(["git", "-C", str(ROOT), "show", f"{FORMER_README}:README.md"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"commit {FORMER_README} is not in this clone (shallow?): {r.stderr.strip()[:200]}")
    tables = re.findall(r"((?:^\|.*\|\n)+)", r.stdout, re.M)
    assert len(tables) == 16
    for table in tables:
        header = table.splitlines()[0]
        page = next((p for h, p in SETTINGS_TABLES.items() if header.startswith(h)), "results.md")
        text = unlink((DOCS / page).read_text())
        for row in table.splitlines()[2:]:
            if re.search(r"\d", row):
                assert unlink(row) in text, f"docs/{page} lacks the row {row}"


def test_troubleshooting_quotes_real_error_lines():
    from test_bad_inputs import CASES

    known = [c.words for c in CASES] + [p.read_text() for p in (ROOT / "mucs").rglob("*.py")]
    rows = re.findall(r"^\| (`.*?) \|", (DOCS / "troubleshooting.md").read_text(), re.M)
    assert len(rows) >= 25
    for row in rows:
        for words in re.findall(r"`([^`]+)`", row):
            assert any(words in k for k in known), f"troubleshooting.md quotes {words!r}, which no error line says"


def documented_objects():
    """Every object the API reference pages render: `::: name` with its `members` option, or a module's public
    functions and classes; with the public methods and properties of each class."""
    for page in DOCS.rglob("*.md"):
        for name, options in re.findall(r"^::: (\S+)\n((?:    .*\n)*)", page.read_text(), re.M):
            obj = resolve(name)
            members = (yaml.safe_load(options) or {}).get("options", {}).get("members") if options.strip() else None
            if inspect.ismodule(obj):
                members = members or [n for n, v in vars(obj).items() if not n.startswith("_") and
                                      (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == obj.__name__]
                objs = [(f"{name}.{n}", getattr(obj, n)) for n in members]
            else:
                objs = [(name, obj)]
            for full, o in objs:
                yield full, o
                if inspect.isclass(o):
                    for n, v in vars(o).items():
                        if not n.startswith("_") and (inspect.isfunction(v) or isinstance(v, property)):
                            yield f"{full}.{n}", v


def resolve(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        module, attr = name.rsplit(".", 1)
        return getattr(importlib.import_module(module), attr)


def test_api_reference_objects_have_docstrings():
    objs = dict(documented_objects())
    assert {"mucs.api.attribute", "mucs.attrib.base.Method", "mucs.attrib.base.register", "mucs.diffusion.heun_sampler",
            "mucs.diffusers_adapter.DDPMPrecond"} <= set(objs)
    missing = [n for n, o in objs.items() if not (inspect.getdoc(o) or "").strip()]
    assert not missing, f"no docstring: {missing}"
    # the reference renders docstrings as Markdown, which drops a bare <placeholder> as an HTML tag
    bare = [n for n, o in objs.items() if re.search(r"<[A-Za-z_]", re.sub(r"`[^`]*`", "", inspect.getdoc(o)))]
    assert not bare, f"put <placeholders> in backticks in the docstrings of {bare}"


@pytest.mark.parametrize("script", [str(p.relative_to(ROOT)) for p in sorted((ROOT / "scripts").rglob("*.py"))
                                    if p.name != "common.py"] + ["pipeline.py", "eval.py", "report.py"])
def test_every_script_answers_help(script, monkeypatch, capsys):
    """In this process (torch is imported once): `python <script> --help` prints its usage and exits 0."""
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.syspath_prepend(str((ROOT / script).parent))
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert exit_.value.code in (0, None) and capsys.readouterr().out.startswith("usage:")
