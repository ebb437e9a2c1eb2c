"""The default report in headless Chromium: every figure renders, no request leaves the page, tables sort.

A copy of ``index.html`` gets a probe script at the top of its head (before the report's content
security policy) that records policy violations and, once the page has loaded, every image's decoded
size, every resource the page fetched, and the order of a table after a click on its header; Chromium's
``--dump-dom`` then prints the page with the probe's findings in an attribute.
"""

import functools
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

import curvlab.zoo
from curvlab_cli.main import cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian package "
                                                         "'chromium', which .ci/run installs when missing)")

PROBE = """<script>
window.curvlabViolations = [];
document.addEventListener("securitypolicyviolation", function (event) {
  window.curvlabViolations.push(event.blockedURI + " " + event.violatedDirective);
});
window.addEventListener("load", function () {
  var table = document.getElementById("table-spectra");
  var column = Array.prototype.findIndex.call(table.tHead.rows[0].cells, function (cell) {
    return cell.textContent === "lambda_max";
  });
  table.tHead.rows[0].cells[column].click();
  var sorted = Array.prototype.map.call(table.tBodies[0].rows, function (row) {
    return parseFloat(row.cells[column].getAttribute("data-sort"));
  });
  document.documentElement.setAttribute("data-probe", JSON.stringify({
    images: Array.prototype.map.call(document.images, function (image) {
      return {alt: image.alt, complete: image.complete, width: image.naturalWidth, height: image.naturalHeight,
              inline: image.src.indexOf("data:image/png;base64,") === 0};
    }),
    resources: performance.getEntriesByType("resource").map(function (entry) { return entry.name; }),
    violations: window.curvlabViolations,
    sorted: sorted,
    sort: table.tHead.rows[0].cells[column].getAttribute("aria-sort")
  }));
});
</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """The built-in model's report from `curvlab compare` (a smaller model; every section and figure)."""
    out = tmp_path_factory.mktemp("browser") / "default"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(curvlab.zoo, "default_problem", functools.partial(
            curvlab.zoo.default_problem, train_steps=20, hidden=8, analysis_examples=64))
        result = CliRunner().invoke(cli, ["compare", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out / "index.html"


def _probe(page: Path, tmp_path: Path) -> dict:
    text = page.read_text(encoding="utf-8")
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("<head>", "<head>\n" + PROBE, 1), encoding="utf-8")
    dump = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--host-resolver-rules=MAP * ~NOTFOUND",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=120)
    found = re.search(r'data-probe="([^"]*)"', dump.stdout)
    assert found, f"the probe did not run; chromium said: {dump.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def test_every_figure_renders_inline_and_no_request_leaves_the_page(report, tmp_path):
    probe = _probe(report, tmp_path)

    assert len(probe["images"]) == 8
    for image in probe["images"]:
        assert image["inline"] and image["complete"], image
        assert image["width"] > 100 and image["height"] > 100, image
    assert probe["resources"] == []
    assert probe["violations"] == []


def test_a_click_on_a_column_header_sorts_the_table_by_value(report, tmp_path):
    probe = _probe(report, tmp_path)

    assert probe["sort"] == "ascending"
    assert len(probe["sorted"]) == 5 and probe["sorted"] == sorted(probe["sorted"])
