"""The README's promises: CI runs exactly its test command."""

import re

from conftest import ROOT


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    test_command = _bash_blocks(readme)[1].strip()
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_quick_start_uses_bundled_sample_data():
    main_job = _bash_blocks((ROOT / "README.md").read_text())[0]
    for path in re.findall(r"sample_data/\S+", main_job):
        assert (ROOT / path).is_file(), path
