"""The README's commands for a fresh machine are the ones CI runs (.ci/run), word for word."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _fresh_machine_commands() -> list[str]:
    """The one-line commands in the README's code blocks under 'On a fresh machine'."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## On a fresh machine", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_developer_and_test_commands() -> None:
    commands = _fresh_machine_commands()
    developer = [c for c in commands if 'pip install -e' in c]
    tests = [c for c in commands if c.endswith("-m pytest")]
    assert len(developer) == 1 and len(tests) == 1, commands
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert developer[0] in ci and tests[0] in ci
    assert ci.index(developer[0]) < ci.index(tests[0])


def test_readme_extras_exist() -> None:
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for command in _fresh_machine_commands():
        for group in re.findall(r'"\.\[([a-z0-9,]+)\]"', command):
            assert set(group.split(",")) <= set(extras), (group, sorted(extras))
